"""The host tier is visible and configurable.

Visible: memory_stats()-style keys (ellm.host.*), the summary's host-tier
line, telemetry samples (`host`: bytes per owner, free, created, budget),
swap events in recordings, the `top` frame, and a second panel of
plot_timeline, all on host pools after KV pages were swapped out to the host
tier; with the tier off, the keys read 0 and no panel is drawn.
Configurable: enable(cpu_budget=...) and ELLM_ALLOC_CPU_BUDGET (Settings.resolve),
bad values refused with clear errors. enable() runs in fresh interpreters
only (it cannot be undone in a process).
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ellm_alloc import Pool
from ellm_alloc.config import Settings
from ellm_alloc.kv.space import PageSpace
from ellm_alloc.plot import _series, plot_timeline
from ellm_alloc.stats import format_summary, torch_style
from ellm_alloc.telemetry import Recorder, record, render_frame

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
C = 2 * MiB  # the host backend's chunk (and KV page) size
PAGES = 8
HOST_KEYS = {"budget_bytes", "chunk_bytes", "created_chunks", "free_chunks", "slabs", "pinned_bytes",
             "failed_acquires", "held_bytes", "chunks.free"}


def map_and_swap_out(space: PageSpace, mapped: int, swapped: int) -> PageSpace:
    """Maps pages [0, mapped), fills each with its own byte, swaps out the
    first `swapped` of them and waits for the copies to finish. Returns the
    space: the caller must keep it, or it closes (its pages go) when collected."""
    if mapped:  # map() and swap_out() refuse nothing to do
        space.map(0, mapped)
    for p in range(mapped):
        ctypes.memset(space.page_addr(p), p + 1, C)
    if swapped:
        space.swap_out(range(swapped))
        space.finish_swaps(wait=True)
    return space


def host_keys(stats: dict) -> dict:
    return {k[len("ellm.host."):]: v for k, v in stats.items() if k.startswith("ellm.host.")}


# ---- memory_stats() keys -------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(cpu_chunks=st.integers(1, PAGES), data=st.data())
def test_memory_stats_host_keys_after_swap_out(cpu_chunks, data):
    mapped = data.draw(st.integers(0, PAGES), label="mapped")
    swapped = data.draw(st.integers(0, min(mapped, cpu_chunks)), label="swapped")
    with Pool("cpu", budget="64MiB", cpu_budget=cpu_chunks * C) as pool:
        space = PageSpace(pool, "kv", PAGES)
        map_and_swap_out(space, mapped, swapped)
        host = host_keys(torch_style(pool.stats(), pool.owners(), pool.host_tier()))
        assert set(host) == HOST_KEYS | {"chunks.kv"}
        assert host["budget_bytes"] == cpu_chunks * C and host["chunk_bytes"] == C
        assert host["chunks.kv"] == swapped and host["held_bytes"] == swapped * C
        assert host["created_chunks"] == host["free_chunks"] + swapped == host["chunks.free"] + swapped
        assert swapped <= host["created_chunks"] <= cpu_chunks
        assert host["created_chunks"] * C <= host["pinned_bytes"] <= cpu_chunks * C
        assert host["slabs"] == (1 if swapped else 0) and host["failed_acquires"] == 0
        # The device side is the existing keys, unchanged: the swapped pages left it.
        assert torch_style(pool.stats(), pool.owners())["ellm.chunks.kv"] == mapped - swapped
        pool.validate()


def test_host_keys_come_after_the_device_keys_unchanged():
    with Pool("cpu", budget="64MiB", cpu_budget="8MiB") as pool:
        space = map_and_swap_out(PageSpace(pool, "kv", PAGES), 3, 2)
        device_only = torch_style(pool.stats(), pool.owners())
        both = torch_style(pool.stats(), pool.owners(), pool.host_tier())
    assert not any(k.startswith("ellm.host.") for k in device_only)
    assert list(both.items())[:len(device_only)] == list(device_only.items())
    assert len(both) == len(device_only) + len(HOST_KEYS) + 1  # + ellm.host.chunks.kv


def test_host_keys_with_the_tier_off_read_zero():
    with Pool("cpu", budget="64MiB") as pool:
        space = map_and_swap_out(PageSpace(pool, "kv", PAGES), 2, 0)
        host = host_keys(torch_style(pool.stats(), pool.owners(), pool.host_tier()))
    assert host == {"budget_bytes": 0, "chunk_bytes": C, "created_chunks": 0, "free_chunks": 0, "slabs": 0,
                    "pinned_bytes": 0, "failed_acquires": 0, "held_bytes": 0, "chunks.kv": 0, "chunks.free": 0}


def test_spaces_sharing_a_name_are_summed():
    """ElasticCache names all its full-attention layers' spaces "hf.full"."""
    with Pool("cpu", budget="64MiB", cpu_budget="16MiB") as pool:
        spaces = [map_and_swap_out(PageSpace(pool, name, PAGES), mapped, swapped)
                  for name, mapped, swapped in (("hf.full", 2, 1), ("hf.full", 3, 3), ("other", 1, 1))]
        host = host_keys(torch_style(pool.stats(), pool.owners(), pool.host_tier()))
    assert host["chunks.hf.full"] == 4 and host["chunks.other"] == 1 and host["held_bytes"] == 5 * C


