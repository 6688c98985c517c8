"""Bad input over the C ABI and the Python API, one row per input.

Each row is a call that must fail cleanly: the expected error (a status and
message fragment from C, or an exception class and message from Python), no
crash, and afterwards a balanced ledger (validate()), live data intact and a
pool that still allocates. The rows include the findings of the hardening
audit: size overflows, owner API misuse, a huge KV space, NULL handles.
"""
from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc import _native as N
from ellm_alloc.kv.space import PageSpace

MiB = 1 << 20
U32 = ctypes.c_uint32


def ids(*xs):
    return (U32 * max(len(xs), 1))(*xs)


class World:
    """A pool holding live data, one extra owner with two chunks, and a KV space."""

    def __init__(self, pool, mem):
        self.pool, self.mem = pool, mem
        self.h = pool.handle
        self.live = pool.malloc(3 * MiB)
        mem.fill(self.live, 3 * MiB, tag=11)
        self.owner = pool.register_owner("tenant")
        self.other = pool.register_owner("other")
        self.mine = pool.acquire(self.owner, 2)
        self.theirs = pool.acquire(self.other, 1)
        self.space = PageSpace(pool, "kv.bad", 4)

    def check(self):
        self.pool.validate()
        assert self.mem.intact(self.live, 3 * MiB, tag=11)
        p = self.pool.malloc(MiB)
        self.pool.free(p)

    def close(self):
        self.space.close()
        self.pool.release(self.owner, self.mine)
        self.pool.release(self.other, self.theirs)
        self.pool.free(self.live)


NULL = None  # what a pointer-returning entry point gives back (ctypes maps NULL to None)
ERR = -1  # placeholder in rows below: "the status, negated" (KV calls that return 1/0/-status)


def stale_status() -> None:
    """Leaves a failure no row expects (DOUBLE_FREE) in last_status, so a row passes only if
    its own call set the status and message."""
    with_pool = N.lib.ellm_pool_create(b"host", 0, 8 * MiB, 0.0, 0, 0, 0)
    p = N.lib.ellm_pool_malloc(with_pool, 4096, 0)
    N.lib.ellm_pool_free(with_pool, p, 0)
    N.lib.ellm_pool_free(with_pool, p, 0)
    N.lib.ellm_pool_destroy(with_pool)
    assert N.last_status() == N.DOUBLE_FREE


def release_twice(w):
    """Releases one of the tenant's chunks, then the same chunk again in a second call."""
    first = w.mine.pop()
    assert N.lib.ellm_pool_release(w.h, w.owner, 1, ids(first)) == N.OK
    return N.lib.ellm_pool_release(w.h, w.owner, 1, ids(first))


def bench_sizes(*xs):
    return (ctypes.c_size_t * max(len(xs), 1))(*xs)


