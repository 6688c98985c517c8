"""python -m ellm_alloc.bench {replay,hotpath,kv,generate,serve,cpu-routing,gpu,swap} [--json]

replay TRACE   replays an allocation trace through the arena on a host pool and,
               side by side, through models of plain VA-first best fit and of
               torch's caching allocator.
hotpath        times cached malloc/free pairs inside C, ours and glibc's, on
               the same size mix in the same run.
kv             a request workload through the KV manager, a max-page-size
               baseline and a static per-type partition, side by side.
generate       HF generate() on a scaled random-weight model of a preset:
               ElasticCache (growing, and fixed-shape for torch.compile) vs
               DynamicCache vs StaticCache (peak KV and total bytes, tokens/s,
               largest batch within a KV budget).
serve          a request trace (arrival times, prompt and output lengths)
               replayed through transformers' continuous batching, stock and
               made elastic, at one KV budget: output tokens/s, TTFT and TPOT
               percentiles, SLO attainment, preemptions, peak KV bytes.
cpu-routing    the same generate() with torch's native CPU allocator and with
               the pool (enable(device="cpu")), in alternating fresh processes:
               tokens/s of each and their ratio, fragmentation, malloc calls.
gpu            (CUDA only) ours vs torch native vs expandable_segments.
swap           KV pages to the host tier and back: bandwidth each way against a
               plain copy of the same size (memcpy on the host backend,
               cudaMemcpyAsync on CUDA), bit-exact, and a decode step's latency
               while a swap runs beside it (--json PATH writes the report).

With --json the last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from ..config import human, parse_size
from ..pool import Pool
from . import trace as tr
from .kv import ALLOCATORS as KV_ALLOCATORS
from .best_fit_model import BestFitModel
from .torch_model import TorchCachingModel


def replay(path: str, budget: int | None = None, chunk_size: int | None = None,
           timeline_points: int = 0) -> dict:
    """Replays a trace through a fresh host pool. Returns the figures (and a
    sampled timeline of live vs mapped bytes when timeline_points > 0)."""
    events = tr.parse(path)
    peak = tr.peak_live(events)
    budget = budget or max(4 * peak, 1 << 30)
    pool = Pool("cpu", budget=budget, chunk_size=chunk_size)
    ptrs: dict[int, tuple[int, int]] = {}
    every = max(1, len(events) // timeline_points) if timeline_points else 0
    timeline = []
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        if ev.op == "a":
            ptrs[ev.id] = (pool.malloc(ev.size, ev.stream), ev.stream)
        else:
            p, s = ptrs.pop(ev.id)
            pool.free(p, s)
        if every and i % every == 0:
            st = pool.stats()
            timeline.append((i, st["allocated_bytes"], st["reserved_bytes"]))
    wall = time.perf_counter() - t0
    st = pool.stats()
    pool.validate()
    for p, s in ptrs.values():
        pool.free(p, s)
    leaked = pool.close()
    torch_peak = TorchCachingModel().replay(events)
    best_fit_peak = BestFitModel(st["chunk_bytes"]).replay(events)
    out = {
        "trace": str(path),
        "events": len(events),
        "peak_live_requested_bytes": peak,
        "peak_mapped_bytes": st["reserved_peak"],
        "fragmentation": st["reserved_peak"] / peak if peak else 1.0,
        "torch_caching_model_peak_reserved_bytes": torch_peak,
        "torch_caching_model_fragmentation": torch_peak / peak if peak else 1.0,
        "best_fit_model_peak_mapped_bytes": best_fit_peak,
        "best_fit_model_fragmentation": best_fit_peak / peak if peak else 1.0,
        "chunk_bytes": st["chunk_bytes"],
        "fast_path_allocs": st["fast_allocs"],
        "allocs": st["num_allocs"],
        "chunk_maps": st["chunk_maps"],
        "chunk_unmaps": st["chunk_unmaps"],
        "chunk_moves": st["chunk_moves"],
        "cache_flushes": st["cache_flushes"],
        "leaked_blocks": leaked,
        "wall_s": round(wall, 4),
    }
    if timeline_points:
        out["timeline"] = timeline
    return out


# One Llama-3-8B decoder layer's tensors during a batch-8 bf16 decode step,
# plus the step's small bookkeeping tensors and logits: the sizes torch asks
# for in the steady state of serving.
DECODE_STEP_MIX = (
    [8, 64, 64, 512]  # cache_position, position_ids, attention-mask pieces
    + [65536, 131072, 65536]  # input norm: hidden, fp32 upcast, output
    + [65536, 16384, 16384]  # q, k, v projections
    + [2048, 2048, 65536, 16384, 16384]  # rope cos/sin, rotated q, k, v views made contiguous
    + [65536, 65536, 65536]  # attention output, o_proj, residual add
    + [65536, 131072, 65536]  # post-attention norm
    + [229376, 229376, 229376, 229376]  # gate, up, act(gate), act*up
    + [65536, 65536]  # down projection, residual add
    + [4202496]  # lm_head logits (8 x 128256 x fp32), once per step
)


def hotpath(iters: int = 20000, repeats: int = 5, sizes: list[int] | None = None) -> dict:
    from .. import _native as N
    import ctypes

    sizes = sizes or DECODE_STEP_MIX
    arr = (ctypes.c_size_t * len(sizes))(*sizes)
    pool = Pool("cpu", budget="1GiB")
    ours, glibc = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        ours.append(N.lib.ellm_bench_pairs(pool.handle, arr, len(sizes), iters, 0))
        glibc.append(N.lib.ellm_bench_pairs(pool.handle, arr, len(sizes), iters, 1))
    st = pool.stats()
    pool.validate()
    pool.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "ns_per_pair_ellm": round(med(ours), 2),
        "ns_per_pair_glibc": round(med(glibc), 2),
        "ratio_to_glibc": round(med(ours) / med(glibc), 3),
        "runs_ellm": [round(x, 2) for x in ours],
        "runs_glibc": [round(x, 2) for x in glibc],
        "sizes": len(sizes),
        "size_mix_bytes": sum(sizes),
        "iters_per_run": iters,
        "repeats": repeats,
        "fast_path_fraction": round(st["fast_allocs"] / max(1, st["num_allocs"]), 4),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def _print_replay(r: dict) -> None:
    print(f"trace {r['trace']}: {r['events']} events, replayed in {r['wall_s']:.3f} s")
    print(f"  peak live requested   {human(r['peak_live_requested_bytes']):>12}")
    print(f"  peak mapped (ellm)    {human(r['peak_mapped_bytes']):>12}   fragmentation {r['fragmentation']:.4f}")
    print(f"  plain best fit (model){human(r['best_fit_model_peak_mapped_bytes']):>12}"
          f"   fragmentation {r['best_fit_model_fragmentation']:.4f}")
    print(f"  torch caching (model) {human(r['torch_caching_model_peak_reserved_bytes']):>12}"
          f"   fragmentation {r['torch_caching_model_fragmentation']:.4f}")
    print(f"  allocs {r['allocs']} (fast path {r['fast_path_allocs']}), chunk maps {r['chunk_maps']}, "
          f"unmaps {r['chunk_unmaps']}, moves {r['chunk_moves']}, cache flushes {r['cache_flushes']}, "
          f"chunk {human(r['chunk_bytes'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ellm_alloc.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="replay an allocation trace through a host pool")
    rp.add_argument("trace", nargs="+")
    rp.add_argument("--budget", help="pool budget (default: 4 x peak live, at least 1 GiB)")
    rp.add_argument("--chunk-size", help="chunk size (default 2 MiB)")
    rp.add_argument("--json", action="store_true")
    hp = sub.add_parser("hotpath", help="cached malloc/free pair latency vs glibc")
    hp.add_argument("--iters", type=int, default=20000)
    hp.add_argument("--repeats", type=int, default=5)
    hp.add_argument("--json", action="store_true")
    kp = sub.add_parser("kv", help="KV utilisation: ellm vs max-page vs static partition")
    src = kp.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset name (see ellm_alloc.kv.presets)")
    src.add_argument("--spec", help="model spec JSON (schema in the README)")
    kp.add_argument("--workload", action="append", help="workload JSON (default: every shipped one)")
    kp.add_argument("--budget", help="KV pool budget (default 16GiB, or twice the longest request's need "
                                     "when that is more)")
    kp.add_argument("--block-size", type=int, default=16)
    kp.add_argument("--state-checkpoint-tokens", type=int,
                    help="tokens between saved recurrent states (default: the KV manager's, 512)")
    kp.add_argument("--state-update", choices=["out-of-place", "copy"], default="out-of-place",
                    help="how recurrent states reach a fresh block at a checkpoint: read from the old block "
                         "and written to the new one by the kernel (default, as serving engines do), or "
                         "copied (kernels that update a state in place)")
    kp.add_argument("--max-cached-fraction", type=float,
                    help="cached prefix blocks kept, as a fraction of live blocks (default: the KV "
                         "manager's, 0.02; inf keeps them until memory is short)")
    kp.add_argument("--allocators", default=",".join(KV_ALLOCATORS),
                    help="comma-separated columns to run (default: all of %(default)s)")
    kp.add_argument("--json", action="store_true")
    gn = sub.add_parser("generate", help="generate(): ElasticCache (growing, fixed-shape) vs DynamicCache vs StaticCache")
    gn.add_argument("--model", required=True, help="preset name (llama3-8b, gemma3-12b-like, ...)")
    gn.add_argument("--batch", type=int, default=4)
    gn.add_argument("--prompt-len", type=int, default=128)
    gn.add_argument("--new-tokens", type=int, default=64)
    gn.add_argument("--max-cache-len", type=int, help="StaticCache / ElasticCache length (default max(2048, L+N))")
    gn.add_argument("--layers", type=int, help="layers of the scaled model (default: one pattern period, or 4)")
    gn.add_argument("--window", type=int, help="override the sliding window / attention chunk size")
    gn.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default float32 on CPU, bfloat16 on CUDA")
    gn.add_argument("--repeats", type=int, default=3, help="runs per cache, interleaved; median reported")
    gn.add_argument("--find-max-batch", action="store_true", help="largest batch within --budget of KV bytes")
    gn.add_argument("--budget", help="KV byte budget for --find-max-batch, e.g. 1GiB")
    gn.add_argument("--no-progress", action="store_true",
                    help="no progress bar on stderr (it is shown only when stderr is a terminal)")
    gn.add_argument("--json", action="store_true")
    sv = sub.add_parser("serve", help="a request trace through transformers' continuous batching: stock, "
                                          "elastic, elastic with the SLO-aware scheduler")
    sv.add_argument("--model", required=True, help="preset name (llama3-8b, gemma3-12b-like, ...)")
    sv.add_argument("--trace", help="serving trace JSON (shipped: benchmarks/workloads/serve/); not with "
                                    "--find-max-batch")
    sv.add_argument("--find-max-batch", action="store_true",
                    help="instead of a trace: many long prompts at once; the most requests each mode decodes "
                         "together at the budget")
    sv.add_argument("--prompt-len", type=int, help="--find-max-batch's prompt length (default 2048)")
    sv.add_argument("--max-batch-output", type=int, help="--find-max-batch's output tokens per request (default 16)")
    sv.add_argument("--requests", type=int, help="--find-max-batch's request count (default: twice what the "
                                                 "budget holds, plus two)")
    sv.add_argument("--budget", help="KV budget of both modes, e.g. 128MiB (default: half of what the whole "
                                     "trace would hold at once, at least twice its longest request)")
    sv.add_argument("--max-requests", type=int, help="replay only the first N requests by arrival")
    sv.add_argument("--modes", default="stock,elastic,elastic+slo",
                    help="comma-separated modes to run (default: %(default)s)")
    sv.add_argument("--page-size", type=int, help="tokens per KV block, both modes (default 256)")
    sv.add_argument("--max-batch-tokens", type=int, help="tokens per batch, both modes (default 8192)")
    sv.add_argument("--ttft-ms", type=float, help="TTFT target for SLO attainment (default 2000)")
    sv.add_argument("--tpot-ms", type=float, help="TPOT target for SLO attainment (default 200)")
    sv.add_argument("--time-scale", type=float, help="multiplies the trace's arrival times (default 1)")
    sv.add_argument("--layers", type=int, help="layers of the scaled model (default: one pattern period, or 4)")
    sv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default float32 on CPU, bfloat16 on CUDA")
    sv.add_argument("--timeline", metavar="PNG", help="write the elastic mode's pool timeline here "
                                                      "(elastic+slo's: the same name with -slo)")
    sv.add_argument("--json", action="store_true")
    cr = sub.add_parser("cpu-routing", help="generate() with torch's native CPU allocator vs the pool")
    cr.add_argument("--batch", type=int, default=8)
    cr.add_argument("--prompt-len", type=int, default=512)
    cr.add_argument("--new-tokens", type=int, default=128)
    cr.add_argument("--rounds", type=int, default=2, help="alternating native/pool rounds (a process each)")
    cr.add_argument("--runs", type=int, default=2, help="timed generate() calls per process, after a warm-up")
    cr.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    cr.add_argument("--budget", default="8GiB", help="the pool's budget (default 8GiB)")
    cr.add_argument("--json", action="store_true")
    gp = sub.add_parser("gpu", help="GPU tier: ours vs native vs expandable_segments (needs CUDA)")
    gp.add_argument("--out", help="write the report JSON here (e.g. benchmarks/results/gpu_allocator.json)")
    gp.add_argument("--json", action="store_true")
    sw = sub.add_parser("swap", help="host-tier swap bandwidth vs a plain copy, and a decode step beside a swap")
    sw.add_argument("--sizes", nargs="+", metavar="SIZE",
                    help="KV sizes, multiples of the chunk size (default 64MiB 256MiB 1GiB 4GiB; "
                         "a size that cannot fit in memory now is skipped, saying so)")
    sw.add_argument("--device", default="cpu", help="cpu (host backend, default) or cuda[:N]")
    sw.add_argument("--repeats", type=int, default=3, help="timed round trips per size, after a cold one")
    sw.add_argument("--steps", type=int, default=20, help="decode steps timed alone and during each swap direction")
    sw.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write the report (figures and conditions) to PATH; without PATH print it as the last line")
    args = ap.parse_args(argv)

    if args.cmd == "kv":
        from ..kv.presets import get_preset
        from ..kv.spec import ModelKVSpec
        from . import kv as kvbench

        workloads = args.workload or sorted(str(p) for p in kvbench.WORKLOADS.glob("*.json"))
        if not workloads:
            ap.error("no workload given and none shipped under benchmarks/workloads/")
        reports = []
        try:  # a malformed spec, workload or budget is reported in one line, as by `generate`
            model = get_preset(args.model) if args.model else ModelKVSpec.from_json(args.spec)
            budget = parse_size(args.budget, "budget") if args.budget else None
            allocators = tuple(a.strip() for a in args.allocators.split(",") if a.strip())
            unknown = [a for a in allocators if a not in kvbench.ALLOCATORS]
            if unknown or not allocators:
                raise ValueError(f"--allocators: unknown {unknown or 'empty list'}; choose from "
                                 f"{', '.join(kvbench.ALLOCATORS)}")
            for w in workloads:
                r = kvbench.run(model, w, budget, args.block_size,
                                state_checkpoint_tokens=args.state_checkpoint_tokens,
                                max_cached_fraction=args.max_cached_fraction, allocators=allocators,
                                state_update=args.state_update.replace("-", "_"))
                kvbench.print_report(r)
                reports.append(r)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else {"reports": reports}))
        return 0

    if args.cmd == "generate":
        from . import generate as gen

        if args.find_max_batch and not args.budget:
            ap.error("--find-max-batch needs --budget BYTES")
        try:
            r = gen.run(args.model, args.batch, args.prompt_len, args.new_tokens,
                        max_cache_len=args.max_cache_len, layers=args.layers, window=args.window,
                        dtype=args.dtype, repeats=args.repeats, find_max=args.find_max_batch,
                        budget=parse_size(args.budget, "budget") if args.budget else None,
                        progress=not args.no_progress and sys.stderr.isatty())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        gen.print_report(r)
        if args.json:
            print(json.dumps(r))
        return 0

    if args.cmd == "serve":
        from . import serve

        try:
            given = {k: getattr(args, k) for k in ("page_size", "max_batch_tokens", "ttft_ms", "tpot_ms", "time_scale")
                     if getattr(args, k) is not None}  # the others: serve.run's defaults
            say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
            if args.find_max_batch:
                if args.trace or args.max_requests:
                    raise ValueError("--find-max-batch makes its own requests: no --trace or --max-requests")
                sizes = {k: getattr(args, a) for k, a in (("prompt_len", "prompt_len"), ("output", "max_batch_output"),
                                                          ("requests", "requests")) if getattr(args, a) is not None}
                r = serve.find_max_batch(args.model, budget=serve.budget_arg(args.budget),
                                         modes=serve.parse_modes(args.modes), layers=args.layers, dtype=args.dtype,
                                         timeline=args.timeline, progress=say, **sizes, **given)
            else:
                if not args.trace:
                    raise ValueError("--trace is required (or --find-max-batch)")
                if args.prompt_len or args.max_batch_output or args.requests:
                    raise ValueError("--prompt-len, --max-batch-output and --requests go with --find-max-batch")
                r = serve.run(args.model, args.trace, budget=serve.budget_arg(args.budget),
                              max_requests=args.max_requests, modes=serve.parse_modes(args.modes), layers=args.layers,
                              dtype=args.dtype, timeline=args.timeline, progress=say, **given)
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve.print_report(r)
        if args.json:
            print(json.dumps(r))
        return 0

    if args.cmd == "cpu-routing":
        from . import cpu_routing

        try:
            r = cpu_routing.run(args.batch, args.prompt_len, args.new_tokens, args.rounds, args.runs,
                                args.threads, args.budget, progress=lambda m: print(m, file=sys.stderr, flush=True))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cpu_routing.print_report(r)
        if args.json:
            print(json.dumps(r))
        return 0

    if args.cmd == "swap":
        import shlex

        from . import swap

        command = "python -m ellm_alloc.bench " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        try:
            doc = swap.run(args.sizes, args.device, args.repeats, args.steps,
                           progress=lambda m: print(m, file=sys.stderr, flush=True), command=command)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except swap.SwapMismatch as e:  # the swap core lost or changed bytes: loud, and a failing status
            print(f"error: swap round trip is not bit-exact: {e}", file=sys.stderr)
            return 1
        swap.print_report(doc)
        if args.json == "-":
            print(json.dumps(doc))
        elif args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {args.json}")
        return 0

    if args.cmd == "gpu":
        from .gpu import run

        report = run(args.out)
        if args.json:
            print(json.dumps(report))
        return 0

    if args.cmd == "replay":
        results = []
        for path in args.trace:
            if not Path(path).is_file():
                ap.error(f"no such trace: {path}")
            try:
                r = replay(path, parse_size(args.budget, "budget") if args.budget else None,
                           parse_size(args.chunk_size, "chunk_size") if args.chunk_size else None)
            except tr.TraceError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            _print_replay(r)
            results.append(r)
        if args.json:
            print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
        return 0

    r = hotpath(args.iters, args.repeats)
    print(f"hot path: {r['sizes']} sizes per round (one decode-step layer + logits), "
          f"{r['iters_per_run']} rounds x {r['repeats']} runs, timed inside C")
    print(f"  ellm_alloc arena  {r['ns_per_pair_ellm']:8.1f} ns per malloc/free pair")
    print(f"  glibc malloc/free {r['ns_per_pair_glibc']:8.1f} ns per malloc/free pair")
    print(f"  ratio to glibc    {r['ratio_to_glibc']:8.3f}   (fast-path share {r['fast_path_fraction']:.3f})")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
