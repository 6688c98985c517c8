"""bench cpu-routing: the same generate() with torch's native CPU allocator and with the pool.

Routing cannot be undone in a process, so each run is a fresh worker process
(`python -m ellm_alloc.bench.cpu_routing MODE PARAMS_JSON`), and the two modes
alternate, round by round, so that drift of the machine hits both alike. Each
worker builds the same random-weight Llama-shaped model (seeded), runs one
warm-up generate() and then the timed ones. The pool worker enables CPU
routing before the model is built, so weights, activations and the KV cache
(transformers' default DynamicCache) all come from the pool.

Reported: tokens/s of each mode, best and median over every timed run, and
their ratios. On a shared machine other work only ever slows a run down, so
the best runs are the figure least disturbed by it, and their ratio is the
headline; the medians are printed beside them. For the pool also: peak mapped
/ peak live bytes of the arena over the timed runs (fragmentation) and the
malloc / free calls torch made through it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

MODES = ("native", "pool")
# A small Llama shape: 4 layers of width 512 with grouped-query attention and Llama's vocabulary.
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def worker(mode: str, batch: int, prompt_len: int, new_tokens: int, runs: int, threads: int,
           budget: str) -> dict:
    if mode == "pool":
        import ellm_alloc

        ellm_alloc.enable(device="cpu", budget=budget)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, MODEL["vocab_size"], (batch, prompt_len), generator=g)

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    first = generate()  # warm-up: caches, thread pools, the arena's chunks
    pool = None
    if mode == "pool":
        pool = ellm_alloc.device_pool()
        pool.reset_peaks()
        before = pool.stats()
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = generate()
        walls.append(time.perf_counter() - t0)
        assert torch.equal(out, first), "generate() is not deterministic across runs"
    report = {"mode": mode, "walls_s": [round(w, 4) for w in walls],
              "tokens_per_s": [round(batch * new_tokens / w, 2) for w in walls],
              "tokens": out[:, prompt_len:].tolist()}
    if pool is not None:
        s = pool.stats()
        report.update(
            peak_mapped_bytes=s["reserved_peak"], peak_live_bytes=s["allocated_peak"],
            torch_mallocs=s["num_allocs"] - before["num_allocs"],
            torch_frees=s["num_frees"] - before["num_frees"],
            fast_path_mallocs=s["fast_allocs"] - before["fast_allocs"],
            chunk_maps=s["chunk_maps"] - before["chunk_maps"],
            chunk_unmaps=s["chunk_unmaps"] - before["chunk_unmaps"],
            invalid_frees=s["invalid_frees"],
        )
    return report


def run(batch: int = 8, prompt_len: int = 512, new_tokens: int = 128, rounds: int = 2, runs: int = 2,
        threads: int | None = None, budget: str = "8GiB", progress=None) -> dict:
    """Alternates native and pool workers for `rounds` rounds, `runs` timed generate() calls each."""
    for name, v in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                    ("rounds", rounds), ("runs", runs)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    import torch

    threads = threads or torch.get_num_threads()
    params = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, threads=threads,
                  budget=budget)
    by_mode: dict[str, list[dict]] = {m: [] for m in MODES}
    total = rounds * len(MODES)
    for r in range(rounds):
        for m in MODES:
            if progress:
                progress(f"[{r * len(MODES) + MODES.index(m) + 1}/{total}] {m} allocator: "
                         f"{runs} timed generate() of batch {batch}, prompt {prompt_len}, {new_tokens} new tokens")
            proc = subprocess.run([sys.executable, "-m", "ellm_alloc.bench.cpu_routing", m, json.dumps(params)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"the {m} worker failed:\n{proc.stderr[-3000:]}")
            by_mode[m].append(json.loads(proc.stdout.splitlines()[-1]))
    every_run = {m: [t for w in by_mode[m] for t in w["tokens_per_s"]] for m in MODES}
    tps = {m: max(every_run[m]) for m in MODES}
    median = {m: statistics.median(every_run[m]) for m in MODES}
    last_pool = by_mode["pool"][-1]
    return {
        "workload": {**params, "model": "random-weight Llama shape", "model_config": MODEL,
                     "dtype": "float32", "cache": "DynamicCache", "rounds": rounds},
        "tokens_per_s_native": tps["native"],
        "tokens_per_s_pool": tps["pool"],
        "throughput_ratio_pool_to_native": round(tps["pool"] / tps["native"], 4),
        "median_tokens_per_s_native": median["native"],
        "median_tokens_per_s_pool": median["pool"],
        "median_throughput_ratio_pool_to_native": round(median["pool"] / median["native"], 4),
        "runs_tokens_per_s": every_run,
        "tokens_identical": all(w["tokens"] == by_mode["native"][0]["tokens"] for m in MODES for w in by_mode[m]),
        "peak_mapped_bytes": last_pool["peak_mapped_bytes"],
        "peak_live_bytes": last_pool["peak_live_bytes"],
        "fragmentation_peak_mapped_to_live": round(last_pool["peak_mapped_bytes"] / last_pool["peak_live_bytes"], 4),
        "torch_mallocs_per_generate": last_pool["torch_mallocs"] // runs,
        "torch_frees_per_generate": last_pool["torch_frees"] // runs,
        "fast_path_fraction": round(last_pool["fast_path_mallocs"] / max(last_pool["torch_mallocs"], 1), 4),
        "chunk_maps_in_timed_runs": last_pool["chunk_maps"],
        "chunk_unmaps_in_timed_runs": last_pool["chunk_unmaps"],
        "invalid_frees": last_pool["invalid_frees"],
    }


def print_report(r: dict) -> None:
    from ..config import human

    w = r["workload"]
    print(f"cpu-routing: generate() of a {w['model']} ({w['model_config']['num_hidden_layers']} layers x "
          f"{w['model_config']['hidden_size']}, {w['dtype']}), batch {w['batch']}, prompt {w['prompt_len']}, "
          f"{w['new_tokens']} new tokens, {w['threads']} threads; {w['rounds']} rounds x {w['runs']} timed runs "
          f"per allocator, alternating")
    print(f"  {'tokens/s':<27}{'best':>10}{'median':>10}   runs")
    for m, label in (("native", "torch native CPU allocator"), ("pool", "ellm_alloc pool")):
        print(f"  {label:<27}{r['tokens_per_s_' + m]:10.1f}{r['median_tokens_per_s_' + m]:10.1f}   "
              f"{r['runs_tokens_per_s'][m]}")
    print(f"  {'ratio pool / native':<27}{r['throughput_ratio_pool_to_native']:10.3f}"
          f"{r['median_throughput_ratio_pool_to_native']:10.3f}   tokens identical: {r['tokens_identical']}")
    print(f"  arena: peak mapped {human(r['peak_mapped_bytes'])} / peak live {human(r['peak_live_bytes'])} "
          f"= {r['fragmentation_peak_mapped_to_live']:.4f}")
    print(f"  torch called malloc {r['torch_mallocs_per_generate']} and free {r['torch_frees_per_generate']} "
          f"times per generate() (fast path {r['fast_path_fraction']:.3f}); chunk maps "
          f"{r['chunk_maps_in_timed_runs']}, unmaps {r['chunk_unmaps_in_timed_runs']} in the timed runs")


if __name__ == "__main__":
    mode, params = sys.argv[1], json.loads(sys.argv[2])
    if mode not in MODES:
        sys.exit(f"mode must be one of {MODES}, got {mode!r}")
    print(json.dumps(worker(mode, **params)))