def test_a_closed_space_leaves_the_host_keys():
    with Pool("cpu", budget="64MiB", cpu_budget="8MiB") as pool:
        space = PageSpace(pool, "kv", PAGES)
        map_and_swap_out(space, 2, 2)
        space.close()
        host = host_keys(torch_style(pool.stats(), pool.owners(), pool.host_tier()))
    assert "chunks.kv" not in host and host["held_bytes"] == 0
    assert host["free_chunks"] == host["created_chunks"] > 0


# ---- the summary --------------------------------------------------------------------


def test_summary_host_line_on_and_off():
    with Pool("cpu", budget="64MiB", cpu_budget="16MiB") as pool:
        space = map_and_swap_out(PageSpace(pool, "kv", PAGES), 3, 2)
        text = pool.summary()
        device_only = format_summary(pool.stats(), pool.owners(), "host:0")
    assert text.splitlines()[:-1] == device_only.splitlines()
    # One slab of 8 chunks is allocated for the first swap-out (HostSlabs::kSlabChunks).
    assert text.splitlines()[-1] == ("  host tier: budget 16.00 MiB, pinned 16.00 MiB; chunks: 8 created, 6 free; "
                                     "swapped out 4.00 MiB, by owner: kv=2")
    with Pool("cpu", budget="64MiB") as pool:
        assert pool.summary().splitlines()[-1] == "  host tier: off (cpu_budget 0)"


# ---- telemetry, top and the plot --------------------------------------------------------


def test_samples_record_host_bytes_and_swap_events(tmp_path):
    with Pool("cpu", budget="64MiB", cpu_budget="16MiB") as pool:
        space = PageSpace(pool, "kv", PAGES)
        with record(pool, nvml=False) as rec:
            map_and_swap_out(space, 3, 2)
            rec.sample("swapped out")
            assert space.finish_swaps(wait=True) == 0  # nothing ended: no sample
            space.swap_in([0])
            space.finish_swaps(wait=True)
            rec.sample("one back")
        frame = render_frame(pool)
    labels = [s["label"] for s in rec.samples]
    assert labels == ["start", "PageSpace.map", "PageSpace.swap_out", "PageSpace.finish_swaps", "swapped out",
                      "PageSpace.swap_in", "PageSpace.finish_swaps", "one back", "end"]
    by = {s["label"]: s for s in rec.samples}
    assert by["start"]["host"] == {"owners": {"kv": 0}, "free": 0, "created": 0, "budget": 16 * MiB}
    assert by["swapped out"]["host"]["owners"] == {"kv": 2 * C}
    assert by["swapped out"]["owners"]["kv"] == 1 * C  # the device kept the page not swapped
    assert by["one back"]["host"]["owners"] == {"kv": 1 * C} and by["one back"]["owners"]["kv"] == 2 * C
    for s in rec.samples:  # the host tier's ledger: created = free + sum owned, within the budget
        h = s["host"]
        assert h["created"] == h["free"] + sum(h["owners"].values()) <= h["budget"]
    assert rec.host_tier_used() and rec.owner_names(host=True) == ["kv"]
    assert "host tier (swapped-out KV)  budget 16.00 MiB" in frame
    assert [line.split()[0] for line in frame.splitlines()[-3:]] == ["kv", "(free", "(not"]

    order, data = _series(rec, host=True)
    assert order == ["kv", "free chunks"]
    assert data["kv"] == [s["host"]["owners"]["kv"] for s in rec.samples]
    fig = plot_timeline(rec, tmp_path / "host.png")
    assert (tmp_path / "host.png").stat().st_size > 1000
    device_ax, host_ax = fig.axes
    colours = {c.get_label(): tuple(c.get_facecolor()[0]) for ax in fig.axes for c in ax.collections}
    assert [c.get_label() for c in host_ax.collections] == ["host: kv", "host: free chunks"]
    assert colours["host: kv"] == colours["kv"]  # a space keeps its colour on the host
    assert host_ax.get_xlabel().startswith("sample") and device_ax.get_xlabel() == ""


