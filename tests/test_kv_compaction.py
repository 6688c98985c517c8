"""Compaction moves live blocks out of sparsely used large pages: every byte,
block table and prefix-cache entry must follow, and pages must go back."""
from __future__ import annotations

import random

import pytest

from ellm_alloc import Pool
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, ModelKVSpec, SlidingWindowSpec

BS = 16
# Small pages of 512 KiB and 256 KiB: 4 and 8 per 2 MiB large page, so
# requests share pages and finishing ones leave holes to compact.
MODEL = ModelKVSpec("compaction", [
    FullAttentionSpec(kv_heads=8, head_dim=256, dtype="float32"),
    SlidingWindowSpec(kv_heads=8, head_dim=256, dtype="float32", window=48),
    FullAttentionSpec(kv_heads=8, head_dim=256, dtype="float32"),
])


def value(rid: str, pos: int, layer: int) -> float:
    return float(sum(map(ord, rid)) * 1000 + layer * 100000 + pos)


class Driver:
    def __init__(self, mgr: KVCacheManager):
        self.mgr = mgr
        self.lens: dict[str, int] = {}

    def write(self, rid: str, lo: int, hi: int) -> None:
        for layer in range(len(MODEL.layers)):
            k, v = self.mgr.layer_tensors(layer)
            table = self.mgr.block_table(rid, layer)
            for pos in range(lo, hi):
                b = table[pos // BS]
                if b is not None:
                    k[b, pos % BS].fill_(value(rid, pos, layer))
                    v[b, pos % BS].fill_(-value(rid, pos, layer))

    def verify(self) -> None:
        for rid, n in self.lens.items():
            for layer in range(len(MODEL.layers)):
                keys, vals, positions = self.mgr.gather(rid, layer)
                assert positions[-1] == n - 1
                for i, pos in enumerate(positions):
                    want = value(rid, pos, layer)
                    assert keys[i].eq(want).all() and vals[i].eq(-want).all(), (rid, layer, pos)


def packed(mgr: KVCacheManager) -> KVCacheManager:
    """Packed placement (what groups whose chunk holds many blocks get): a
    request's blocks go to any page's free slots, so finishing requests leave
    other requests' blocks in sparse pages."""
    for bp in mgr.pools:
        bp.reserve_own_pages = False
    return mgr


@pytest.mark.parametrize("placement", ["packed", "own pages"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_with_compaction_keeps_data_and_returns_pages(seed, placement):
    pool = Pool("cpu", budget="512MiB")
    mgr = KVCacheManager(MODEL, pool, block_size=BS, enable_prefix_caching=False)
    for bp in mgr.pools:  # every group one way (left alone, the 48-token window would pack)
        bp.reserve_own_pages = placement == "own pages"
    d = Driver(mgr)
    rng = random.Random(seed)
    for step in range(160):
        op = rng.random()
        if op < 0.3 and len(d.lens) < 16:
            rid, n = f"r{step}", rng.randrange(1, 100)
            mgr.add_request(rid, [rng.randrange(100) for _ in range(n)])
            if mgr.allocate_slots(rid, n):
                d.lens[rid] = n
                d.write(rid, 0, n)
            else:
                mgr.free(rid)
        elif op < 0.7 and d.lens:
            rid, k = rng.choice(sorted(d.lens)), rng.randrange(1, 20)
            if mgr.allocate_slots(rid, k, [1] * k):
                d.write(rid, d.lens[rid], d.lens[rid] + k)
                d.lens[rid] += k
        elif d.lens:
            rid = rng.choice(sorted(d.lens))
            mgr.free(rid)  # compacts when pages are left sparse
            del d.lens[rid]
        mgr.check()
        d.verify()
    if placement == "packed":
        assert mgr.stats_blocks_moved > 0, "the traffic never triggered compaction: the test lost its point"
    else:  # a finishing request's pages empty whole (the pool is never short here): nothing to move
        assert mgr.stats_blocks_moved == 0
    for rid in list(d.lens):
        mgr.free(rid)
    assert mgr.mapped_bytes() == 0
    mgr.close()
    pool.validate()
    assert pool.close() == 0


def test_compaction_empties_the_sparse_page_and_keeps_prefix_hits():
    pool = Pool("cpu", budget="256MiB")
    mgr = packed(KVCacheManager(MODEL, pool, block_size=BS, max_cached_fraction=1.0))
    prompts = {f"r{i}": [i * 1000 + t for t in range(2 * BS)] for i in range(4)}
    for rid, toks in prompts.items():  # 2 full blocks each: r0, r1 share page 0 of group 0, r2, r3 page 1
        mgr.add_request(rid, toks)
        assert mgr.allocate_slots(rid, len(toks))
    d = Driver(mgr)
    d.lens = {rid: 2 * BS for rid in prompts}
    for rid in prompts:
        d.write(rid, 0, 2 * BS)
    before = mgr.usage()["groups"][0]["mapped_pages"]
    mgr._drop_request_blocks("r1")  # leave holes without caching them
    del mgr.requests["r1"], d.lens["r1"]
    mgr._drop_request_blocks("r2")
    del mgr.requests["r2"], d.lens["r2"]
    moved = mgr.compact()
    assert moved > 0
    u = mgr.usage()
    assert sum(g["blocks_moved"] for g in u["groups"]) == moved == u["blocks_moved_by_compaction"]
    assert u["bytes_moved_by_compaction"] == sum(g["blocks_moved"] * g["small_page_bytes"] for g in u["groups"]) > 0
    assert mgr.usage()["groups"][0]["mapped_pages"] < before
    mgr.check()
    d.verify()
    mgr.free("r0")  # its full blocks stay cached, at their new ids
    hit = mgr.add_request("again", prompts["r0"])
    assert hit == BS, hit  # the first block hits (the last one is recomputed for its logits)
    mgr.close()
    assert pool.close() == 0
