#!/usr/bin/env bash
# The GPU tier in one call, for a lent GPU machine:
#   build -> pytest tests/gpu -> bench gpu -> bench generate (long prompts, largest batch)
#   -> bench serve (chat trace, largest batch)
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh        (the device tool sets $OUT)
#
# That machine has no network: the library is built with the image's cmake and
# nvcc into build/gpu/ and loaded through ELLM_ALLOC_LIB, and everything runs
# under the image's python3 and its torch / transformers (no venv, no pip).
# Logs go to $OUT (default gpu_out/); figures to benchmarks/results/gpu_*.json,
# each with the device, driver, torch version, date and command. A summary
# table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0

step() { printf '\n== %s\n' "$*"; }

step "build (cmake + nvcc)"
if ! { cmake -S . -B build/gpu && cmake --build build/gpu -j; } > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
export ELLM_ALLOC_LIB=$PWD/build/gpu/libellm_alloc_core.so
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$py - <<'EOF' | tee "$out/facts.txt"
import ellm_alloc._native as N, torch, transformers
print(N.build_info(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "|", torch.cuda.get_device_name())
EOF

step "pytest tests/gpu"
timeout 400 $py -m pytest -v -p no:cacheprovider tests/gpu > "$out/pytest_gpu.log" 2>&1 || status=1
grep -E "PASSED|FAILED|ERROR|passed|failed" "$out/pytest_gpu.log" | tail -20

step "bench gpu (native vs expandable_segments vs ellm_alloc)"
timeout 300 $py -m ellm_alloc.bench gpu --out benchmarks/results/gpu_allocator.json \
  > "$out/bench_gpu.log" 2>&1 || status=1
tail -5 "$out/bench_gpu.log"

# save_json LOG DEST CMD...: the report on LOG's last line, with the device,
# driver, torch version, date and command, into DEST.
save_json() {
  $py - "$@" <<'EOF'
import datetime, json, sys
import torch
log, dest, *cmd = sys.argv[1:]
report = json.loads(open(log).read().strip().splitlines()[-1])
try:
    import pynvml
    pynvml.nvmlInit()
    driver = pynvml.nvmlSystemGetDriverVersion()
except Exception as e:  # say so rather than guess
    driver = f"unknown ({e})"
doc = {"device": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
       "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "command": "python " + " ".join(cmd), "report": report}
open(dest, "w").write(json.dumps(doc, indent=1) + "\n")
EOF
}

# bench_json NAME TIMEOUT ARGS...: python ARGS > NAME.log, saved as benchmarks/results/gpu_NAME.json.
bench_json() {
  local name=$1 limit=$2
  shift 2
  if timeout "$limit" $py "$@" > "$out/$name.log" 2> "$out/$name.err"; then
    save_json "$out/$name.log" "benchmarks/results/gpu_$name.json" "$@"
  else
    status=1
    tail -20 "$out/$name.err"
  fi
}

# eLLM's long-context check: an 8B KV shape (all 32 layers, bfloat16) with
# 32K-token prompts; the largest batch whose KV fits 64 GiB, per cache.
step "bench generate, llama3-8b KV shape, 32K prompts"
bench_json generate_llama3-8b_32k 240 -m ellm_alloc.bench generate --model llama3-8b --layers 32 --batch 1 \
  --prompt-len 32768 --new-tokens 32 --repeats 1 --find-max-batch --budget 64GiB --no-progress --json

# eLLM's serving experiments on transformers' continuous batching: (a) stock,
# (b) elastic + FIFO, (c) elastic + SLO-aware scheduler, at one KV budget.
step "bench serve, llama3-8b (all 32 layers), chat trace and the largest batch of 8K prompts"
bench_json serve_llama3-8b_chat 240 -m ellm_alloc.bench serve --model llama3-8b --layers 32 \
  --trace benchmarks/workloads/serve/chat.json --budget 2GiB --tpot-ms 50 --json
bench_json serve_llama3-8b_max_batch 240 -m ellm_alloc.bench serve --model llama3-8b --layers 32 \
  --find-max-batch --prompt-len 8192 --budget 8GiB --json

cp benchmarks/results/gpu_*.json "$out/" 2>/dev/null
step "summary"
$py - <<'EOF'
import glob, json
for path in sorted(glob.glob("benchmarks/results/gpu_*.json")):
    d = json.load(open(path))
    print(path, "|", d.get("device"), "| driver", d.get("driver"), "| torch", d.get("torch"))
    for mode, r in d.get("results", {}).items():
        print(f"  {mode:>10}: pair {r['pair_ns']:.0f} ns ({r['pair_ratio_to_native']:.2f}x native), "
              f"peak reserved / allocated {r['reserved_over_allocated']:.3f}")
    rep = d.get("report", {})
    for cache, r in rep.get("results", {}).items() if "slo" not in rep else ():
        print(f"  {cache:>10}: peak KV {r['peak_kv_bytes'] / 2**30:.2f} GiB, {r['tokens_per_s']:.1f} tok/s")
    if "max_batch" in rep:
        print("  largest batch within the budget:", rep["max_batch"])
    for mode, r in rep.get("results", {}).items() if "slo" in rep else ():
        print(f"  {mode:>12}: {r['output_tokens_per_s']} out tok/s, SLO {r['slo_attainment']}")
EOF
exit $status