# (name, call(world), expected return value, expected status, message fragment)
C_ROWS = [
    ("malloc SIZE_MAX", lambda w: N.lib.ellm_pool_malloc(w.h, 2**64 - 1, 0), NULL, N.OUT_OF_MEMORY,
     "more than the arena's whole VA"),
    ("malloc 2^64-100", lambda w: N.lib.ellm_pool_malloc(w.h, 2**64 - 100, 0), NULL, N.OUT_OF_MEMORY,
     "no allocation this large can succeed"),
    ("malloc above the VA", lambda w: N.lib.ellm_pool_malloc(w.h, 2**62, 0), NULL, N.OUT_OF_MEMORY,
     "more than the arena's whole VA"),
    ("malloc NULL pool", lambda w: N.lib.ellm_pool_malloc(None, 64, 0), NULL, N.INVALID_ARGUMENT, "NULL pool"),
    ("free NULL pool", lambda w: N.lib.ellm_pool_free(None, w.live, 0), N.INVALID_ARGUMENT, N.INVALID_ARGUMENT,
     "NULL pool"),
    ("free a foreign pointer", lambda w: N.lib.ellm_pool_free(w.h, 0x1000, 0), N.INVALID_POINTER, N.INVALID_POINTER,
     "not owned"),
    ("acquire, unknown owner", lambda w: N.lib.ellm_pool_acquire(w.h, 99, 1, ids(0)), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "no active owner 99"),
    ("acquire, negative owner", lambda w: N.lib.ellm_pool_acquire(w.h, -1, 1, ids(0)), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "no active owner"),
    ("acquire, NULL ids", lambda w: N.lib.ellm_pool_acquire(w.h, w.owner, 1, None), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "NULL id"),
    ("release, id out of range", lambda w: N.lib.ellm_pool_release(w.h, w.owner, 1, ids(10**6)),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "does not exist"),
    ("release, another owner's chunk", lambda w: N.lib.ellm_pool_release(w.h, w.owner, 1, ids(w.theirs[0])),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "not held by owner"),
    ("release twice in one call", lambda w: N.lib.ellm_pool_release(w.h, w.owner, 2, ids(w.mine[0], w.mine[0])),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "listed twice"),
    ("release a chunk already released", release_twice, N.INVALID_ARGUMENT, N.INVALID_ARGUMENT,
     "not held by owner"),
    ("release, unknown owner", lambda w: N.lib.ellm_pool_release(w.h, 77, 1, ids(w.mine[0])), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "no active owner"),
    ("release, NULL ids", lambda w: N.lib.ellm_pool_release(w.h, w.owner, 1, None), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "NULL id"),
    ("chunk_handle out of range", lambda w: N.lib.ellm_pool_chunk_handle(w.h, 10**6), 0, N.INVALID_ARGUMENT,
     "does not exist"),
    ("set_budget below held chunks", lambda w: N.lib.ellm_pool_set_budget(w.h, 2 * MiB), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "below the"),
    ("set_budget below one chunk", lambda w: N.lib.ellm_pool_set_budget(w.h, 100), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "smaller than one chunk"),
    ("set_headroom, unknown owner", lambda w: N.lib.ellm_pool_set_headroom(w.h, 55, MiB), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "no active owner"),
    ("available_chunks, unknown owner", lambda w: N.lib.ellm_pool_available_chunks(w.h, 55), 0,
     N.INVALID_ARGUMENT, "no active owner"),
    ("register_owner, NULL pool", lambda w: N.lib.ellm_pool_register_owner(None, b"x", N.RECLAIM_FN(), None),
     -N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "NULL pool"),
    ("unregister, unknown owner", lambda w: N.lib.ellm_pool_unregister_owner(w.h, 55), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "no active owner"),
    ("unregister, owner holding chunks", lambda w: N.lib.ellm_pool_unregister_owner(w.h, w.owner),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "still holds"),
    ("owner stats of an unknown owner", lambda w: N.lib.ellm_pool_owner_stats(w.h, 999, ctypes.byref(N.OwnerStats())),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "no owner"),
    ("owner stats, NULL output", lambda w: N.lib.ellm_pool_owner_stats(w.h, 0, None), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "NULL output"),
    ("validate, NULL pool", lambda w: N.lib.ellm_pool_validate(None, None, 0), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "NULL pool"),
    ("pool with a VA above 2^47", lambda w: N.lib.ellm_pool_create(b"host", 0, 64 * MiB, 0.0, 0, 2**50, 0), NULL,
     N.INVALID_ARGUMENT, "above the maximum"),
    ("pool with an unknown backend", lambda w: N.lib.ellm_pool_create(b"tpu", 0, 64 * MiB, 0.0, 0, 0, 0), NULL,
     N.INVALID_ARGUMENT, "unknown backend"),
    ("KV space of 2^40 pages", lambda w: N.lib.ellm_kv_create(w.h, b"huge", 2**40), NULL, N.INVALID_ARGUMENT,
     "pages"),
    ("KV space of SIZE_MAX pages", lambda w: N.lib.ellm_kv_create(w.h, b"huge", 2**64 - 1), NULL,
     N.INVALID_ARGUMENT, "pages"),
    ("KV space of 0 pages", lambda w: N.lib.ellm_kv_create(w.h, b"none", 0), NULL, N.INVALID_ARGUMENT, "pages"),
    ("KV space, NULL pool", lambda w: N.lib.ellm_kv_create(None, b"x", 4), NULL, N.INVALID_ARGUMENT, "NULL pool"),
    ("KV map past the end", lambda w: N.lib.ellm_kv_map(w.space.handle, 3, 5), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "KV map"),
    ("KV map, first + count wraps 32 bits", lambda w: N.lib.ellm_kv_map(w.space.handle, 2, 2**32 - 1),
     N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "KV map"),
    ("KV map, NULL space", lambda w: N.lib.ellm_kv_map(None, 0, 1), N.INVALID_ARGUMENT, N.INVALID_ARGUMENT,
     "NULL KV space"),
    ("KV unmap of an unmapped page", lambda w: N.lib.ellm_kv_unmap(w.space.handle, 2, 0), -N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "not mapped"),
    ("KV unmap out of range", lambda w: N.lib.ellm_kv_unmap(w.space.handle, 2**31, 0), -N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "KV unmap"),
    ("KV set_reclaimable out of range", lambda w: N.lib.ellm_kv_set_reclaimable(w.space.handle, 4, 0, 0),
     -N.INVALID_ARGUMENT, N.INVALID_ARGUMENT, "KV page 4"),
    ("KV pin out of range", lambda w: N.lib.ellm_kv_pin(w.space.handle, 4), -N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "out of range"),
    ("KV state out of range", lambda w: N.lib.ellm_kv_state(w.space.handle, 4), -N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "out of range"),
    ("KV take_reclaimed, NULL array", lambda w: N.lib.ellm_kv_take_reclaimed(w.space.handle, None, 8), 0,
     N.INVALID_ARGUMENT, "NULL page array"),
    ("KV reclaim, NULL space", lambda w: N.lib.ellm_kv_reclaim(None, 1), 0, N.INVALID_ARGUMENT, "NULL KV space"),
    ("DLPack view of 2^64-1 bytes", lambda w: N.lib.ellm_dlpack_view(w.h, w.live, 2**64 - 1), NULL,
     N.INVALID_ARGUMENT, "not a valid range"),
    ("DLPack view wrapping the address space", lambda w: N.lib.ellm_dlpack_view(w.h, 2**64 - 4096, 8192), NULL,
     N.INVALID_ARGUMENT, "not a valid range"),
    ("bench_pairs, NULL pool", lambda w: N.lib.ellm_bench_pairs(None, bench_sizes(64), 1, 1, 0), -1.0,
     N.INVALID_ARGUMENT, "NULL pool"),
    ("bench_pairs, SIZE_MAX", lambda w: N.lib.ellm_bench_pairs(w.h, bench_sizes(2**64 - 1), 1, 1, 0), -1.0,
     N.INVALID_ARGUMENT, "do not fit the arena"),
    ("bench_pairs, no sizes", lambda w: N.lib.ellm_bench_pairs(w.h, None, 0, 1, 0), -1.0, N.INVALID_ARGUMENT,
     "at least one size"),
    ("host fault of an unknown kind", lambda w: N.lib.ellm_host_inject_fault(w.h, 7, 1), N.INVALID_ARGUMENT,
     N.INVALID_ARGUMENT, "fault kind"),
    ("torch memory fraction of 2.5", lambda w: N.lib.ellm_memory_fraction(2.5, 0), None, N.INVALID_ARGUMENT,
     "(0, 1]"),
]


