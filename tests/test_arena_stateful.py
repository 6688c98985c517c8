"""Stateful property test of the arena through the torch C ABI, on a host pool.

Hypothesis drives malloc / free / record_stream / empty_cache and simulated
GPU work (hold_stream / release_stream) over 3 streams, and after every step
checks the arena against a model of the live blocks:

* live blocks are 512-byte aligned, inside the arena's VA, and never overlap;
* the data written into each block at malloc is intact until it is freed;
* pool.validate() passes (ledger balances, VA tiled exactly) and
  allocated_bytes / live_blocks agree with the model;
* the stream rule: while stream S is held (its GPU work is in flight), bytes
  freed by a block that S used are not handed to an allocation on another
  stream, and stay mapped;
* out of memory is only reported when the live blocks could not all fit in
  the budget even with a boundary chunk on each side of every block.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc import _native as N

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 2 * MiB
SMALL_MAX = 8 * KiB
VA = 16 << 30  # VA is cheap: with this much, placement can only fail for lack of chunks
DEVICE = 6  # torch device index the machine's pool is bound to
STREAMS = st.sampled_from([0, 1, 2])
SIZES = st.one_of(
    st.integers(1, SMALL_MAX),
    st.integers(1, SMALL_MAX),
    st.sampled_from([0, 512, SMALL_MAX, SMALL_MAX + 1, CHUNK - 512, CHUNK, CHUNK + 512, 4 * MiB]),
    st.integers(SMALL_MAX + 1, 4 * MiB),
    st.integers(SMALL_MAX + 1, 4 * MiB),
    st.integers(4 * MiB, 64 * MiB),
)


def rounded(size: int) -> int:
    return (size + 511) // 512 * 512


@dataclass
class Blk:
    tag: int
    ptr: int
    size: int
    stream: int
    uses: set = field(default_factory=set)

    @property
    def rs(self) -> int:
        return rounded(self.size)

    @property
    def small(self) -> bool:
        return self.rs <= SMALL_MAX


class ArenaMachine(RuleBasedStateMachine):
    mem = None  # conftest's Mem, set by the test function
    budget = 96 * MiB  # set by the test function

    blocks = Bundle("blocks")

    device = DEVICE  # the torch entry points reach self.pool through this index

    def __init__(self):
        super().__init__()
        self.pool = self.open_pool()
        self.base = self.pool.arena_base
        self.live: dict[int, Blk] = {}
        self.next_tag = 1
        self.held: set[int] = set()
        # (start, end, stream): bytes freed while `stream`, which used them, was held.
        self.in_flight: list[tuple[int, int, int]] = []
        # Small-object bookkeeping for the footprint bound (see footprint_chunks).
        self.small_pairs: set[tuple[int, int]] = set()
        self.deferred_small = 0

    def open_pool(self) -> Pool:
        pool = Pool("cpu", budget=self.budget, va_size=VA)
        assert N.lib.ellm_bind_device(self.device, pool.handle) == 0, N.last_error()
        return pool

    def close_pool(self) -> None:
        """Checks that nothing leaked, then lets the pool go (every live block is freed by now)."""
        try:
            self.pool.validate()
            leaked = self.pool.close()
            assert leaked == 0, f"{leaked} blocks leaked"
        finally:
            N.lib.ellm_bind_device(self.device, None)
            self.pool.close()

    # ---- model helpers ---------------------------------------------------

    def footprint_chunks(self, extra_size: int) -> int:
        """An upper bound on the chunks the live blocks plus one more of
        `extra_size` need: a large block spans at most ceil(size/chunk)+1 VA
        chunks; every slab (<= 64 KiB) at most 2, and there are at most one
        slab per live or deferred small object plus one kept empty per
        (stream, size class) ever used."""
        n = 0
        slabs = len(self.small_pairs) + self.deferred_small + 1  # +1: a new slab for the request
        for b in self.live.values():
            if b.small:
                slabs += 1
            else:
                n += -(-b.rs // CHUNK) + 1
        if rounded(extra_size) > SMALL_MAX:
            n += -(-rounded(extra_size) // CHUNK) + 1
        return n + 2 * slabs

    def budget_chunks(self) -> int:
        return self.pool.stats()["budget_bytes"] // CHUNK

    def fences_waited(self) -> None:
        """The arena waited for every recorded event (only legal on the way to OOM)."""
        self.in_flight.clear()
        self.deferred_small = 0

    # ---- rules -----------------------------------------------------------

    @rule(target=blocks, size=SIZES, stream=STREAMS, via_torch=st.booleans())
    def malloc(self, size, stream, via_torch):
        before = self.pool.stats()
        if via_torch:
            ptr = N.lib.ellm_malloc(size, self.device, stream or None) or 0
            oom = ptr == 0 and size > 0
            if oom:
                assert N.last_status() == N.OUT_OF_MEMORY, (N.last_status(), N.last_error())
                assert "out of memory" in N.last_error()
        else:
            try:
                ptr = self.pool.malloc(size, stream)
                oom = False
            except OutOfMemoryError as e:
                assert "out of memory" in str(e)
                ptr, oom = 0, True
        if size == 0:
            assert ptr == 0, "malloc(0) must return NULL"
            return multiple()
        after = self.pool.stats()
        if oom:
            need, have = self.footprint_chunks(size), self.budget_chunks()
            assert need > have, (
                f"spurious OOM for {size} bytes on stream {stream}: the live blocks and it fit in "
                f"{need} chunks of a {have}-chunk budget"
            )
            self.fences_waited()
            return multiple()
        assert ptr != 0
        if after["failed_acquires"] > before["failed_acquires"]:
            self.fences_waited()  # memory pressure: the arena may wait for fences before failing
        tag = self.next_tag
        self.next_tag += 1
        blk = self.live[tag] = Blk(tag, ptr, size, stream)  # recorded first: teardown frees it
        if blk.small:
            self.small_pairs.add((stream, blk.rs // 512))
        for a, b, s in self.in_flight:
            assert not (s != stream and ptr < b and a < ptr + blk.rs), (
                f"stream {stream} got [{ptr:#x}, {ptr + blk.rs:#x}) overlapping [{a:#x}, {b:#x}), freed "
                f"while stream {s} (still held, no memory pressure) used it"
            )
        self.mem.fill(ptr, size, tag)
        return tag

    @rule(tag=consumes(blocks), via_torch=st.booleans())
    def free(self, tag, via_torch):
        blk = self.live.pop(tag)
        assert self.mem.intact(blk.ptr, blk.size, tag)
        before = self.pool.stats()
        if via_torch:
            N.lib.ellm_free(blk.ptr, blk.size, self.device, blk.stream or None)
        else:
            self.pool.free(blk.ptr, blk.stream)
        after = self.pool.stats()
        assert after["invalid_frees"] == before["invalid_frees"], N.last_error()
        assert after["num_frees"] == before["num_frees"] + 1
        for s in {blk.stream} | blk.uses:
            if s in self.held:
                self.in_flight.append((blk.ptr, blk.ptr + blk.rs, s))
        if blk.small and blk.uses:
            self.deferred_small += 1

    @rule(tag=blocks, stream=STREAMS, via_torch=st.booleans())
    def record_stream(self, tag, stream, via_torch):
        blk = self.live[tag]
        if via_torch:
            N.lib.ellm_record_stream(blk.ptr, stream or None)
        else:
            self.pool.record_stream(blk.ptr, stream)
        if stream != blk.stream:
            blk.uses.add(stream)

    @rule(via_torch=st.booleans())
    def empty_cache(self, via_torch):
        if via_torch:
            N.lib.ellm_reset()  # torch.cuda.empty_cache(): flush, unmap idle chunks, trim the pool
        else:
            self.pool.empty_cache()
        if not self.held:
            self.deferred_small = 0  # every fence is complete, so the flush drained them all

    @rule(stream=STREAMS)
    def hold_stream(self, stream):
        self.pool.hold_stream(stream)
        self.held.add(stream)

    @rule(stream=STREAMS)
    def release_stream(self, stream):
        self.pool.release_stream(stream)
        self.held.discard(stream)
        self.in_flight = [f for f in self.in_flight if f[2] != stream]

    @rule(via_torch=st.booleans(), stream=STREAMS)
    def free_null(self, via_torch, stream):
        before = self.pool.stats()
        if via_torch:
            N.lib.ellm_free(None, 0, self.device, stream or None)
        else:
            self.pool.free(0, stream)
        after = self.pool.stats()
        assert (after["num_frees"], after["invalid_frees"]) == (before["num_frees"], before["invalid_frees"])

    # ---- invariants ------------------------------------------------------

    @invariant()
    def live_blocks_aligned_disjoint_and_in_the_arena(self):
        va = self.pool.stats()["va_bytes"]
        spans = sorted((b.ptr, b.ptr + b.rs, b.tag) for b in self.live.values())
        for start, end, tag in spans:
            assert start % 512 == 0, f"block {tag} at {start:#x} is not 512-byte aligned"
            assert self.base <= start and end <= self.base + va, f"block {tag} outside the arena"
        for (s0, e0, t0), (s1, e1, t1) in zip(spans, spans[1:]):
            assert e0 <= s1, f"blocks {t0} [{s0:#x},{e0:#x}) and {t1} [{s1:#x},{e1:#x}) overlap"

    @invariant()
    def live_data_intact(self):
        for b in self.live.values():
            assert self.mem.intact(b.ptr, b.size, b.tag), f"data of live block {b.tag} at {b.ptr:#x} changed"

    @invariant()
    def pool_validates_and_counts_agree(self):
        self.pool.validate()
        s = self.pool.stats()
        assert s["allocated_bytes"] == sum(b.rs for b in self.live.values())
        assert s["live_blocks"] == len(self.live)
        assert s["reserved_bytes"] <= s["budget_bytes"]

    @invariant()
    def in_flight_bytes_stay_mapped(self):
        for a, b, s in self.in_flight:
            probes = {a, b - 1} | set(range((a + CHUNK - 1) // CHUNK * CHUNK, b, CHUNK))
            for p in probes:
                assert self.mem.readable(p), (
                    f"{p:#x} in [{a:#x},{b:#x}), freed while stream {s} is held, was unmapped under the GPU"
                )

    def teardown(self):
        try:
            for s in list(self.held):
                self.pool.release_stream(s)
            for b in self.live.values():
                self.pool.free(b.ptr, b.stream)
        finally:
            self.close_pool()


def run_arena_machine(machine: type[ArenaMachine], mem, budget_mib: int, examples: int) -> None:
    """Runs `machine` with budget_mib MiB (ELLM_STATEFUL_EXAMPLES overrides the example count)."""
    machine.mem = mem
    machine.budget = budget_mib * MiB
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("ELLM_STATEFUL_EXAMPLES", examples)),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.parametrize("budget_mib", [96, 12], ids=["roomy", "tight"])
def test_arena_state_machine(mem, budget_mib):
    """Random malloc/free/record_stream/empty_cache/stream traffic keeps every arena invariant,
    with room to spare (placement and stream rules) and with a budget that forces OOM paths."""
    run_arena_machine(ArenaMachine, mem, budget_mib, examples=200)