def test_plot_without_the_host_tier_has_one_panel(tmp_path):
    with Pool("cpu", budget="64MiB") as pool:
        space = PageSpace(pool, "kv", PAGES)
        with record(pool, nvml=False) as rec:
            space.map(0, 2)
        assert "host tier" not in render_frame(pool)
    assert not rec.host_tier_used()
    assert all(s["host"] == {"owners": {"kv": 0}, "free": 0, "created": 0, "budget": 0} for s in rec.samples)
    fig = plot_timeline(rec, tmp_path / "device.png")
    assert len(fig.axes) == 1
    assert not any(c.get_label().startswith("host") for c in fig.axes[0].collections)


def test_a_sample_without_a_pool_has_an_empty_host_tier():
    s = Recorder(pool=None, nvml=False).sample("bare")
    assert s["host"] == {"owners": {}, "free": 0, "created": 0, "budget": 0}


# ---- configuration ------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("ELLM_ALLOC_CPU_BUDGET", raising=False)
    return monkeypatch


@pytest.mark.parametrize("value, nbytes", [
    (None, 0), (0, 0), ("0", 0), (" 0 ", 0), (4096, 4096), ("16GiB", 16 << 30), ("512 MB", 512 * 10**6),
])
def test_cpu_budget_argument(no_env, value, nbytes):
    assert Settings.resolve(budget="1GiB", cpu_budget=value).cpu_budget == nbytes


@pytest.mark.parametrize("value, error, message", [
    ("-1", ValueError, "malformed cpu_budget '-1'"),
    (-1, ValueError, "cpu_budget must be positive, got -1"),
    ("abc", ValueError, "malformed cpu_budget 'abc'"),
    ("0GiB", ValueError, "cpu_budget must be at least one byte"),
    (True, TypeError, "cpu_budget must be bytes or a string like '16GiB', not a bool"),
    (False, TypeError, "cpu_budget must be bytes or a string like '16GiB', not a bool"),
    (1.5, TypeError, "cpu_budget must be an int or a string"),
])
def test_bad_cpu_budget_argument(no_env, value, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        Settings.resolve(budget="1GiB", cpu_budget=value)


@pytest.mark.parametrize("value, nbytes", [(0, 0), ("0", 0), (" 0 ", 0), ("4MiB", 4 << 20)])
def test_pool_cpu_budget_reads_like_enables(value, nbytes):
    """Pool(cpu_budget=) and set_cpu_budget() take what enable() takes."""
    with Pool("cpu", budget="8MiB", cpu_budget=value) as pool:
        assert pool.cpu_budget() == nbytes == pool.host_tier()["budget_bytes"]
        pool.set_cpu_budget("2MiB")
        pool.set_cpu_budget(value)
        assert pool.cpu_budget() == nbytes


@pytest.mark.parametrize("value, error, message", [
    (False, TypeError, "not a bool"), ("abc", ValueError, "malformed cpu_budget 'abc'"), (-1, ValueError, "positive"),
])
def test_pool_bad_cpu_budget(value, error, message):
    with pytest.raises(error, match=message):
        Pool("cpu", budget="8MiB", cpu_budget=value)
    with Pool("cpu", budget="8MiB") as pool, pytest.raises(error, match=message):
        pool.set_cpu_budget(value)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 2**40), unit=st.sampled_from(["", "B", "KiB", "MiB", "GiB"]))
def test_cpu_budget_sizes(n, unit):
    scale = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
    assert Settings.resolve(budget="1GiB", cpu_budget=f"{n}{unit}").cpu_budget == n * scale


def test_cpu_budget_from_the_environment(no_env):
    no_env.setenv("ELLM_ALLOC_CPU_BUDGET", "2GiB")
    assert Settings.resolve(budget="1GiB").cpu_budget == 2 << 30
    assert Settings.resolve(budget="1GiB", cpu_budget=0).cpu_budget == 0  # the argument wins
    no_env.setenv("ELLM_ALLOC_CPU_BUDGET", "0")
    assert Settings.resolve(budget="1GiB").cpu_budget == 0
    for bad in ("-1", "abc", "1.5 XB"):
        no_env.setenv("ELLM_ALLOC_CPU_BUDGET", bad)
        with pytest.raises(ValueError, match=f"malformed ELLM_ALLOC_CPU_BUDGET {bad!r}"):
            Settings.resolve(budget="1GiB")


