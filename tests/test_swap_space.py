"""The host tier's swap core at the PageSpace level (csrc/kv_space.h "Swap",
csrc/host_tier.h), on host pools with a cpu budget.

A KV page (one chunk) swaps out to a host-tier chunk and back at the same VA,
asynchronously on the tier's copy stream:

    pinned/reclaimable --swap_out--> 4 swapping out --finish--> 5 swapped
    5 swapped --swap_in--> 6 swapping in --finish--> 1 pinned

Checked here:

* round trips are bit-exact (hypothesis draws the page sets, the bytes, how
  the swap-outs end: waiting, polling, or reclaim pressure), tensors made
  before the swap read the bytes back at the same addresses, and both
  ledgers balance after every step (device: pool.owners(); host:
  pool.host_tier()); closing leaves nothing held in either tier;
* a stateful machine over one space: map, write, set_reclaimable, pin,
  unmap, swap_out, finish, swap_in, swap_wait, reclaim pressure from another
  owner, and a caller stream held back (GPU work still in flight): a copy
  queued behind it must not start before the stream is released, so bytes
  that "kernel" writes after swap_out() returned are the ones swapped out;
* injected faults (a copy, a host-tier slab, a device map or create) make
  the call raise and leave every page as it was, nothing leaked;
* bad input: clear errors, nothing changed;
* threads swapping their own pages while the arena squeezes the pool from
  another thread, so the pool reclaims finished swap-outs and reclaimable
  pages from under them.

The file also runs on the CUDA backend over the fake driver
(tests/test_fakecuda_suite.py). The fake runs copies at once and does not
order one stream after another's events, so the checks that a copy waits
for a held stream run on the host backend only (ORDERED); the fake's own
calls stand in for the host backend's injected faults.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc.errors import AllocatorError
from ellm_alloc.kv.space import PINNED, RECLAIMABLE, SWAPPED, SWAPPING_IN, SWAPPING_OUT, UNMAPPED, PageSpace

FAKE = os.environ.get("ELLM_TEST_BACKEND") == "fakecuda"
ORDERED = not FAKE  # the backend really orders the copy stream after a held caller stream
EXAMPLES = int(os.environ.get("ELLM_STATEFUL_EXAMPLES", 50))
MiB = 1 << 20
C = 2 * MiB  # the chunk (and page) size
HELD = 0x5157  # a caller stream number (a torch stream) the tests hold back
ON_DEVICE = (PINNED, RECLAIMABLE, SWAPPING_OUT, SWAPPING_IN)  # states holding a device chunk
ON_HOST = (SWAPPING_OUT, SWAPPED, SWAPPING_IN)  # states holding a host chunk
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=64)
def page_bytes(seed: int) -> bytes:
    """A page of random bytes; distinct seeds make distinct pages, so two
    pages sharing a chunk in either tier would show as corruption."""
    return np.random.default_rng(seed).bytes(C)


def write(space: PageSpace, p: int, data: bytes) -> None:
    ctypes.memmove(space.page_addr(p), data, C)


def read(space: PageSpace, p: int) -> bytes:
    return ctypes.string_at(space.page_addr(p), C)


_pipe = os.pipe()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t


def readable(addr: int) -> bool:
    """Whether `addr` is mapped readable, without faulting (write(2) from it fails with EFAULT)."""
    if _libc.write(_pipe[1], addr, 1) != 1:
        return False
    os.read(_pipe[0], 1)
    return True


def states(space: PageSpace) -> list[int]:
    return [space.state(p) for p in range(space.n_pages)]


def check_ledgers(pool: Pool, spaces=(), exact: bool = True) -> None:
    """Both tiers balance: created == free + sum(held), within the budget, and
    (exact: no copy may finish meanwhile, one thread) each space's owners
    hold exactly the chunks its page states say."""
    pool.validate()  # the arena, the device ledger and the host tier's ledger
    st_ = pool.stats()
    owners = pool.owners()
    assert st_["created_chunks"] == st_["free_chunks"] + sum(o["held_chunks"] for o in owners)
    assert st_["created_chunks"] * st_["chunk_bytes"] <= st_["budget_bytes"]
    host = pool.host_tier()
    assert host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"]), host
    assert host["created_chunks"] * host["chunk_bytes"] <= host["budget_bytes"], host
    assert host["pinned_bytes"] >= host["created_chunks"] * host["chunk_bytes"], host
    if not exact:
        return
    for s in spaces:
        sts, ks = states(s), s.stats()
        on_device = sum(x in ON_DEVICE for x in sts)
        on_host = sum(x in ON_HOST for x in sts)
        assert owners[s.owner]["held_chunks"] == ks["mapped_pages"] == on_device, (s.name, sts, ks)
        assert host["owners"][s.host_owner]["held_chunks"] == ks["host_pages"] == on_host, (s.name, sts, host)
        assert ks["swapping_pages"] == sts.count(SWAPPING_OUT) + sts.count(SWAPPING_IN), (sts, ks)


def check_closed_clean(pool: Pool) -> None:
    """After the spaces closed: no KV chunk held in either tier."""
    pool.validate()
    assert all(o["held_chunks"] == 0 for o in pool.owners() if o["name"] != "arena"), pool.owners()
    host = pool.host_tier()
    assert host["free_chunks"] == host["created_chunks"], host
    assert all(o["held_chunks"] == 0 for o in host["owners"]), host


def close_pool(pool: Pool) -> None:
    leaked = pool.close()
    assert leaked == 0, f"pool closed with {leaked} live blocks"


def inject(pool: Pool, kind: str, nth: int, direction: str = "out") -> None:
    """pool.inject_fault(kind, nth); on the fake driver, the fake's failure
    of the matching entry point (the conftest maps 'create' and 'map' only)."""
    if FAKE and kind in ("copy", "host_alloc"):
        import fakecuda

        name = {"host_alloc": "cuMemHostAlloc",
                "copy": "cuMemcpyDtoHAsync" if direction == "out" else "cuMemcpyHtoDAsync"}[kind]
        fakecuda.load().fail_call(name, nth, fakecuda.CUDA_ERROR_OUT_OF_MEMORY)
    else:
        pool.inject_fault(kind, nth)


def wait_until(pred, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def squeeze(pool: Pool, owner: int, n: int, timeout: float = 20.0) -> list[int]:
    """Another owner takes n chunks, more than are free: the pool reclaims
    the rest (retried while the copies of swap-outs still run)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return pool.acquire(owner, n)
        except OutOfMemoryError:
            if time.monotonic() > end:
                raise
            time.sleep(0.002)


