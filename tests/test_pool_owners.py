"""Several owners of one pool's chunks: the ledger, and reclaim in both directions."""
from __future__ import annotations

import threading

import pytest

from ellm_alloc import OutOfMemoryError

MiB = 1 << 20
CHUNK = 2 * MiB


def owner(pool, name: str) -> dict:
    return next(o for o in pool.owners() if o["name"] == name and o["active"])


def owner_named(pool, name: str) -> dict:
    return next(o for o in pool.owners() if o["name"] == name)


def assert_ledger(pool) -> None:
    pool.validate()
    s = pool.stats()
    held = sum(o["held_chunks"] for o in pool.owners())
    assert s["created_chunks"] == s["free_chunks"] + held
    assert s["created_chunks"] * CHUNK <= s["budget_bytes"]


class KvOwner:
    """A second owner holding chunks, with a reclaim callback that gives back up to `want`."""

    def __init__(self, pool, name="kv", generous=True):
        self.pool = pool
        self.held: list[int] = []
        self.calls = 0
        self.generous = generous
        self.id = pool.register_owner(name, reclaim=self.reclaim)

    def reclaim(self, want: int) -> int:
        self.calls += 1
        if not self.generous:
            return 0
        give, self.held = self.held[:want], self.held[want:]
        if give:
            self.pool.release(self.id, give)
        return len(give)

    def acquire(self, n: int) -> list[int]:
        ids = self.pool.acquire(self.id, n)
        self.held += ids
        return ids

    def release_all(self) -> None:
        if self.held:
            self.pool.release(self.id, self.held)
        self.held = []


def test_owner_acquire_release_keeps_the_ledger(pool):
    """acquire/release of a second owner moves chunks between free and held, and owners() agrees."""
    kv = KvOwner(pool)
    ids = kv.acquire(5)
    assert len(set(ids)) == 5
    assert owner(pool, "kv")["held_chunks"] == 5
    assert_ledger(pool)
    pool.release(kv.id, ids[:2])
    kv.held = ids[2:]
    assert owner(pool, "kv")["held_chunks"] == 3
    kv.release_all()
    o = owner(pool, "kv")
    assert (o["held_chunks"], o["peak_chunks"]) == (0, 5)
    assert_ledger(pool)
    pool.unregister_owner(kv.id)


def test_acquire_is_all_or_nothing(pool):
    """Asking for more chunks than the budget has takes none and raises OOM."""
    kv = KvOwner(pool)
    kv.acquire(3)
    with pytest.raises(OutOfMemoryError, match="cannot acquire 40 chunks"):
        kv.acquire(40)
    assert owner(pool, "kv")["held_chunks"] == 3
    assert pool.stats()["failed_acquires"] == 1
    assert_ledger(pool)
    kv.release_all()


def test_owner_acquire_reclaims_idle_arena_chunks(make_pool):
    """With the budget held by the arena's cached (freed) blocks, another owner's acquire succeeds
    by reclaiming them: the arena's 'given' and the owner's 'received' count the move."""
    pool = make_pool("32MiB")
    blocks = [pool.malloc(4 * MiB) for _ in range(8)]  # the whole budget
    for p in blocks:
        pool.free(p)  # cached in the arena, chunks still mapped
    assert pool.stats()["reserved_bytes"] == 32 * MiB
    kv = KvOwner(pool, generous=False)
    kv.acquire(16)
    arena, o = owner(pool, "arena"), owner(pool, "kv")
    assert arena["held_chunks"] == 0 and o["held_chunks"] == 16
    assert arena["given"] > 0 and o["received"] > 0 and arena["reclaimed"] == 16
    assert pool.stats()["reserved_bytes"] == 0
    assert_ledger(pool)
    with pytest.raises(OutOfMemoryError):  # the KV owner holds everything and gives nothing back
        pool.malloc(MiB)
    kv.release_all()
    pool.free(pool.malloc(MiB))
    pool.unregister_owner(kv.id)