@pytest.mark.parametrize("name, call, returns, status, fragment", C_ROWS, ids=[r[0] for r in C_ROWS])
def test_c_abi_refuses_bad_input_cleanly(make_pool, mem, name, call, returns, status, fragment):
    """The call returns its error value, sets this status and message, and changes nothing."""
    w = World(make_pool("64MiB"), mem)
    before = [o["held_chunks"] for o in w.pool.owners()]
    stale_status()
    result = call(w)
    assert result == returns, f"{name}: returned {result!r}, expected {returns!r}"
    assert N.last_status() == status, (name, N.last_status(), N.last_error())
    assert fragment in N.last_error(), (name, N.last_error())
    after = [o["held_chunks"] for o in w.pool.owners()]
    if name == "release a chunk already released":  # the first, valid release of the row
        before[w.owner] -= 1
    assert after == before
    w.check()
    w.close()


# (name, call(world), exception class, message fragment)
PY_ROWS = [
    ("malloc 2^64 + 4096 (ctypes would truncate)", lambda w: w.pool.malloc(2**64 + 4096), ValueError, "2**63-1"),
    ("malloc 2^64 - 1", lambda w: w.pool.malloc(2**64 - 1), ValueError, "2**63-1"),
    ("malloc 2^62", lambda w: w.pool.malloc(2**62), OutOfMemoryError, "out of memory"),
    ("malloc a float", lambda w: w.pool.malloc(4096.0), TypeError, "must be an int"),
    ("byte tensor of 2^64 bytes", lambda w: w.pool.byte_tensor(w.live, 2**64), ValueError, "2**63-1"),
    ("release another owner's chunk", lambda w: w.pool.release(w.owner, [w.theirs[0]]), ValueError,
     "not held by owner"),
    ("release an id above 32 bits", lambda w: w.pool.release(w.owner, [2**40]), ValueError, "32-bit"),
    ("acquire -1 chunks", lambda w: w.pool.acquire(w.owner, -1), ValueError, "0 to 2**32"),
    ("acquire for an unknown owner", lambda w: w.pool.acquire(1234, 1), ValueError, "no active owner"),
    ("set_budget below held", lambda w: w.pool.set_budget("2MiB"), ValueError, "below the"),
    ("set_budget of 2^70", lambda w: w.pool.set_budget(2**70), ValueError, "2**63-1"),
    ("headroom of -1", lambda w: w.pool.set_headroom(-1), ValueError, ">= 0"),
    ("KV space of 2^40 pages", lambda w: PageSpace(w.pool, "huge", 2**40), ValueError, "pages"),
    ("KV state of a page out of range", lambda w: w.space.state(4), ValueError, "out of range"),
    ("pool budget of 2^64 + 1 GiB (ctypes would truncate)", lambda w: Pool("cpu", budget=2**64 + 2**30), ValueError,
     "2**63-1"),
    ("pool VA of 2^64 (ctypes would truncate)", lambda w: Pool("cpu", budget="64MiB", va_size=2**64), ValueError,
     "2**63-1"),
    ("pool VA of 2^50", lambda w: Pool("cpu", budget="64MiB", va_size=2**50), ValueError, "above the maximum"),
]