def held(pool: Pool) -> tuple[list[int], list[int]]:
    """Chunks each owner holds, device tier and host tier."""
    return ([o["held_chunks"] for o in pool.owners()], [o["held_chunks"] for o in pool.host_tier()["owners"]])


def drain_copy_stream(pool: Pool) -> None:
    """Every copy queued so far has ended, without finishing any swap: a
    probe page's swap-out, queued behind them on the tier's one copy stream,
    is waited for."""
    probe = PageSpace(pool, "probe", 1)
    probe.map(0)
    probe.swap_out([0])
    probe.finish_swaps(wait=True)
    probe.close()


# ---- round trips --------------------------------------------------------------------


def _split(items: list[int], cuts: list[int]) -> list[list[int]]:
    """items cut into consecutive non-empty calls at the given positions."""
    out, lo = [], 0
    for c in sorted(set(c for c in cuts if 0 < c < len(items))) + [len(items)]:
        out.append(items[lo:c])
        lo = c
    return out


@settings(max_examples=2 * EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_round_trip_is_bit_exact_at_the_same_addresses(data):
    n = 8
    pool = Pool("cpu", budget=str(12 * C), cpu_budget=str(8 * C))
    try:
        space = PageSpace(pool, "kv", n)
        other = PageSpace(pool, "other", 12)
        mapped = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=7, unique=True), "mapped"))
        contents = {}
        for p in mapped:
            space.map(p)
            seed = data.draw(st.integers(0, 2**32 - 1), f"seed {p}")
            patch = data.draw(st.binary(max_size=64), f"patch {p}")
            off = data.draw(st.integers(0, C - 64), f"offset {p}")
            b = bytearray(page_bytes(seed))
            b[off:off + len(patch)] = patch
            contents[p] = bytes(b)
            write(space, p, contents[p])
        view = space.bytes_view()  # a tensor made before the swap: it must read the same bytes after
        assert view.data_ptr() == space.base
        out = data.draw(st.lists(st.sampled_from(mapped), min_size=1, unique=True), "swapped")
        for p in out:
            if data.draw(st.booleans(), f"reclaimable {p}"):  # a swap-out takes reclaimable pages too
                assert space.set_reclaimable(p, data.draw(st.integers(0, 3)))
        stream = data.draw(st.sampled_from([0, 3]), "stream")
        how = data.draw(st.sampled_from(["wait", "poll", "squeeze", "held"] if ORDERED else ["wait", "poll", "squeeze"]),
                        "finish")
        if how == "held":  # the writer's work is still queued: the copy waits for it
            pool.hold_stream(HELD)
            stream = HELD
        for call in _split(out, data.draw(st.lists(st.integers(1, len(out)), max_size=2), "cuts")):
            space.swap_out(call, stream=stream)
            check_ledgers(pool, [space, other])
        assert [space.state(p) for p in out] == [SWAPPING_OUT] * len(out)
        assert pool.host_tier()["owners"][space.host_owner]["held_chunks"] == len(out)
        if how == "held":
            time.sleep(0.01)  # room for a wrongly started copy to run
            assert space.finish_swaps() == 0
            assert [space.state(p) for p in out] == [SWAPPING_OUT] * len(out)
            for p in out:  # the queued "kernel" runs now, before the copy
                contents[p] = page_bytes(0xABC000 + p)
                write(space, p, contents[p])
            if data.draw(st.booleans(), "swap in while still swapping out"):
                space.swap_in(out)  # waits for the copies (completing the held work): the pages keep their chunks
                pool.release_stream(HELD)
                assert [space.state(p) for p in out] == [PINNED] * len(out)
                check_ledgers(pool, [space, other])
                assert all(view[p * C:(p + 1) * C].numpy().tobytes() == contents[p] for p in out)
                assert space.stats()["swap_ins"] == 1 and space.stats()["swapped_in_pages"] == 0
                space.close()
                other.close()
                check_closed_clean(pool)
                return
            pool.release_stream(HELD)
            how = "wait"
        if how == "wait":
            assert space.finish_swaps(wait=True) == len(out)
        elif how == "poll":
            wait_until(lambda: space.finish_swaps() >= 0 and all(space.state(p) == SWAPPED for p in out),
                       "the swap-outs' copies")
        else:  # reclaim pressure: the pool takes the device chunks of finished swap-outs
            owner = pool.register_owner("squeeze")
            ids = squeeze(pool, owner, pool.available_chunks(owner) + len(out))
            assert all(space.state(p) == SWAPPED for p in out)
            check_ledgers(pool, [space, other])
            pool.release(owner, ids)
            pool.unregister_owner(owner)
        assert [space.state(p) for p in out] == [SWAPPED] * len(out)
        assert not any(readable(space.page_addr(p)) for p in out)  # the device chunk is gone from the VA
        check_ledgers(pool, [space, other])
        assert space.stats()["mapped_pages"] == len(mapped) - len(out)
        # Their device chunks go to another space, which scribbles over them.
        k = min(pool.available_chunks(other.owner), other.n_pages)
        if k:
            other.map(0, k)
            for q in range(k):
                ctypes.memset(other.page_addr(q), 0xEE, C)
            for q in range(k):
                other.unmap(q)
        back = data.draw(st.permutations(out), "swap-in order")
        for call in _split(back, data.draw(st.lists(st.integers(1, len(back)), max_size=2), "in cuts")):
            space.swap_in(call, stream=stream)
            check_ledgers(pool, [space, other])
        # A swap_in() also ends the earlier swaps whose copies are done.
        assert all(space.state(p) in (SWAPPING_IN, PINNED) for p in out) and space.state(call[0]) == SWAPPING_IN
        still = sum(space.state(p) == SWAPPING_IN for p in out)
        space.swap_wait(out, stream=stream)  # the host backend waits here; the bytes have landed
        for p in mapped:
            assert view[p * C:(p + 1) * C].numpy().tobytes() == contents[p], f"page {p} differs"
        assert space.finish_swaps(wait=data.draw(st.booleans(), "wait")) == still
        assert [space.state(p) for p in out] == [PINNED] * len(out)
        assert view.data_ptr() == space.base
        check_ledgers(pool, [space, other])
        assert pool.host_tier()["owners"][space.host_owner]["held_chunks"] == 0
        s = space.stats()
        assert (s["swapped_out_pages"], s["swapped_in_pages"]) == (len(out), len(out))
        for p in mapped:
            assert read(space, p) == contents[p]
        space.close()
        other.close()
        check_closed_clean(pool)
    finally:
        if ORDERED:
            pool.release_stream(HELD)
        close_pool(pool)


