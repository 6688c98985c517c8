"""Stateful property test of KVCacheManager on a small host pool.

Hypothesis drives admit (add_request + allocate_slots of the prompt), extend
(decode tokens with their ids), free, fork, evict and arena pressure (torch
arena mallocs from the same pool, then frees) over a mixed model of full,
sliding-window and Mamba layers, and after every step checks:

* the manager's own invariants (mgr.check(): refcounts equal the holders);
* a block held by two requests is shared legitimately: same position in both
  block tables, a full block, and the same token prefix up to its end (what
  a fork or a prefix-cache hit shares);
* every token written into a request's blocks (a value derived from its
  token prefix, its position, the layer and K/V) reads back intact through
  layer_tensors() + block_table() and through gather(); every Mamba state
  block holds the state of its prefix;
* the torch arena's blocks written under pressure are intact;
* the ledger: each KV space's owner holds exactly its mapped chunks, owners
  plus free chunks make up the created chunks, the pool validates; after
  sync() the manager's mapped chunks equal the C++ side's;
* teardown: closing the manager and freeing the arena leaves every chunk
  free and pool.close() reports no leaked block.

It runs on two models: one whose blocks divide the chunk, and one whose
blocks straddle chunk boundaries (a chunk shared by two blocks, mapped while
either is used, reclaimable only when neither is live).

Demotion (a second-level prefix cache in the host tier): evicting cached
blocks demotes them while the tier has room, and readmit (a later turn of a
finished request) hits them, which promotes them; their bytes are then
checked like any hit. Demoted blocks keep their hashes until the tier drops
them for a swap or a newer demotion.

Swap (the pool's host tier): swap_out, swap_in, polling swap_ready and
waiting, with arena pressure in between (a squeeze reclaims the device
chunks of finished swap-outs while others are still copying). Swapped-out
requests are neither extended nor forked (the rules check that refusal);
their bytes are checked once they are back. The ledger invariant covers both
tiers: each space's host owner holds exactly its swapped pages, and nothing
is left in the host tier at teardown.

Out-of-place state updates (state_update="out_of_place"): the Mamba state
is written as a step would, read from state_source() (or the table's block)
and written to the table's block; the rules check the block read holds the
state before the step, and the invariants that it stays intact until the
request's next call, whatever the other rules do meanwhile.
"""
from __future__ import annotations

import ctypes
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec, SlidingWindowSpec
from ellm_alloc.kv.layout import plan_layout
from ellm_alloc.kv.space import SWAPPING_IN, SWAPPING_OUT


MiB = 1 << 20
BS = 8
WINDOW = 12
F32 = "float32"
# Pages: full 2 layers x 8 tokens x 8 KiB = 128 KiB (16 per chunk), sliding
# 64 KiB (32 per chunk), Mamba state 32 KiB (64 per chunk): 16 chunks fill fast.
MODEL = ModelKVSpec("mixed-tiny", (
    FullAttentionSpec(4, 256, F32),
    SlidingWindowSpec(4, 256, F32, window=WINDOW),
    FullAttentionSpec(4, 256, F32),
    MambaSpec(dtype=F32, conv_shape=(16, 64), ssm_shape=(112, 64)),
))
TOKEN_LAYERS = (0, 1, 2)
SPOT_DIMS = [0, 255]  # dims of each head written and checked
MAMBA_LAYER = 3
BASES = ([1, 2, 3, 4] * 20, [7, 5, 3, 1, 0] * 16)
# Blocks across chunk boundaries: full 2 layers x 8 tokens x 48 KiB = 768 KiB
# (8 in a 3-chunk page), sliding 384 KiB (16 in 3 chunks), Mamba state 1.5 MiB
# (4 in 3 chunks).
STRADDLING = ModelKVSpec("straddling-tiny", (
    FullAttentionSpec(6, 1024, F32),
    SlidingWindowSpec(6, 1024, F32, window=WINDOW),
    FullAttentionSpec(6, 1024, F32),
    MambaSpec(dtype=F32, conv_shape=(64, 1024), ssm_shape=(320, 1024)),
))

# Blocks of a whole chunk each (full: 2 layers x 8 tokens x 128 KiB = 2 MiB;
# Mamba state 2 MiB; sliding 1 MiB, two to a chunk): most of a request's
# chunks are its own, so swaps move real bytes.
WHOLE_CHUNKS = ModelKVSpec("whole-chunks-tiny", (
    FullAttentionSpec(16, 1024, F32),
    SlidingWindowSpec(16, 1024, F32, window=WINDOW),
    FullAttentionSpec(16, 1024, F32),
    MambaSpec(dtype=F32, conv_shape=(64, 1024), ssm_shape=(448, 1024)),
))


