"""Ballooning between the KV cache and the torch arena of one pool.

Pages that hold only cached (evictable) blocks are reclaimable: a torch
allocation on a full pool takes them inside the C++ pool, without calling
into Python; once the arena frees and empties its cache, the KV cache maps
those chunks again. memory_stats-style counters (ellm_alloc.stats.torch_style
over a host pool's stats() and owners()) record both directions.
"""
from __future__ import annotations

import sys

import pytest
import torch

from ellm_alloc import OutOfMemoryError
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, ModelKVSpec
from ellm_alloc.stats import torch_style

MiB = 1 << 20
# 2 layers x 16 tokens x 8 KiB = 256 KiB blocks: 8 per 2 MiB chunk.
MODEL = ModelKVSpec("f", (FullAttentionSpec(4, 256, "float32"),) * 2)


def stats(pool) -> dict:
    return torch_style(pool.stats(), pool.owners())


def kv_chunks(pool) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"].startswith("kv."))


def fill(mgr, n_req, tokens=128, offset=0):
    for i in range(n_req):
        rid = f"r{offset + i}"
        mgr.add_request(rid, [offset + i] * tokens)
        assert mgr.allocate_slots(rid, tokens), rid
        k, v = mgr.layer_tensors(0)
        for b in mgr.block_table(rid, 0):
            k[b].fill_(offset + i + 1)


def intact(mgr, rid, val) -> bool:
    k, _ = mgr.layer_tensors(0)
    return all(bool((k[b] == val).all()) for b in mgr.block_table(rid, 0))


def test_arena_reclaims_cached_pages_without_python_and_gives_them_back(make_pool):
    pool = make_pool("16MiB")  # 8 chunks
    mgr = KVCacheManager(MODEL, pool, block_size=16, max_cached_fraction=float("inf"))
    fill(mgr, 8)  # 8 requests x 8 blocks: every chunk, one page each
    assert kv_chunks(pool) == 8 and pool.stats()["free_chunks"] == 0
    for i in range(8):
        mgr.free(f"r{i}")
    assert mgr.usage()["groups"][0]["cached_blocks"] == 64
    assert kv_chunks(pool) == 8  # cached pages stay mapped
    s0 = stats(pool)

    # The arena takes 6 chunks from the KV cache with no Python code of the KV side running.
    kv_calls = []

    def prof(frame, event, arg):
        if event == "call" and "/ellm_alloc/kv/" in frame.f_code.co_filename:
            kv_calls.append(frame.f_code.co_name)

    sys.setprofile(prof)
    try:
        ptr = pool.malloc(12 * MiB)
    finally:
        sys.setprofile(None)
    assert kv_calls == []
    s1 = stats(pool)
    assert s1["ellm.balloon.kv_to_arena_chunks"] - s0["ellm.balloon.kv_to_arena_chunks"] == 6
    assert s1["ellm.chunks.arena"] == 6 and kv_chunks(pool) == 2
    pool.validate()

    # The manager learns about it on its next call and forgets those cached blocks.
    mgr.sync()
    g = mgr.usage()["groups"][0]
    assert g["mapped_pages"] == 2 and g["cached_blocks"] == 16
    mgr.check()
    # Least recently released pages went first: r0's prefix is gone, r7's is still cached.
    assert mgr.add_request("x0", [0] * 128 + [9]) == 0
    assert mgr.add_request("x7", [7] * 128 + [9]) == 128
    mgr.free("x0")
    mgr.free("x7")

    # While the arena holds them the KV cache cannot grow beyond the rest.
    fill(mgr, 2, offset=100)  # 16 blocks: evicts the 16 cached ones
    mgr.add_request("y", [7] * 64)
    assert not mgr.can_allocate("y", 64) and not mgr.allocate_slots("y", 64)

    # The arena frees and empties its cache: the KV cache maps the chunks again.
    pool.free(ptr)
    assert pool.empty_cache() == 6
    assert mgr.allocate_slots("y", 64)
    s2 = stats(pool)
    assert s2["ellm.balloon.arena_to_kv_chunks"] - s1["ellm.balloon.arena_to_kv_chunks"] >= 1
    assert s2["ellm.chunks.arena"] == 0
    assert intact(mgr, "r100", 101) and intact(mgr, "r101", 102)
    mgr.check()
    mgr.close()
    assert kv_chunks(pool) == 0