def test_owner_reclaim_leaves_live_arena_blocks_alone(make_pool, mem):
    """Reclaim takes only idle arena chunks: a live block keeps its chunks and its data."""
    pool = make_pool("32MiB")
    live = pool.malloc(8 * MiB)
    mem.fill(live, 8 * MiB, 3)
    for p in [pool.malloc(4 * MiB) for _ in range(6)]:
        pool.free(p)
    kv = KvOwner(pool)
    with pytest.raises(OutOfMemoryError):
        kv.acquire(13)  # only 12 chunks are not under the live block
    kv.acquire(12)
    assert mem.intact(live, 8 * MiB, 3)
    assert owner(pool, "arena")["held_chunks"] == 4
    assert_ledger(pool)
    kv.release_all()
    pool.free(live)


def test_owner_reclaim_does_not_take_chunks_the_gpu_may_still_use(make_pool, mem):
    """An idle arena chunk whose fence is pending (stream held) is not reclaimed until released."""
    pool = make_pool("16MiB")  # 8 chunks
    a = pool.malloc(CHUNK, 1)
    pool.hold_stream(1)
    pool.free(a, 1)
    kv = KvOwner(pool)
    with pytest.raises(OutOfMemoryError):
        kv.acquire(8)
    assert mem.readable(a), "the chunk under a block freed on a busy stream was unmapped"
    pool.release_stream(1)
    kv.acquire(8)
    assert owner(pool, "arena")["held_chunks"] == 0
    kv.release_all()


def test_arena_malloc_reclaims_from_owner_callback(make_pool, mem):
    """With the budget held by another owner, arena malloc succeeds through that owner's reclaim
    callback, and the ledger records the move (owner given/reclaimed, arena received)."""
    pool = make_pool("32MiB")
    kv = KvOwner(pool)
    kv.acquire(16)
    p = pool.malloc(8 * MiB)
    mem.fill(p, 8 * MiB, 1)
    assert mem.intact(p, 8 * MiB, 1)
    o, arena = owner(pool, "kv"), owner(pool, "arena")
    assert kv.calls >= 1
    assert o["reclaimed"] >= 4 and o["given"] >= 4 and arena["received"] >= 4
    assert o["held_chunks"] == len(kv.held) == 16 - o["reclaimed"]
    assert_ledger(pool)
    pool.free(p)
    kv.release_all()


def test_arena_oom_when_owner_gives_nothing_back(make_pool):
    """An owner whose callback gives nothing back makes arena malloc fail cleanly with OOM."""
    pool = make_pool("32MiB")
    kv = KvOwner(pool, generous=False)
    kv.acquire(16)
    with pytest.raises(OutOfMemoryError, match="kv=16"):
        pool.malloc(MiB)
    assert kv.calls >= 1 and pool.stats()["reclaim_calls"] >= 1
    assert_ledger(pool)
    kv.release_all()
    pool.free(pool.malloc(MiB))


@pytest.mark.parametrize("behaviour", ["raises", "lies"])
def test_misbehaving_reclaim_callback_is_contained(make_pool, behaviour):
    """A callback that raises, or claims chunks it never released, yields OOM and a balanced ledger."""
    pool = make_pool("16MiB")
    held: list[int] = []

    def bad(want):
        if behaviour == "raises":
            raise RuntimeError("boom")
        return want  # claims to have given `want` chunks, gave none

    kv = pool.register_owner("kv", reclaim=bad)
    held += pool.acquire(kv, 8)
    with pytest.raises(OutOfMemoryError):
        pool.malloc(MiB)
    assert_ledger(pool)
    assert owner(pool, "kv")["held_chunks"] == 8
    pool.release(kv, held)
    pool.free(pool.malloc(MiB))


def test_unregister_owner_holding_chunks_fails(pool):
    """unregister_owner refuses while the owner holds chunks, and succeeds once they are released."""
    kv = KvOwner(pool)
    kv.acquire(2)
    with pytest.raises(ValueError, match="still holds chunks"):
        pool.unregister_owner(kv.id)
    assert owner(pool, "kv")["active"]
    kv.release_all()
    pool.unregister_owner(kv.id)
    assert not [o for o in pool.owners() if o["name"] == "kv" and o["active"]]
    assert_ledger(pool)


