"""Misuse is reported clearly and never corrupts the pool: bad frees, bad settings, enable() on CPU."""
from __future__ import annotations

import ctypes

import pytest

import ellm_alloc
from ellm_alloc import AllocatorError, EnableError, Pool, parse_budget, parse_size
from ellm_alloc import _native as N
from ellm_alloc.config import Settings

KiB, MiB = 1 << 10, 1 << 20

_outside = ctypes.create_string_buffer(4096)  # memory the arena never owned


def outside_ptr() -> int:
    return (ctypes.addressof(_outside) + 511) // 512 * 512


# ---- bad frees through the Python binding ------------------------------------------


def test_free_of_pointer_outside_the_arena_is_not_owned(pool):
    """free() of an address outside the arena raises AllocatorError saying it is not owned."""
    with pytest.raises(AllocatorError, match="not owned"):
        pool.free(outside_ptr())
    assert pool.stats()["invalid_frees"] == 1


@pytest.mark.parametrize("size", [100, 8 * KiB, 8 * KiB + 1, 3 * MiB], ids=["small", "small-max", "large", "multi-chunk"])
def test_double_free_is_reported(pool, size):
    """A second free of the same block raises AllocatorError('double free') and counts as invalid."""
    p = pool.malloc(size)
    pool.free(p)
    with pytest.raises(AllocatorError, match="double free"):
        pool.free(p)
    s = pool.stats()
    assert s["invalid_frees"] == 1 and s["num_frees"] == 1 and s["allocated_bytes"] == 0


@pytest.mark.parametrize("size", [100, 3 * MiB], ids=["small", "large"])
def test_double_free_after_cache_flush_is_reported(pool, size):
    """A double free is still caught after the block left the stream cache (empty_cache)."""
    p = pool.malloc(size)
    pool.free(p)
    pool.empty_cache()
    with pytest.raises(AllocatorError):
        pool.free(p)
    assert pool.stats()["invalid_frees"] == 1


def test_bad_free_does_not_disturb_live_blocks(pool, mem):
    """Freeing an interior pointer of a live block is refused and leaves the block live and intact."""
    p = pool.malloc(MiB)
    mem.fill(p, MiB, 7)
    with pytest.raises(AllocatorError):
        pool.free(p + 512)
    assert mem.intact(p, MiB, 7)
    assert pool.stats()["live_blocks"] == 1
    pool.validate()
    pool.free(p)


def test_record_stream_of_unknown_pointer_raises(pool):
    """record_stream() of a pointer the arena does not own raises AllocatorError."""
    with pytest.raises(AllocatorError, match="not owned"):
        pool.record_stream(outside_ptr(), 1)


def test_negative_malloc_size_is_refused(pool):
    """Pool.malloc(-1) raises ValueError before reaching C."""
    with pytest.raises(ValueError, match=">= 0"):
        pool.malloc(-1)


def test_closed_pool_refuses_use():
    """Every call on a closed pool raises ValueError instead of touching freed memory."""
    p = Pool("cpu", budget="16MiB")
    assert p.close() == 0
    with pytest.raises(ValueError, match="closed"):
        p.malloc(10)
    assert p.close() == 0  # closing twice is harmless


def test_close_reports_leaked_blocks():
    """close() returns how many blocks were still live."""
    p = Pool("cpu", budget="16MiB")
    p.malloc(100)
    p.malloc(MiB)
    p.malloc(MiB)
    assert p.close() == 3


# ---- bad frees through the torch ABI --------------------------------------------------


def test_torch_abi_free_of_bad_pointer_sets_status(pool, bind):
    """ellm_free of an unowned pointer returns (no crash), sets last_status and counts it."""
    dev = bind(pool)
    dev.free(outside_ptr(), 512)
    assert N.last_status() == N.INVALID_POINTER
    assert "not owned" in N.last_error()
    assert pool.stats()["invalid_frees"] == 1


def test_torch_abi_double_free_sets_status(pool, bind):
    """ellm_free twice: the second sets last_status DOUBLE_FREE; the pool stays valid."""
    dev = bind(pool)
    p = dev.malloc(4 * MiB)
    dev.free(p, 4 * MiB)
    dev.free(p, 4 * MiB)
    assert N.last_status() == N.DOUBLE_FREE
    assert "double free" in N.last_error()
    assert pool.stats()["invalid_frees"] == 1
    pool.validate()


def test_torch_abi_free_on_unbound_device_sets_status():
    """ellm_free of a pointer no pool owns, on a device with no pool, only sets last_status."""
    N.lib.ellm_free(outside_ptr(), 512, 42, None)
    assert N.last_status() == N.INVALID_POINTER


def test_torch_abi_successful_free_reports_success(pool, bind):
    """ellm_free returns void, so its status must describe this call: OK after a good free,
    even when the previous call on this thread failed."""
    dev = bind(pool)
    p = dev.malloc(MiB)
    dev.free(outside_ptr(), 512)  # a failure first
    assert N.last_status() == N.INVALID_POINTER
    dev.free(p, MiB)
    assert pool.stats()["live_blocks"] == 0
    assert N.last_status() == N.OK, f"a successful ellm_free left a stale status: {N.last_error()!r}"


def test_torch_abi_malloc_on_unusable_device_returns_null():
    """ellm_malloc on a device without a pool on a CPU-only machine returns NULL with a reason."""
    N.lib.ellm_configure(b"cuda", 64 * MiB, 0.0, 0, 0, 0)
    assert N.lib.ellm_malloc(MiB, 43, None) is None
    assert N.last_status() in (N.UNAVAILABLE, N.BACKEND_ERROR)
    assert N.last_error()


