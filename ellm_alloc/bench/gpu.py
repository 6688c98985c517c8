"""GPU tier benchmark: ellm_alloc against torch's native allocator, with and
without expandable_segments, on the same workload, each in a fresh process.

Figures: malloc/free pair latency through torch (torch.empty + release, so
torch's own overhead is in every column alike), and peak reserved / peak
allocated bytes over an HF generate() workload with mixed batch and prompt
lengths on a random-weight Llama-shaped model. Never run on CPU.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

WORKER = r'''
import json, sys, time, torch
mode = sys.argv[1]
if mode == "ellm":
    import ellm_alloc
    ellm_alloc.enable()
from ellm_alloc.bench.__main__ import DECODE_STEP_MIX
from transformers import LlamaConfig, LlamaForCausalLM

dev = "cuda"
# 1. pair latency: one decode-step layer's tensors, allocated together, released in reverse.
for _ in range(50):
    ts = [torch.empty(n, dtype=torch.uint8, device=dev) for n in DECODE_STEP_MIX]
    del ts
torch.cuda.synchronize()
iters = 2000
t0 = time.perf_counter()
for _ in range(iters):
    ts = [torch.empty(n, dtype=torch.uint8, device=dev) for n in DECODE_STEP_MIX]
    while ts:
        ts.pop()
torch.cuda.synchronize()
pair_ns = (time.perf_counter() - t0) * 1e9 / (iters * len(DECODE_STEP_MIX))

# 2. peaks over a generate() workload.
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000)
model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
torch.cuda.reset_peak_memory_stats()
with torch.no_grad():
    for batch, prompt, new in [(1, 2048, 64), (8, 512, 64), (4, 4096, 32), (16, 256, 64), (2, 8192, 16)]:
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev)
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
torch.cuda.synchronize()
print(json.dumps({
    "mode": mode,
    "pair_ns": pair_ns,
    "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
    "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
}))
'''


def _device_facts() -> dict:
    import torch

    facts = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
             "cuda": torch.version.cuda}
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as e:  # report, do not invent
        facts["driver"] = f"unknown ({e})"
    return facts


def run(out_path: str | None = None) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device")
    results = {}
    for mode, env in (("native", {}), ("expandable", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
                      ("ellm", {})):
        r = subprocess.run([sys.executable, "-c", WORKER, "ellm" if mode == "ellm" else "native"],
                           capture_output=True, text=True, env=dict(os.environ, **env))
        if r.returncode != 0:
            raise SystemExit(f"{mode} worker failed:\n{r.stderr[-3000:]}")
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{mode:>10}: pair {results[mode]['pair_ns']:.0f} ns, peak allocated "
              f"{results[mode]['peak_allocated_bytes'] / 2**20:.0f} MiB, peak reserved "
              f"{results[mode]['peak_reserved_bytes'] / 2**20:.0f} MiB", flush=True)
    for mode, r in results.items():
        r["reserved_over_allocated"] = r["peak_reserved_bytes"] / r["peak_allocated_bytes"]
        r["pair_ratio_to_native"] = r["pair_ns"] / results["native"]["pair_ns"]
    report = {
        **_device_facts(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m ellm_alloc.bench gpu",
        "results": results,
    }
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
