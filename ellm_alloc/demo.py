"""`make demo`: the main job.

Builds a model with Llama-3-8B's KV shape (8 KV heads x 128 per layer) and
random weights, scaled down on CPU (4 layers, hidden 512, float32; see
ellm_alloc.bench.generate for the scaling) and kept at 32 layers in bfloat16
on a GPU, runs generate() with ElasticCache on the pool, then the same
prompts with DynamicCache and StaticCache, and prints the pool's figures and
the three caches' peaks side by side. A timeline of the pool's ledger during
the ElasticCache run is written as a PNG (default demo_output/timeline.png).

The pool is torch's allocator (enable()): the CUDA allocator on a GPU
machine, the CPU allocator otherwise (a memfd-backed host pool), so the
model's weights, its activations and the KV caches share its chunks. The GPU
path has never run on a GPU in this repository.

`--trace [FILE]` instead replays a shipped allocation trace of HF generate()
through a host pool and prints its timeline and fragmentation next to a
model of torch's allocator (the earlier CPU demo).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import human

TRACES = Path(__file__).resolve().parents[1] / "benchmarks" / "traces"
DEFAULT_TRACE = "hf_generate_dynamic.trace"


def timeline_chart(points: list[tuple[int, int, int]], width: int = 50) -> str:
    """Rows of 'event  live-bar  mapped' for a sampled (event, live, mapped) timeline."""
    top = max(m for _, _, m in points) or 1
    rows = [f"{'event':>8}  {'live (#) within mapped (.)':<{width}}  {'live':>10} {'mapped':>10}"]
    for ev, live, mapped in points:
        n_live = round(width * live / top)
        n_mapped = round(width * mapped / top)
        bar = "#" * n_live + "." * max(0, n_mapped - n_live)
        rows.append(f"{ev:>8}  {bar:<{width}}  {human(live):>10} {human(mapped):>10}")
    return "\n".join(rows)


def cpu_demo(trace: Path) -> int:
    from .bench.__main__ import replay

    print(f"No GPU here: replaying {trace.name} through a host pool (memfd-backed, real addresses).")
    r = replay(str(trace), timeline_points=24)
    print()
    print(timeline_chart(r["timeline"]))
    print()
    print(f"events            {r['events']}")
    print(f"peak live         {human(r['peak_live_requested_bytes'])}")
    print(f"peak mapped       {human(r['peak_mapped_bytes'])}   fragmentation {r['fragmentation']:.4f}")
    print(f"torch (model)     {human(r['torch_caching_model_peak_reserved_bytes'])}   "
          f"fragmentation {r['torch_caching_model_fragmentation']:.4f}")
    print(f"fast-path allocs  {r['fast_path_allocs']} of {r['allocs']}; chunk maps {r['chunk_maps']}, "
          f"moves {r['chunk_moves']}; leaked blocks {r['leaked_blocks']}")
    return 0 if r["leaked_blocks"] == 0 else 1


def generate_demo(batch: int, prompt_len: int, new_tokens: int, out_dir: Path, force_cpu: bool) -> int:
    import torch

    import ellm_alloc
    from .bench import generate as gen
    from .telemetry import record

    cuda = torch.cuda.is_available() and not force_cpu
    if cuda:  # GPU path: never run on a GPU in this repository
        ellm_alloc.enable()
        device, dtype, layers = "cuda", torch.bfloat16, 32
        pool = ellm_alloc.device_pool()
    else:  # CPU routing: weights, activations and KV all come from one host pool
        ellm_alloc.enable(device="cpu", budget="2GiB")
        device, dtype, layers = "cpu", torch.float32, 4
        pool = ellm_alloc.device_pool()
    cfg = gen.scaled_config("llama3-8b", layers=layers)
    structure = gen.check_kv_structure("llama3-8b", cfg)
    model = gen.build_model(cfg, device, dtype)
    max_len = max(2048, prompt_len + new_tokens)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    where = torch.cuda.get_device_name() if cuda else "CPU (torch's CPU allocator is the host pool)"
    print(f"Llama-3-8B KV shape, random weights: {structure}, hidden {cfg.hidden_size}, "
          f"{str(dtype).replace('torch.', '')}, on {where}")
    print(f"generate(): batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, max_cache_len {max_len}")

    with record(pool) as rec:
        el = gen.run_generate("elastic", model, cfg, ids, mask, new_tokens, max_len, pool, recorder=rec)
    print()
    print(pool.summary())  # the pool's figures, KV chunks back in the pool after the run
    peak_kv_owners = {n: rec.peak(n) for n in rec.owner_names()}
    print("  peak chunks held during generate(): "
          + ", ".join(f"{n} {human(b)}" for n, b in peak_kv_owners.items()))
    dy = gen.run_generate("dynamic", model, cfg, ids, mask, new_tokens, max_len, pool)
    st = gen.run_generate("static", model, cfg, ids, mask, new_tokens, max_len, pool)
    print()
    print(f"  {'cache':<14}{'peak KV':>12}{'peak total':>13}{'tokens/s':>10}")
    for name, r in (("ElasticCache", el), ("DynamicCache", dy), ("StaticCache", st)):
        print(f"  {name:<14}{human(r['peak_kv_bytes']):>12}{human(r['peak_total_bytes']):>13}"
              f"{r['tokens_per_s']:>10.1f}")
    need = el["needed_bytes_at_peak"]
    print(f"  ElasticCache held {human(el['peak_kv_bytes'])} for {human(need)} of tokens (chunk-rounded per "
          f"layer, K/V and sequence); StaticCache reserved {human(st['peak_kv_bytes'])} for {max_len} tokens "
          "per sequence.")
    print("  (tokens/s: one cold run each, for orientation only; use `python -m ellm_alloc.bench generate`)")
    print("  peak total = the arena's peak allocated bytes (weights, activations, Dynamic/Static KV tensors) "
          "+ ElasticCache's mapped KV")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "timeline.png"
    ellm_alloc.plot_timeline(rec, png, title="ElasticCache generate(): pool chunks by owner")
    print(f"\ntimeline of the pool during the ElasticCache run: {png}")
    pool.validate()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ellm_alloc.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, nargs="?", const=TRACES / DEFAULT_TRACE,
                    help=f"replay an allocation trace instead (default trace: {DEFAULT_TRACE})")
    ap.add_argument("--cpu", action="store_true", help="use a host pool even when a GPU is present")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the timeline PNG")
    args = ap.parse_args(argv)
    if args.trace is not None:
        if not args.trace.is_file():
            print(f"error: trace {args.trace} not found (the demo reads benchmarks/traces/ of a checkout)",
                  file=sys.stderr)
            return 2
        return cpu_demo(args.trace)
    return generate_demo(args.batch, args.prompt_len, args.new_tokens, args.out, args.cpu)


if __name__ == "__main__":
    sys.exit(main())
