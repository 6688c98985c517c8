"""CPU routing: enable(device="cpu") puts every later torch CPU tensor in a host pool.

Routing cannot be undone in a process, so nothing here enables it in the
pytest process itself: each check runs in a fresh interpreter. The files of
tests/routed/ run one process each, with routing on from their conftest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROUTED = sorted((Path(__file__).parent / "routed").glob("test_*.py"))
REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize("path", ROUTED, ids=lambda p: p.stem)
def test_routed_file(path):
    """Runs one file of tests/routed/ in its own routed process; its pytest output is the report."""
    env = {**os.environ, "ELLM_ALLOC_ROUTED_SUITE": "1", "ELLM_ALLOC_BUDGET": "4GiB"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert r.returncode == 0, f"{path.name} failed under CPU routing:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"


def test_one_line_enable_puts_cpu_tensors_in_the_pool():
    """The README's one line on a machine without a GPU, in a fresh process."""
    r = run_python("""
        import ellm_alloc; ellm_alloc.enable(); import torch; x = torch.randn(1024, 1024)
        import json
        s = ellm_alloc.memory_stats()
        p = ellm_alloc.device_pool()
        print(json.dumps({"allocated": s["allocated_bytes.all.current"], "device": ellm_alloc.enabled_device(),
                          "in_arena": p.arena_base <= x.data_ptr() < p.arena_base + s["ellm.va_bytes"],
                          "arena_chunks": s["ellm.chunks.arena"], "summary": ellm_alloc.memory_summary()}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["device"] == "cpu"
    assert out["allocated"] >= 4 << 20
    assert out["in_arena"] and out["arena_chunks"] >= 2
    assert out["summary"].startswith("ellm_alloc pool cpu:0")


def test_tensors_made_before_enable_keep_their_memory_and_deleter():
    """A tensor from before enable() is not in the pool and is freed by torch's own allocator."""
    r = run_python("""
        import gc, json, torch, ellm_alloc
        before = torch.arange(1 << 20, dtype=torch.float32)
        ellm_alloc.enable(device="cpu", budget="1GiB")
        after = torch.arange(1 << 20, dtype=torch.float32)
        p = ellm_alloc.device_pool()
        va = p.stats()["va_bytes"]
        inside = lambda t: p.arena_base <= t.data_ptr() < p.arena_base + va
        before_in, after_in = inside(before), inside(after)
        mixed = (before + after).sum().item()   # the two kinds work together
        frees = p.stats()["num_frees"]
        del before; gc.collect()
        freed_by_pool = p.stats()["num_frees"] - frees
        del after; gc.collect()
        print(json.dumps({"before_in": before_in, "after_in": after_in, "mixed": mixed,
                          "freed_by_pool_for_old": freed_by_pool,
                          "freed_by_pool_for_new": p.stats()["num_frees"] - frees - freed_by_pool,
                          "invalid_frees": p.stats()["invalid_frees"]}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert not out["before_in"] and out["after_in"]
    assert out["mixed"] == 2 * sum(range(1 << 20))
    assert out["freed_by_pool_for_old"] == 0  # torch's own deleter freed it
    assert out["freed_by_pool_for_new"] == 1
    assert out["invalid_frees"] == 0


@pytest.mark.parametrize(
    "call, expected",
    [
        ("ellm_alloc.enable(device='tpu')", "ValueError: device must be 'cpu', 'cuda' or None"),
        ("ellm_alloc.enable(device=3)", "TypeError: device must be 'cpu', 'cuda' or None"),
        ("ellm_alloc.enable(device='cuda')", "EnableError: this torch"),
        ("ellm_alloc.enable(device='cpu', budget='lots')", "ValueError: malformed budget"),
        ("ellm_alloc.enable(device='cpu', budget='1MiB')", "EnableError: cannot create the host pool"),
    ],
)
def test_enable_refuses_bad_settings_clearly(call, expected):
    r = run_python(f"""
        import ellm_alloc, torch
        try:
            {call}
        except Exception as e:
            print(f"{{type(e).__name__}}: {{e}}")
        print("enabled:", ellm_alloc.enabled())
        x = torch.ones(4)            # torch still works
        print("sum:", x.sum().item())
    """)
    assert r.returncode == 0, r.stderr
    assert expected in r.stdout, r.stdout
    assert "enabled: False" in r.stdout and "sum: 4.0" in r.stdout


def test_enable_is_idempotent_and_refuses_other_settings():
    r = run_python("""
        import ellm_alloc, torch
        s = ellm_alloc.enable(device="cpu", budget="1GiB")
        assert ellm_alloc.enable(device="cpu", budget="1GiB") == s
        for other in (dict(device="cpu", budget="2GiB"), dict(device="cuda", budget="1GiB")):
            try:
                ellm_alloc.enable(**other)
            except ellm_alloc.EnableError as e:
                print("refused:", "already enabled" in str(e))
        print("device:", ellm_alloc.enabled_device())
    """, env={"ELLM_ALLOC_DEVICE": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused: True") == 2 and "device: cpu" in r.stdout


def test_environment_selects_device_and_budget():
    r = run_python("""
        import ellm_alloc, torch
        s = ellm_alloc.enable()
        print(s.device, ellm_alloc.device_pool().stats()["budget_bytes"])
    """, env={"ELLM_ALLOC_DEVICE": "cpu", "ELLM_ALLOC_BUDGET": "256MiB"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", str(256 << 20)]


def test_bench_cpu_routing_reports_both_allocators_side_by_side():
    """bench cpu-routing on a small workload: both throughputs, their ratio and the fragmentation."""
    r = subprocess.run([sys.executable, "-m", "ellm_alloc.bench", "cpu-routing", "--batch", "2", "--prompt-len",
                        "16", "--new-tokens", "4", "--rounds", "1", "--runs", "1", "--json"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["tokens_per_s_native"] > 0 and out["tokens_per_s_pool"] > 0
    assert out["throughput_ratio_pool_to_native"] == pytest.approx(
        out["tokens_per_s_pool"] / out["tokens_per_s_native"], rel=1e-3)
    assert out["tokens_identical"]
    assert out["peak_live_bytes"] > 100 << 20  # the model's weights are in the pool
    assert 1.0 <= out["fragmentation_peak_mapped_to_live"] < 1.5
    assert out["torch_mallocs_per_generate"] > 0 and out["invalid_frees"] == 0
    assert "[2/2] pool allocator" in r.stderr  # progress, one line per worker
    assert "ratio pool / native" in r.stdout and out["median_tokens_per_s_pool"] <= out["tokens_per_s_pool"]


def test_bench_cpu_routing_refuses_bad_parameters():
    r = subprocess.run([sys.executable, "-m", "ellm_alloc.bench", "cpu-routing", "--batch", "0"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "batch must be a positive int" in r.stderr


def test_figures_telemetry_and_top_use_the_enabled_cpu_pool():
    """memory_stats / memory_summary / empty_cache, telemetry's default pool and `top` after enable(device='cpu')."""
    r = run_python("""
        import io, json, torch, ellm_alloc
        from ellm_alloc.telemetry import record
        from ellm_alloc.__main__ import run_top
        ellm_alloc.enable(device="cpu", budget="1GiB")
        with record(nvml=False, events=False) as rec:
            x = torch.zeros(8 << 20, dtype=torch.uint8)
            rec.sample("after x")
        del x
        cached = ellm_alloc.memory_stats()["reserved_bytes.all.current"]
        ellm_alloc.empty_cache()
        out = io.StringIO()
        run_top(ellm_alloc.device_pool(), once=True, out=out)
        print(json.dumps({
            "arena_in_sample": rec.samples[-2]["owners"].get("arena", 0),
            "budget_in_sample": rec.samples[-1]["budget"],
            "reserved_before_empty": cached,
            "reserved_after_empty": ellm_alloc.memory_stats()["reserved_bytes.all.current"],
            "top": out.getvalue(),
            "summary": ellm_alloc.memory_summary(),
            "same_pool": ellm_alloc.device_pool() is ellm_alloc.device_pool("cpu"),
        }))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["arena_in_sample"] >= 8 << 20 and out["budget_in_sample"] == 1 << 30
    assert out["reserved_before_empty"] >= 8 << 20 > out["reserved_after_empty"]
    assert "pool host:0" in out["top"] and "arena" in out["top"]
    assert out["summary"].startswith("ellm_alloc pool cpu:0") and out["same_pool"]