def test_unregistered_owner_is_not_asked_to_reclaim(make_pool):
    """After unregister, the old callback is never called again."""
    pool = make_pool("16MiB")
    kv = KvOwner(pool)
    kv.acquire(1)
    kv.release_all()
    pool.unregister_owner(kv.id)
    other = pool.register_owner("other")
    ids = pool.acquire(other, 8)
    with pytest.raises(OutOfMemoryError):
        pool.malloc(MiB)
    assert kv.calls == 0
    pool.release(other, ids)


# ---- owner lifetime: no reclaim callback runs on an owner once it is unregistered ----


def test_unregister_waits_for_a_reclaim_callback_running_on_the_owner(make_pool):
    """unregister_owner() returns only after a reclaim callback already running on that owner
    has returned: the owner (a KV space, in C++) is freed right after unregistering, and a
    callback still inside it would use freed memory (the use-after-free of issue 16)."""
    pool = make_pool("16MiB")
    inside, let_go = threading.Event(), threading.Event()
    events: list[str] = []

    def slow_reclaim(want):
        inside.set()
        let_go.wait(10)
        events.append("callback returned")
        return 0

    slow = pool.register_owner("slow", reclaim=slow_reclaim)
    hungry = KvOwner(pool, "hungry")
    asker = threading.Thread(target=lambda: pytest.raises(OutOfMemoryError, hungry.acquire, 9))
    asker.start()  # 9 chunks of 8: the pool asks every other owner, "slow" included
    assert inside.wait(10), "the reclaim callback never ran"

    def unregister():
        pool.unregister_owner(slow)
        events.append("unregistered")

    leaver = threading.Thread(target=unregister)
    leaver.start()
    leaver.join(0.3)
    assert leaver.is_alive(), "unregister_owner returned while a callback was still running on the owner"
    let_go.set()
    leaver.join(10)
    asker.join(10)
    assert events == ["callback returned", "unregistered"]
    assert not owner_named(pool, "slow")["active"]
    assert_ledger(pool)
    pool.unregister_owner(hungry.id)


def test_owner_cannot_unregister_inside_its_own_reclaim_callback(make_pool):
    """A callback unregistering its own owner would wait for itself forever: it is refused
    with a ValueError, and the owner stays registered."""
    pool = make_pool("16MiB")
    refusals: list[str] = []

    def leave_now(want):
        try:
            pool.unregister_owner(me)
        except ValueError as e:
            refusals.append(str(e))
        return 0

    me = pool.register_owner("leaver", reclaim=leave_now)
    hungry = KvOwner(pool, "hungry")
    with pytest.raises(OutOfMemoryError):
        hungry.acquire(9)
    assert refusals and "inside its own reclaim callback" in refusals[0]
    assert owner_named(pool, "leaver")["active"]
    pool.unregister_owner(me)  # outside the callback it may leave
    assert not owner_named(pool, "leaver")["active"]
    assert_ledger(pool)
    pool.unregister_owner(hungry.id)


def test_acquire_and_release_for_an_unregistered_owner_are_refused(pool):
    """An owner that left can neither take nor give chunks: the ledger keeps balancing."""
    kv = KvOwner(pool)
    ids = kv.acquire(2)
    kv.release_all()
    pool.unregister_owner(kv.id)
    with pytest.raises(ValueError, match=f"no active owner {kv.id}"):
        pool.acquire(kv.id, 1)
    with pytest.raises(ValueError, match="no active owner"):
        pool.release(kv.id, ids)
    assert_ledger(pool)


def test_a_pool_and_its_kv_space_collected_in_one_cycle_tear_down_cleanly():
    """When the garbage collector frees a reference cycle holding a pool and
    a KV space (with a view of its pages), it may finalise the pool first,
    with its weak references to the space already cleared: the pool must
    still destroy the space before itself, and the space's own teardown must
    then do nothing. It used to run on the destroyed pool (a segfault), so
    this runs in a fresh interpreter."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import gc
        from ellm_alloc.pool import Pool
        from ellm_alloc.kv.space import PageSpace

        class Holder:
            pass

        for _ in range(20):
            h = Holder()
            h.pool = Pool("cpu", budget=64 << 20)
            h.space = PageSpace(h.pool, "cycle", 8)
            h.space.map(0, 2)
            h.view = h.space.bytes_view()
            h.self = h
            del h
            gc.collect()
        print("clean")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "clean", (r.returncode, r.stderr[-2000:])