@pytest.mark.skipif(not ORDERED, reason="the fake driver runs copies at once, unordered by other streams")
def test_swap_out_behind_a_held_writer_waits_for_its_release():
    """The copy is queued after the caller stream's work: while that stream
    is held (a kernel still writing the page), nothing is copied and the
    swap does not finish, whatever is polled or reclaimed meanwhile."""
    pool = Pool("cpu", budget=str(4 * C), cpu_budget=str(4 * C))
    try:
        space = PageSpace(pool, "kv", 2)
        space.map(0, 2)
        write(space, 0, page_bytes(1))
        write(space, 1, page_bytes(2))
        pool.hold_stream(HELD)
        space.swap_out([0], stream=HELD)
        space.swap_out([1])  # queued behind it on the one copy stream
        owner = pool.register_owner("squeeze")
        ids = pool.acquire(owner, pool.available_chunks(owner))
        for _ in range(20):
            time.sleep(0.002)
            assert space.finish_swaps() == 0
            with pytest.raises(OutOfMemoryError):  # nothing to reclaim: no copy is done
                pool.acquire(owner, 1)
        assert states(space) == [SWAPPING_OUT, SWAPPING_OUT]
        write(space, 0, page_bytes(3))  # the held "kernel" writes its result
        pool.release_stream(HELD)
        ids += squeeze(pool, owner, 2)  # both copies end; reclaim takes both device chunks
        assert states(space) == [SWAPPED, SWAPPED]
        check_ledgers(pool, [space])
        pool.release(owner, ids)
        space.swap_in([0, 1])
        space.swap_wait([0, 1])
        assert read(space, 0) == page_bytes(3) and read(space, 1) == page_bytes(2)
        assert space.finish_swaps(wait=True) == 2
        pool.unregister_owner(owner)
        space.close()
        check_closed_clean(pool)
    finally:
        pool.release_stream(HELD)
        close_pool(pool)


def test_reclaim_takes_finished_swap_outs_before_reclaimable_pages():
    pool = Pool("cpu", budget=str(4 * C), cpu_budget=str(3 * C))
    try:
        space = PageSpace(pool, "kv", 3)
        space.map(0, 3)
        for p in range(3):
            write(space, p, page_bytes(10 + p))
        assert space.set_reclaimable(2, 0)  # the cheapest reclaimable page there is
        space.swap_out([0, 1])
        drain_copy_stream(pool)  # their copies have ended; nothing has finished them
        assert states(space) == [SWAPPING_OUT, SWAPPING_OUT, RECLAIMABLE]
        owner = pool.register_owner("squeeze")
        ids = pool.acquire(owner, pool.available_chunks(owner) + 2)
        assert states(space) == [SWAPPED, SWAPPED, RECLAIMABLE] and len(ids) == 3
        assert read(space, 2) == page_bytes(12)
        ids += pool.acquire(owner, 1)  # only now the reclaimable page
        assert states(space) == [SWAPPED, SWAPPED, UNMAPPED] and space.take_reclaimed() == [2]
        check_ledgers(pool, [space])
        pool.release(owner, ids)
        pool.unregister_owner(owner)
        space.swap_in([0, 1])
        space.finish_swaps(wait=True)
        assert read(space, 0) == page_bytes(10) and read(space, 1) == page_bytes(11)
        space.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)


