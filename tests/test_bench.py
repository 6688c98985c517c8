"""The benchmark front ends: trace parsing, replay figures on the shipped
traces and on generated ones, and the --json contract (last line is one JSON
object). Placement quality is a property of the arena, not a timing, so the
fragmentation bounds are checked here; timings only in the benchmarks."""
from __future__ import annotations

import json
import re
import random
from pathlib import Path

import pytest

from ellm_alloc.bench import __main__ as bench
from ellm_alloc.bench import trace as tr

TRACES = sorted((Path(__file__).parent.parent / "benchmarks" / "traces").glob("*.trace"))
REALISTIC = [t for t in TRACES if not t.name.startswith("random")]
MiB = 1 << 20


def test_traces_are_shipped():
    names = {t.stem for t in TRACES}
    assert {"hf_generate_dynamic", "long_prefill_decode", "mixed_batches", "moe_mix", "random_two_stream"} <= names


@pytest.mark.parametrize("trace", REALISTIC, ids=lambda p: p.stem)
def test_realistic_trace_fragmentation_at_most_1_01(trace):
    r = bench.replay(trace)
    assert r["leaked_blocks"] == 0
    assert r["fragmentation"] <= 1.01, r
    # The arena holds at least what is live: a ratio below 1 would mean a broken ledger.
    assert r["peak_mapped_bytes"] >= r["peak_live_requested_bytes"]


def test_random_two_stream_trace_fragmentation_at_most_1_04():
    r = bench.replay(next(t for t in TRACES if t.stem == "random_two_stream"))
    assert 1.0 <= r["fragmentation"] <= 1.04, r


def _random_trace(path: Path, seed: int, events: int = 6000) -> Path:
    """Random sizes (log-uniform 512 B .. 64 MiB), random lifetimes, two streams."""
    rng = random.Random(seed)
    live: list[int] = []
    lines, nid = [], 0
    for _ in range(events):
        if live and (rng.random() < 0.5 or len(live) > 200):
            lines.append(f"f {live.pop(rng.randrange(len(live)))}")
        else:
            size = int(2 ** rng.uniform(9, 26))
            lines.append(f"a {nid} {size} {rng.randrange(2)}")
            live.append(nid)
            nid += 1
    lines += [f"f {i}" for i in live]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_random_trace_keeps_the_best_fit_advantage(tmp_path, seed):
    """Slabs, per-stream caches and fences must not cost placement quality:
    the arena stays within 2 points of plain VA-first best fit (both vary by
    about that much from one random trace to the next), far below torch's."""
    r = bench.replay(_random_trace(tmp_path / f"r{seed}.trace", seed))
    assert r["leaked_blocks"] == 0
    assert r["fragmentation"] <= r["best_fit_model_fragmentation"] + 0.02, r
    assert r["fragmentation"] <= 1.05, r
    assert r["fragmentation"] < r["torch_caching_model_fragmentation"], r


