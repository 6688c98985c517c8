"""The arena state machine (tests/test_arena_stateful.py) on the enabled pool,
with real torch tensors allocated and dropped among its raw mallocs and frees.

Torch tensors live in the same arena as the machine's raw blocks, so every
invariant of the base machine (alignment, disjointness, data intact, ledger,
stream rule, no spurious OOM) now also covers memory torch allocated.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis.stateful import Bundle, consumes, multiple, rule
from test_arena_stateful import SIZES, ArenaMachine, Blk, run_arena_machine

import ellm_alloc


class RoutedArenaMachine(ArenaMachine):
    device = 0  # torch's entry points reach the enabled pool as device 0
    tensors = Bundle("tensors")

    def open_pool(self):
        pool = ellm_alloc.device_pool()
        ellm_alloc.empty_cache()  # idle chunks back to the device, so the budget below can hold
        assert pool.stats()["live_blocks"] == 0, "the routed process holds tensors the model does not know"
        pool.set_budget(self.budget)
        # The pool outlives the example: the arena may still hold chunks under
        # empty slabs it keeps per (stream, size class) from earlier examples,
        # which this example's footprint model does not know about.
        self.inherited_chunks = pool.stats()["reserved_bytes"] // pool.stats()["chunk_bytes"]
        self.torch_tensors: dict[int, torch.Tensor] = {}
        return pool

    def budget_chunks(self) -> int:
        return super().budget_chunks() - self.inherited_chunks

    def close_pool(self):
        self.pool.validate()
        assert self.pool.stats()["live_blocks"] == 0, "blocks leaked"
        ellm_alloc.empty_cache()

    @rule(target=tensors, size=SIZES)
    def torch_tensor(self, size):
        before = self.pool.stats()
        try:
            t = torch.empty(size, dtype=torch.uint8)
        except torch.OutOfMemoryError as e:
            assert "CPU out of memory" in str(e)
            need, have = self.footprint_chunks(size), self.budget_chunks()
            assert need > have, f"spurious OOM for a {size}-byte tensor: {need} chunks fit in {have}"
            self.fences_waited()
            return multiple()
        if size == 0:
            assert t.data_ptr() == 0
            return multiple()
        if self.pool.stats()["failed_acquires"] > before["failed_acquires"]:
            self.fences_waited()  # memory pressure: the arena may wait for fences before failing
        tag = self.next_tag
        self.next_tag += 1
        blk = self.live[tag] = Blk(tag, t.data_ptr(), size, 0)
        if blk.small:
            self.small_pairs.add((0, blk.rs // 512))
        self.torch_tensors[tag] = t
        self.mem.fill(blk.ptr, size, tag)
        return tag

    @rule(tag=consumes(tensors))
    def drop_tensor(self, tag):
        blk = self.live.pop(tag)
        assert self.mem.intact(blk.ptr, blk.size, tag)
        frees = self.pool.stats()["num_frees"]
        del self.torch_tensors[tag]  # the last reference: torch calls our deleter now
        assert self.pool.stats()["num_frees"] == frees + 1
        for s in {0} & self.held:
            self.in_flight.append((blk.ptr, blk.ptr + blk.rs, s))

    def teardown(self):
        for tag in list(self.torch_tensors):
            self.live.pop(tag)
        self.torch_tensors.clear()
        super().teardown()


@pytest.mark.parametrize("budget_mib", [96, 12], ids=["roomy", "tight"])
def test_arena_state_machine_with_torch_tensors(mem, budget_mib):
    run_arena_machine(RoutedArenaMachine, mem, budget_mib, examples=150)