def test_unmap_drops_a_swapping_or_swapped_page_and_close_frees_both_tiers():
    pool = Pool("cpu", budget=str(8 * C), cpu_budget=str(8 * C))
    try:
        space = PageSpace(pool, "kv", 6)
        space.map(0, 6)
        for p in range(6):
            write(space, p, page_bytes(20 + p))
        if ORDERED:
            pool.hold_stream(HELD)
        space.swap_out([0, 1, 2, 3, 4], stream=HELD)
        assert space.unmap(0)  # still swapping out: its copy ends first, then both chunks go
        if ORDERED:
            pool.release_stream(HELD)
        space.finish_swaps(wait=True)
        assert space.unmap(1)  # swapped
        space.swap_in([2, 3])
        assert space.unmap(2)  # swapping in
        assert states(space) == [UNMAPPED, UNMAPPED, UNMAPPED, SWAPPING_IN, SWAPPED, PINNED]
        check_ledgers(pool, [space])
        host = pool.host_tier()
        assert host["owners"][space.host_owner]["held_chunks"] == 2
        assert space.stats()["mapped_pages"] == 2
        space.map(0, 3)  # the dropped pages map again like any unmapped page
        check_ledgers(pool, [space])
        space.close()  # a page swapping in, one swapped, four resident
        check_closed_clean(pool)
    finally:
        if ORDERED:
            pool.release_stream(HELD)
        close_pool(pool)


# ---- the stateful machine ----------------------------------------------------------


U, P, R, OUT, SW, IN, UNSEEN = "unmapped", "pinned", "reclaimable", "out", "swapped", "in", "reclaimed"
NPAGES = 7
DEVICE_CHUNKS = 7
HOST_CHUNKS = 5
ALLOWED = {  # model state -> page states the C side may show (a copy may end, a reclaim may run)
    U: {UNMAPPED}, UNSEEN: {UNMAPPED}, P: {PINNED}, R: {RECLAIMABLE, UNMAPPED},
    OUT: {SWAPPING_OUT, SWAPPED}, SW: {SWAPPED}, IN: {SWAPPING_IN, PINNED},
}
OBSERVED = {(R, UNMAPPED): UNSEEN, (OUT, SWAPPED): SW, (IN, PINNED): P}


