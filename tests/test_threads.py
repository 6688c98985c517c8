"""Concurrency: many threads allocating from one pool (ctypes drops the GIL, so the C++ runs in parallel)."""
from __future__ import annotations

import bisect
import random
import threading

from ellm_alloc import OutOfMemoryError

KiB, MiB = 1 << 10, 1 << 20
N_THREADS = 6
OPS = 2500
MAX_LIVE = 12
GPU_STREAM = 9  # a stream some blocks are recorded on, held and released by a "GPU" thread


def rounded(n: int) -> int:
    return (n + 511) // 512 * 512


class LiveRanges:
    """Every block any thread holds, by address; adding one that overlaps another is an error."""

    def __init__(self):
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.ends: dict[int, int] = {}

    def add(self, ptr: int, size: int) -> None:
        end = ptr + rounded(size)
        with self.lock:
            i = bisect.bisect_left(self.starts, ptr)
            if i < len(self.starts):
                assert self.starts[i] >= end, f"[{ptr:#x},{end:#x}) overlaps a live block at {self.starts[i]:#x}"
            if i > 0:
                prev = self.starts[i - 1]
                assert self.ends[prev] <= ptr, f"[{ptr:#x},{end:#x}) overlaps live [{prev:#x},{self.ends[prev]:#x})"
            self.starts.insert(i, ptr)
            self.ends[ptr] = end

    def remove(self, ptr: int) -> None:
        with self.lock:
            self.starts.remove(ptr)
            del self.ends[ptr]


def draw_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.55:
        return rng.randint(1, 8 * KiB)
    if r < 0.9:
        return rng.randint(8 * KiB + 1, MiB)
    if r < 0.98:
        return rng.choice([2 * MiB, 2 * MiB + 512, 3 * MiB])
    return rng.randint(3 * MiB, 4 * MiB)


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread is stuck (deadlock?)"
    return errors


def test_threads_malloc_write_verify_free(make_pool, mem, bind):
    """6 threads x 2500 ops (mixed sizes, shared and private streams, half via the torch ABI) never
    hand out overlapping blocks, never corrupt data, and leave a valid, leak-free pool."""
    pool = make_pool("1GiB")  # large enough that no interleaving can legitimately run out
    dev = bind(pool)
    live = LiveRanges()
    done = threading.Event()

    def worker(tid: int):
        rng = random.Random(tid)
        stream = tid % 3 if tid < 3 else 100 + tid  # threads 0-2 share streams with each other
        via_torch = tid % 2 == 1
        mine: list[tuple[int, int, int]] = []
        for op in range(OPS):
            if mine and (len(mine) >= MAX_LIVE or rng.random() < 0.45):
                ptr, size, tag = mine.pop(rng.randrange(len(mine)))
                assert mem.intact(ptr, size, tag), f"thread {tid}: block {tag} at {ptr:#x} corrupted"
                live.remove(ptr)
                if via_torch:
                    dev.free(ptr, size, stream)
                else:
                    pool.free(ptr, stream)
            else:
                size = draw_size(rng)
                ptr = dev.malloc(size, stream) if via_torch else pool.malloc(size, stream)
                assert ptr, f"thread {tid}: malloc({size}) failed: {pool.summary()}"
                assert ptr % 512 == 0
                live.add(ptr, size)
                tag = (tid << 20) | op
                mem.fill(ptr, size, tag)
                if rng.random() < 0.05:
                    pool.record_stream(ptr, GPU_STREAM)
                mine.append((ptr, size, tag))
        for ptr, size, tag in mine:
            assert mem.intact(ptr, size, tag)
            live.remove(ptr)
            pool.free(ptr, stream)

    def janitor():
        while not done.is_set():
            pool.empty_cache()
            pool.validate()  # takes the arena lock: invariants must hold between any two calls

    def gpu():
        rng = random.Random(99)
        while not done.is_set():
            pool.hold_stream(GPU_STREAM)
            for _ in range(rng.randint(1, 50)):
                if done.is_set():
                    break
                pool.stats()
            pool.release_stream(GPU_STREAM)

    helpers = [threading.Thread(target=janitor), threading.Thread(target=gpu)]
    for h in helpers:
        h.start()
    try:
        errors = run_threads([(worker, i) for i in range(N_THREADS)])
    finally:
        done.set()
        for h in helpers:
            h.join()
    assert not errors, errors[0]
    pool.validate()
    s = pool.stats()
    assert s["allocated_bytes"] == 0 and s["live_blocks"] == 0
    assert s["num_allocs"] == s["num_frees"]
    assert s["invalid_frees"] == 0


def test_threads_owner_races_arena_for_a_tight_budget(make_pool):
    """A KV owner acquiring/releasing chunks while the arena mallocs, both reclaiming from each
    other under a tight budget: no deadlock, and the ledger balances afterwards."""
    pool = make_pool("32MiB")
    held: list[int] = []
    held_lock = threading.Lock()

    def reclaim(want: int) -> int:
        # Called from C on the arena's thread; must not block.
        if not held_lock.acquire(blocking=False):
            return 0
        try:
            give = held[:want]
            del held[: len(give)]
        finally:
            held_lock.release()
        if give:
            pool.release(kv, give)
        return len(give)

    kv = pool.register_owner("kv", reclaim=reclaim)
    counts = {"arena_ooms": 0, "kv_ooms": 0}

    def arena_user():
        rng = random.Random(1)
        for _ in range(400):
            size = rng.choice([512 * KiB, 2 * MiB, 6 * MiB])
            try:
                p = pool.malloc(size)
            except OutOfMemoryError:
                counts["arena_ooms"] += 1
                continue
            pool.free(p)
            if rng.random() < 0.3:
                pool.empty_cache()

    def kv_user():
        rng = random.Random(2)
        for _ in range(400):
            n = rng.randint(1, 4)
            try:
                ids = pool.acquire(kv, n)
            except OutOfMemoryError:
                counts["kv_ooms"] += 1
                ids = []
            with held_lock:
                held.extend(ids)
                drop = held[: rng.randint(0, len(held))] if held else []
                del held[: len(drop)]
            if drop:
                pool.release(kv, drop)

    errors = run_threads([(arena_user,), (kv_user,)])
    assert not errors, errors[0]
    with held_lock:
        rest = list(held)
        held.clear()
    if rest:
        pool.release(kv, rest)
    pool.validate()
    by_name = {o["name"]: o for o in pool.owners()}
    assert by_name["kv"]["held_chunks"] == 0
    s = pool.stats()
    assert s["created_chunks"] == s["free_chunks"] + by_name["arena"]["held_chunks"]
    pool.unregister_owner(kv)
