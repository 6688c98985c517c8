"""bench serve: a tiny trace through transformers' continuous batching, stock
and elastic, on the scaled random-weight model (CPU, host pool, no downloads)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from ellm_alloc.bench.__main__ import main  # noqa: E402
from ellm_alloc.bench.serve import TraceError, load_trace  # noqa: E402

# Four requests queued before the engine starts, one arriving while it runs.
# With 16-token pages a 4 MiB budget holds 6 blocks (stock: two sectors are
# trash) or 7 (elastic: one trash block) of the 15 they need at once, so both
# engines make requests wait, preempt and recompute.
TINY = {"name": "tiny", "description": "five short requests", "arrival_unit": "s",
        "requests": [{"arrival": 0, "prompt": 20, "output": 8}, {"arrival": 0, "prompt": 45, "output": 12},
                     {"arrival": 0, "prompt": 30, "output": 10}, {"arrival": 0, "prompt": 60, "output": 6},
                     {"arrival": 0.05, "prompt": 25, "output": 9}]}
MODE_FIELDS = {"engine", "configuration", "wall_s", "steps", "output_tokens", "output_tokens_per_s", "ttft_ms",
               "tpot_ms", "slo_attainment", "preemptions", "offloaded_to_cpu", "recomputed_tokens",
               "peak_kv_bytes", "peak_kv_bytes_in_use", "peak_activation_bytes", "requests"}
STOCK_CONFIG = {"page_size", "num_blocks", "max_batch_tokens", "scheduler_type", "safety_margin",
                "max_memory_percent", "max_requests_per_batch", "allow_block_sharing", "use_async_batching",
                "cpu_offload_space_gib", "cpu_offload", "bytes_per_sector", "num_sectors", "trash_sectors",
                "bytes_per_model_block"}
RATIOS = {"output_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "slo_attainment",
          "peak_kv_bytes", "peak_kv_bytes_in_use", "preemptions"}


def write(tmp_path, doc, name="trace.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_tiny_trace_all_modes_every_field_and_identical_tokens(tmp_path, capsys):
    png = tmp_path / "timeline.png"
    rc = main(["serve", "--model", "llama3-8b", "--trace", write(tmp_path, TINY), "--budget", "4MiB",
               "--page-size", "16", "--json", "--timeline", str(png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(captured.out.strip().splitlines()[-1])
    assert "elastic: 5/5 requests done" in captured.err  # progress goes to stderr

    assert r["modes_run"] == ["stock", "elastic", "elastic+slo"]
    assert r["budget_bytes"] == 4 << 20
    assert r["trace"]["requests"] == 5 and r["trace"]["output_tokens"] == 45
    for mode, x in r["results"].items():
        assert MODE_FIELDS <= set(x), (mode, MODE_FIELDS - set(x))
        assert x["output_tokens"] == 45 and x["output_tokens_per_s"] > 0
        for key in ("ttft_ms", "tpot_ms"):
            assert 0 < x[key]["p50"] <= x[key]["p99"]
        assert 0 <= x["slo_attainment"] <= 1
        assert x["peak_activation_bytes"] is None  # CPU: torch's allocator, not the pool
        assert [q["id"] for q in x["requests"]] == ["r0", "r1", "r2", "r3", "r4"]
        assert x["preemptions"] >= 1  # the budget is tight on purpose
    stock, el, slo = r["results"]["stock"], r["results"]["elastic"], r["results"]["elastic+slo"]
    assert stock["recomputed_tokens"] > 0 and el["recomputed_tokens"] > 0
    # (c) counts its own decisions; every preemption is a swap or a recompute.
    d = slo["decisions"]
    assert slo["preemptions"] == d.get("preempted_swap", 0) + d.get("preempted_recompute", 0)
    assert slo["offloaded_to_cpu"] == d.get("preempted_swap", 0) == d.get("swapped_in", 0)
    assert slo["configuration"]["scheduler_type"] == "ellm_slo"
    assert slo["configuration"]["host_tier_bytes"] == r["budget_bytes"]
    assert STOCK_CONFIG <= set(stock["configuration"])
    offload = stock["configuration"]
    assert offload["cpu_offload_space_gib"] == 0 and "accelerator" in offload["cpu_offload"]
    assert stock["peak_kv_bytes"] == stock["kv_tensor_bytes"] <= r["budget_bytes"]
    assert stock["peak_kv_bytes_in_use"] <= stock["peak_kv_bytes"]
    assert 0 < el["peak_kv_bytes"] <= r["budget_bytes"] and el["kv_maps"] == el["kv_unmaps"] > 0
    assert set(r["elastic_over_stock"]) == RATIOS == set(r["slo_over_stock"])
    # Greedy decoding: the same tokens, request by request, whatever the batches and preemptions.
    assert r["identical_tokens"] == {"requests": 5, "identical": 5, "modes": ["stock", "elastic", "elastic+slo"]}
    assert ([q["tokens_digest"] for q in stock["requests"]] == [q["tokens_digest"] for q in el["requests"]]
            == [q["tokens_digest"] for q in slo["requests"]])
    assert r["timeline"]["path"] == str(png) and png.stat().st_size > 0
    assert any(s.startswith("serve.") for s in r["timeline"]["series"])
    slo_png = tmp_path / "timeline-slo.png"
    assert r["timeline_slo"]["path"] == str(slo_png) and slo_png.stat().st_size > 0
    assert "elastic+slo / stock" in captured.out and "elastic+slo decisions" in captured.out


@pytest.mark.parametrize("doc, problem", [
    ("{not json", "not JSON"),
    ([1, 2], "must be a JSON object"),
    ({"requests": [{"arrival": 0, "prompt": 5, "output": 5}]}, "'arrival_unit' must be \"s\""),
    ({"arrival_unit": "s", "requests": []}, "'requests' must be a non-empty list"),
    ({"arrival_unit": "s", "requests": [{"arrival": 0, "prompt": 5, "output": 5},
                                        {"arrival": 1, "prompt": 5, "output": 0}]},
     "request 1: 'output' must be an int >= 1, got 0"),
    ({"arrival_unit": "s", "requests": [{"arrival": -1, "prompt": 5, "output": 5}]},
     "request 0: 'arrival' must be a number of seconds >= 0, got -1"),
    ({"arrival_unit": "s", "requests": [{"arrival": 0, "prompt": "5", "output": 5}]},
     "request 0: 'prompt' must be an int >= 1, got '5'"),
    ({"arrival_unit": "s", "requests": [{"arrival": 0, "prompt": 5, "output": 5, "prefix": "s"}]},
     "request 0: unknown field(s) 'prefix'"),
    ({"arrival_unit": "s", "requests": [{"id": "a", "arrival": 0, "prompt": 5, "output": 5},
                                        {"id": "a", "arrival": 0, "prompt": 5, "output": 5}]},
     "request 1: duplicate id 'a'"),
])
def test_malformed_trace_is_refused_in_one_line(tmp_path, capsys, doc, problem):
    path = write(tmp_path, doc)
    assert main(["serve", "--model", "llama3-8b", "--trace", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: trace {path}") and problem in err and "\n" not in err


def test_missing_trace_and_unknown_preset_are_refused(tmp_path, capsys):
    assert main(["serve", "--model", "llama3-8b", "--trace", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "--model", "no-such-model", "--trace", write(tmp_path, TINY)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'no-such-model'" in err and "\n" not in err


def test_budget_too_small_for_a_request_is_refused(tmp_path, capsys):
    assert main(["serve", "--model", "llama3-8b", "--trace", write(tmp_path, TINY), "--budget", "2MiB",
                 "--page-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "fewer than request 'r3'" in err and "needs alone" in err


def test_trace_is_replayed_in_arrival_order_and_can_be_cut(tmp_path):
    doc = {"arrival_unit": "s", "requests": [{"arrival": 2, "prompt": 5, "output": 5},
                                             {"arrival": 0.5, "prompt": 6, "output": 5},
                                             {"arrival": 0.5, "prompt": 7, "output": 5}]}
    t = load_trace(write(tmp_path, doc, "order.json"))
    assert [(q.id, q.arrival) for q in t["requests"]] == [("r1", 0.5), ("r2", 0.5), ("r0", 2.0)]
    assert t["name"] == "order"
    assert [q.id for q in load_trace(write(tmp_path, doc, "order.json"), max_requests=2)["requests"]] == ["r1", "r2"]
    with pytest.raises(TraceError):
        load_trace(write(tmp_path, "[]", "bad.json"))


def test_find_max_batch_reports_the_most_requests_decoding_together(capsys):
    """Long prompts all at once: each mode reports how many decode together
    at the budget (room for about four here), and the ratios to stock."""
    rc = main(["serve", "--model", "llama3-8b", "--find-max-batch", "--prompt-len", "48", "--max-batch-output", "3",
               "--page-size", "16", "--budget", "4MiB", "--requests", "12", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(captured.out.strip().splitlines()[-1])
    assert r["trace"]["requests"] == 12 and r["trace"]["path"] is None
    assert set(r["max_batch"]) == {"stock", "elastic", "elastic+slo"}
    assert all(1 <= n <= 12 for n in r["max_batch"].values())
    assert set(r["max_batch_over_stock"]) == {"elastic", "elastic+slo"}
    assert "most requests decoding together" in captured.out


@pytest.mark.parametrize("argv, problem", [
    (["--find-max-batch", "--trace", "x.json"], "no --trace"),
    (["--prompt-len", "5", "--trace", "x.json"], "go with --find-max-batch"),
    ([], "--trace is required"),
    (["--find-max-batch", "--prompt-len", "0"], "--prompt-len"),
])
def test_find_max_batch_bad_arguments(argv, problem, capsys):
    assert main(["serve", "--model", "llama3-8b", *argv]) == 2
    assert problem in capsys.readouterr().err