class SwapMachine(RuleBasedStateMachine):
    """One space of NPAGES pages on a pool of DEVICE_CHUNKS chunks and a host
    tier of HOST_CHUNKS, against a model of each page's state and bytes."""

    def __init__(self):
        super().__init__()
        self.pool = Pool("cpu", budget=str(DEVICE_CHUNKS * C), cpu_budget=str(HOST_CHUNKS * C))
        self.space = PageSpace(self.pool, "kv", NPAGES)
        self.squeezer = self.pool.register_owner("squeeze")
        self.squeezed: list[int] = []
        self.model = [U] * NPAGES
        self.data: list[bytes | None] = [None] * NPAGES  # what the page's memory holds
        self.pending: dict[int, bytes] = {}  # bytes the held stream's "kernel" writes before the copy
        self.held = False
        self.seed = 0

    def fresh(self) -> bytes:
        self.seed += 1
        return page_bytes(self.seed)

    @initialize(n=st.integers(0, NPAGES), hold=st.booleans())
    def map_some(self, n, hold):
        """Starts with n pages mapped and written (the swap rules need
        some), and maybe the caller stream held."""
        if hold:
            self.hold()
        if n:
            self.space.map(0, n)
        for p in range(n):
            self.model[p] = P
            self.data[p] = self.fresh()
            write(self.space, p, self.data[p])

    # ---- the held caller stream ----

    def land(self) -> None:
        """The held stream's work runs (its kernel writes, then the stream is
        released), before any call that may wait on a copy queued behind it:
        a host wait completes the work it waits for."""
        if self.pending:
            event("held stream's work landed on pages swapping out behind it")
        for p, b in self.pending.items():
            assert self.space.state(p) == SWAPPING_OUT
            write(self.space, p, b)
            self.data[p] = b
        self.pending.clear()
        if self.held:
            self.pool.release_stream(HELD)
            self.held = False

    # No preconditions: whether the stream is still held depends on the
    # copies' timing (a wait lands it), and hypothesis must pick rules alike.
    @rule()
    def hold(self):
        if not self.held:
            self.pool.hold_stream(HELD)
            self.held = True

    @rule()
    def release(self):
        self.land()

    # ---- resident pages ----

    # Which pages a rule takes depends on the page states, and those on when
    # the copies end: the draws themselves must not (hypothesis replays them),
    # so each rule draws the same values whatever the state and maps them
    # onto the pages that fit.

    def page(self, data, states) -> int:
        """Mostly a page in one of `states`; one time in eight (or when none
        is) any page, so the refusals are exercised too."""
        valid = data.draw(st.integers(0, 7), "valid") > 0
        k = data.draw(st.integers(0, NPAGES - 1), "page")
        good = [p for p in range(NPAGES) if self.model[p] in states]
        return good[k % len(good)] if valid and good else k

    def pages(self, data, states) -> list[int]:
        valid = data.draw(st.integers(0, 7), "valid") > 0
        ks = data.draw(st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=4), "pages")
        good = [p for p in range(NPAGES) if self.model[p] in states]
        return list(dict.fromkeys(good[k % len(good)] for k in ks) if valid and good else dict.fromkeys(ks))

    @rule(data=st.data(), n=st.integers(1, 3))
    def map(self, data, n):
        p = self.page(data, (U,))
        run = range(p, min(NPAGES, p + n))
        if any(self.model[q] != U for q in run):
            with pytest.raises(ValueError):
                self.space.map(p, len(run))
            return
        try:
            self.space.map(p, len(run))
        except OutOfMemoryError:
            assert self.pool.available_chunks(self.space.owner) < len(run)
            return
        for q in run:
            self.model[q] = P
            self.data[q] = self.fresh()
            write(self.space, q, self.data[q])

    @rule(data=st.data())
    def write_page(self, data):
        p = self.page(data, (P,))
        if self.model[p] == P:
            self.data[p] = self.fresh()
            write(self.space, p, self.data[p])

    @rule(data=st.data(), prio=st.integers(0, 2))
    def set_reclaimable(self, data, prio):
        p = self.page(data, (P, R, IN, UNSEEN))
        m = self.model[p]
        if m == IN:
            self.land()
        if m in (P, R, IN):
            assert self.space.set_reclaimable(p, prio)
            self.model[p] = R
        elif m == UNSEEN:
            assert not self.space.set_reclaimable(p, prio)
        else:
            with pytest.raises(ValueError):
                self.space.set_reclaimable(p, prio)

    @rule(data=st.data())
    def pin(self, data):
        p = self.page(data, (R, IN, UNSEEN))
        m = self.model[p]
        if m == IN:
            self.land()
        if m in (P, R, IN):
            assert self.space.pin(p)
            self.model[p] = P
        elif m in (U, UNSEEN):
            assert not self.space.pin(p)
        else:
            with pytest.raises(ValueError):
                self.space.pin(p)

    @rule(data=st.data())
    def unmap(self, data):
        p = self.page(data, (P, R, OUT, SW, IN, UNSEEN))
        m = self.model[p]
        if m in (OUT, IN):
            self.land()
        if m == U:
            with pytest.raises(ValueError):
                self.space.unmap(p)
            return
        assert self.space.unmap(p) == (m != UNSEEN)
        self.model[p] = U
        self.data[p] = None
        self.pending.pop(p, None)

    @rule()
    def take_reclaimed(self):
        taken = self.space.take_reclaimed()
        assert sorted(taken) == [p for p in range(NPAGES) if self.model[p] == UNSEEN]
        for p in taken:
            self.model[p] = U

    # ---- swap ----

    @rule(data=st.data(), behind_held=st.booleans())
    def swap_out(self, data, behind_held):
        pages = self.pages(data, (P, R, IN))
        ms = [self.model[p] for p in pages]
        if IN in ms:
            self.land()  # a page swapping in lands first (a wait)
        stream = HELD if behind_held and self.held else 0
        if any(m not in (P, R, IN) for m in ms):
            with pytest.raises(ValueError):
                self.space.swap_out(pages, stream=stream)
            for p in pages:  # those swapping in before the bad one have landed
                if self.model[p] == IN and self.space.state(p) == PINNED:
                    self.model[p] = P
            return
        held_host = sum(m in (OUT, SW, IN) for m in self.model) - ms.count(IN)
        if len(pages) > HOST_CHUNKS - held_host:
            before = self.pool.host_tier()["owners"][self.space.host_owner]["held_chunks"]
            with pytest.raises(OutOfMemoryError, match="host tier has no room"):
                self.space.swap_out(pages, stream=stream)
            after = self.pool.host_tier()["owners"][self.space.host_owner]["held_chunks"]
            assert after == before - ms.count(IN)  # pages that were swapping in have landed, nothing taken
            for p in pages:
                self.model[p] = P if self.model[p] == IN else self.model[p]
            return
        self.space.swap_out(pages, stream=stream)
        event("swap_out" + (" behind the held stream" if stream == HELD else ""))
        for p in pages:
            self.model[p] = OUT
            if stream == HELD and ORDERED:  # the kernel queued before the swap writes the page
                self.pending[p] = self.fresh()

    @rule(data=st.data())
    def swap_in(self, data):
        pages = self.pages(data, (OUT, SW))
        ms = [self.model[p] for p in pages]
        if any(m not in (OUT, SW) for m in ms):
            with pytest.raises(ValueError):
                self.space.swap_in(pages)
            return
        if OUT in ms:
            self.land()  # a page still swapping out is waited for
        try:
            self.space.swap_in(pages)
        except OutOfMemoryError:
            assert all(self.space.state(p) in (SWAPPING_OUT, SWAPPED) for p in pages)
            return
        for p in pages:
            s = self.space.state(p)
            assert s in (PINNED, SWAPPING_IN), (p, s)
            self.model[p] = P if s == PINNED else IN
            event("swap_in of a page " + ("still swapping out" if s == PINNED else "swapped"))

    @rule(wait=st.booleans())
    def finish(self, wait):
        if wait:
            self.land()
        before = sum(m in (OUT, IN) for m in self.model)
        n = self.space.finish_swaps(wait=wait)
        if wait:
            assert n == before
            self.model = [SW if m == OUT else P if m == IN else m for m in self.model]
        else:
            assert n <= before

    @rule(data=st.data())
    def swap_wait(self, data):
        pages = self.pages(data, (IN,))
        if any(self.model[p] == IN for p in pages):
            self.land()
        self.space.swap_wait(pages)
        for p in pages:  # their copies back have landed: the bytes read back now
            if self.space.state(p) == SWAPPING_IN:
                assert read(self.space, p) == self.data[p], f"page {p} swapped in wrong"

    # ---- pressure from another owner ----

    @rule(n=st.integers(1, 3))
    def squeeze(self, n):
        try:
            self.squeezed += self.pool.acquire(self.squeezer, n)
        except OutOfMemoryError:
            pass

    @rule(n=st.integers(1, 3))
    def unsqueeze(self, n):
        give, self.squeezed = self.squeezed[:n], self.squeezed[n:]
        self.pool.release(self.squeezer, give)

    # ---- invariants ----

    @invariant()
    def pages_and_ledgers_match_the_model(self):
        for p in range(NPAGES):
            s, m = self.space.state(p), self.model[p]
            allowed = {SWAPPING_OUT} if p in self.pending else ALLOWED[m]
            assert s in allowed, f"page {p}: state {s}, model {m}"
            self.model[p] = OBSERVED.get((m, s), m)
            if self.model[p] != m:
                event(f"observed {m} -> {self.model[p]}")
            if self.model[p] == UNSEEN:
                self.data[p] = None
            if self.model[p] in (P, R, OUT):  # resident: the memory holds the model's bytes
                assert read(self.space, p) == self.data[p], f"page {p} ({self.model[p]}) corrupted"
        # Both ledgers, against the states just observed.
        check_ledgers(self.pool, [self.space])
        assert self.pool.owners()[self.squeezer]["held_chunks"] == len(self.squeezed)
        assert self.space.stats()["mapped_pages"] == sum(m in (P, R, OUT, IN) for m in self.model)

    def teardown(self):
        try:
            self.land()
            self.space.close()
            self.pool.release(self.squeezer, self.squeezed)
            check_closed_clean(self.pool)
        finally:
            if ORDERED:
                self.pool.release_stream(HELD)
            close_pool(self.pool)