@pytest.mark.parametrize("name, call, exc, fragment", PY_ROWS, ids=[r[0] for r in PY_ROWS])
def test_python_api_refuses_bad_input_cleanly(make_pool, mem, name, call, exc, fragment):
    w = World(make_pool("64MiB"), mem)
    with pytest.raises(exc, match=None) as e:
        call(w)
    assert fragment in str(e.value), (name, str(e.value))
    w.check()
    w.close()


def test_set_budget_below_created_chunks_destroys_free_ones_and_keeps_the_ledger(make_pool):
    pool = make_pool("64MiB")
    ptrs = [pool.malloc(2 * MiB) for _ in range(8)]
    for p in ptrs[4:]:
        pool.free(p)
    pool.empty_cache()
    created = pool.stats()["created_chunks"]
    held = created - pool.stats()["free_chunks"]
    pool.set_budget(held * 2 * MiB)
    s = pool.stats()
    assert s["budget_bytes"] == held * 2 * MiB and s["created_chunks"] == held < created
    pool.validate()
    for p in ptrs[:4]:
        pool.free(p)


# ---- any sequence of owner calls, valid or not, keeps the ledger ------------------------

OWNER_CALL = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from([-1, 1, 2, 3, 99]), st.integers(0, 12)),
    st.tuples(st.just("release"), st.sampled_from([-1, 1, 2, 3, 99]), st.lists(st.integers(0, 40), max_size=5)),
    st.tuples(st.just("release_held"), st.sampled_from([1, 2, 3]), st.integers(0, 4)),
    st.tuples(st.just("set_budget"), st.just(0), st.sampled_from([0, 100, 2 * MiB, 8 * MiB, 24 * MiB, 64 * MiB])),
    st.tuples(st.just("unregister"), st.sampled_from([-1, 1, 2, 3, 99]), st.just(0)),
    st.tuples(st.just("handle"), st.just(0), st.integers(0, 2**32 - 1)),
)


