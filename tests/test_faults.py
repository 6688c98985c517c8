"""Out of memory and backend faults: the pool fails cleanly, stays consistent, and recovers."""
from __future__ import annotations

import pytest

from ellm_alloc import OutOfMemoryError
from ellm_alloc import _native as N

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 2 * MiB


def assert_ledger_clean(pool) -> None:
    """Every created chunk is free or held, and the arena holds exactly the chunks it maps."""
    pool.validate()
    s = pool.stats()
    held = sum(o["held_chunks"] for o in pool.owners())
    assert s["created_chunks"] == s["free_chunks"] + held
    arena = next(o for o in pool.owners() if o["name"] == "arena")
    assert arena["held_chunks"] * CHUNK == s["reserved_bytes"]


def fill_until_oom(pool, size: int, stream: int = 0) -> list[int]:
    ptrs = []
    with pytest.raises(OutOfMemoryError):
        for _ in range(100_000):
            ptrs.append(pool.malloc(size, stream))
    return ptrs


# ---- injected backend faults -------------------------------------------------


@pytest.mark.parametrize(
    "kind, nth, evidence",
    [
        # A failed create leaves the pool short, so acquire asks the other owners (a reclaim call).
        ("create", 1, "reclaim_calls"),
        ("create", 2, "reclaim_calls"),
        ("create", 4, "reclaim_calls"),
        # A failed map undoes the maps this allocation already made (unmaps nth - 1 chunks).
        ("map", 2, "chunk_unmaps"),
        ("map", 3, "chunk_unmaps"),
    ],
)
@pytest.mark.parametrize("via_torch", [False, True], ids=["pool", "torch_abi"])
def test_injected_fault_during_growth_fails_cleanly_or_recovers(make_pool, bind, mem, kind, nth, evidence, via_torch):
    """A create/map fault while an 8 MiB block needs 4 new chunks leaves a balanced ledger and a usable
    pool; the allocation either succeeds (usable memory) or raises OOM with the pool state."""
    pool = make_pool("64MiB")
    dev = bind(pool)
    pool.inject_fault(kind, nth)
    size = 8 * MiB  # 4 VA chunks at the arena base: 4 creates, 4 maps
    if via_torch:
        ptr = dev.malloc(size)
        if not ptr:
            assert N.last_status() == N.OUT_OF_MEMORY
            assert "out of memory" in N.last_error() and "pool(host" in N.last_error()
    else:
        try:
            ptr = pool.malloc(size)
        except OutOfMemoryError as e:
            ptr = 0
            assert "out of memory" in str(e) and "pool(host" in str(e)
    assert pool.stats()[evidence] >= (1 if kind == "create" else nth - 1), "the injected fault did not fire"
    assert_ledger_clean(pool)
    if ptr:
        mem.fill(ptr, size, 1)
        assert mem.intact(ptr, size, 1)
    nxt = pool.malloc(size)  # the pool is usable afterwards
    mem.fill(nxt, size, 2)
    assert mem.intact(nxt, size, 2)
    for p in (ptr, nxt):
        if p:
            pool.free(p)
    assert_ledger_clean(pool)


@pytest.mark.parametrize("kind", ["create", "map"])
def test_fault_armed_past_the_allocation_fires_later_and_is_also_clean(make_pool, kind):
    """A fault armed for the 6th create/map fires during a later growth; the pool stays consistent."""
    pool = make_pool("64MiB")
    pool.inject_fault(kind, 6)
    ptrs = []
    for _ in range(6):  # 6 x 4 MiB: at least 12 creates and 12 maps
        try:
            ptrs.append(pool.malloc(4 * MiB))
        except OutOfMemoryError:
            pass
        assert_ledger_clean(pool)
    assert len(ptrs) >= 5
    for p in ptrs:
        pool.free(p)
    assert pool.empty_cache() > 0
    assert_ledger_clean(pool)


def test_fault_can_be_disarmed(make_pool):
    """inject_fault(kind, 0) disarms: growth then behaves exactly like a pool that was never armed."""
    pool = make_pool("64MiB")
    pool.inject_fault("map", 1)
    pool.inject_fault("map", 0)
    p = pool.malloc(8 * MiB)
    s = pool.stats()
    assert (s["chunk_maps"], s["chunk_unmaps"], s["reclaim_calls"]) == (4, 0, 0)
    pool.free(p)


# ---- budget exhaustion -----------------------------------------------------------