def test_swap_state_machine():
    run_state_machine_as_test(SwapMachine, settings=settings(max_examples=3 * EXAMPLES, stateful_step_count=60,
                                                             **SETTINGS))


# ---- injected faults -----------------------------------------------------------------


def _resident(n_pages=4, device=8, host=8):
    pool = Pool("cpu", budget=str(device * C), cpu_budget=str(host * C))
    space = PageSpace(pool, "kv", n_pages)
    space.map(0, n_pages)
    for p in range(n_pages):
        write(space, p, page_bytes(100 + p))
    return pool, space


def _intact(space, pages):
    return all(read(space, p) == page_bytes(100 + p) for p in pages)


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_failed_copy_out_leaves_the_pages_resident(nth):
    pool, space = _resident()
    try:
        space.swap_out([3])  # the tier's slab exists: the fault hits a copy, nothing else
        space.finish_swaps(wait=True)
        before = held(pool)
        inject(pool, "copy", nth, "out")
        with pytest.raises(AllocatorError, match="kv_swap_out: copying page . to the host failed"):
            space.swap_out([0, 1, 2])
        inject(pool, "copy", 0, "out")
        assert states(space) == [PINNED, PINNED, PINNED, SWAPPED] and _intact(space, [0, 1, 2])
        assert held(pool) == before
        check_ledgers(pool, [space])
        space.swap_out([0, 1, 2])  # nothing is left marked: the same call now works
        space.finish_swaps(wait=True)
        space.swap_in([0, 1, 2, 3])
        space.finish_swaps(wait=True)
        assert _intact(space, range(4))
        space.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)


@pytest.mark.parametrize("kind,nth", [("copy", 1), ("copy", 2), ("copy", 3), ("map", 1), ("map", 3)])
def test_a_failed_swap_in_leaves_the_pages_swapped(kind, nth):
    pool, space = _resident(device=4)
    try:
        space.swap_out([0, 1, 2])
        space.finish_swaps(wait=True)
        before = held(pool)
        inject(pool, kind, nth, "in")
        with pytest.raises((AllocatorError, OutOfMemoryError), match="kv_swap_in: swapping in failed"):
            space.swap_in([0, 1, 2])
        inject(pool, kind, 0, "in")
        assert states(space) == [SWAPPED, SWAPPED, SWAPPED, PINNED]
        assert not any(readable(space.page_addr(p)) for p in range(3))
        assert held(pool) == before
        check_ledgers(pool, [space])
        space.swap_in([0, 1, 2])  # the host bytes are intact: the retry brings them back
        space.finish_swaps(wait=True)
        assert _intact(space, range(4))
        space.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)