def _kv_growth_trace(path: Path, layers: int = 32, per_token: int = 8192, prompt: int = 1024,
                     steps: int = 128) -> Path:
    """HF DynamicCache decode: every layer's K and V re-allocated one token larger
    each step (torch.cat), plus the step's activations. Defaults: Llama-3-8B's
    K/V (8 kv heads x 128 dim, bf16) at batch 4 after a 1024-token prompt."""
    lines, nid = [], 0
    kv = {}
    for step in range(steps):
        for layer in range(layers):
            act = nid
            nid += 1
            lines.append(f"a {act} {4 * 4096 * 2 * 3}")  # q/k/v projections of the new token
            for half in range(2):
                lines.append(f"a {nid} {per_token * (prompt + step + 1)}")
                if (layer, half) in kv:
                    lines.append(f"f {kv[(layer, half)]}")
                kv[(layer, half)] = nid
                nid += 1
            lines.append(f"f {act}")
        lines.append(f"a {nid} {4 * 128256 * 4}")  # logits
        lines.append(f"f {nid}")
        nid += 1
    lines += [f"f {i}" for i in kv.values()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generated_kv_growth_trace_fragmentation_at_most_1_01(tmp_path):
    r = bench.replay(_kv_growth_trace(tmp_path / "kv.trace"))
    assert r["fragmentation"] <= 1.01, r
    assert r["fast_path_allocs"] > 0  # same-size K/V of successive layers are served from the cache


@pytest.mark.parametrize("text, match", [
    ("a 1 100\na 1 200\n", "allocated while still live"),
    ("f 3\n", "not live"),
    ("a 1 0\n", "size must be > 0"),
    ("a 1 -5\n", "size must be > 0"),
    ("x 1 2\n", "expected 'a ID BYTES"),
    ("a one 100\n", "invalid literal"),
    ("a 1 100 2 9\n", "expected 'a ID BYTES"),
])
def test_malformed_trace_names_the_line(tmp_path, text, match):
    p = tmp_path / "bad.trace"
    p.write_text("# header\n" + text)
    with pytest.raises(tr.TraceError, match=match) as e:
        tr.parse(p)
    assert "bad.trace:" in str(e.value)


def test_comments_and_blank_lines_are_ignored(tmp_path):
    p = tmp_path / "ok.trace"
    p.write_text("# c\n\na 1 4096 1  # on stream 1\nf 1\n")
    assert tr.parse(p) == [tr.Event("a", 1, 4096, 1), tr.Event("f", 1)]


def test_replay_cli_json_is_the_last_line(tmp_path, capsys):
    p = _random_trace(tmp_path / "t.trace", seed=9, events=400)
    assert bench.main(["replay", str(p), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    for key in ("peak_live_requested_bytes", "peak_mapped_bytes", "fragmentation", "events", "wall_s",
                "best_fit_model_fragmentation", "torch_caching_model_fragmentation"):
        assert key in r
    assert any("fragmentation" in line for line in out[:-1])  # the human report comes first


def test_replay_cli_rejects_a_bad_trace(tmp_path, capsys):
    p = tmp_path / "bad.trace"
    p.write_text("f 1\n")
    assert bench.main(["replay", str(p)]) == 2
    assert "not live" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["replay", str(tmp_path / "missing.trace")])


def test_hotpath_cli_json_reports_both_allocators(capsys):
    assert bench.main(["hotpath", "--iters", "200", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["ns_per_pair_ellm"] > 0 and r["ns_per_pair_glibc"] > 0
    assert r["ratio_to_glibc"] == pytest.approx(r["ns_per_pair_ellm"] / r["ns_per_pair_glibc"], rel=0.01)
    assert r["fast_path_fraction"] > 0.9  # the decode-step mix is served from the caches


def _tiny_workload(tmp_path: Path) -> Path:
    reqs = [{"arrival": i, "prompt": 96, "output": 20, "prefix": "sys", "prefix_len": 64} for i in range(12)]
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({"name": "tiny", "requests": reqs}))
    return p


def test_kv_bench_shares_prefixes_and_reports_every_allocator(tmp_path):
    from ellm_alloc.bench import kv as kvbench
    from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, SlidingWindowSpec

    model = ModelKVSpec("tiny", [FullAttentionSpec(kv_heads=8, head_dim=128, dtype="float32"),
                                 SlidingWindowSpec(kv_heads=8, head_dim=128, dtype="float32", window=128)] * 2)
    r = kvbench.run(model, _tiny_workload(tmp_path), budget=256 * MiB, progress=False)
    res = {x["allocator"]: x for x in r["results"]}
    assert set(res) == {"ellm", "ellm+swap", "max-page", "static"}
    for x in res.values():
        assert 0 < x["utilisation_time_avg"] <= 1.0, x  # shared blocks are counted once in the need
        assert x["peak_concurrent_requests"] >= 1
    # Every request after the first reuses the 64-token system prompt (4 full blocks of 16).
    assert res["ellm"]["prefix_hit_rate"] >= 0.5 * 64 / 96, res["ellm"]


def test_kv_bench_swap_column_swaps_preempted_requests_instead_of_recomputing(tmp_path):
    """A budget that makes ellm preempt: ellm drops and recomputes the
    victims' KV; ellm+swap (host tier as large as the budget) swaps every
    one out and back in, recomputing nothing, and both finish every request."""
    from ellm_alloc.bench import kv as kvbench
    from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, SlidingWindowSpec

    model = ModelKVSpec("tiny", [FullAttentionSpec(kv_heads=8, head_dim=128, dtype="float32"),
                                 SlidingWindowSpec(kv_heads=8, head_dim=128, dtype="float32", window=128)] * 2)
    reqs = [{"arrival": i % 3, "prompt": 300 + 37 * i, "output": 120} for i in range(16)]
    p = tmp_path / "tight.json"
    p.write_text(json.dumps({"name": "tight", "requests": reqs}))
    r = kvbench.run(model, p, budget=32 * MiB, progress=False, allocators=("ellm", "ellm+swap"))
    res = {x["allocator"]: x for x in r["results"]}
    assert set(res) == {"ellm", "ellm+swap"}
    ellm, swap = res["ellm"], res["ellm+swap"]
    assert ellm["preemptions"] > 0 and ellm["recomputed_tokens"] > 0, ellm
    assert ellm["swap_outs"] == ellm["swap_ins"] == ellm["swapped_out_bytes"] == 0
    assert swap["preemptions"] > 0 and swap["recomputed_tokens"] == 0, swap
    assert swap["swap_outs"] == swap["swap_ins"] == swap["preemptions"]
    assert swap["swapped_out_bytes"] >= swap["swap_outs"] * 2 * MiB  # whole chunks move


def test_kv_bench_state_update_modes_differ_only_in_copies(tmp_path, capsys):
    """A hybrid model, whose requests each cross their prompt's state
    checkpoint: out of place (the default) reads each saved state where it is
    and copies nothing; --state-update copy copies one state per crossing.
    Hits and steps are the same, and so are maps and unmaps with states this
    small (a block held one step longer maps nothing); the report names the
    mode."""
    from ellm_alloc.kv import FullAttentionSpec, MambaSpec, ModelKVSpec

    model = ModelKVSpec("hybrid", [FullAttentionSpec(kv_heads=8, head_dim=128, dtype="float32"),
                                   MambaSpec(dtype="float32", conv_shape=(4, 64), ssm_shape=(16, 64))] * 2)
    spec = tmp_path / "hybrid.json"
    model.to_json(spec)
    runs = {}
    for mode in ("out-of-place", "copy"):
        args = ["kv", "--spec", str(spec), "--workload", str(_tiny_workload(tmp_path)), "--budget", "256MiB",
                "--allocators", "ellm", "--json"]
        assert bench.main(args + (["--state-update", mode] if mode == "copy" else [])) == 0
        out = capsys.readouterr().out
        assert f"state update {mode}" in out
        r = json.loads(out.strip().splitlines()[-1])
        assert r["state_update"] == mode.replace("-", "_")
        runs[mode] = r["results"][0]
    oop, copied = runs["out-of-place"], runs["copy"]
    state = 2 * (4 + 16) * 64 * 4  # both Mamba layers
    assert oop["state_bytes_copied"] == 0 and oop["out_of_place_updates"] >= 12
    assert copied["out_of_place_updates"] == 0 and copied["state_bytes_copied"] == oop["out_of_place_updates"] * state
    for key in ("prefix_hit_rate", "steps", "maps", "unmaps"):
        assert oop[key] == copied[key], key


def test_kv_bench_cli_refuses_an_unknown_allocator(tmp_path, capsys):
    assert bench.main(["kv", "--model", "llama3-8b", "--workload", str(_tiny_workload(tmp_path)),
                       "--budget", "1GiB", "--allocators", "ellm,vllm"]) == 2
    err = capsys.readouterr().err
    assert "--allocators: unknown ['vllm']" in err and "ellm+swap" in err


@pytest.mark.parametrize("doc, match", [
    ({"requests": []}, "at least one request"),
    ({"requests": [{"arrival": 0, "prompt": 5}]}, "needs integer"),
    ({"requests": [{"arrival": 0, "prompt": 0, "output": 3}]}, "'prompt' must be between 1 and"),
    ({"requests": [{"arrival": 0, "prompt": 7.5, "output": 3}]}, "'prompt' must be an integer, got 7.5"),
    ({"requests": [{"arrival": 0, "prompt": True, "output": 3}]}, "'prompt' must be an integer"),
    ({"requests": [{"arrival": 0, "prompt": 10**12, "output": 3}]}, "'prompt' must be between 1 and 4194304"),
    ({"requests": [{"arrival": 0, "prompt": 9, "output": 3, "prefix": ["a"], "prefix_len": 4}]},
     "'prefix' must be a string name or null"),
    ({"requests": [{"arrival": 0, "prompt": 9, "output": 3, "prefix": "a", "prefix_len": -4}]},
     "'prefix_len' must be between 0 and"),
    ({"requests": [{"arrival": 0, "prompt": 4_000_000, "output": 3}] * 17}, "more than 16777216 tokens in all"),
    ({"requests": ["not a request"]}, "must be a JSON object"),
    ({"requests": [{"arrival": 0, "prompt": 9, "output": 3, "prefix": "a", "prefix_len": 4.5}]},
     "'prefix_len' must be an integer, got 4.5"),
    ({"requests": [{"arrival": 0.5, "prompt": 9, "output": 3}]}, "'arrival' must be an integer, got 0.5"),
    ({"name": 5, "requests": [{"arrival": 0, "prompt": 9, "output": 3}]}, "'name' must be a string"),
])
def test_malformed_kv_workload_is_refused(tmp_path, doc, match):
    from ellm_alloc.bench import kv as kvbench

    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        kvbench.load_workload(p)


def test_kv_bench_cli_reports_a_malformed_workload_in_one_line(tmp_path, capsys):
    """`bench kv` with a malformed workload exits with status 2 and one 'error:' line naming the
    field, not a traceback."""
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"requests": [{"arrival": 0, "prompt": 9, "output": 3, "prefix": ["a"]}]}))
    assert bench.main(["kv", "--model", "llama3-8b", "--workload", str(p), "--budget", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'prefix' must be a string name or null" in err


def _long_workload(tmp_path: Path, prompt: int) -> Path:
    p = tmp_path / "long.json"
    p.write_text(json.dumps({"name": "long", "requests": [{"arrival": 0, "prompt": prompt, "output": 4},
                                                          {"arrival": 1, "prompt": 64, "output": 4}]}))
    return p


@pytest.mark.parametrize("prompt, budget_gib", [
    (1000, 16),          # 1000 tokens x 64 KiB: far below 16 GiB, the default stands
    (200_000, 25),       # 12.2 GiB alone: twice that, rounded up to a GiB
])
def test_kv_bench_default_budget_holds_the_longest_request(tmp_path, prompt, budget_gib):
    from ellm_alloc.bench import kv as kvbench
    from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec

    model = ModelKVSpec("mha", [FullAttentionSpec(kv_heads=8, head_dim=128, dtype="float32")] * 8)  # 64 KiB/token
    _, items = kvbench.load_workload(_long_workload(tmp_path, prompt))
    assert kvbench.default_budget(model, items) == budget_gib << 30


def test_kv_bench_reports_an_allocator_that_cannot_hold_a_request(tmp_path):
    from ellm_alloc.bench import kv as kvbench
    from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec

    model = ModelKVSpec("mha", [FullAttentionSpec(kv_heads=8, head_dim=128, dtype="float32")] * 2)  # 16 KiB/token
    r = kvbench.run(model, _long_workload(tmp_path, 4000), budget=32 * MiB, progress=False)  # needs 62.6 MiB
    assert r["budget_source"] == "given"
    for x in r["results"]:  # the manager names the limit (pages the space holds) or the budget
        assert re.search(r"does not fit the budget|holds at most", x["error"]), x
