"""Demotion: the prefix cache's second level in the host tier (block_pool.py).

Table-driven over layer kinds: a finished request's cached blocks, evicted,
go to the host tier instead of being dropped; the next request with the same
prefix hits them, which promotes them, bit-exact at the same block ids. And
what happens when demotion cannot be done: no host tier, demotion off, a
tier too small, a failed copy, a live neighbour; a swap that needs the room;
promotion when the device is full; teardown with demoted blocks.
"""
from __future__ import annotations

import os

import pytest
import torch

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc.kv.block_pool import EVICT_TAIL
from ellm_alloc.kv import (CrossAttentionSpec, FullAttentionSpec, KVCacheManager, MambaSpec, MLASpec, ModelKVSpec,
                           SlidingWindowSpec)

MiB = 1 << 20
BS = 16
PROMPT = list(range(1000, 1000 + 8 * BS + 5))  # 8 full blocks and a partial one
SPECS = {
    "full": FullAttentionSpec(8, 128, "float32"),  # 64 KiB per block
    "sliding": SlidingWindowSpec(8, 128, "float32", window=4 * BS),
    "mamba": MambaSpec(dtype="float32", conv_shape=(8, 256), ssm_shape=(64, 256)),
    "mla": MLASpec(dtype="float32", kv_lora_rank=448, rope_dim=64),
    "cross": CrossAttentionSpec(8, 128, "float32", max_tokens=64),
}


def make(kinds: str, cpu_budget="32MiB", budget="32MiB", **kw) -> tuple[Pool, KVCacheManager]:
    pool = Pool("cpu", budget=budget, cpu_budget=cpu_budget)
    model = ModelKVSpec(kinds, tuple(SPECS[k] for k in kinds.split("+")))
    mgr = KVCacheManager(model, pool, block_size=BS, max_cached_fraction=float("inf"),
                         state_checkpoint_tokens=BS, **kw)
    return pool, mgr


def blocks_of(mgr: KVCacheManager, rid: str) -> list[tuple[int, int]]:
    """(group, block) of every block the request holds."""
    return [(g, b) for g, m in enumerate(mgr.managers) for b in m.req_blocks.get(rid, []) if b is not None]


def block_bytes(mgr: KVCacheManager, g: int, b: int) -> torch.Tensor:
    group = mgr.layout.groups[g]
    start = b * group.padded_small_bytes
    return mgr.spaces[g].bytes_view()[start:start + group.small_page_bytes]


DECODED = [9] * BS  # tokens decoded after the prompt: past a block boundary, where a Mamba state is saved
TURN2 = PROMPT + DECODED + [4, 4, 4]  # the follow-up turn extends prompt and output


def compute(mgr: KVCacheManager, rid: str, tokens: list[int], decode: list[int] = DECODED
            ) -> dict[tuple[int, int], torch.Tensor]:
    """Admits a request, computes its prompt and decodes `decode`, filling
    every block it holds with bytes of its own; returns a copy of them."""
    hit = mgr.add_request(rid, tokens)
    assert mgr.allocate_slots(rid, len(tokens) - hit)
    for t in decode:
        assert mgr.allocate_slots(rid, 1, new_token_ids=[t])
    out = {}
    for i, (g, b) in enumerate(blocks_of(mgr, rid)):
        view = block_bytes(mgr, g, b)
        if not (hit and mgr.managers[g].pool.ref[b] > 1):  # a block it hit is someone else's too: left as is
            view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(
                hash((rid, g, b)) % 2**31)))
        out[(g, b)] = view.clone()
    mgr.check()
    return out


def ledgers_balance(pool: Pool) -> None:
    pool.validate()
    s = pool.stats()
    assert s["created_chunks"] == s["free_chunks"] + sum(o["held_chunks"] for o in pool.owners() if o["active"])
    host = pool.host_tier()
    assert host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"])


KINDS = ["full", "sliding", "mamba", "mla", "full+sliding", "full+mamba", "full+cross", "sliding+mamba+mla"]


@pytest.mark.parametrize("kinds", KINDS)
def test_evicted_prefix_is_demoted_and_a_hit_promotes_it_bit_exact(kinds):
    pool, mgr = make(kinds)
    try:
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        expected = mgr.add_request("probe", TURN2)  # the hit while the prefix is on the device
        mgr.free("probe")
        assert expected > 0
        mapped = mgr.usage()["mapped_bytes"]
        # Every cached block's bytes, and which are worth demoting (not out of their window).
        cached = {(g, b): block_bytes(mgr, g, b).clone() for g, bp in enumerate(mgr.pools) for b in bp.priority}
        worth = sum(1 for g, bp in enumerate(mgr.pools) for p in bp.priority.values() if p >= EVICT_TAIL)
        assert worth > 0
        done = mgr.evict(10**6)
        u = mgr.usage()
        assert done == len(cached) and u["demotions"] == worth, u
        assert sum(g["cached_blocks"] for g in u["groups"]) == 0
        assert u["mapped_bytes"] < mapped and u["demoted_bytes"] > 0
        held = sum(o["held_chunks"] for o in pool.host_tier()["owners"])
        assert held * pool.stats()["chunk_bytes"] == u["demoted_bytes"]
        assert u["swapped_bytes"] == 0  # demoted blocks are not a request's swap
        mgr.check()
        ledgers_balance(pool)

        hit = mgr.add_request("again", TURN2)  # the same prefix: hits the host tier
        assert hit == expected
        u = mgr.usage()
        assert u["promotions"] > 0 and u["demoted_bytes"] == 0
        hits = blocks_of(mgr, "again")
        assert hits and all(gb in cached for gb in hits)  # the same block ids ...
        for g, b in hits:  # ... and the same bytes
            assert torch.equal(block_bytes(mgr, g, b), cached[(g, b)]), f"group {g} block {b} changed"
        assert mgr.allocate_slots("again", len(TURN2) - hit)
        mgr.check()
        mgr.free("again")
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