@pytest.mark.parametrize("kind,nth", [("host_alloc", 1), ("host_alloc", 2), ("create", 1)])
def test_a_failed_slab_or_chunk_creation_is_retried_by_the_acquire(kind, nth):
    """One failed pinned-slab allocation (swap_out, host tier) or chunk
    creation (swap_in, device) is absorbed: the pool's acquire grows again
    in its second round, and the swap goes through with both ledgers right.
    (Out of memory with nothing changed: the budget tests below.)"""
    pool, space = _resident(n_pages=4, device=4, host=16)
    try:
        direction = "out" if kind == "host_alloc" else "in"
        if direction == "out":
            inject(pool, kind, nth)  # nth 2: the second slab of the ten chunks
            space.swap_out([0, 1, 2, 3] if nth == 1 else [0, 1, 2])
            if nth == 2:
                space.finish_swaps(wait=True)
                space.swap_in([0, 1, 2])
                space.finish_swaps(wait=True)
                other = PageSpace(pool, "kv2", 10)  # 10 host chunks: beyond the first slab of 8
                pool.set_budget(str(14 * C))
                other.map(0, 10)
                inject(pool, kind, nth)
                other.swap_out(range(10))
                other.finish_swaps(wait=True)
                assert pool.host_tier()["slabs"] == 2
                other.close()
        else:
            space.swap_out([0, 1, 2])
            space.finish_swaps(wait=True)
            pool.set_budget(str(1 * C))  # the pool destroys its free chunks: the swap-in creates them
            pool.set_budget(str(4 * C))
            inject(pool, kind, nth)
            space.swap_in([0, 1, 2])
        inject(pool, kind, 0)
        check_ledgers(pool, [space])
        space.finish_swaps(wait=True)
        if direction == "out" and nth == 1:
            space.swap_in([0, 1, 2, 3])
            space.finish_swaps(wait=True)
        assert states(space) == [PINNED] * 4 and _intact(space, range(4))
        check_ledgers(pool, [space])
        space.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)


# ---- bad input ----------------------------------------------------------------------


def test_bad_swap_calls_are_refused_and_change_nothing():
    pool, space = _resident(n_pages=4, device=8, host=2)
    try:
        space.unmap(3)
        snapshot = lambda: (states(space), pool.owners(), pool.host_tier())  # noqa: E731
        before = snapshot()
        for call, pages, msg in [
            (space.swap_out, [3], "page 3 holds no data to swap out"),
            (space.swap_out, [0, 1, 0], "page 0 is listed twice"),
            (space.swap_out, [0, 4], "page 4 is out of range"),
            (space.swap_out, [2**31], "is out of range"),
            (space.swap_out, [], "no pages given"),
            (space.swap_in, [0], "page 0 is not swapped out"),
            (space.swap_in, [3], "page 3 is not swapped out"),
            (space.swap_in, [], "no pages given"),
        ]:
            with pytest.raises(ValueError, match=msg):
                call(pages)
            assert snapshot() == before, (call, pages)
        with pytest.raises(OutOfMemoryError, match=r"no room for 3 more chunks \(cpu budget"):
            space.swap_out([0, 1, 2])  # the tier holds two
        assert states(space) == before[0] and _intact(space, [0, 1, 2])
        with pytest.raises(ValueError, match="out of range"):
            space.swap_wait([4])
        space.swap_out([0, 1])  # the refusals left no page marked
        for call in (space.pin, lambda p: space.set_reclaimable(p, 0)):
            with pytest.raises(ValueError):
                call(0)  # swapping out
        with pytest.raises(ValueError):
            space.map(0)
        with pytest.raises(ValueError, match="page 1 is listed twice"):
            space.swap_in([1, 1])
        with pytest.raises(ValueError, match="below the 4.00 MiB swapped out now"):
            pool.set_cpu_budget(str(1 * C))
        with pytest.raises(OutOfMemoryError, match="no room for 1 more chunks"):
            space.swap_out([2])
        space.finish_swaps(wait=True)
        with pytest.raises(ValueError):
            space.pin(1)  # swapped
        assert states(space) == [SWAPPED, SWAPPED, PINNED, UNMAPPED]
        pool.set_cpu_budget(str(4 * C))  # raised: room for more
        space.swap_out([2])
        space.swap_in([0, 1, 2])
        space.finish_swaps(wait=True)
        assert _intact(space, [0, 1, 2])
        check_ledgers(pool, [space])
        pool.set_cpu_budget(0)  # nothing swapped: the tier may go off, its slabs freed
        assert pool.host_tier()["pinned_bytes"] == 0
        with pytest.raises(OutOfMemoryError, match="host tier has no room"):
            space.swap_out([0])
        space.close()
        with pytest.raises(ValueError, match="closed"):
            space.swap_out([0])
        check_closed_clean(pool)
    finally:
        close_pool(pool)


