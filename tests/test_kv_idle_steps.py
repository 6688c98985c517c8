"""allocate_slots' shortcut for steps that give no group work (RequestState.idle_until):
a manager taking it must decide exactly as one that asks every group at every
step. Two managers on two pools run the same random mix of admissions, decode
bursts, forks and frees; the second forgets idle_until before each call."""
from __future__ import annotations

import random

import pytest

from ellm_alloc import Pool
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec, SlidingWindowSpec

BS = 4
SPECS = {
    "full": FullAttentionSpec(1, 8, "float32"),
    "sliding": SlidingWindowSpec(1, 8, "float32", window=8),
    "mamba": MambaSpec(dtype="float32", conv_shape=(64, 64), ssm_shape=(64, 960)),  # 256 KiB
}


def make(kinds: str, mode: str, checkpoint: int) -> tuple[Pool, KVCacheManager]:
    pool = Pool("cpu", budget="24MiB")
    model = ModelKVSpec(kinds, tuple(SPECS[k] for k in kinds.split("+")))
    return pool, KVCacheManager(model, pool, block_size=BS, state_checkpoint_tokens=checkpoint, state_update=mode)


def snapshot(mgr: KVCacheManager) -> tuple:
    """Everything a caller can see of the manager's decisions."""
    layers = range(len(mgr.model.layers))
    tables = {rid: [(mgr.block_table(rid, i), mgr.state_source(rid, i)) for i in layers] for rid in mgr.requests}
    return tables, mgr.mapped_bytes(), mgr.live_bytes_needed(), [bp.live_blocks() for bp in mgr.pools]


@pytest.mark.parametrize("mode", ["copy", "out_of_place"])
@pytest.mark.parametrize("kinds,checkpoint", [("full+mamba", 8), ("mamba", 4), ("full", 4), ("sliding+mamba", 8)])
def test_idle_steps_decide_as_full_steps(kinds, checkpoint, mode):
    rng = random.Random(7)
    fast, slow = make(kinds, mode, checkpoint), make(kinds, mode, checkpoint)
    live: list[str] = []
    for n in range(300):
        op = rng.random()
        if op < 0.15 or not live:
            rid, prompt = f"r{n}", [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            hits = {mgr.add_request(rid, prompt) for _, mgr in (fast, slow)}
            assert len(hits) == 1, n
            args: tuple = (rid, len(prompt) - hits.pop())
            live.append(rid)
        elif op < 0.2:
            parent = rng.choice(live)
            for _, mgr in (fast, slow):
                mgr.fork(parent, f"f{n}")
            live.append(f"f{n}")
            continue
        elif op < 0.3:
            rid = live.pop(rng.randrange(len(live)))
            for _, mgr in (fast, slow):
                mgr.free(rid)
            continue
        else:
            rid = rng.choice(live)
            tokens = [rng.randrange(4) for _ in range(rng.choice((1, 1, 1, 3)))]
            args = (rid, len(tokens), tokens)
        slow[1].requests[args[0]].idle_until = 0
        results = [mgr.allocate_slots(*args) for _, mgr in (fast, slow)]
        assert results[0] == results[1], n
        if not results[0]:
            live.remove(args[0])
            for _, mgr in (fast, slow):
                mgr.free(args[0])
        assert snapshot(fast[1]) == snapshot(slow[1]), n
        fast[1].check()
    for pool, mgr in (fast, slow):
        mgr.close()
        assert pool.close() == 0
