"""Recurrent states updated out of place: KVCacheManager(state_update=...).

The engine here runs a step as a model's kernel would: it reads each
request's state from state_source() (else from the block table's block) and
writes the state after the step's tokens into the table's block. A state is
a whole block of bytes made from a running hash of the tokens it covers, so
every read checks the block bit-exact and that it is the state of the right
tokens.

Table-driven over both modes: the same hits and the same states, with no
byte copied out of place. Then what must hold while a step's read block is
pending: other requests' allocations cannot take it, the request's next
call (allocate_slots, free, swap_out, fork) lets go of it exactly once,
compaction moves it with its id in state_source(), a block shared with
another request is read rather than copied, and a follow-up turn hits the
checkpoint it holds. Each ends with the manager's invariants and a balanced
ledger.
"""
from __future__ import annotations

import pytest
import torch

from ellm_alloc import Pool
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec

MiB = 1 << 20
BS = 4
STATE = MambaSpec(dtype="float32", conv_shape=(64, 64), ssm_shape=(64, 960))  # 256 KiB: 8 to a 2 MiB chunk
STATE_BYTES = STATE.state_bytes()
SPECS = {"full": FullAttentionSpec(1, 8, "float32"), "mamba": STATE}
MODES = ["copy", "out_of_place"]
SEED = 12345
_RAMP = torch.arange(STATE_BYTES, dtype=torch.int64) * 2654435761 >> 7


def make(kinds: str, mode: str, budget="32MiB", cpu_budget=0, checkpoint=BS, **kw) -> tuple[Pool, KVCacheManager]:
    """checkpoint: tokens between saved states (BS: every block boundary)."""
    pool = Pool("cpu", budget=budget, cpu_budget=cpu_budget)
    model = ModelKVSpec(kinds, tuple(SPECS[k] for k in kinds.split("+")))
    mgr = KVCacheManager(model, pool, block_size=BS, max_cached_fraction=float("inf"),
                         state_checkpoint_tokens=checkpoint, state_update=mode, **kw)
    return pool, mgr


def fold(h: int, tokens: list[int]) -> int:
    for t in tokens:
        h = (h * 1000003 + t + 1) % (1 << 61)
    return h


def state_image(h: int) -> torch.Tensor:
    """The bytes of the state with hash h: the hash, then a ramp shifted by it."""
    img = ((_RAMP + h) & 0xFF).to(torch.uint8)
    img[:8] = torch.tensor([h], dtype=torch.int64).view(torch.uint8)
    return img


def read_state(block: torch.Tensor) -> int:
    h = int(block[:8].view(torch.int64))
    assert torch.equal(block, state_image(h)), "a state block is not whole"
    return h


class Engine:
    """Steps of a model whose kernels take a read and a write state block."""

    def __init__(self, mgr: KVCacheManager):
        self.mgr = mgr
        self.layer = next(layer for layer, g in sorted(mgr.layer_group.items()) if g.is_state)
        self.done: dict[str, list[int]] = {}  # tokens each request's state covers

    def admit(self, rid: str, prompt: list[int]) -> int:
        hit = self.mgr.add_request(rid, prompt)
        self.done[rid] = prompt[:hit]
        assert self.mgr.allocate_slots(rid, len(prompt) - hit)
        self.run(rid, prompt[hit:])
        return hit

    def decode(self, rid: str, tokens: list[int]) -> None:
        for t in tokens:
            assert self.mgr.allocate_slots(rid, 1, new_token_ids=[t])
            self.run(rid, [t])

    def states(self) -> torch.Tensor:
        return self.mgr.layer_tensors(self.layer)[0]

    def source(self, rid: str) -> int:
        """The block the step reads: state_source(), else the table's."""
        src = self.mgr.state_source(rid, self.layer)
        return self.mgr.block_table(rid, self.layer)[-1] if src is None else src

    def run(self, rid: str, tokens: list[int]) -> None:
        """The step computing `tokens` after allocate_slots() gave them slots."""
        done = self.done[rid]
        if done:
            h = read_state(self.states()[self.source(rid)])
            assert h == fold(SEED, done), f"{rid}'s step would read the state of other tokens"
        else:
            assert self.mgr.state_source(rid, self.layer) is None
            h = SEED
        self.states()[self.mgr.block_table(rid, self.layer)[-1]] = state_image(fold(h, tokens))
        self.done[rid] = done + tokens


