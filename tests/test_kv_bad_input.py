"""Bad input to the KV manager: clear errors naming the limit, and failed
allocations that leave nothing behind."""
from __future__ import annotations

import pytest

from ellm_alloc.kv import (
    FullAttentionSpec, KVCacheManager, MambaSpec, MLASpec, ModelKVSpec, SlidingWindowSpec,
)

from ellm_alloc.kv.contiguous import ContiguousKV

F32 = "float32"
FULL = FullAttentionSpec(4, 256, F32)  # 8 KiB/token: 16 tokens = 128 KiB per layer
MIXED = ModelKVSpec("mixed", (FULL, SlidingWindowSpec(4, 256, F32, window=32),
                              MambaSpec(dtype=F32, conv_shape=(16, 64), ssm_shape=(112, 64))))


def snapshot(mgr, pool):
    u = mgr.usage()
    return ([(g["mapped_pages"], g["live_blocks"], g["free_slots"], g["cached_blocks"]) for g in u["groups"]],
            u["mapped_bytes"], [(o["name"], o["held_chunks"]) for o in pool.owners()])


def test_mismatched_specs():
    with pytest.raises(ValueError, match="layer 1 is not a LayerSpec"):
        ModelKVSpec("m", (FULL, {"type": "full"}))
    with pytest.raises(ValueError, match="kv_heads must be 1"):
        MLASpec(kv_heads=2, kv_lora_rank=64, rope_dim=16)
    with pytest.raises(ValueError, match="head_dim must be kv_lora_rank"):
        MLASpec(head_dim=70, kv_lora_rank=64, rope_dim=16)
    with pytest.raises(ValueError, match="has no layers"):
        ModelKVSpec("m", ())


def test_views_reject_the_wrong_layer_kind(pool):
    with pytest.raises(ValueError, match="layer 2 is mamba"):
        ContiguousKV(MIXED, pool, 1, 16)
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    mgr.add_request("a", [1] * 5)
    assert mgr.allocate_slots("a", 5)
    with pytest.raises(ValueError, match="layer 2 is mamba"):
        mgr.gather("a", 2)
    mgr.close()


def test_block_larger_than_any_large_page(pool):
    with pytest.raises(ValueError, match=r"more than the largest feasible large page \(33554432 B\).*block_size \(now 8192\)"):
        KVCacheManager(ModelKVSpec("m", (FULL,)), pool, block_size=8192)  # 64 MiB per block
    with pytest.raises(ValueError, match=r"\(4194304 B\)"):
        KVCacheManager(ModelKVSpec("m", (FULL,)), pool, block_size=1024, max_large_page_bytes=4 << 20)
    assert all(not o["active"] or o["held_chunks"] == 0 for o in pool.owners())


def test_request_longer_than_capacity(pool):
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    before = snapshot(mgr, pool)
    mgr.add_request("a", [1] * 10)
    n_pages = mgr.spaces[0].n_pages
    too_many = (n_pages + 1) * mgr.pools[0].ratio * 16
    with pytest.raises(ValueError, match=rf"'a' at {too_many} tokens needs {n_pages + 1} large pages in group 0 "
                                         rf"\(full\); the KV space holds at most {n_pages}"):
        mgr.allocate_slots("a", too_many)
    with pytest.raises(ValueError, match=f"holds at most {n_pages}"):
        mgr.can_allocate("a", too_many)
    assert mgr.requests["a"].num_tokens == 0
    assert snapshot(mgr, pool) == before
    mgr.check()
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        mgr.allocate_slots("a", -1)
    mgr.close()


def test_failed_allocation_rolls_back_every_group(make_pool):
    pool = make_pool("16MiB")
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    mgr.add_request("a", [1] * 900)
    assert mgr.allocate_slots("a", 900)  # 57 full blocks (16 a page): 4 chunks, + sliding + mamba: 6 of 8
    mgr.check()
    before = snapshot(mgr, pool)
    mgr.add_request("b", [2] * 700)
    assert not mgr.can_allocate("b", 700)
    # 44 full blocks: the 7 free slots and 2 fresh pages are taken, then the pool runs dry.
    assert not mgr.allocate_slots("b", 700)
    assert snapshot(mgr, pool) == before
    assert mgr.requests["b"].num_tokens == 0
    assert all(b is None for b in mgr.block_table("b", 0))
    mgr.check()
    pool.validate()
    # A smaller one still fits afterwards, and everything frees.
    assert mgr.allocate_slots("b", 20)
    mgr.check()
    mgr.close()
    assert all(o["held_chunks"] == 0 for o in pool.owners())


def test_failed_map_rolls_back(pool):
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    mgr.add_request("a", list(range(40)))
    before = snapshot(mgr, pool)
    pool.inject_fault("map", 2)  # the second group's page fails to map
    assert not mgr.allocate_slots("a", 40)
    assert snapshot(mgr, pool) == before
    s = pool.stats()
    assert sum(o["held_chunks"] for o in pool.owners()) + s["free_chunks"] == s["created_chunks"]
    mgr.check()
    assert mgr.allocate_slots("a", 40)
    mgr.check()
    mgr.close()


def test_unknown_request_ids(pool):
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    for call in (lambda: mgr.free("nope"), lambda: mgr.allocate_slots("nope", 1), lambda: mgr.can_allocate("nope", 1),
                 lambda: mgr.block_table("nope", 0), lambda: mgr.gather("nope", 0), lambda: mgr.fork("nope", "c")):
        with pytest.raises(KeyError, match="unknown request 'nope'"):
            call()
    mgr.add_request("a", [1, 2, 3])
    mgr.free("a")
    with pytest.raises(KeyError, match="unknown request 'a'"):
        mgr.free("a")
    assert mgr.usage()["requests"] == 0
    mgr.check()
    mgr.close()


def test_double_add_request_and_fork_onto_existing(pool):
    mgr = KVCacheManager(MIXED, pool, block_size=16)
    mgr.add_request("a", [1] * 20)
    assert mgr.allocate_slots("a", 20)
    before = snapshot(mgr, pool)
    with pytest.raises(ValueError, match="request 'a' is already known"):
        mgr.add_request("a", [1] * 20)
    mgr.add_request("b", [3])
    with pytest.raises(ValueError, match="request 'b' is already known"):
        mgr.fork("a", "b")
    with pytest.raises(ValueError, match="empty prompt"):
        mgr.add_request("c", [])
    assert "c" not in mgr.requests
    assert mgr.requests["a"].num_tokens == 20
    mgr.free("b")
    assert snapshot(mgr, pool) == before
    mgr.check()
    mgr.close()
