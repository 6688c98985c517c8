"""Writes the notebooks of this folder (and, with --execute, runs them in place).

    python notebooks/make_notebooks.py            # write 01_..03_*.ipynb, no outputs
    python notebooks/make_notebooks.py --execute  # write, then execute with nbclient

The notebooks are generated so that their code stays reviewable here as plain
Python; edit this file, not the .ipynb JSON. Each runs on CPU in well under a
minute (host pools, tiny random-weight models, short workloads).
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os, sys
from pathlib import Path
# The checkout (for benchmarks/): ELLM_ALLOC_ROOT, else the notebook folder's parent.
ROOT = Path(os.environ.get("ELLM_ALLOC_ROOT") or
            (Path.cwd() if (Path.cwd() / "benchmarks").is_dir() else Path.cwd().parent))
sys.path.insert(0, str(ROOT))
import ellm_alloc
from IPython.display import Image, display
"""

QUICKSTART = [
    new_markdown_cell("""\
# 01 · Quickstart: one pool for weights, activations and KV

`ellm_alloc.enable()` makes the pool torch's allocator: the CUDA allocator on
a GPU machine, the CPU allocator here (a memfd-backed host pool with real
addresses, the same pool and arena code). From then on the model's weights
and activations are `arena` blocks of the pool, and `ElasticCache` maps its KV
chunks from the same pool as the sequences grow, while
`ellm_alloc.telemetry.record` samples the pool's ledger by owner. A tiny
Llama with random weights (no download) does the generating."""),
    new_code_cell(SETUP),
    new_code_cell("""\
ellm_alloc.enable(budget="2GiB")   # CUDA when torch has a GPU, else CPU; before the model is built
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from ellm_alloc.hf import ElasticCache
from ellm_alloc.telemetry import record

device = "cuda" if ellm_alloc.enabled_device() == "cuda" else "cpu"   # GPU path: never run on a GPU here
pool = ellm_alloc.device_pool()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64)
model = LlamaForCausalLM(cfg).to(device).eval()
ids = torch.randint(3, cfg.vocab_size, (4, 64), device=device)
cache = ElasticCache(cfg, max_batch_size=4, max_cache_len=4096)   # draws on the same pool
print(ellm_alloc.memory_summary())   # the weights are already in the arena"""),
    new_code_cell("""\
with record(pool, cache=cache) as rec:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0,
                             logits_processor=[rec.logits_processor()])
print("generated", tuple(out.shape), "samples", len(rec.samples))
print("KV mapped", cache.mapped_bytes() >> 20, "MiB for", cache.needed_bytes() >> 10, "KiB of tokens")
print(ellm_alloc.memory_summary())"""),
    new_code_cell("""\
fig = ellm_alloc.plot_timeline(rec, "quickstart_timeline.png")
display(Image("quickstart_timeline.png"))"""),
    new_code_cell("""\
cache.close()   # every KV chunk goes back to the pool, ready for activations or another cache
print(ellm_alloc.memory_summary())"""),
]

FRAGMENTATION = [
    new_markdown_cell("""\
# 02 · Fragmentation on recorded allocation traces

Each shipped trace (see `benchmarks/traces/README.md`) is replayed through the
arena on a host pool. *Fragmentation* is the peak bytes mapped divided by the
peak bytes live; the same trace also runs through a model of plain VA-first
best fit and a model of torch's caching allocator."""),
    new_code_cell(SETUP),
    new_code_cell("""\
from ellm_alloc.bench.__main__ import replay
traces = sorted((ROOT / "benchmarks" / "traces").glob("*.trace"))
rows = [replay(str(t)) for t in traces]
print(f"{'trace':<26}{'events':>8}{'ellm':>9}{'best fit':>10}{'torch':>9}")
for t, r in zip(traces, rows):
    print(f"{t.stem:<26}{r['events']:>8}{r['fragmentation']:>9.4f}"
          f"{r['best_fit_model_fragmentation']:>10.4f}{r['torch_caching_model_fragmentation']:>9.4f}")"""),
    new_code_cell("""\
from matplotlib.figure import Figure
fig = Figure(figsize=(8, 3.8))
ax = fig.add_subplot()
w = 0.27
keys = [("fragmentation", "ellm_alloc arena"), ("best_fit_model_fragmentation", "plain best fit (model)"),
        ("torch_caching_model_fragmentation", "torch caching (model)")]
for i, (k, label) in enumerate(keys):
    ax.bar([j + (i - 1) * w for j in range(len(rows))], [r[k] for r in rows], w, label=label)
ax.set_xticks(range(len(rows)), [t.stem for t in traces], rotation=15, fontsize=8)
ax.set_ylabel("peak mapped / peak live")
ax.set_ylim(0.95, max(r["torch_caching_model_fragmentation"] for r in rows) * 1.05)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("fragmentation.png")
display(Image("fragmentation.png"))"""),
    new_code_cell("""\
r = replay(str(traces[0]), timeline_points=40)
from ellm_alloc.demo import timeline_chart
print(timeline_chart(r["timeline"][::2]))"""),
]

HETEROGENEOUS = [
    new_markdown_cell("""\
# 03 · Heterogeneous KV: presets and utilisation against baselines

The presets carry the published KV shapes of real models (full, sliding,
chunked, Mamba, cross-attention layers). A short slice of the `chat` workload
(24 requests) runs through the KV manager and two baselines on host pools of
the same 8 GiB budget: a single max-page-size allocator (vLLM-style) and a
static per-type partition. Utilisation = bytes the live tokens need / bytes
mapped for KV, averaged over steps."""),
    new_code_cell(SETUP),
    new_code_cell("""\
from ellm_alloc.kv.presets import get_preset, preset_names
from collections import Counter
for name in preset_names():
    spec = get_preset(name)
    kinds = Counter(s.kind for s in spec.layers)
    print(f"{name:<20} {spec.num_layers:>3} layers  " + ", ".join(f"{n} {k}" for k, n in kinds.items()))"""),
    new_code_cell("""\
from ellm_alloc.bench import kv as kvbench
_, items = kvbench.load_workload(ROOT / "benchmarks" / "workloads" / "chat.json")
items = items[:24]
budget = 8 << 30
models = ["llama3-8b", "gemma3-12b-like", "llama4-scout-like"]
modes = ["ellm", "max-page", "static"]
res = {m: {mode: kvbench.run_one(get_preset(m), items, budget, mode) for mode in modes} for m in models}
for m in models:
    print(m, "  ".join(f"{mode} {res[m][mode]['utilisation_time_avg']:.3f}" for mode in modes))"""),
    new_code_cell("""\
from matplotlib.figure import Figure
fig = Figure(figsize=(8, 3.6))
ax = fig.add_subplot()
w = 0.27
for i, mode in enumerate(modes):
    ax.bar([j + (i - 1) * w for j in range(len(models))],
           [res[m][mode]["utilisation_time_avg"] for m in models], w, label=mode)
ax.set_xticks(range(len(models)), models)
ax.set_ylabel("KV utilisation (time average)")
ax.set_ylim(0, 1)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("kv_utilisation.png")
display(Image("kv_utilisation.png"))"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_fragmentation.ipynb": FRAGMENTATION,
    "03_heterogeneous_kv.ipynb": HETEROGENEOUS,
}


def write(directory: Path = HERE) -> list[Path]:
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        path = directory / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def execute(path: Path, timeout: int = 120) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in write():
        if "--execute" in sys.argv[1:]:
            execute(p)
        print(p)