# ---- malformed settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, exc, match",
    [
        ("12 parsecs", ValueError, "malformed budget"),
        ("-1", ValueError, "malformed budget"),
        ("", ValueError, "malformed budget"),
        ("GiB", ValueError, "malformed budget"),
        ("1.5.2GiB", ValueError, "malformed budget"),
        (0, ValueError, "positive"),
        (-5, ValueError, "positive"),
        (1.5, ValueError, r"\(0, 1\]"),
        (0.0, ValueError, r"\(0, 1\]"),
        (float("nan"), ValueError, r"\(0, 1\]"),
        ("150%", ValueError, r"\(0, 1\]"),
        ("abc%", ValueError, "malformed budget"),
        (True, TypeError, "bool"),
        ([1], TypeError, "int or a string"),
    ],
)
def test_malformed_budget_is_rejected(budget, exc, match):
    """parse_budget and Pool(...) reject malformed budgets with a clear message."""
    with pytest.raises(exc, match=match):
        parse_budget(budget)
    with pytest.raises(exc, match=match):
        Pool("cpu", budget=budget)


@pytest.mark.parametrize(
    "text, expected",
    [("512", 512), ("4KiB", 4096), ("2 MiB", 2 * MiB), ("1.5GiB", 3 << 29), ("1gb", 10**9), ("64mib", 64 * MiB)],
)
def test_sizes_parse(text, expected):
    """Well-formed sizes parse to bytes (units are case-insensitive, spaces allowed)."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, fraction", [("0.5", 0.5), ("80%", 0.8), (0.25, 0.25), ("1.0", 1.0)])
def test_fraction_budgets_parse(text, fraction):
    """Fractions of free memory parse as fractions, not bytes."""
    b = parse_budget(text)
    assert b.bytes == 0 and b.fraction == pytest.approx(fraction)


def test_host_pool_without_budget_is_refused():
    """Pool('cpu') with no budget raises ValueError telling how to give one."""
    with pytest.raises(ValueError, match="explicit budget"):
        Pool("cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda0", "gpu:0", "", "cpu:x"])
def test_unknown_device_is_refused(device):
    """Pool(device=...) with an unknown device string raises ValueError."""
    with pytest.raises(ValueError):
        Pool(device, budget="64MiB")


@pytest.mark.parametrize("chunk", ["1MiB", "3MiB", 3 * MiB + 4096, 512])
def test_chunk_size_not_a_multiple_of_granularity_is_refused(chunk):
    """chunk_size must be a multiple of the 2 MiB granularity."""
    with pytest.raises(ValueError, match="not a multiple of the granularity"):
        Pool("cpu", budget="64MiB", chunk_size=chunk)


def test_chunk_size_multiple_of_granularity_is_accepted():
    """A 4 MiB chunk size is accepted and allocations map 4 MiB chunks."""
    with Pool("cpu", budget="64MiB", chunk_size="4MiB") as p:
        a = p.malloc(100)
        assert p.stats()["chunk_bytes"] == 4 * MiB and p.stats()["reserved_bytes"] == 4 * MiB
        p.free(a)
        p.validate()


@pytest.mark.parametrize("budget", ["1MiB", 2 * MiB - 512, "100"])
def test_budget_smaller_than_a_chunk_is_refused(budget):
    """A budget below one chunk raises ValueError naming both sizes."""
    with pytest.raises(ValueError, match="smaller than one chunk"):
        Pool("cpu", budget=budget)


def test_budget_is_rounded_down_to_whole_chunks():
    """A budget of 5 MiB holds two 2 MiB chunks."""
    with Pool("cpu", budget="5MiB") as p:
        assert p.stats()["budget_bytes"] == 4 * MiB


def test_bad_fault_kind_is_refused(pool):
    """inject_fault accepts only 'create' and 'map'."""
    with pytest.raises(ValueError, match="create"):
        pool.inject_fault("unmap", 1)


def test_unknown_owner_stats_refused(pool):
    """owner_stats of an owner that does not exist is an invalid argument."""
    out = N.OwnerStats()
    assert N.lib.ellm_pool_owner_stats(pool.handle, 99, ctypes.byref(out)) == N.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "var, value, match",
    [
        ("ELLM_ALLOC_BUDGET", "12 parsecs", "malformed budget"),
        ("ELLM_ALLOC_CHUNK_SIZE", "two", "malformed chunk_size"),
        ("ELLM_ALLOC_VA_SIZE", "-3GiB", "malformed va_size"),
    ],
)
def test_malformed_environment_settings_are_rejected(monkeypatch, var, value, match):
    """Settings.resolve() names the malformed ELLM_ALLOC_* value."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        Settings.resolve()


def test_explicit_argument_wins_over_environment(monkeypatch):
    """An explicit budget overrides ELLM_ALLOC_BUDGET."""
    monkeypatch.setenv("ELLM_ALLOC_BUDGET", "1GiB")
    assert Settings.resolve(budget="2GiB").budget.bytes == 2 * 2**30
    assert Settings.resolve().budget.bytes == 2**30


# ---- enable() on this CPU build of torch ----------------------------------------------


def test_enable_cuda_on_cpu_torch_raises_enable_error():
    """enable(device='cuda') on a CPU-only torch raises EnableError naming the CPU build.
    (enable() itself would route this process's CPU tensors: tests/test_cpu_routing.py
    runs that in fresh processes.)"""
    import torch

    if torch.backends.cuda.is_built():
        pytest.skip("this torch has CUDA; tests/gpu covers enable()")
    with pytest.raises(EnableError, match="CPU build"):
        ellm_alloc.enable(device="cuda", budget="1GiB")
    assert not ellm_alloc.enabled()


def test_device_pool_before_enable_raises():
    """device_pool()/memory_stats() before enable() raise EnableError, not a crash."""
    with pytest.raises(EnableError, match="not enabled"):
        ellm_alloc.memory_stats()