def test_a_pool_without_a_cpu_budget_refuses_to_swap():
    pool = Pool("cpu", budget=str(4 * C))
    try:
        space = PageSpace(pool, "kv", 2)
        space.map(0, 2)
        write(space, 0, page_bytes(5))
        with pytest.raises(OutOfMemoryError, match=r"kv_swap_out: the host tier has no room .*cpu budget"):
            space.swap_out([0])
        assert states(space) == [PINNED, PINNED] and read(space, 0) == page_bytes(5)
        assert pool.host_tier()["budget_bytes"] == 0 and pool.host_tier()["created_chunks"] == 0
        check_ledgers(pool, [space])
        space.close()
    finally:
        close_pool(pool)


def test_a_zero_filled_space_does_not_swap():
    pool = Pool("cpu", budget=str(4 * C), cpu_budget=str(4 * C))
    try:
        space = PageSpace(pool, "kv", 3)
        space.map(0)
        space.set_zero_fill(True)
        with pytest.raises(ValueError, match="zero-filled KV space .* does not swap"):
            space.swap_out([0])
        assert states(space)[0] == PINNED and pool.host_tier()["created_chunks"] == 0
        space.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)


# ---- threads ------------------------------------------------------------------------


def test_threads_swap_their_pages_while_the_arena_squeezes_the_pool():
    """Three threads swap their own pages of one space (and one its own
    space) out and in, polling, waiting, letting reclaim finish their
    swap-outs; the arena takes chunks until refused from a fifth thread, so
    the pool reclaims finished swap-outs and the threads' reclaimable pages.
    Every round trip is bit-exact and both ledgers balance at the end."""
    pool = Pool("cpu", budget=str(24 * C), cpu_budget=str(16 * C))
    shared = PageSpace(pool, "kv.shared", 12)
    own = PageSpace(pool, "kv.own", 4)
    stop = threading.Event()
    errors: list[str] = []
    rounds = [0] * 4
    squeezes = [0]

    def swapper(i, space, pages, scratch):
        seed = 1000 * (i + 1)
        contents = {}

        def retry(fn, *a):
            end = time.monotonic() + 30
            while True:
                try:
                    return fn(*a)
                except OutOfMemoryError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.001)

        try:
            for p in pages + ([scratch] if scratch is not None else []):
                retry(space.map, p)
                seed += 1
                contents[p] = page_bytes(seed)
                write(space, p, contents[p])
            while not stop.is_set() or rounds[i] < 5:
                if scratch is not None:  # a reclaimable page the arena may take
                    if not space.pin(scratch):
                        assert not space.unmap(scratch)  # reclaimed: taken off the reclaimed list
                        retry(space.map, scratch)
                    space.set_reclaimable(scratch, 0)
                space.swap_out(pages)
                mode = rounds[i] % 3
                if mode == 0:
                    space.finish_swaps(wait=True)
                elif mode == 1:
                    time.sleep(0.001)  # the arena's reclaim may finish them
                retry(space.swap_in, pages)
                space.swap_wait(pages)
                for p in pages:
                    if read(space, p) != contents[p]:
                        errors.append(f"thread {i}: page {p} differs after round {rounds[i]}")
                space.finish_swaps(wait=rounds[i] % 2 == 0)
                p = pages[rounds[i] % len(pages)]
                space.finish_swaps(wait=True)
                seed += 1
                contents[p] = page_bytes(seed)
                write(space, p, contents[p])
                rounds[i] += 1
            space.finish_swaps(wait=True)
            for p in pages:
                if read(space, p) != contents[p]:
                    errors.append(f"thread {i}: page {p} differs at the end")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    def arena():
        tag = 0
        try:
            while not stop.is_set():
                held = []
                while len(held) < 24:
                    try:
                        ptr = pool.malloc(C)
                    except OutOfMemoryError:
                        break
                    tag += 1
                    ctypes.memset(ptr, tag & 0xFF, 64)
                    held.append((ptr, tag))
                squeezes[0] += 1
                for ptr, t in held:
                    if ctypes.string_at(ptr, 64) != bytes([t & 0xFF]) * 64:
                        errors.append(f"arena block {ptr:#x} overwritten")
                    pool.free(ptr)
                pool.empty_cache()
        except Exception as e:  # noqa: BLE001
            errors.append(f"arena: {type(e).__name__}: {e}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=swapper, args=(0, shared, [0, 1, 2], 3)),
               threading.Thread(target=swapper, args=(1, shared, [4, 5], 6)),
               threading.Thread(target=swapper, args=(2, shared, [7, 8, 9, 10], 11)),
               threading.Thread(target=swapper, args=(3, own, [0, 1, 2], None)),
               threading.Thread(target=arena)]
    try:
        for t in threads:
            t.start()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hangs"
    finally:
        stop.set()
        sys.setswitchinterval(switch)
    try:
        assert not errors, errors[:5]
        assert min(rounds) >= 5 and squeezes[0] > 0, (rounds, squeezes)
        reclaimed = {o["name"]: o["reclaimed"] for o in pool.owners()}
        assert reclaimed["kv.shared"] + reclaimed["kv.own"] > 0, pool.owners()  # the arena did reclaim KV chunks
        shared.finish_swaps(wait=True)
        own.finish_swaps(wait=True)
        pool.empty_cache()
        check_ledgers(pool, [shared, own])
        assert pool.host_tier()["owners"][shared.host_owner]["held_chunks"] == 0
        shared.close()
        own.close()
        check_closed_clean(pool)
    finally:
        close_pool(pool)