@pytest.mark.parametrize("why, kw, cpu_budget", [
    ("no host tier", {}, 0),
    ("demotion off", {"demote_to_host": False}, "32MiB"),
    ("prefix caching off", {"enable_prefix_caching": False}, "32MiB"),
])
def test_eviction_when_demotion_cannot_happen(why, kw, cpu_budget):
    pool, mgr = make("full+mamba", cpu_budget=cpu_budget, **kw)
    try:
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        mgr.evict(10**6)
        u = mgr.usage()
        assert u["demotions"] == 0 and u["demoted_bytes"] == 0, why
        assert mgr.add_request("again", TURN2) == 0, why  # evicted: nothing to hit
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


def test_a_live_neighbour_keeps_a_chunk_resident():
    """Blocks of a running request share the chunks: its neighbours in them
    are evicted, not demoted (a chunk moves whole or not at all)."""
    pool, mgr = make("full")
    mgr.pools[0].reserve_own_pages = False  # packed placement: b's blocks may go to a's pages
    try:
        compute(mgr, "a", PROMPT)
        compute(mgr, "b", [7] * len(PROMPT))  # its blocks land in a's chunks' free slots
        shared = {k for _, b in blocks_of(mgr, "a") for k in mgr.pools[0].block_chunks(b)} & \
                 {k for _, b in blocks_of(mgr, "b") for k in mgr.pools[0].block_chunks(b)}
        assert shared, "the test needs a chunk under blocks of both requests"
        mgr.free("a")
        mgr.evict(10**6)
        bp = mgr.pools[0]
        for b in bp.block_unit:
            assert not set(bp.block_chunks(b)) & shared
        assert bp.evictions > 0
        mgr.check()
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


def test_a_tier_full_of_a_swapped_request_evicts_instead():
    pool, mgr = make("full", cpu_budget="2MiB")
    try:
        compute(mgr, "swapped", [3] * len(PROMPT))
        mgr.swap_out("swapped")
        mgr.wait_swap("swapped")
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        mgr.evict(10**6)
        u = mgr.usage()
        assert u["demotions"] == 0 and mgr.pools[0].evictions > 0  # the swap keeps its room
        assert mgr.add_request("again", TURN2) == 0
        mgr.check()
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


@pytest.mark.skipif(os.environ.get("ELLM_TEST_BACKEND") == "fakecuda",
                    reason="copy faults are the host backend's (test_swap_space covers the fake driver's)")
def test_a_failed_copy_evicts_instead():
    pool, mgr = make("full")
    try:
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        pool.inject_fault("copy", 1)  # the first unit's copy fails: that unit is evicted
        mgr.evict(1)
        pool.inject_fault("copy", 0)
        u = mgr.usage()
        assert u["demoted_bytes"] == 0 and mgr.pools[0].evictions == 1
        mgr.check()
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


def test_swap_out_drops_demoted_blocks_for_room():
    """Request swaps come first: the host tier's demoted prefix makes way."""
    pool, mgr = make("full", cpu_budget="2MiB")
    try:
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        mgr.evict(10**6)
        assert mgr.usage()["demoted_bytes"] == 2 * MiB  # the tier is full of it
        compute(mgr, "other", [3] * len(PROMPT))
        assert mgr.swap_out("other") > 0
        mgr.wait_swap("other")
        assert mgr.usage()["demoted_bytes"] == 0
        assert mgr.add_request("again", TURN2) == 0  # dropped: no hit left
        mgr.swap_in("other")
        mgr.wait_swap("other")
        mgr.check()
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


def test_promotion_without_device_room_loses_the_hit_cleanly():
    pool, mgr = make("full", budget="8MiB")
    arena = []
    try:
        compute(mgr, "seed", PROMPT)
        mgr.free("seed")
        mgr.evict(10**6)
        assert mgr.usage()["demoted_bytes"] > 0
        while True:  # the torch arena takes every chunk
            try:
                arena.append(pool.malloc(2 * MiB))
            except OutOfMemoryError:
                break
        assert mgr.add_request("again", TURN2) == 0  # the unit is dropped, not half promoted
        u = mgr.usage()
        assert u["demoted_bytes"] == 0 and u["promotions"] == 0
        mgr.check()
        ledgers_balance(pool)
        mgr.free("again")
    finally:
        for p in arena:
            pool.free(p)
        mgr.close()
        pool.close()


def test_room_for_a_new_request_demotes_rather_than_drops():
    """When the device is short, placing a new request's blocks demotes the
    least valuable cached unit (and waits for its copy) before evicting."""
    pool, mgr = make("full", budget="4MiB")  # two chunks of 16 blocks
    try:
        compute(mgr, "seed", list(range(16 * BS)), decode=[])  # one whole chunk
        mgr.free("seed")
        big = [5] * (17 * BS + 1)  # two chunks: the seed's must go
        hit = mgr.add_request("big", big)
        assert mgr.allocate_slots("big", len(big) - hit)
        assert mgr.usage()["demotions"] > 0
        mgr.free("big")
        mgr.check()
        ledgers_balance(pool)
    finally:
        mgr.close()
        pool.close()


def test_close_with_demoted_blocks_empties_the_host_tier():
    pool, mgr = make("full+mamba")
    compute(mgr, "seed", PROMPT)
    mgr.free("seed")
    mgr.evict(10**6)
    assert mgr.usage()["demoted_bytes"] > 0
    mgr.close()
    host = pool.host_tier()
    assert all(o["held_chunks"] == 0 for o in host["owners"]) and host["free_chunks"] == host["created_chunks"]
    assert pool.close() == 0
