"""Where a request's blocks go (GroupBlockPool placement).

A group whose requests grow block by block (full, sliding, chunked, MLA),
whose chunk holds few blocks and whose window keeps several chunks' worth
gives each request pages of its own: other
requests' blocks never land in them while the pool has chunks, so a finishing
request's pages empty whole and nothing is copied to give its memory back.
Other groups pack: a request's block goes to the fullest page with a free
slot. Either way, when the pool is short, blocks go where chunks_needed()
counted them (tests/test_kv_straddling.py checks that promise for both).
"""
from __future__ import annotations

import pytest

from ellm_alloc import Pool
from ellm_alloc.kv import (
    ChunkedLocalSpec, CrossAttentionSpec, FullAttentionSpec, KVCacheManager, MambaSpec, MLASpec, ModelKVSpec,
    SlidingWindowSpec,
)
from ellm_alloc.kv.block_pool import MAX_RESERVED_BLOCKS_PER_CHUNK

BS = 16
F32 = "float32"
# 1.5 MiB blocks: four to a 6 MiB page of three chunks.
STRADDLE = FullAttentionSpec(12, 1024, F32)

# (spec, blocks a 2 MiB chunk holds, own pages?)
PLACEMENT_ROWS = [
    (STRADDLE, 1, True),
    (FullAttentionSpec(8, 128, F32), 16, True),  # 128 KiB blocks: the most a chunk may hold for own pages
    (FullAttentionSpec(4, 128, F32), 32, False),  # 64 KiB: a request's tail chunk would hold 31 others' worth
    # A window keeps at most window / 16 + 1 blocks: own pages from four chunks' worth.
    (SlidingWindowSpec(8, 128, F32, window=1024), 16, True),  # 65 blocks
    (SlidingWindowSpec(8, 128, F32, window=992), 16, False),  # 63: a tail chunk is too much of it
    (ChunkedLocalSpec(8, 128, F32, chunk_size=1024), 16, True),
    (ChunkedLocalSpec(8, 128, F32, chunk_size=64), 16, False),
    (MLASpec(dtype=F32, kv_lora_rank=1984, rope_dim=64), 16, True),
    (MambaSpec(dtype=F32, conv_shape=(64, 1024), ssm_shape=(448, 1024)), 1, False),  # one block a request
    (CrossAttentionSpec(8, 128, F32, max_tokens=64), 16, False),  # all its blocks at admission
]


def make(spec, budget="64MiB") -> tuple[Pool, KVCacheManager]:
    pool = Pool("cpu", budget=budget)
    return pool, KVCacheManager(ModelKVSpec("m", (spec,)), pool, block_size=BS, enable_prefix_caching=False)


def pages_of(mgr: KVCacheManager, rid: str) -> set[int]:
    bp = mgr.pools[0]
    return {b // bp.ratio for b in mgr.managers[0].req_blocks[rid] if b is not None}


@pytest.mark.parametrize("spec,per_chunk,own", PLACEMENT_ROWS, ids=[r[0].kind + str(r[1]) for r in PLACEMENT_ROWS])
def test_which_groups_give_requests_pages_of_their_own(spec, per_chunk, own):
    pool, mgr = make(spec)
    try:
        bp = mgr.pools[0]
        assert bp.chunk_bytes // mgr.layout.groups[0].padded_small_bytes == per_chunk
        assert bp.reserve_own_pages is own
        assert (per_chunk <= MAX_RESERVED_BLOCKS_PER_CHUNK) or not own
        # Two requests, one block each: with pages of their own they never share one.
        for rid in ("a", "b"):
            mgr.add_request(rid, [1] * 10)
            assert mgr.allocate_slots(rid, 10)
        if bp.ratio > 1:
            assert (pages_of(mgr, "a") == pages_of(mgr, "b")) is not own
        mgr.check()
    finally:
        mgr.close()
        pool.close()


def test_a_finishing_request_empties_its_pages_with_nothing_moved():
    """Two requests decoding in turn, block by block: each stays in its own
    pages, so when one finishes every chunk it mapped goes back at once."""
    pool, mgr = make(STRADDLE)
    try:
        for rid in ("a", "b"):
            mgr.add_request(rid, [1] * 5)
            assert mgr.allocate_slots(rid, 5)
        for _ in range(6 * BS):
            for rid in ("a", "b"):
                assert mgr.allocate_slots(rid, 1, [2])
        assert not pages_of(mgr, "a") & pages_of(mgr, "b")
        bp = mgr.pools[0]
        b_chunks = {k for b in mgr.managers[0].req_blocks["b"] for k in bp.block_chunks(b)}
        mgr.free("a")
        assert {k for k, m in enumerate(bp.chunk_mapped) if m} == b_chunks
        assert mgr.stats_blocks_moved == 0
        mgr.check()
    finally:
        mgr.close()
        pool.close()


def test_an_orphan_page_is_adopted_before_a_fresh_one():
    """A page whose request finished but whose blocks another request still
    holds (a prefix hit) is nobody's: the next new request fills it."""
    pool = Pool("cpu", budget="64MiB")
    mgr = KVCacheManager(ModelKVSpec("m", (STRADDLE,)), pool, block_size=BS)
    try:
        prompt = list(range(2 * BS + 1))  # two full blocks and a partial one
        mgr.add_request("a", prompt)
        assert mgr.allocate_slots("a", len(prompt))
        (page,) = pages_of(mgr, "a")
        mgr.add_request("hitter", prompt + [7])  # hits a's two full blocks
        assert mgr.requests["hitter"].hit_tokens == 2 * BS
        assert mgr.allocate_slots("hitter", len(prompt) + 1 - 2 * BS)
        mgr.free("a")  # its partial block's slot is free; the hitter holds the rest
        bp = mgr.pools[0]
        assert page in bp.orphans
        mgr.add_request("new", [9] * 3)
        assert mgr.allocate_slots("new", 3)
        assert pages_of(mgr, "new") == {page} and page not in bp.orphans
        mgr.check()
    finally:
        mgr.close()
        pool.close()


def test_a_packed_group_fills_the_fullest_page_first():
    pool, mgr = make(FullAttentionSpec(4, 128, F32))  # 32 blocks a chunk: packed
    try:
        for rid in ("a", "b", "c"):
            mgr.add_request(rid, [1] * (3 * BS))
            assert mgr.allocate_slots(rid, 3 * BS)
        assert pages_of(mgr, "a") == pages_of(mgr, "b") == pages_of(mgr, "c")
        assert mgr.usage()["groups"][0]["mapped_chunks"] == 1
        mgr.check()
    finally:
        mgr.close()
        pool.close()