@settings(max_examples=int(os.environ.get("ELLM_STATEFUL_EXAMPLES", 60)), deadline=None)
@given(calls=st.lists(OWNER_CALL, max_size=25))
def test_owner_calls_in_any_order_keep_the_ledger(calls):
    """Random owner calls through the C ABI, valid ones mixed with misuse (unknown owners, ids
    never held or held by another, budgets below what is held, leaving while holding): each
    call either does exactly what a model of the owners' chunks says or is refused with a
    message, and after each one validate() passes and every owner's held count matches."""
    with Pool("cpu", budget="64MiB") as pool:
        h = pool.handle
        owners = {pool.register_owner(f"o{i}"): set() for i in range(3)}  # owner -> chunk ids it holds
        assert sorted(owners) == [1, 2, 3]
        for kind, who, arg in calls:
            live = who in owners
            if kind == "acquire":
                out = ids(*([0] * max(arg, 1)))
                r = N.lib.ellm_pool_acquire(h, who, arg, out)
                if r == N.OK:
                    got = set(out[:arg])
                    assert live and len(got) == arg and not got & set().union(*owners.values())
                    owners[who] |= got
                else:
                    assert r in (N.INVALID_ARGUMENT, N.OUT_OF_MEMORY) and N.last_error()
                    assert live or r == N.INVALID_ARGUMENT
            elif kind in ("release", "release_held"):
                chosen = sorted(owners.get(who, ()))[:arg] if kind == "release_held" else arg
                r = N.lib.ellm_pool_release(h, who, len(chosen), ids(*chosen))
                valid = live and len(set(chosen)) == len(chosen) and set(chosen) <= owners[who]
                assert (r == N.OK) == valid, (kind, who, chosen, r, N.last_error())
                if valid:
                    owners[who] -= set(chosen)
                else:
                    assert "nothing was released" in N.last_error()
            elif kind == "set_budget":
                held = sum(len(c) for c in owners.values())
                r = N.lib.ellm_pool_set_budget(h, arg)
                assert (r == N.OK) == (arg >= max(held * 2 * MiB, 2 * MiB)), (arg, held, r, N.last_error())
            elif kind == "unregister":
                r = N.lib.ellm_pool_unregister_owner(h, who)
                assert (r == N.OK) == (live and not owners[who]), (who, r, N.last_error())
                if r == N.OK:
                    del owners[who]
            else:
                handle = N.lib.ellm_pool_chunk_handle(h, arg)
                if N.last_status() != N.OK:
                    assert handle == 0 and "does not exist" in N.last_error()
            pool.validate()
            held = {o["owner"]: o["held_chunks"] for o in pool.owners()}
            assert all(held[o] == len(c) for o, c in owners.items())
        for o, chunks in owners.items():
            pool.release(o, sorted(chunks))
            pool.unregister_owner(o)
        pool.validate()


def test_set_budget_takes_back_the_arena_cache_before_refusing(make_pool, mem):
    """Chunks the arena only caches (freed blocks, still mapped) hold no live data: a budget below
    them is met by taking them back, as an acquire would; the live block stays intact."""
    pool = make_pool("64MiB")
    live = pool.malloc(3 * MiB)  # two chunks at least
    mem.fill(live, 3 * MiB, tag=5)
    for p in [pool.malloc(4 * MiB) for _ in range(6)]:
        pool.free(p)  # 12 more chunks, cached by the arena
    assert pool.stats()["reserved_bytes"] >= 12 * MiB
    pool.set_budget("6MiB")
    s = pool.stats()
    assert s["budget_bytes"] == 6 * MiB and s["created_chunks"] <= 3 and 4 * MiB <= s["reserved_bytes"] <= 6 * MiB
    assert mem.intact(live, 3 * MiB, tag=5)
    pool.validate()
    with pytest.raises(ValueError, match="in use; free memory first"):
        pool.set_budget("2MiB")  # below the live block's chunks
    pool.free(live)