def test_cpu_budget_is_off_by_default(no_env):
    assert Settings.resolve(budget="1GiB").cpu_budget == 0


# ---- enable(cpu_budget=...) in fresh interpreters ---------------------------------------------


def run_python(*parts: str, env: dict | None = None) -> dict:
    """Runs the code `parts` (each indented alike within itself) in a fresh
    interpreter, ELLM_ALLOC_CPU_BUDGET unset unless `env` sets it; returns
    the JSON its last line printed."""
    base = {k: v for k, v in os.environ.items() if k != "ELLM_ALLOC_CPU_BUDGET"}
    code = "\n".join(textwrap.dedent(part) for part in parts)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**base, **(env or {})}, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


SWAP_TWO_PAGES = """
    import ctypes
    from ellm_alloc.kv.space import PageSpace
    pool = ellm_alloc.device_pool()
    space = PageSpace(pool, "kv", 4)
    space.map(0, 3)
    ctypes.memset(space.page_addr(0), 7, 3 * space.page_bytes)
    space.swap_out([0, 1])
    space.finish_swaps(wait=True)
    stats = ellm_alloc.memory_stats()
"""


def test_enable_cpu_budget_gives_the_pool_a_host_tier():
    out = run_python("""
        import json, ellm_alloc
        from ellm_alloc import EnableError
        errors = []
        for bad in ("-1", "abc", True, -1):
            try:
                ellm_alloc.enable(device="cpu", budget="1GiB", cpu_budget=bad)
            except (TypeError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
        assert not ellm_alloc.enabled()
        s = ellm_alloc.enable(device="cpu", budget="1GiB", cpu_budget="64MiB")
    """, SWAP_TWO_PAGES, """
        assert ellm_alloc.enable(device="cpu", budget="1GiB", cpu_budget=64 << 20) == s
        try:
            ellm_alloc.enable(device="cpu", budget="1GiB", cpu_budget="32MiB")
            again = "no error"
        except EnableError as e:
            again = str(e)
        print(json.dumps({"errors": errors, "cpu_budget": s.cpu_budget, "tier": pool.host_tier()["budget_bytes"],
                          "stats": {k: v for k, v in stats.items() if k.startswith("ellm.host.")},
                          "summary": ellm_alloc.memory_summary(), "again": again}))
    """)
    assert out["errors"] == [
        "ValueError: malformed cpu_budget '-1': expected bytes or a number with a unit "
        "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '40GiB'",
        "ValueError: malformed cpu_budget 'abc': expected bytes or a number with a unit "
        "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '40GiB'",
        "TypeError: cpu_budget must be bytes or a string like '16GiB', not a bool",
        "ValueError: cpu_budget must be positive, got -1",
    ]
    assert out["cpu_budget"] == out["tier"] == out["stats"]["ellm.host.budget_bytes"] == 64 * MiB
    assert out["stats"]["ellm.host.chunks.kv"] == 2 and out["stats"]["ellm.host.held_bytes"] == 2 * C
    assert "host tier: budget 64.00 MiB" in out["summary"] and "by owner: kv=2" in out["summary"]
    assert "cannot be reconfigured" in out["again"] and "cpu_budget=33554432" in out["again"]


def test_enable_takes_the_cpu_budget_from_the_environment():
    out = run_python("""
        import json, ellm_alloc
        s = ellm_alloc.enable(device="cpu", budget="1GiB")
    """, SWAP_TWO_PAGES, """
        print(json.dumps({"cpu_budget": s.cpu_budget, "held": stats["ellm.host.held_bytes"],
                          "budget": stats["ellm.host.budget_bytes"]}))
    """, env={"ELLM_ALLOC_CPU_BUDGET": "32MiB"})
    assert out == {"cpu_budget": 32 * MiB, "held": 2 * C, "budget": 32 * MiB}


def test_enable_leaves_the_host_tier_off_by_default():
    out = run_python("""
        import json, ellm_alloc
        s = ellm_alloc.enable(device="cpu", budget="1GiB")
        stats = ellm_alloc.memory_stats()
        print(json.dumps({"cpu_budget": s.cpu_budget, "budget": stats["ellm.host.budget_bytes"],
                          "summary": ellm_alloc.memory_summary()}))
    """)
    assert out["cpu_budget"] == out["budget"] == 0
    assert out["summary"].splitlines()[-1] == "  host tier: off (cpu_budget 0)"
