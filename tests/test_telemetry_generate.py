"""Telemetry (record, plot_timeline, `python -m ellm_alloc top`), `bench generate`
and the demo, on CPU with host pools and tiny random-weight models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ellm_alloc
from ellm_alloc import Pool
from ellm_alloc.telemetry import record, render_frame

ROOT = Path(__file__).resolve().parents[1]


def test_record_samples_events_and_plot(tmp_path):
    pool = Pool("cpu", budget="64MiB")
    with record(pool) as rec:
        p = pool.malloc(5 << 20)
        rec.sample("mid")
        pool.free(p)
    labels = [s["label"] for s in rec.samples]
    assert labels[0] == "start" and labels[-1] == "end" and "mid" in labels
    assert "Pool.malloc" in labels and "Pool.free" in labels
    mid = next(s for s in rec.samples if s["label"] == "mid")
    assert mid["owners"]["arena"] >= 5 << 20
    assert mid["device"] is None  # no GPU here: the NVML view falls back to None
    for s in rec.samples:  # the ledger: created = free + sum owned
        assert s["created"] == s["free"] + sum(s["owners"].values())
    assert Pool.malloc.__name__ == "malloc"  # hooks removed on exit
    fig = ellm_alloc.plot_timeline(rec, tmp_path / "t.png")
    assert fig is not None and (tmp_path / "t.png").stat().st_size > 1000
    assert "arena" in render_frame(pool)
    pool.close()


def test_record_generate_steps():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from ellm_alloc.hf import ElasticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    cache = ElasticCache(cfg, max_batch_size=2, max_cache_len=1024)
    ids = torch.randint(1, 128, (2, 8))
    with record(cache=cache) as rec:
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6,
                       min_new_tokens=6, do_sample=False, pad_token_id=0,
                       logits_processor=[rec.logits_processor()])
    steps = [s["step"] for s in rec.samples if s["label"] == "step"]
    assert steps == list(range(6))
    assert rec.peak("hf.full") == cache.mapped_bytes() > 0
    assert any(s["label"] == "PageSpace.map" for s in rec.samples)
    cache.close()


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_top_once_and_no_demo():
    r = _run("-m", "ellm_alloc", "top", "--once")
    assert r.returncode == 0, r.stderr
    assert "host-pool demo" in r.stdout and "kv.demo" in r.stdout and "(free chunks)" in r.stdout
    r = _run("-m", "ellm_alloc", "top", "--no-demo")
    assert r.returncode == 0 and "no ellm_alloc pool" in r.stdout


def _generate_json(*args):
    r = _run("-m", "ellm_alloc.bench", "generate", "--batch", "2", "--prompt-len", "24", "--new-tokens", "8",
             "--repeats", "1", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_generate_json():
    pytest.importorskip("transformers")
    out = _generate_json("--model", "llama3-8b", "--max-cache-len", "1024", "--find-max-batch",
                         "--budget", "256MiB")
    c = out["checks"]
    assert c["elastic_within_need_plus_one_chunk_each"]
    assert c["fixed_within_need_plus_one_chunk_each_and_zero_chunk"]
    assert c["fixed_peak_kv_bytes"] == c["elastic_peak_kv_bytes"] + out["chunk_bytes"]  # full layers: + the zero chunk
    assert c["sequences_shorter_than_max_cache_len"] and c["elastic_below_static"]
    assert c["tokens_per_s_ratio_elastic_over_dynamic"] > 0
    assert all(x["model_matches_measured"] for x in out["results"].values())
    mb = out["max_batch"]
    assert mb["model_matches_measured"] and mb["dynamic"] >= mb["elastic"] >= mb["static"] >= 1


def test_bench_generate_sliding_layers():
    pytest.importorskip("transformers")
    # 5 sliding (window 16, so the windows slide) + 1 global layer: the chunk bound and the
    # bytes model hold. (With a window this small each sliding layer still holds a whole
    # chunk per sequence, more than StaticCache's 16-slot buffer: no "below static" here.)
    out = _generate_json("--model", "gemma3-12b-like", "--window", "16", "--max-cache-len", "256")
    assert out["checks"]["elastic_within_need_plus_one_chunk_each"]
    assert out["checks"]["fixed_within_need_plus_one_chunk_each_and_zero_chunk"]
    assert all(x["model_matches_measured"] for x in out["results"].values())


def test_bench_generate_refuses_mamba():
    r = _run("-m", "ellm_alloc.bench", "generate", "--model", "jamba-like")
    assert r.returncode == 2 and "Mamba" in r.stderr


def test_demo_generate_and_trace(tmp_path):
    pytest.importorskip("transformers")
    r = _run("-m", "ellm_alloc.demo", "--batch", "2", "--prompt-len", "16", "--new-tokens", "4",
             "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "ellm_alloc pool host:0" in r.stdout and "StaticCache" in r.stdout
    assert (tmp_path / "timeline.png").is_file()
    r = _run("-m", "ellm_alloc.demo", "--trace")
    assert r.returncode == 0 and "fragmentation" in r.stdout