def test_over_budget_request_raises_oom_with_pool_state(pool):
    """A request larger than the whole budget raises OutOfMemoryError describing the pool."""
    with pytest.raises(OutOfMemoryError) as ei:
        pool.malloc(65 * MiB)
    msg = str(ei.value)
    assert "out of memory" in msg and "65.00 MiB" in msg and "budget 64.00 MiB" in msg
    assert pool.stats()["ooms"] == 1
    pool.validate()


def test_smaller_allocations_still_work_after_oom(pool, mem):
    """After the budget is exhausted and malloc raised OOM, what still fits is served."""
    big = pool.malloc(60 * MiB)
    with pytest.raises(OutOfMemoryError):
        pool.malloc(8 * MiB)
    pool.validate()
    small = pool.malloc(3 * MiB)  # 60 + 3 MiB = 31.5 chunks of the 32
    tiny = pool.malloc(100)
    for i, (p, n) in enumerate([(big, 60 * MiB), (small, 3 * MiB), (tiny, 100)]):
        mem.fill(p, n, i)
    for i, (p, n) in enumerate([(big, 60 * MiB), (small, 3 * MiB), (tiny, 100)]):
        assert mem.intact(p, n, i)
        pool.free(p)


def test_oom_is_a_torch_out_of_memory_error(pool):
    """Code that catches torch.OutOfMemoryError catches the pool's OOM."""
    import torch

    with pytest.raises(torch.OutOfMemoryError):
        pool.malloc(1 << 40)


@pytest.mark.parametrize(
    "fill_size, fill_stream, big_stream",
    [
        (4 * MiB, 0, 0),  # large blocks in the exact-size cache of the same stream
        (4 * MiB, 1, 2),  # ... of another stream
        (CHUNK + 512, 1, 1),  # sizes that straddle chunks
        (8 * KiB, 0, 0),  # small objects: slabs emptied by the frees
        (8 * KiB, 1, 2),
    ],
)
def test_cached_blocks_are_reclaimed_before_oom(make_pool, fill_size, fill_stream, big_stream):
    """Fill the budget, free everything (it stays cached), then a different size needing nearly
    all chunks must succeed: caches are flushed and their chunks reused before OOM."""
    pool = make_pool("32MiB")
    ptrs = fill_until_oom(pool, fill_size, fill_stream)
    for p in ptrs:
        pool.free(p, fill_stream)
    assert pool.stats()["cached_bytes"] > 0 or fill_size <= 8 * KiB
    big = pool.malloc(30 * MiB, big_stream)
    pool.free(big, big_stream)
    assert pool.stats()["ooms"] == 1  # only the one that ended the fill


def test_torch_abi_oom_returns_null_with_status(pool, bind, mem):
    """ellm_malloc: NULL with last_status()==OUT_OF_MEMORY on OOM; a non-NULL usable pointer otherwise."""
    dev = bind(pool)
    assert dev.malloc(65 * MiB) == 0
    assert N.last_status() == N.OUT_OF_MEMORY
    assert "out of memory" in N.last_error()
    ptrs = []
    while True:  # allocate 3 MiB blocks until the budget is exhausted
        p = dev.malloc(3 * MiB)
        if not p:
            assert N.last_status() == N.OUT_OF_MEMORY
            break
        mem.fill(p, 3 * MiB, len(ptrs))
        ptrs.append(p)
    s = pool.stats()
    # It stopped only when another block could not fit: at most one chunk of the budget unmapped.
    assert s["reserved_bytes"] + 3 * MiB > s["budget_bytes"], pool.summary()
    assert len(ptrs) >= 10
    small = dev.malloc(512)  # what still fits is served
    assert small
    for i, p in enumerate(ptrs):
        assert mem.intact(p, 3 * MiB, i)
        dev.free(p, 3 * MiB)
    dev.free(small, 512)
    assert pool.stats()["invalid_frees"] == 0


def test_torch_abi_zero_size_returns_null_and_allocates_nothing(pool, bind):
    """ellm_malloc(0) returns NULL without touching the arena; ellm_free(NULL) is a no-op."""
    dev = bind(pool)
    before = pool.stats()
    assert dev.malloc(0) == 0
    dev.free(0, 0)
    after = pool.stats()
    for k in ("num_allocs", "num_frees", "invalid_frees", "allocated_bytes", "reserved_bytes"):
        assert after[k] == before[k], k