def _prefix_hashes(tokens: list[int], seed: int) -> list[int]:
    """ph[p]: a 20-bit hash of (extra keys, tokens[:p+1])."""
    out, h = [], seed
    for t in tokens:
        h = (h * 1000003 + t + 1) % (1 << 20)
        out.append(h)
    return out


def _value(ph: int, layer: int, kv: int) -> float:
    return float(((ph * 8 + layer * 2 + kv) % (1 << 23)) + 1)  # exact in float32


class Req:
    def __init__(self, tokens: list[int], seed: int):
        self.tokens = list(tokens)  # tokens with a KV slot (num_tokens of them)
        self.seed = seed
        self.ph = _prefix_hashes(self.tokens, seed)
        self.read_len = 0  # tokens the state in its state_source block covers

    def extend(self, toks: list[int]) -> None:
        h = self.ph[-1] if self.ph else self.seed
        for t in toks:
            h = (h * 1000003 + t + 1) % (1 << 20)
            self.ph.append(h)
        self.tokens.extend(toks)


class KVMachine(RuleBasedStateMachine):
    mem = None  # conftest's Mem (raw reads and writes of pool memory), set by the test
    model = MODEL
    budget = "32MiB"
    max_cached_fraction = 0.5  # trims the prefix cache as blocks are released
    state_update = "copy"
    state_checkpoint_tokens = None  # the manager's default

    def __init__(self):
        super().__init__()
        self.pool = Pool("cpu", budget=self.budget, cpu_budget=self.budget)
        self.chunk = self.pool.stats()["chunk_bytes"]
        self.mgr = KVCacheManager(self.model, self.pool, block_size=BS,
                                  max_cached_fraction=self.max_cached_fraction, state_update=self.state_update,
                                  state_checkpoint_tokens=self.state_checkpoint_tokens)
        self.reqs: dict[str, Req] = {}
        self.arena: dict[int, tuple[int, int]] = {}  # ptr -> (size, tag)
        self.counter = 0
        self.finished: list[tuple[list[int], tuple]] = []  # (tokens, extra keys) of recent frees

    # ---- writing the model's data ------------------------------------------------

    def _write(self, rid: str, lo: int, hi: int) -> None:
        """Writes positions [lo, hi) of every token layer and the Mamba states
        (the state covered `lo` tokens before)."""
        r = self.reqs[rid]
        for layer in TOKEN_LAYERS:
            bt = self.mgr.block_table(rid, layer)
            pos = [p for p in range(lo, hi) if p // BS < len(bt) and bt[p // BS] is not None]
            if not pos:
                continue
            b_idx = torch.tensor([bt[p // BS] for p in pos])
            s_idx = torch.tensor([p % BS for p in pos])
            for kv, t in enumerate(self.mgr.layer_tensors(layer)):
                vals = torch.tensor([_value(r.ph[p], layer, kv) for p in pos], dtype=torch.float32)
                # Sample spots of each token's [heads, dim] slice: first and last dim of every head.
                for d in SPOT_DIMS:
                    t[b_idx, s_idx, :, d] = vals[:, None].expand(-1, t.shape[2])
        self._write_states(rid, lo)

    def _write_states(self, rid: str, before: int) -> None:
        """A step of the Mamba layer: the state of `before` tokens, read from
        state_source() or else the table's block, becomes the state of all."""
        r = self.reqs[rid]
        n = len(r.tokens)
        (states,) = self.mgr.layer_tensors(MAMBA_LAYER)
        bt = self.mgr.block_table(rid, MAMBA_LAYER)
        source = self.mgr.state_source(rid, MAMBA_LAYER)
        if self.state_update == "copy":
            assert source is None, "a state to read elsewhere in copy mode"
        if before:
            src = bt[(n - 1) // BS] if source is None else source
            want = torch.tensor([r.ph[before - 1]], dtype=torch.int64).view(torch.uint8)
            assert torch.equal(states[src, :8], want), f"{rid}: the step would read a wrong state"
        r.read_len = before
        for i, b in enumerate(bt):
            if b is None or n == 0:
                continue
            end = min(n, (i + 1) * BS)
            states[b, :8] = torch.tensor([r.ph[end - 1]], dtype=torch.int64).view(torch.uint8)

    def _new_id(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    # ---- rules ---------------------------------------------------------------------

    @rule(base=st.sampled_from([0, 1]), keep=st.integers(0, 60), suffix=st.lists(st.integers(0, 9), max_size=12),
          extra=st.sampled_from([(), ("img", 1)]))
    def admit(self, base, keep, suffix, extra):
        prompt = BASES[base][:keep] + suffix
        self._admit(prompt or [0], extra)

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), more=st.lists(st.integers(0, 9), max_size=6))
    def readmit(self, data, more):
        """A later turn: a finished request's tokens again, and more. Its
        prefix may sit demoted in the host tier: the hit promotes it (every
        demoted block hit comes back), and data_intact reads its bytes."""
        tokens, extra = data.draw(st.sampled_from(self.finished))
        demoted = {h for bp in self.mgr.pools for b, h in bp.block_hash.items() if b in bp.block_unit}
        before = self.mgr.usage()["promotions"]
        rid = self._admit(tokens + more, extra)
        if rid is None:
            return
        st_ = self.mgr.requests[rid]
        hit_demoted = [h for h in st_.hashes[:st_.hit_tokens // BS] if h in demoted]
        if hit_demoted:
            assert self.mgr.usage()["promotions"] > before, "a hit on a demoted block did not promote it"

    def _admit(self, prompt: list[int], extra: tuple) -> str | None:
        rid = self._new_id()
        hit = self.mgr.add_request(rid, prompt, extra_keys=extra)
        assert 0 <= hit < len(prompt) and hit % BS == 0, (hit, len(prompt))
        seed = 1 if extra else 0
        self.reqs[rid] = Req(prompt[:hit], seed)
        before = self.mgr.usage()
        if self.mgr.allocate_slots(rid, len(prompt) - hit):
            self.reqs[rid].extend(prompt[hit:])
            self._write(rid, hit, len(prompt))
        else:
            after = self.mgr.usage()
            # The failed allocation took nothing: no live block, no mapped page more.
            for g0, g1 in zip(before["groups"], after["groups"]):
                assert g1["live_blocks"] == g0["live_blocks"], (g0, g1)
            self.mgr.free(rid)
            del self.reqs[rid]
            return None
        return rid

    def _resident(self) -> list[str]:
        return sorted(r for r in self.reqs if not self.mgr.is_swapped_out(r))

    def _swapped(self) -> list[str]:
        return sorted(r for r in self.reqs if self.mgr.is_swapped_out(r))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), toks=st.lists(st.integers(0, 9), min_size=1, max_size=10))
    def extend(self, data, toks):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        n = len(self.reqs[rid].tokens)
        if self.mgr.is_swapped_out(rid):
            try:
                self.mgr.allocate_slots(rid, len(toks), new_token_ids=toks)
            except ValueError as e:
                assert "swapped out" in str(e)
            else:
                raise AssertionError("a swapped-out request was extended")
            assert self.mgr.requests[rid].num_tokens == n
            return
        if self.mgr.allocate_slots(rid, len(toks), new_token_ids=toks):
            self.reqs[rid].extend(toks)
            self._write(rid, n, n + len(toks))
        else:
            assert self.mgr.requests[rid].num_tokens == n

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        st_ = self.mgr.requests[rid]
        self.finished = (self.finished + [(list(st_.token_ids[:st_.num_tokens]), st_.extra_keys)])[-8:]
        self.mgr.free(rid)
        del self.reqs[rid]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.reqs)))
        child = self._new_id()
        if self.mgr.is_swapped_out(parent):
            try:
                self.mgr.fork(parent, child)
            except ValueError as e:
                assert "swapped out" in str(e)
            else:
                raise AssertionError("a swapped-out request was forked")
            assert child not in self.mgr.requests
            return
        try:
            self.mgr.fork(parent, child)
        except OutOfMemoryError:
            assert child not in self.mgr.requests  # all or nothing
            return
        p = self.reqs[parent]
        full = len(p.tokens) // BS
        self.reqs[child] = Req(p.tokens, p.seed)  # the child continues from the parent's exact state
        for layer in TOKEN_LAYERS:
            pt, ct = self.mgr.block_table(parent, layer), self.mgr.block_table(child, layer)
            assert ct[:full] == pt[:full]  # full blocks shared
            assert len(ct) == len(pt)
            for i in range(full, len(pt)):  # blocks still being written: the child's own copies
                assert (ct[i] is None) == (pt[i] is None)
                assert ct[i] is None or ct[i] != pt[i]

    @precondition(lambda self: any(not self.mgr.is_swapped_out(r) for r in self.reqs))
    @rule(data=st.data(), wait=st.booleans())
    def swap_out(self, data, wait):
        rid = data.draw(st.sampled_from(self._resident()))
        before = self.pool.host_tier()
        demoted = sum(bp.demoted_chunks() for bp in self.mgr.pools)
        try:
            moved = self.mgr.swap_out(rid)
        except OutOfMemoryError:
            # All or nothing: no host chunk taken for it. Demoted prefix blocks
            # made way for it first, all of them, since it still did not fit.
            after = self.pool.host_tier()
            assert all(not bp.units for bp in self.mgr.pools)
            assert sum(o["held_chunks"] for o in after["owners"]) == \
                sum(o["held_chunks"] for o in before["owners"]) - demoted
            assert not self.mgr.is_swapped_out(rid)
            return
        assert moved % self.chunk == 0 and self.mgr.is_swapped_out(rid)
        if wait:
            self.mgr.wait_swap(rid)
            assert self.mgr.swap_ready(rid)
        try:
            self.mgr.swap_out(rid)
        except ValueError:
            pass
        else:
            raise AssertionError("a request was swapped out twice")

    @precondition(lambda self: any(self.mgr.is_swapped_out(r) for r in self.reqs))
    @rule(data=st.data(), wait=st.booleans())
    def swap_in(self, data, wait):
        rid = data.draw(st.sampled_from(self._swapped()))
        can = self.mgr.can_swap_in(rid)
        try:
            self.mgr.swap_in(rid)
        except OutOfMemoryError:
            assert not can, "can_swap_in() said yes, swap_in() ran out of memory"
            assert self.mgr.is_swapped_out(rid)  # still swapped out, bytes still in the host tier
            return
        assert not self.mgr.is_swapped_out(rid)
        if wait:
            self.mgr.wait_swap(rid)
            assert self.mgr.swap_ready(rid)

    @rule()
    def poll_swaps(self):
        for rid in sorted(self.reqs):
            self.mgr.swap_ready(rid)

    @rule()
    def compact(self):
        """Moves live blocks between pages: the invariants then check that every
        block table, hash and byte followed them."""
        before = self.mgr.usage()["mapped_bytes"]
        moved = self.mgr.compact()
        after = self.mgr.usage()["mapped_bytes"]
        assert after <= before
        assert moved == 0 or after < before  # a planned move always unmaps more than it maps

    @rule(n=st.integers(1, 40))
    def evict(self, n):
        """Cached blocks leave the device: demoted to the host tier while it
        has room (their hashes stay: lookups still hit), else evicted."""
        u0 = self.mgr.usage()
        done = self.mgr.evict(n)
        u1 = self.mgr.usage()
        cached = [sum(g["cached_blocks"] for g in u["groups"]) for u in (u0, u1)]
        # A demoted unit moves whole: its blocks may overshoot n.
        assert 0 <= done and (done <= n or u1["demotions"] > u0["demotions"])
        assert cached[1] <= cached[0] - min(done, cached[0])
        assert u1["demotions"] - u0["demotions"] <= done
        for bp in self.mgr.pools:
            for b in bp.block_unit:
                assert bp.lookup(bp.block_hash[b]) == b, "a demoted block cannot be hit"

    @rule(size=st.sampled_from([1 * MiB, 2 * MiB, 6 * MiB, 10 * MiB, 16 * MiB, 28 * MiB]))
    def arena_malloc(self, size):
        try:
            ptr = self.pool.malloc(size)
        except OutOfMemoryError:
            return
        self.counter += 1
        self.mem.fill(ptr, size, self.counter)
        self.arena[ptr] = (size, self.counter)

    @rule()
    def arena_squeeze(self):
        """The arena takes chunk after chunk until the pool refuses: every
        reclaimable KV chunk goes, and the next KV steps find their cached
        blocks gone."""
        while True:
            try:
                ptr = self.pool.malloc(self.chunk)
            except OutOfMemoryError:
                return
            self.counter += 1
            self.mem.fill(ptr, self.chunk, self.counter)
            self.arena[ptr] = (self.chunk, self.counter)

    @precondition(lambda self: self.arena)
    @rule(data=st.data(), flush=st.booleans())
    def arena_free(self, data, flush):
        ptr = data.draw(st.sampled_from(sorted(self.arena)))
        del self.arena[ptr]
        self.pool.free(ptr)
        if flush:
            self.pool.empty_cache()

    # ---- invariants ------------------------------------------------------------------

    @invariant()
    def manager_consistent(self):
        self.mgr.check()
        assert set(self.mgr.requests) == set(self.reqs)
        for layer in TOKEN_LAYERS + (MAMBA_LAYER,):
            owner_of: dict[int, tuple[str, int]] = {}
            for rid in self.reqs:
                for i, b in enumerate(self.mgr.block_table(rid, layer)):
                    if b is None:
                        continue
                    if b in owner_of:
                        other, j = owner_of[b]
                        assert i == j, f"layer {layer}: block {b} at index {j} of {other} and {i} of {rid}"
                        end = (i + 1) * BS
                        ra, rb = self.reqs[other], self.reqs[rid]
                        assert len(ra.tokens) >= end and len(rb.tokens) >= end, \
                            f"layer {layer}: partial block {b} shared by {other} and {rid}"
                        assert ra.seed == rb.seed and ra.tokens[:end] == rb.tokens[:end], \
                            f"layer {layer}: block {b} shared by {other} and {rid} with different prefixes"
                    else:
                        owner_of[b] = (rid, i)

    @invariant()
    def data_intact(self):
        # Copies still running would finish, or not, by the clock: drained,
        # every run of the same steps sees the same swaps end.
        self.pool.drain_copies()
        (states,) = self.mgr.layer_tensors(MAMBA_LAYER)
        for rid, r in self.reqs.items():
            if self.mgr.is_swapped_out(rid):  # unreadable: checked once it is back
                continue
            self.mgr.wait_swap(rid)  # a swap-in's copies land before we read
            n = len(r.tokens)
            assert self.mgr.requests[rid].num_tokens == n
            ph = torch.tensor(r.ph, dtype=torch.int64)
            for layer in TOKEN_LAYERS:
                bt = self.mgr.block_table(rid, layer)
                first = self.model.layers[layer].first_needed_token(n)
                bt_t = torch.tensor([-1 if b is None else b for b in bt] or [-1], dtype=torch.int64)
                all_pos = torch.arange(n)
                blk = bt_t[torch.clamp(all_pos // BS, max=len(bt_t) - 1)] if n else all_pos
                held = (blk >= 0) & (all_pos // BS < len(bt))
                # Every kept token has a block.
                assert bool(held[first:].all()), \
                    f"{rid} layer {layer}: tokens {first}..{n - 1} must be kept, block table {bt}"
                pos = all_pos[held]
                k, v, positions = self.mgr.gather(rid, layer)
                assert positions == pos.tolist(), (rid, layer, positions, pos.tolist())
                tensors = self.mgr.layer_tensors(layer)
                for kv in range(2):
                    exp = (((ph[pos] * 8 + layer * 2 + kv) % (1 << 23)) + 1).to(torch.float32)
                    got = tensors[kv][blk[held], pos % BS][..., SPOT_DIMS]
                    assert torch.equal(got, exp[:, None, None].expand_as(got)), \
                        f"{rid} layer {layer} kv {kv}: paged view corrupted"
                    g = (k, v)[kv][..., SPOT_DIMS]
                    assert torch.equal(g, exp[:, None, None].expand_as(g)), \
                        f"{rid} layer {layer} kv {kv}: gather() differs"
            source = self.mgr.state_source(rid, MAMBA_LAYER)
            if source is not None:  # held until the request's next call: nothing may have touched it
                want = torch.tensor([r.ph[r.read_len - 1]], dtype=torch.int64).view(torch.uint8)
                assert torch.equal(states[source, :8], want), f"{rid}: the state to read was overwritten"
            if n:
                bt = self.mgr.block_table(rid, MAMBA_LAYER)
                assert len(bt) > (n - 1) // BS and bt[(n - 1) // BS] is not None, f"{rid}: no current Mamba state"
                for i, b in enumerate(bt):
                    if b is None:
                        continue
                    end = min(n, (i + 1) * BS)
                    want = torch.tensor([r.ph[end - 1]], dtype=torch.int64).view(torch.uint8)
                    assert torch.equal(states[b, :8], want), f"{rid}: Mamba state block {i} corrupted"
        for ptr, (size, tag) in self.arena.items():
            assert self.mem.intact(ptr, size, tag), f"arena block {ptr:#x} corrupted"

    @invariant()
    def ledger(self):
        self.pool.drain_copies()
        self.pool.validate()
        owners = self.pool.owners()
        stats = self.pool.stats()
        for space in self.mgr.spaces:
            assert owners[space.owner]["held_chunks"] == space.stats()["mapped_pages"], \
                (space.name, owners[space.owner], space.stats())
        held = sum(o["held_chunks"] for o in owners if o["active"])
        assert held + stats["free_chunks"] == stats["created_chunks"]
        assert stats["created_chunks"] * self.chunk <= stats["budget_bytes"]
        self.mgr.sync()
        host = self.pool.host_tier()
        assert host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"])
        assert host["created_chunks"] * self.chunk <= host["budget_bytes"]
        for g, space, bp in zip(self.mgr.usage()["groups"], self.mgr.spaces, self.mgr.pools):
            # C++ still holds the device chunk of a page swapping out; Python let go of it.
            states = [space.state(k) for k in range(space.n_pages)]
            out, back = states.count(SWAPPING_OUT), states.count(SWAPPING_IN)
            stats = space.stats()
            assert g["mapped_chunks"] + out == stats["mapped_pages"], (g, stats)
            assert bp.swapped_chunks + back == stats["host_pages"], (bp.swapped_chunks, back, stats)
            assert host["owners"][space.host_owner]["held_chunks"] == stats["host_pages"]

    def teardown(self):
        try:
            self.mgr.close()
            for ptr in list(self.arena):
                self.pool.free(ptr)
            self.arena.clear()
            self.pool.empty_cache()
            self.pool.validate()
            owners = self.pool.owners()
            assert all(o["held_chunks"] == 0 for o in owners), owners
            s = self.pool.stats()
            assert s["free_chunks"] == s["created_chunks"]
            host = self.pool.host_tier()
            assert host["free_chunks"] == host["created_chunks"], host
            assert all(o["held_chunks"] == 0 for o in host["owners"]), host
        finally:
            leaked = self.pool.close()
        assert leaked == 0, f"pool closed with {leaked} live blocks"


class StraddlingKVMachine(KVMachine):
    model = STRADDLING
    budget = "64MiB"
    max_cached_fraction = float("inf")  # every released full block stays cached, for the arena to reclaim


class WholeChunkKVMachine(KVMachine):
    model = WHOLE_CHUNKS
    budget = "64MiB"


class OutOfPlaceKVMachine(KVMachine):
    state_update = "out_of_place"
    state_checkpoint_tokens = BS  # every boundary saved: many steps read an old block

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), steps=st.integers(1, 40))
    def decode(self, data, steps):
        """Token by token, as decoding goes: steps stop on block boundaries,
        where states are saved, so the next step reads from the saved block."""
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        for _ in range(steps):
            if self.mgr.is_swapped_out(rid):
                return
            n = len(self.reqs[rid].tokens)
            if not self.mgr.allocate_slots(rid, 1, new_token_ids=[n % 10]):
                return
            self.reqs[rid].extend([n % 10])
            self._write(rid, n, n + 1)


def _run(machine, mem, examples):
    machine.mem = mem
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: the thread pool only costs time
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=int(os.environ.get("ELLM_STATEFUL_EXAMPLES", examples)),
                              stateful_step_count=50, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow]),
        )
    finally:
        torch.set_num_threads(threads)


def test_kv_manager_stateful(mem):
    _run(KVMachine, mem, 80)


def test_kv_manager_stateful_straddling_blocks(mem):
    groups = plan_layout(STRADDLING, BS, 2 * MiB).groups
    assert [(g.ratio, g.large_page_bytes) for g in groups] == [(8, 6 * MiB), (16, 6 * MiB), (4, 6 * MiB)]
    _run(StraddlingKVMachine, mem, 50)


def test_kv_manager_stateful_swap(mem):
    """Blocks of whole chunks: swap_out and swap_in move most of a request."""
    _run(WholeChunkKVMachine, mem, 50)


def test_kv_manager_stateful_out_of_place_states(mem):
    """States updated out of place: every step reads the state it should,
    and the block it reads stays intact until the request's next call."""
    _run(OutOfPlaceKVMachine, mem, 40)