def test_live_pages_are_never_reclaimed(make_pool):
    pool = make_pool("16MiB")
    mgr = KVCacheManager(MODEL, pool, block_size=16, max_cached_fraction=float("inf"))
    fill(mgr, 8)
    s0 = stats(pool)
    with pytest.raises(OutOfMemoryError):
        pool.malloc(2 * MiB)
    s1 = stats(pool)
    assert s1["ellm.balloon.kv_to_arena_chunks"] == s0["ellm.balloon.kv_to_arena_chunks"]
    assert kv_chunks(pool) == 8
    assert all(intact(mgr, f"r{i}", i + 1) for i in range(8))
    # Free one request: its page is only cached now, so the arena may take it.
    mgr.free("r3")
    ptr = pool.malloc(2 * MiB)
    assert stats(pool)["ellm.balloon.kv_to_arena_chunks"] == s0["ellm.balloon.kv_to_arena_chunks"] + 1
    assert all(intact(mgr, f"r{i}", i + 1) for i in range(8) if i != 3)
    pool.free(ptr)
    mgr.check()
    mgr.close()


def test_freed_uncached_pages_go_straight_back(make_pool):
    pool = make_pool("16MiB")
    mgr = KVCacheManager(MODEL, pool, block_size=16, enable_prefix_caching=False)
    fill(mgr, 8)
    for i in range(8):
        mgr.free(f"r{i}")
    assert kv_chunks(pool) == 0 and mgr.usage()["mapped_bytes"] == 0
    s0 = stats(pool)
    ptr = pool.malloc(16 * MiB)  # the whole budget: the 8 chunks the KV cache freed
    s1 = stats(pool)
    assert s1["ellm.balloon.kv_to_arena_chunks"] - s0["ellm.balloon.kv_to_arena_chunks"] == 8
    assert s1["ellm.chunks.arena"] == 8
    pool.free(ptr)
    assert pool.empty_cache() == 8
    fill(mgr, 8, offset=10)
    assert kv_chunks(pool) == 8
    assert stats(pool)["ellm.balloon.arena_to_kv_chunks"] - s1["ellm.balloon.arena_to_kv_chunks"] == 8
    mgr.close()


def test_reserve_headroom_keeps_chunks_from_the_kv_cache(make_pool):
    pool = make_pool("16MiB")
    mgr = KVCacheManager(MODEL, pool, block_size=16, max_cached_fraction=float("inf"))
    mgr.reserve_headroom(6 * MiB)  # 3 chunks for the arena
    i = 0
    while True:
        mgr.add_request(f"r{i}", [i] * 128)
        if not mgr.allocate_slots(f"r{i}", 128):
            assert not mgr.can_allocate(f"r{i}", 128)
            mgr.free(f"r{i}")
            break
        i += 1
    assert i == 5 and kv_chunks(pool) == 5
    s0 = stats(pool)
    ptr = pool.malloc(6 * MiB)  # the headroom: no reclaim needed, nothing live touched
    assert stats(pool)["ellm.balloon.kv_to_arena_chunks"] == s0["ellm.balloon.kv_to_arena_chunks"]
    assert kv_chunks(pool) == 5
    pool.free(ptr)
    pool.empty_cache()
    mgr.reserve_headroom(0)
    mgr.add_request("more", [99] * 128)
    assert mgr.allocate_slots("more", 128)
    assert kv_chunks(pool) == 6
    with pytest.raises(ValueError, match="headroom"):
        mgr.reserve_headroom(-1)
    mgr.close()
