"""Runs the CPU benchmarks and writes their figures, with the conditions, to
benchmarks/results/cpu_*.json.

    python benchmarks/run_cpu.py [replay] [hotpath] [kv] [kvspecs] [kvswap] [generate] [serve] [cpu-routing]   (default: all)
    python benchmarks/run_cpu.py table        # the README's KV table, from the stored results

Every file holds the exact command, the date, the machine (CPU model, cores)
and the torch / transformers / Python versions next to the benchmark's own
JSON (its last output line). Nothing here is edited by hand.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
# Published configs that are not presets: the same spec JSON, never tuned for.
# bench kv's default budget raises itself for a workload's longest request
# (Phi-3-mini has no GQA: one 45K-token document takes 17 GiB).
OUT_OF_SAMPLE_SPECS = ["deepseek-v2-lite-like", "phi3-mini-like", "gemma3-4b-like", "gemma2-9b-like",
                       "command-r7b-like", "gpt-oss-20b-like", "qwen3-8b-like", "llama3.1-70b-like",
                       "mamba-2.8b-like", "qwen3-next-like"]
PRESETS = ["llama3-8b", "gemma3-12b-like", "llama4-scout-like", "jamba-like", "mllama-like",
           "mistral-7b-v0.1", "qwen2.5-7b"]
SWAP_BUDGETS = {"jamba-like": "1GiB"}  # kvswap: where 4 GiB would not preempt
# serve, llama3-8b scaled (4 layers, float32: 32 KiB of KV a token, 8 MiB a
# 256-token block): per shipped trace, the KV budget of both engines, tight
# enough that requests wait for memory (chat: 16 blocks for 40 requests of
# 1-5 blocks; long context: 2 or 3 documents at a time), and its extra
# arguments. A 3.6K-token prompt alone takes over 2 s to prefill on this CPU:
# long context is judged against a 10 s TTFT.
SERVE_RUNS = {"chat": ["--budget", "128MiB", "--timeline", "benchmarks/results/cpu_serve_llama3-8b_chat_timeline.png"],
              "long_context": ["--budget", "256MiB", "--ttft-ms", "10000"]}
# serve --find-max-batch: 2K-token prompts (each takes about a second to
# prefill here), room for four alone (the default budget), 16 output tokens.
SERVE_MAX_BATCH = ["--prompt-len", "2048", "--max-batch-output", "16", "--ttft-ms", "10000"]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": tv, "device": "cpu (host backend)"}


def run(args: list[str], name: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "ellm_alloc.bench", *args, "--json"]
    print("running:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = {"command": "python -m ellm_alloc.bench " + " ".join(args + ["--json"]),
           "env": env or {}, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "report": report}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"cpu_{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def kv_table() -> str:
    """Markdown rows of the README's KV table, read from cpu_kv_*.json."""
    def util(x: dict) -> str:
        if "error" in x:
            return "cannot serve"
        return f"{x['utilisation_time_avg']:.3f} / {x['utilisation_at_peak']:.3f}"

    def each(res: list[dict], key: str) -> str:
        return " / ".join("-" if "error" in x else str(x[key]) for x in res)

    rows = ["| model | workload | budget | ellm_alloc | max-page baseline | static partition "
            "| peak requests (ellm / max-page / static) | preemptions | hit rate (ellm) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in PRESETS + OUT_OF_SAMPLE_SPECS:
        doc = json.loads((OUT / f"cpu_kv_{name}.json").read_text())
        for r in doc["report"]["reports"]:
            by_name = {x["allocator"]: x for x in r["results"]}
            res = [by_name[a] for a in ("ellm", "max-page", "static")]
            ellm = res[0]
            hit = "-" if "error" in ellm else f"{ellm['prefix_hit_rate']:.3f}"
            rows.append(f"| {name} | {r['workload']} | {r['budget_bytes'] >> 30} GiB | "
                        + " | ".join(util(x) for x in res)
                        + f" | {each(res, 'peak_concurrent_requests')} | {each(res, 'preemptions')} | {hit} |")
    return "\n".join(rows)


def swap_table() -> str:
    """Markdown rows of the README's swap-versus-recompute table, read from cpu_kv_swap_*.json."""
    rows = ["| model | budget (device = host) | preemptions (ellm / ellm+swap) | recomputed tokens (ellm / ellm+swap) "
            "| swapped out | steps (ellm / ellm+swap) | wall s (ellm / ellm+swap) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in PRESETS:
        path = OUT / f"cpu_kv_swap_{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())["report"]
        x = {y["allocator"]: y for y in r["results"]}
        e, s = x["ellm"], x["ellm+swap"]
        rows.append(f"| {name} | {r['budget_bytes'] / 2**30:g} GiB | {e['preemptions']} / {s['preemptions']} "
                    f"| {e['recomputed_tokens']} / {s['recomputed_tokens']} | {s['swapped_out_bytes'] / 2**30:.1f} GiB "
                    f"| {e['steps']} / {s['steps']} | {e['wall_s']:.0f} / {s['wall_s']:.0f} |")
    return "\n".join(rows)


def main(parts: list[str]) -> None:
    if parts == ["table"]:
        print(kv_table())
        print()
        print(swap_table())
        return
    parts = parts or ["replay", "hotpath", "kv", "kvswap", "generate", "serve", "cpu-routing"]  # kv includes kvspecs
    if "replay" in parts:
        traces = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "traces").glob("*.trace"))
        run(["replay", *traces], "replay")
    if "hotpath" in parts:
        run(["hotpath"], "hotpath")
    # The KV table's columns. Not ellm+swap: at the default 16 GiB budget its
    # host tier of the same size outgrows this 24 GiB machine (kvswap below
    # measures swap at budgets that preempt).
    table_allocators = ["--allocators", "ellm,max-page,static"]
    if "kv" in parts:
        for preset in PRESETS:
            run(["kv", "--model", preset, *table_allocators], f"kv_{preset}")
    if "kv" in parts or "kvspecs" in parts:
        for spec in OUT_OF_SAMPLE_SPECS:
            run(["kv", "--spec", f"benchmarks/specs/{spec}.json", *table_allocators], f"kv_{spec}")
    if "kvswap" in parts:
        # A preempted request swapped to a host tier as large as the device
        # budget, against dropping and recomputing it; the budget is tight
        # enough for mixed_burst to preempt on every preset (Jamba-like's KV
        # is 4 attention layers and its states: at 4 GiB it never preempts).
        for preset in PRESETS:
            budget = SWAP_BUDGETS.get(preset, "4GiB")
            run(["kv", "--model", preset, "--workload", "benchmarks/workloads/mixed_burst.json", "--budget", budget,
                 "--allocators", "ellm,ellm+swap"], f"kv_swap_{preset}")
    if "generate" in parts:
        # One torch thread: on a small shared machine the thread pool's noise
        # swamps the difference between the caches.
        for preset in ["llama3-8b", "gemma3-12b-like"]:
            run(["generate", "--model", preset, "--batch", "4", "--prompt-len", "128", "--new-tokens", "64",
                 "--repeats", "7", "--find-max-batch", "--budget", "1GiB"], f"generate_{preset}",
                env={"OMP_NUM_THREADS": "1"})
    if "serve" in parts:
        for trace, extra in SERVE_RUNS.items():
            run(["serve", "--model", "llama3-8b", "--trace", f"benchmarks/workloads/serve/{trace}.json", *extra],
                f"serve_llama3-8b_{trace}")
        run(["serve", "--model", "llama3-8b", "--find-max-batch", *SERVE_MAX_BATCH], "serve_llama3-8b_max_batch")
    if "cpu-routing" in parts:
        # The workload on one torch thread: on a small shared machine two
        # OpenMP threads spin against whatever else runs and swamp the difference.
        run(["cpu-routing", "--batch", "8", "--prompt-len", "512", "--new-tokens", "128", "--rounds", "2",
             "--runs", "2", "--threads", "1"], "cpu_routing")


if __name__ == "__main__":
    main(sys.argv[1:])