def balanced(pool: Pool, mgr: KVCacheManager) -> None:
    mgr.check()
    pool.validate()
    for space in mgr.spaces:
        assert pool.owners()[space.owner]["held_chunks"] == space.stats()["mapped_pages"]


def close(pool: Pool, mgr: KVCacheManager) -> None:
    mgr.close()
    assert pool.close() == 0


# ---- both modes: same hits, same states ---------------------------------------------

# (checkpoint, [(new prompt tokens, output tokens) per turn], expected hit of each turn);
# BS = 4, so a state is saved at the first boundary after each prompt.
TURN_ROWS = [
    (64, [(10, 6), (5, 6), (3, 2)], [0, 12, 24]),
    (8, [(10, 12), (5, 6)], [0, 16]),
    (64, [(8, 1), (4, 1)], [0, 8]),
    (64, [(10, 1), (4, 1)], [0, 0]),
    (4, [(3, 9), (2, 7), (6, 5)], [0, 12, 20]),  # turn 1 ends at 21: boundary 24 never reached
]


def conversation(mode: str, kinds: str, checkpoint: int, turns: list[tuple[int, int]]) -> tuple[list[int], dict]:
    """Each turn extends the last one's prompt and output; the engine checks
    every state it reads. Returns each turn's hit and the final usage()."""
    pool, mgr = make(kinds, mode, checkpoint=checkpoint)
    eng = Engine(mgr)
    tokens: list[int] = []
    hits = []
    for k, (new, out) in enumerate(turns):
        tokens += [1000 * (k + 1) + i for i in range(new)]
        rid = f"turn{k}"
        hit = mgr.add_request(rid, tokens)
        hit_block = mgr.block_table(rid, eng.layer)[-1] if hit else None
        eng.done[rid] = tokens[:hit]
        assert mgr.allocate_slots(rid, len(tokens) - hit)
        if hit and mode == "out_of_place":  # the prefill reads the checkpoint hit, from its cached block
            assert mgr.state_source(rid, eng.layer) == hit_block
        eng.run(rid, tokens[hit:])
        hits.append(hit)
        outputs = [7 * k + i for i in range(out)]
        eng.decode(rid, outputs)
        tokens += outputs
        mgr.check()
        mgr.free(rid)
    usage = mgr.usage()
    balanced(pool, mgr)
    close(pool, mgr)
    return hits, usage


@pytest.mark.parametrize("checkpoint,turns,expected", TURN_ROWS)
@pytest.mark.parametrize("kinds", ["mamba", "full+mamba"])
def test_turns_hit_the_same_checkpoints_in_both_modes(kinds, checkpoint, turns, expected):
    """The same hits and states either way; each state a copy moves in copy
    mode is read from its old block out of place."""
    hits, copied = conversation("copy", kinds, checkpoint, turns)
    assert hits == expected and copied["state_update"] == "copy" and copied["out_of_place_updates"] == 0
    hits, oop = conversation("out_of_place", kinds, checkpoint, turns)
    assert hits == expected and oop["state_update"] == "out_of_place" and oop["state_bytes_copied"] == 0
    assert oop["out_of_place_updates"] * STATE_BYTES == copied["state_bytes_copied"]
    assert (oop["maps"], oop["unmaps"]) == (copied["maps"], copied["unmaps"])


# ---- one checkpoint crossing, out of place -------------------------------------------


