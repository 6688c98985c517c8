"""`make demo`: the main job.

On a GPU machine: enable() the allocator and run a small HF generate() with
random weights, then print the pool's figures. On a CPU machine: replay a
shipped allocation trace of HF generate through a host pool and print the
pool's timeline and fragmentation next to a model of torch's allocator.
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


def gpu_demo(new_tokens: int) -> int:
    import ellm_alloc

    ellm_alloc.enable()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    print(f"generate(): {tuple(ids.shape)} -> {tuple(out.shape)} on {torch.cuda.get_device_name()}")
    print(ellm_alloc.memory_summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ellm_alloc.demo", description=__doc__)
    ap.add_argument("--trace", type=Path, default=TRACES / DEFAULT_TRACE, help="trace for the CPU demo")
    ap.add_argument("--cpu", action="store_true", help="run the CPU demo even when a GPU is present")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    import torch

    if torch.cuda.is_available() and not args.cpu:
        return gpu_demo(args.new_tokens)
    if not args.trace.is_file():
        print(f"error: trace {args.trace} not found (the demo reads benchmarks/traces/ of a checkout)",
              file=sys.stderr)
        return 2
    return cpu_demo(args.trace)


if __name__ == "__main__":
    sys.exit(main())
