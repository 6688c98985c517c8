"""Blocks that straddle chunk boundaries: only the chunks under used blocks are mapped.

The model here has one full-attention layer of 2.5 MiB blocks (16 tokens x
160 KiB) on 2 MiB chunks: a large page is lcm = 10 MiB, five chunks holding
four blocks, and every block covers two chunks, sharing one with each
neighbour:

    chunk   0     1     2     3     4
    slot    [0 ][0 1][1 2][2 3][ 3]

A chunk is mapped while any block over it is used, pinned while one is live,
and reclaimable by the arena only when every block over it is free or cached.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ellm_alloc import OutOfMemoryError
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec
from ellm_alloc.kv.block_pool import PageReclaimed
from ellm_alloc.kv.layout import plan_layout
from ellm_alloc.kv.space import PINNED, RECLAIMABLE, UNMAPPED, PageSpace

MiB = 1 << 20
CHUNK = 2 * MiB
BS = 16
MODEL = ModelKVSpec("straddle", (FullAttentionSpec(20, 1024, "float32"),))


def manager(pool, packed: bool = True, **kw) -> KVCacheManager:
    """Packed placement by default (what a group whose chunk holds many
    blocks gets): one-block requests fill the slots of one page, neighbours
    sharing chunks. packed=False: these blocks' own placement, each request
    in pages of its own."""
    kw.setdefault("max_cached_fraction", float("inf"))
    mgr = KVCacheManager(MODEL, pool, block_size=BS, **kw)
    assert mgr.pools[0].reserve_own_pages
    mgr.pools[0].reserve_own_pages = not packed
    return mgr


def owner_chunks(pool, mgr) -> int:
    return pool.owners()[mgr.spaces[0].owner]["held_chunks"]


def admit(mgr, rid, tokens, fill=None):
    mgr.add_request(rid, tokens)
    assert mgr.allocate_slots(rid, len(tokens)), rid
    if fill is not None:
        k, v = mgr.layer_tensors(0)
        for b in mgr.block_table(rid, 0):
            k[b].fill_(fill)
            v[b].fill_(-fill)


def intact(mgr, rid, fill) -> bool:
    k, v = mgr.layer_tensors(0)
    return all(bool((k[b] == fill).all() and (v[b] == -fill).all()) for b in mgr.block_table(rid, 0))


def squeeze(pool) -> list[int]:
    """The arena takes chunk after chunk until the pool refuses."""
    ptrs = []
    while True:
        try:
            ptrs.append(pool.malloc(CHUNK))
        except OutOfMemoryError:
            return ptrs


@pytest.mark.parametrize("spec, block_size, chunk, ratio, chunks_per_page, slot_chunks", [
    # 2.5 MiB blocks on 2 MiB chunks: every block on two chunks.
    (FullAttentionSpec(20, 1024, "float32"), 16, CHUNK, 4, 5, [(0, 2), (1, 3), (2, 4), (3, 5)]),
    # A block that divides the chunk: one chunk per page, no sharing.
    (FullAttentionSpec(4, 1024, "float32"), 16, CHUNK, 4, 1, [(0, 1)] * 4),
    # A block of exactly two chunks.
    (FullAttentionSpec(32, 1024, "float32"), 16, CHUNK, 1, 2, [(0, 2)]),
    # 1.5 MiB blocks: four in three chunks, the outer ones on one chunk.
    (FullAttentionSpec(12, 1024, "float32"), 16, CHUNK, 4, 3, [(0, 1), (0, 2), (1, 3), (2, 3)]),
    # Mamba-2.8B's 12.5 MiB state, padded to 13 MiB, two to a 26 MiB page of 2 MiB chunks.
    (MambaSpec(dtype="float16", conv_shape=(5120, 4), ssm_shape=(5120, 16)), 16, CHUNK, 2, 13, [(0, 7), (6, 13)]),
])
def test_block_to_chunk_geometry(make_pool, spec, block_size, chunk, ratio, chunks_per_page, slot_chunks):
    n = 64 if spec.kind == "mamba" else 1
    model = ModelKVSpec("m", (spec,) * n)
    (g,) = plan_layout(model, block_size, chunk).groups
    pool = make_pool("64MiB")
    mgr = KVCacheManager(model, pool, block_size=block_size, capacity_bytes=g.large_page_bytes * 2)
    bp = mgr.pools[0]
    assert (bp.ratio, bp.chunks_per_page) == (ratio, chunks_per_page)
    assert [(r.start, r.stop) for r in bp.slot_chunks] == slot_chunks
    for slot, r in enumerate(bp.slot_chunks):  # each slot's bytes lie inside its chunks
        lo, hi = slot * g.padded_small_bytes, slot * g.padded_small_bytes + g.small_page_bytes
        assert r.start * chunk <= lo and hi <= r.stop * chunk
    mgr.close()


def test_chunks_follow_the_used_blocks(make_pool):
    pool = make_pool(str(20 * CHUNK))
    mgr = manager(pool, enable_prefix_caching=False)
    steps = []
    for rid in ("a", "b", "c"):  # one block each, all in page 0: slots 0, 1, 2
        admit(mgr, rid, [1] * 10)
        steps.append(mgr.usage()["groups"][0]["mapped_chunks"])
    assert [mgr.block_table(r, 0) for r in "abc"] == [[0], [1], [2]]
    assert steps == [2, 3, 4]  # a lone block maps two chunks, each neighbour one more
    mgr.free("b")  # chunks 1 and 2 are still under a and c
    assert mgr.usage()["groups"][0]["mapped_chunks"] == 4
    mgr.free("a")  # chunks 0 and 1 go
    assert mgr.usage()["groups"][0]["mapped_chunks"] == 2 == owner_chunks(pool, mgr)
    assert mgr.usage()["mapped_bytes"] == 2 * CHUNK
    mgr.check()
    mgr.free("c")
    assert owner_chunks(pool, mgr) == 0 and mgr.usage()["groups"][0]["mapped_pages"] == 0
    mgr.close()


def test_cached_neighbours_both_go_when_their_shared_chunk_is_reclaimed(make_pool):
    pool = make_pool(str(4 * CHUNK))
    mgr = manager(pool)
    admit(mgr, "a", [1] * BS, fill=1.0)  # one full block each: slots 0 and 1
    admit(mgr, "b", [2] * BS, fill=2.0)
    mgr.free("a")
    mgr.free("b")
    u = mgr.usage()["groups"][0]
    assert u["cached_blocks"] == 2 and u["mapped_chunks"] == 3
    ptrs = squeeze(pool)
    assert len(ptrs) == 4  # the free chunk and all three under cached blocks
    mgr.sync()
    u = mgr.usage()["groups"][0]
    assert u["cached_blocks"] == 0 and u["mapped_chunks"] == 0 and owner_chunks(pool, mgr) == 0
    mgr.check()
    for p in ptrs:
        pool.free(p)
    assert mgr.add_request("a2", [1] * BS + [5]) == 0  # the prefix is gone
    mgr.close()


def test_a_live_neighbour_keeps_the_shared_chunk(make_pool):
    pool = make_pool(str(4 * CHUNK))
    mgr = manager(pool)
    admit(mgr, "live", [1] * BS, fill=1.0)  # slot 0: chunks 0, 1
    admit(mgr, "gone", [2] * BS, fill=2.0)  # slot 1: chunks 1, 2
    mgr.free("gone")
    bp = mgr.pools[0]
    states = [mgr.spaces[0].state(k) for k in range(3)]
    assert states == [PINNED, PINNED, RECLAIMABLE]
    ptrs = squeeze(pool)
    assert len(ptrs) == 2  # the free chunk and chunk 2; chunk 1 is under a live block
    mgr.sync()
    assert bp.mapped_chunks == 2 == owner_chunks(pool, mgr)
    assert mgr.usage()["groups"][0]["cached_blocks"] == 0
    assert intact(mgr, "live", 1.0)
    mgr.check()
    for p in ptrs:
        pool.free(p)
    mgr.close()


def test_reclaim_between_sync_and_use(make_pool):
    """A chunk reclaimed after sync() makes the use of its cached block fail
    cleanly; sync() then drops the block and gives back its other chunk."""
    pool = make_pool(str(8 * CHUNK))
    mgr = manager(pool)
    admit(mgr, "a", [1] * BS)
    mgr.free("a")
    bp, space = mgr.pools[0], mgr.spaces[0]
    (b,) = list(bp.priority)
    assert space.reclaim(1) == 1  # the oldest reclaimable chunk: chunk 0
    assert [space.state(k) for k in range(2)] == [UNMAPPED, RECLAIMABLE]
    with pytest.raises(PageReclaimed):
        bp.touch(b)
    assert bp.ref[b] == 0 and space.state(1) == RECLAIMABLE  # nothing changed
    mgr.check()
    bp.sync()
    assert bp.mapped_chunks == 0 == owner_chunks(pool, mgr) and not bp.priority
    mgr.check()
    # The public path retries after sync(): the hit is simply gone.
    admit(mgr, "b", [2] * BS)
    mgr.free("b")
    space.reclaim(1)
    assert mgr.add_request("c", [2] * BS + [3]) == 0
    mgr.check()
    mgr.close()


def test_reclaimed_page_protocol(make_pool):
    """A page reclaimed and not yet listed by take_reclaimed(): set_reclaimable
    and unmap say so (unmap takes it off the list), and it cannot be mapped."""
    pool = make_pool(str(8 * CHUNK))
    space = PageSpace(pool, "kv.t", 4)
    for p in (0, 1):
        space.map(p)
        assert space.set_reclaimable(p, 0)
    assert space.reclaim(2) == 2
    with pytest.raises(ValueError):
        space.map(0)  # Python must see it go first
    assert space.set_reclaimable(0, 0) is False
    assert space.unmap(0) is False  # acknowledged: no longer listed
    assert space.take_reclaimed() == [1]
    space.map(0)
    space.map(1)
    assert space.unmap(0) is True and space.unmap(1) is True
    with pytest.raises(ValueError):
        space.unmap(1)  # not mapped, not reclaimed
    assert space.stats()["mapped_pages"] == 0
    space.close()


@settings(max_examples=120, deadline=None)
@given(budget_chunks=st.integers(3, 14),
       sizes=st.lists(st.integers(1, 80), min_size=1, max_size=12),
       frees=st.lists(st.integers(0, 11), max_size=6),
       packed=st.booleans())
def test_can_allocate_never_promises_what_allocate_refuses(budget_chunks, sizes, frees, packed):
    from ellm_alloc import Pool

    pool = Pool("cpu", budget=budget_chunks * CHUNK)
    mgr = manager(pool, packed=packed, capacity_bytes=20 * CHUNK)
    try:
        live = []
        for i, n in enumerate(sizes):
            rid = f"r{i}"
            mgr.add_request(rid, [i % 3] * n)
            promised = mgr.can_allocate(rid, n - mgr.requests[rid].num_tokens)
            got = mgr.allocate_slots(rid, n - mgr.requests[rid].num_tokens)
            assert got or not promised, f"can_allocate said yes, allocate_slots failed ({rid}, {n} tokens)"
            if got:
                live.append(rid)
            else:
                mgr.free(rid)
            for j in frees:
                if j == i and live:
                    mgr.free(live.pop(0))
            mgr.check()
            assert mgr.usage()["groups"][0]["mapped_chunks"] == owner_chunks(pool, mgr)
        mgr.close()
    finally:
        assert pool.close() == 0


def test_counts_change_over_a_chunk_reclaimed_since_sync(make_pool):
    """Between sync() and the next one the pool may take a reclaimable chunk
    at any moment (another thread's torch allocation). Evicting the blocks
    over it then re-marks or unmaps a chunk that is already gone: the C side
    says so, and the ledger still balances without waiting for sync()."""
    pool = make_pool(str(8 * CHUNK))
    mgr = manager(pool)
    for rid, tok in (("a", 1), ("b", 2), ("c", 3)):  # slots 0, 1, 2: chunks 0-1, 1-2, 2-3
        admit(mgr, rid, [tok] * BS)
    for rid in ("a", "b", "c"):
        mgr.free(rid)
    bp, space = mgr.pools[0], mgr.spaces[0]
    assert [space.state(k) for k in range(4)] == [RECLAIMABLE] * 4
    assert space.reclaim(3) == 3  # oldest first: chunks 0, 1, 2 (each re-marked when its second block was freed)
    assert [space.state(k) for k in range(4)] == [UNMAPPED] * 3 + [RECLAIMABLE]
    for _ in range(3):  # evict a, b, c without a sync() first, as a racing reclaim leaves it
        b = bp._evict_one()
        bp._chunks_changed(b)  # re-marks chunks 1, 2 (gone: said so) and unmaps 0-3 (gone ones acknowledged)
        bp._close_if_unused(b // bp.ratio)
    assert bp.mapped_chunks == 0 == owner_chunks(pool, mgr) == space.stats()["mapped_pages"]
    assert space.take_reclaimed() == []  # every reclaimed chunk was acknowledged by its unmap
    mgr.check()
    mgr.close()


def test_a_run_of_pages_maps_all_or_none(make_pool):
    pool = make_pool(str(3 * CHUNK))
    space = PageSpace(pool, "kv.t", 6)
    with pytest.raises(OutOfMemoryError):
        space.map(0, 4)  # the budget holds three
    assert space.stats()["mapped_pages"] == 0 and pool.owners()[space.owner]["held_chunks"] == 0
    space.map(2)
    with pytest.raises(ValueError, match="pages 1-3"):
        space.map(1, 3)  # page 2 is mapped already
    for bad in ((0, 0), (5, 2), (6, 1)):
        with pytest.raises(ValueError):
            space.map(*bad)
    assert [space.state(p) for p in range(6)] == [UNMAPPED, UNMAPPED, PINNED, UNMAPPED, UNMAPPED, UNMAPPED]
    space.map(0, 2)
    assert space.stats()["mapped_pages"] == 3 == pool.owners()[space.owner]["held_chunks"]
    pool.validate()
    space.close()