def cross(eng: Engine, rid: str = "a", base: int = 0) -> int:
    """Admits rid with a 3-token prompt and decodes across the checkpoint at
    token 4 (BS = 4: its prompt's); returns the block holding the checkpoint."""
    eng.admit(rid, [base + 1, base + 2, base + 3])
    eng.decode(rid, [base + 4])
    saved = eng.mgr.block_table(rid, eng.layer)[-1]
    assert eng.mgr.allocate_slots(rid, 1, new_token_ids=[base + 5])  # the step is not run yet
    return saved


def test_a_crossing_reads_the_saved_block_and_copies_nothing():
    pool, mgr = make("full+mamba", "out_of_place")
    eng = Engine(mgr)
    g = mgr.layer_group[eng.layer].group_id
    bp = mgr.pools[g]
    saved = cross(eng)
    u = mgr.usage()
    assert u["state_bytes_copied"] == 0 and u["out_of_place_updates"] == 1
    assert mgr.state_source("a", eng.layer) == saved
    assert mgr.state_source("a", 0) is None  # attention layers read their blocks in place
    fresh = mgr.block_table("a", eng.layer)
    assert fresh == [None, fresh[1]] and fresh[1] != saved
    assert bp.ref[saved] == 1 and saved in bp.block_hash  # held for the read, and the cached checkpoint
    mgr.check()
    eng.run("a", [5])
    eng.decode("a", [6])  # the next call lets go: the checkpoint stays cached, evictable
    assert mgr.state_source("a", eng.layer) is None
    assert bp.ref[saved] == 0 and saved in bp.priority
    assert mgr.usage()["out_of_place_updates"] == 1  # no crossing this time
    balanced(pool, mgr)
    close(pool, mgr)


@pytest.mark.parametrize("mode", MODES)
def test_others_allocating_in_the_same_step_cannot_take_the_block_read(mode):
    """A pool of eight state blocks (one chunk). After a's crossing, others take every
    free block; the ninth finds only the checkpoint a's step has yet to read.
    Copying, it was copied already: the ninth evicts it. Out of place, it is
    held for the read: the ninth waits until a's next call lets go of it."""
    pool, mgr = make("mamba", mode, budget="2MiB")
    eng = Engine(mgr)
    saved = cross(eng)
    for i in range(6):
        eng.admit(f"b{i}", [100 * (i + 1), 1, 2])
    ok = mgr.add_request("b6", [700, 1, 2]) == 0 and mgr.allocate_slots("b6", 3)
    assert ok == (mode == "copy")
    if ok:
        assert mgr.block_table("b6", 0)[-1] == saved
        mgr.free("b6")
    else:
        mgr.free("b6")
        assert all(saved not in mgr.block_table(f"b{i}", 0) for i in range(6))
    eng.run("a", [5])  # reads the checkpoint out of place, its copy in copy mode
    eng.decode("a", [6])
    eng.admit("b6", [700, 1, 2])  # room now: the checkpoint is evicted
    balanced(pool, mgr)
    close(pool, mgr)


# ---- the request's next call lets go of the block read -----------------------------


def next_allocate(mgr, eng):
    eng.decode("a", [6])


def next_free(mgr, eng):
    mgr.free("a")


def next_swap(mgr, eng):
    mgr.swap_out("a")
    mgr.wait_swap("a")
    balanced(mgr.pool, mgr)
    mgr.swap_in("a")
    mgr.wait_swap("a")
    eng.decode("a", [6])  # reads the state the step wrote, swapped out and back


def next_fork(mgr, eng):
    mgr.fork("a", "c")
    eng.done["c"] = list(eng.done["a"])
    eng.decode("c", [60])  # the child continues from the state the step wrote
    eng.decode("a", [6])


NEXT_CALLS = {"allocate_slots": next_allocate, "free": next_free, "swap_out": next_swap, "fork": next_fork}


