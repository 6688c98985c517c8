"""`bench swap` on the host backend at small sizes: the report's contract
(both directions, their bound and ratio, the conditions), the skip of a size
that cannot fit, the bit-exactness check, and clear errors for bad arguments.
Timings are not asserted: on a shared machine they are only reported."""
from __future__ import annotations

import json

import pytest
import torch

from ellm_alloc.bench import __main__ as bench
from ellm_alloc.bench import swap
from ellm_alloc.kv.space import PageSpace
from ellm_alloc.pool import Pool

MiB = 1 << 20


def _run(capsys, *args):
    rc = bench.main(["swap", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_report_has_both_directions_their_bound_and_ratio(tmp_path, capsys):
    path = tmp_path / "swap.json"
    rc, out, err = _run(capsys, "--sizes", "8MiB", "16MiB", "--repeats", "1", "--steps", "2", "--json", str(path))
    assert rc == 0, err
    doc = json.loads(path.read_text())
    assert doc["command"].startswith("python -m ellm_alloc.bench swap --sizes 8MiB 16MiB")
    assert doc["date"] and doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["device"] == "cpu (host backend)" and doc["machine"]["driver"]
    r = doc["report"]
    assert r["chunk_bytes"] == 2 * MiB and r["goal_ratio_to_bound"] == 0.8 and "memmove" in r["bound_method"]
    assert [x["size_bytes"] for x in r["results"]] == [8 * MiB, 16 * MiB]
    for x in r["results"]:
        assert x["bit_exact"] and x["pages"] == x["size_bytes"] // (2 * MiB)
        for name in ("swap_out", "swap_in"):
            d = x[name]
            assert d["gb_s"]["median"] > 0 and d["bound_gb_s"]["median"] > 0 and d["cold_gb_s"] > 0
            assert d["gb_s"]["n"] == d["bound_gb_s"]["n"] == 1
            assert d["ratio_to_bound"] == pytest.approx(d["gb_s"]["median"] / d["bound_gb_s"]["median"], rel=1e-2)
    # A miss of the goal is listed, never hidden.
    sizes = ("8.00 MiB", "16.00 MiB")
    assert r["goal_misses"] == [f"{n} at {s}: {x[n]['ratio_to_bound']:.3f}" for x, s in zip(r["results"], sizes)
                                for n in ("swap_out", "swap_in") if x[n]["ratio_to_bound"] < 0.8]
    lat = r["decode_latency"]
    assert lat["size_bytes"] == 16 * MiB and lat["alone_ms"]["n"] == 2 and lat["alone_ms"]["median"] > 0
    assert {"during_swap_out_ms", "during_swap_in_ms", "added_ms_swap_out", "added_ms_swap_in"} <= set(lat)
    assert "ratio" in out and "out" in out and "in" in out and f"wrote {path}" in out


def test_a_size_that_cannot_fit_is_skipped_with_the_reason(capsys):
    rc, out, err = _run(capsys, "--sizes", "8MiB,64TiB", "--repeats", "1", "--steps", "1", "--json")
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])["report"]
    big = r["results"][1]
    assert big["size_bytes"] == 64 << 40 and "of host memory" in big["skipped"]
    assert r["decode_latency"]["size_bytes"] == 8 * MiB  # the largest size that did run
    assert "skipped" in out and "skipped" in err


@pytest.mark.parametrize("args, message", [
    (["--sizes", "3MiB"], "not a multiple of the chunk size"),
    (["--sizes", "64MiB,3MiB"], "3MiB (3145728 bytes) is not a multiple"),
    (["--sizes", "12XB"], "malformed size '12XB'"),
    (["--sizes", "0"], "at least one byte"),
    (["--sizes", "8MiB,"], "empty size"),
    (["--repeats", "0"], "--repeats must be a positive int"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_bad_arguments_are_one_clear_line(capsys, args, message):
    rc, out, err = _run(capsys, *args)
    assert rc == 2
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert out == ""  # refused before measuring anything


def test_verify_catches_a_changed_byte():
    pool = Pool("cpu", budget="8MiB", cpu_budget="8MiB")
    space = PageSpace(pool, "kv", 4)
    try:
        space.map(0, 4)
        template = torch.randint(0, 1 << 62, (space.page_bytes // 8,), dtype=torch.int64)
        swap._fill(space, template)
        swap._verify(space, template, "fresh")
        space.bytes_view()[2 * space.page_bytes + 77] ^= 1
        with pytest.raises(swap.SwapMismatch, match="page 2 differs .* first at byte 72"):
            swap._verify(space, template, "corrupted")
    finally:
        space.close()
        pool.close()
