"""The KV manager on one thread while the torch arena squeezes the pool on another.

The arena thread keeps taking chunks until the pool refuses, writing and
checking its own blocks, then frees them. Its reclaims run inside C++ while
the manager may be anywhere in a call (the exact interleavings, a reclaim
between sync() and a pin, a re-mark or an unmap, are pinned down one by one
in test_kv_straddling.py). The manager must never lose a live token, its
bookkeeping must stay consistent, and the ledger must balance at the end.
Blocks straddle chunks (2.5 MiB blocks on 2 MiB chunks), so reclaiming one
chunk drops the cached blocks on both sides of it.
"""
from __future__ import annotations

import sys
import threading

from ellm_alloc import OutOfMemoryError
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, ModelKVSpec

MiB = 1 << 20
CHUNK = 2 * MiB
BS = 16
MODEL = ModelKVSpec("straddle", (FullAttentionSpec(20, 1024, "float32"),))
PREFIXES = ([1] * 48, [2] * 32, [3] * 64)


def test_kv_manager_against_a_squeezing_arena(make_pool, mem):
    pool = make_pool(str(24 * CHUNK))
    mgr = KVCacheManager(MODEL, pool, block_size=BS, max_cached_fraction=float("inf"))
    stop = threading.Event()
    arena_errors: list[str] = []
    squeezes = [0]

    def arena():
        tag = 0
        while not stop.is_set():
            held = []
            while len(held) < 24:
                try:
                    ptr = pool.malloc(CHUNK)
                except OutOfMemoryError:
                    break
                tag += 1
                mem.fill(ptr, CHUNK, tag)
                held.append((ptr, tag))
            squeezes[0] += 1
            for ptr, t in held:
                if not mem.intact(ptr, CHUNK, t):
                    arena_errors.append(f"arena block {ptr:#x} overwritten")
                pool.free(ptr)
            pool.empty_cache()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely: the races live between two calls
    worker = threading.Thread(target=arena)
    worker.start()
    live: dict[str, float] = {}
    lost: list[str] = []
    admitted = hits = 0
    try:
        # 300 requests at least, then on until the arena has taken a KV chunk:
        # how soon it does depends on the threads' timing (much slower under
        # the sanitizers), and the test is about what happens when it does.
        i = -1
        while (i := i + 1) < 300 or (i < 3000 and mgr.spaces[0].stats()["reclaimed_pages"] == 0):
            rid = f"r{i}"
            prompt = PREFIXES[i % 3] + [i % 7] * (i % 11)
            hits += mgr.add_request(rid, prompt) > 0
            if not mgr.allocate_slots(rid, len(prompt) - mgr.requests[rid].num_tokens):
                mgr.free(rid)
            else:
                admitted += 1
                k, v = mgr.layer_tensors(0)
                first = mgr.requests[rid].hit_tokens // BS
                for b in mgr.block_table(rid, 0)[first:]:  # shared prefix blocks hold another's values
                    k[b].fill_(i + 1)
                    v[b].fill_(-(i + 1))
                live[rid] = i + 1
            if len(live) > 3 or (live and i % 5 == 0):
                old = next(iter(live))
                val = live.pop(old)
                k, v = mgr.layer_tensors(0)
                first = mgr.requests[old].hit_tokens // BS
                for b in mgr.block_table(old, 0)[first:]:
                    if not (bool((k[b] == val).all()) and bool((v[b] == -val).all())):
                        lost.append(f"{old} block {b}")
                mgr.free(old)
            mgr.check()
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(switch)
    assert not arena_errors, arena_errors[:3]
    assert not lost, f"live KV overwritten under the arena's reclaims: {lost[:3]}"
    assert admitted > 100 and squeezes[0] > 10, (admitted, squeezes[0])
    mgr.sync()
    mgr.check()
    space = mgr.spaces[0]
    assert pool.owners()[space.owner]["held_chunks"] == space.stats()["mapped_pages"] == mgr.pools[0].mapped_chunks
    assert space.stats()["reclaimed_pages"] > 0, "the arena never took a KV chunk: the race was not exercised"
    pool.validate()
    mgr.close()
    assert pool.owners()[space.owner]["held_chunks"] == 0