@pytest.mark.parametrize("call", NEXT_CALLS)
def test_the_next_call_lets_go_of_the_block_read_once(call):
    pool, mgr = make("full+mamba", "out_of_place", cpu_budget="32MiB")
    eng = Engine(mgr)
    bp = mgr.pools[mgr.layer_group[eng.layer].group_id]
    saved = cross(eng)
    eng.run("a", [5])
    NEXT_CALLS[call](mgr, eng)
    assert "a" not in mgr.requests or mgr.state_source("a", eng.layer) is None
    assert bp.ref[saved] == 0 and saved in bp.priority, "the checkpoint is not cached, or still held"
    balanced(pool, mgr)
    # A follow-up turn lands on the checkpoint, which still holds the state of its 4 tokens.
    assert eng.admit("next", [1, 2, 3, 4, 99]) == 4
    assert mgr.state_source("next", eng.layer) == saved  # its prefill read the checkpoint's own block
    balanced(pool, mgr)
    close(pool, mgr)


def test_compaction_moves_a_block_being_read():
    """a's checkpoint and fresh block open a large page (8 state blocks);
    requests freed in the same step empty two slots of a fuller page, and
    compaction moves both there: state_source() names the checkpoint's new
    block, which holds its bytes, and a's step reads it."""
    pool, mgr = make("mamba", "out_of_place")
    eng = Engine(mgr)
    for i in range(8):
        eng.admit(f"r{i}", [100 * (i + 1), 1, 2])  # one page, full
    saved = cross(eng)  # a's two blocks open a second page
    before = mgr.usage()["blocks_moved_by_compaction"]
    mgr.free("r1")
    mgr.free("r2")
    assert mgr.usage()["blocks_moved_by_compaction"] == before + 2
    moved = mgr.state_source("a", 0)
    assert moved != saved and moved // 8 == mgr.block_table("r0", 0)[-1] // 8
    eng.run("a", [5])  # reads the moved checkpoint, bit-exact
    mgr.check()
    eng.decode("a", [6])
    assert eng.admit("next", [1, 2, 3, 4, 99]) == 4  # the cached checkpoint moved with its hash
    balanced(pool, mgr)
    close(pool, mgr)


@pytest.mark.parametrize("mode", MODES)
def test_a_state_shared_by_a_fork_is_read_not_copied(mode):
    """Forked at a block boundary, parent and child share the state block
    (no prefix cache here); each one's next step moves to a fresh block.
    Out of place both read the shared block, which neither writes. Either
    way each needs one state: a hold for reading is no holder of a state."""
    pool, mgr = make("mamba", mode, enable_prefix_caching=False)
    eng = Engine(mgr)
    eng.admit("p", [1, 2, 3])
    eng.decode("p", [4])
    shared = mgr.block_table("p", 0)[-1]
    mgr.fork("p", "c")
    eng.done["c"] = list(eng.done["p"])
    assert mgr.allocate_slots("p", 1, new_token_ids=[5])
    assert mgr.live_bytes_needed() == 2 * STATE_BYTES
    assert mgr.allocate_slots("c", 1, new_token_ids=[50])
    assert mgr.live_bytes_needed() == 2 * STATE_BYTES
    sources = {mgr.state_source(r, 0) for r in "pc"}
    assert sources == ({shared} if mode == "out_of_place" else {None})
    assert (mgr.usage()["state_bytes_copied"] == 0) == (mode == "out_of_place")
    eng.run("p", [5])
    eng.run("c", [50])
    mgr.check()
    eng.decode("p", [6])
    eng.decode("c", [60])
    # Out of place nobody holds it now; copying, the child's state moved on in it once the parent let go.
    assert mgr.pools[0].ref[shared] == (0 if mode == "out_of_place" else 1)
    balanced(pool, mgr)
    close(pool, mgr)


@pytest.mark.parametrize("bad", ["inplace", "out-of-place", "", None, 1, True])
def test_an_unknown_state_update_is_refused(bad):
    pool = Pool("cpu", budget="8MiB")
    try:
        with pytest.raises(ValueError, match="state_update must be one of 'copy', 'out_of_place', got"):
            KVCacheManager(ModelKVSpec("m", (STATE,)), pool, block_size=BS, state_update=bad)
    finally:
        assert pool.close() == 0
