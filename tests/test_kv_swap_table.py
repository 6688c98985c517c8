"""Table-driven tests of KVCacheManager swap (swap_out / swap_in to the
pool's host tier) with shared blocks, over every layer kind of spec.py.

Swap is chunk-granular: a block the swapped request shares with another
request (a prefix-cache hit, a fork) stays resident, and so does every chunk
under such a block or under another request's block (a chunk shared by two
blocks). What each table checks:

* SHARE_ROWS: a request sharing a prefix with a running one, or a fork
  (parent or child swapped): the shared blocks stay resident and readable,
  the private chunks go to the host tier (their VA faults), the other request
  keeps running; after swap_in every block of both is bit-exact. Distinct
  bytes are written into every block through the manager's tensor views
  (layer_tensors) and checked by digest. The expected numbers of shared
  blocks and swapped chunks are in the table, and which chunks go is derived
  from the block tables, the cached blocks and the page geometry.
* OTHER_FINISHES_ROWS: the request sharing the blocks finishes while the
  swapped one is out. Observed and asserted: the formerly shared blocks stay
  resident, held by the swapped request alone (they are not moved to the host
  tier later); they keep their prefix-cache hashes, so a new request hits
  them; swap_in brings back the rest bit-exact; a second swap_out then moves
  them too.
* FREE_ROWS: finishing a request that is swapped out (copy done), still
  swapping out (its copy held back behind a caller stream), or swapping in,
  or closing the manager with it swapped: its host copy is dropped, both
  ledgers balance (created == free + held, no host chunk held), the sharer
  is intact, and its private blocks left no prefix-cache entry behind.
* PREFIX_ROWS: a swapped request's blocks give up their prefix-cache hashes
  while swapped (a query hits nothing of them) and get them back on swap_in;
  a Mamba checkpoint already released to the cache is not the request's and
  stays hittable.
* BAD_ROWS, FAULT_ROWS: unknown request (KeyError), double swap_out, swap_in
  of a resident request (ValueError), a host tier that is off or too small
  (OutOfMemoryError), injected copy / map faults: clear errors, the request
  stays as it was (resident and readable, or swapped and retryable), both
  ledgers balance.
* Landing (host backend only; found as bugs, now fixed): until a swap-in's
  copies back have landed, no other request is placed over a free slot of
  its chunks, compaction leaves its blocks alone, and a prefix hit cannot
  read them; usage()["live_bytes_needed"] counts blocks a swapped request
  shares once, for the resident sharer.

Also runs on the fake CUDA driver (ELLM_TEST_BACKEND=fakecuda); there
copies run at once, so the cases needing a copy held back behind a stream
run on the host backend only.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import threading

import pytest
import torch

from ellm_alloc import OutOfMemoryError, Pool
from ellm_alloc.errors import AllocatorError
from ellm_alloc.kv import (
    ChunkedLocalSpec, CrossAttentionSpec, FullAttentionSpec, KVCacheManager, MambaSpec, MLASpec, ModelKVSpec,
    SlidingWindowSpec,
)
from ellm_alloc.kv.space import PINNED, SWAPPED, SWAPPING_IN, SWAPPING_OUT, PageSpace

FAKE = os.environ.get("ELLM_TEST_BACKEND") == "fakecuda"
ORDERED = not FAKE  # copies wait behind a held caller stream (the fake runs them at once)
host_only = pytest.mark.skipif(not ORDERED, reason="needs a copy held back behind a stream (host backend)")

MiB = 1 << 20
C = 2 * MiB  # chunk
BS = 4
F32 = "float32"
HELD = 0x5157  # a caller stream the tests hold back (GPU work still in flight)

# Blocks of one chunk each (2 MiB), unless the name says otherwise, so that
# what stays and what goes is a whole block.
SPECS = {
    "full": FullAttentionSpec(64, 1024, F32),
    "half": FullAttentionSpec(32, 1024, F32),  # 1 MiB: two blocks per chunk
    "straddle": FullAttentionSpec(96, 1024, F32),  # 3 MiB: blocks straddle chunks, 2 per 6 MiB page
    "sliding": SlidingWindowSpec(64, 1024, F32, window=8),
    "chunked": ChunkedLocalSpec(64, 1024, F32, chunk_size=8),
    "mamba": MambaSpec(dtype=F32, conv_shape=(64, 1024), ssm_shape=(448, 1024)),
    "cross": CrossAttentionSpec(64, 1024, F32, max_tokens=8),  # 2 blocks per request
    "mla": MLASpec(dtype=F32, kv_lora_rank=131008, rope_dim=64),
}
# A cross-attention-only model takes a "prefix hit" of every prompt (cross
# layers never constrain a hit), so cross is tested beside full attention.
MODELS = {
    "full": ("full",),
    "half": ("half",),
    "straddle": ("straddle",),
    "sliding": ("sliding",),
    "chunked": ("chunked",),
    "mamba": ("mamba",),
    "full+cross": ("full", "cross"),
    "mla": ("mla",),
    "all": ("full", "sliding", "chunked", "mamba", "cross", "mla"),
}
T = list(range(100, 200))  # the shared prompt
U = list(range(1000, 1100))  # another continuation


# ---- building and driving a manager -------------------------------------------------


def make(model: str, device="64MiB", host="64MiB"):
    kinds = MODELS[model]
    if model == "all":
        device = host = "160MiB"
    pool = Pool("cpu", budget=device, cpu_budget=host)
    mgr = KVCacheManager(ModelKVSpec(model, tuple(SPECS[k] for k in kinds)), pool, block_size=BS,
                         max_cached_fraction=float("inf"), state_checkpoint_tokens=BS)
    for bp in mgr.pools:
        # Packed placement (what a group whose chunk holds many blocks gets):
        # two requests' blocks share pages and chunks, which is what the
        # rows below are about.
        bp.reserve_own_pages = False
    return pool, mgr, Book(mgr)


_BASE: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def fill(t: torch.Tensor, tag: int) -> None:
    """Writes one block's plane with bytes distinct for every tag below 255:
    a fixed ramp plus the tag (exact in float32)."""
    base = _BASE.get((t.numel(), t.dtype))
    if base is None:
        i = torch.arange(t.numel(), dtype=torch.int64)
        if t.dtype == torch.uint8:  # a Mamba state
            base = (i * 2654435761 >> 7 & 0xFF).to(torch.uint8)
        else:
            base = (i * 40503 % (1 << 23)).to(t.dtype)
        base = _BASE[t.numel(), t.dtype] = base.view(t.shape)
    t.copy_(base)
    t.add_(tag % 255 + 1 if t.dtype == torch.uint8 else tag * 32749)


class Book:
    """Distinct bytes written into every block of every request through the
    manager's views (layer_tensors), and their digests, keyed by (request,
    layer, block index): a block shared with another request (same index,
    same block id) takes the sharer's digest and is not rewritten."""

    def __init__(self, mgr: KVCacheManager):
        self.mgr = mgr
        self.digest: dict[tuple[str, int, int], bytes] = {}
        self.tag = 0

    def _hash(self, layer: int, b: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for t in self.mgr.layer_tensors(layer):
            h.update(t[b].contiguous().numpy().tobytes())
        return h.digest()

    def write(self, rid: str) -> None:
        for layer in range(self.mgr.model.num_layers):
            for i, b in enumerate(self.mgr.block_table(rid, layer)):
                if b is None or (rid, layer, i) in self.digest:
                    continue
                sharer = next((r for r in self.mgr.requests if r != rid and (r, layer, i) in self.digest
                               and i < len(bt := self.mgr.block_table(r, layer)) and bt[i] == b), None)
                if sharer is not None:
                    self.digest[rid, layer, i] = self.digest[sharer, layer, i]
                    continue
                for t in self.mgr.layer_tensors(layer):  # K and V (or one plane) apart
                    self.tag += 1
                    assert self.tag < 255, "more planes than distinct patterns"
                    fill(t[b], self.tag)
                self.digest[rid, layer, i] = self._hash(layer, b)

    def check(self, rid: str, blocks: dict[int, set[int]] | None = None) -> None:
        """Every block of rid (or only `blocks`, per group) reads its bytes."""
        for layer in range(self.mgr.model.num_layers):
            g = self.mgr.layer_group[layer].group_id
            for i, b in enumerate(self.mgr.block_table(rid, layer)):
                if b is None or (blocks is not None and b not in blocks.get(g, ())):
                    continue
                assert self._hash(layer, b) == self.digest[rid, layer, i], \
                    f"{rid}: layer {layer} block {i} (id {b}) differs"


def run(mgr, book, rid, prompt) -> int:
    """Admits rid and computes its prompt; returns the prefix hit in tokens."""
    hit = mgr.add_request(rid, prompt)
    assert mgr.allocate_slots(rid, len(prompt) - hit)
    book.write(rid)
    return hit


def decode(mgr, book, rid, tokens) -> None:
    for t in tokens:
        assert mgr.allocate_slots(rid, 1, new_token_ids=[t])
        book.write(rid)


def group_blocks(mgr, rid) -> list[set[int]]:
    """Block ids rid holds, per group."""
    out = []
    for g in mgr.layout.groups:
        out.append({b for b in mgr.block_table(rid, g.layers[0]) if b is not None})
    return out


def block_chunks(mgr, g: int, b: int) -> range:
    """The chunks (space pages) under block b of group g, from the geometry."""
    grp = mgr.layout.groups[g]
    lo = b * grp.padded_small_bytes
    return range(lo // C, -(-(lo + grp.small_page_bytes) // C))


def shared_blocks(mgr, rid) -> list[set[int]]:
    """rid's blocks that another request holds too, per group."""
    mine = group_blocks(mgr, rid)
    others = [set().union(*[group_blocks(mgr, r)[g] for r in mgr.requests if r != rid] or [set()])
              for g in range(len(mine))]
    return [m & o for m, o in zip(mine, others)]


def expected_swapped(mgr, rid) -> list[list[int]]:
    """Chunks under rid's blocks that no other request's block and no cached
    block covers: what swap_out moves, per group."""
    out = []
    for g, bp in enumerate(mgr.pools):
        mine = group_blocks(mgr, rid)[g]
        others = set().union(*[group_blocks(mgr, r)[g] for r in mgr.requests if r != rid] or [set()])
        others |= {b for lru in bp.evictable for b in lru}
        keep = {k for b in others for k in block_chunks(mgr, g, b)}
        out.append(sorted({k for b in mine for k in block_chunks(mgr, g, b)} - keep))
    return out


_pipe = os.pipe()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t


def readable(addr: int) -> bool:
    """Whether `addr` is mapped readable, without faulting."""
    if _libc.write(_pipe[1], addr, 1) != 1:
        return False
    os.read(_pipe[0], 1)
    return True


def check_swapped_out(mgr, rid, want: list[list[int]]) -> None:
    """rid's chunks in `want` are in the host tier (their VA unmapped), the
    rest of its chunks resident."""
    for g, (space, chunks) in enumerate(zip(mgr.spaces, want)):
        resident = {k for b in group_blocks(mgr, rid)[g] for k in block_chunks(mgr, g, b)} - set(chunks)
        for k in chunks:
            assert space.state(k) == SWAPPED and not readable(space.page_addr(k)), (g, k, space.state(k))
        for k in resident:
            assert space.state(k) == PINNED and readable(space.page_addr(k)), (g, k, space.state(k))


def resident_blocks(mgr, rid) -> dict[int, set[int]]:
    """rid's blocks whose every chunk is resident, per group id."""
    out = {}
    for g, blocks in enumerate(group_blocks(mgr, rid)):
        out[g] = {b for b in blocks if all(mgr.spaces[g].state(k) == PINNED for k in block_chunks(mgr, g, b))}
    return out


def host_held(pool) -> int:
    return sum(o["held_chunks"] for o in pool.host_tier()["owners"])


def check_ledgers(pool, mgr) -> None:
    """The manager's invariants, and both tiers' ledgers."""
    mgr.check()
    pool.validate()
    st = pool.stats()
    owners = pool.owners()
    assert st["created_chunks"] == st["free_chunks"] + sum(o["held_chunks"] for o in owners if o["active"])
    host = pool.host_tier()
    assert host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"]), host
    assert host["created_chunks"] * host["chunk_bytes"] <= host["budget_bytes"], host
    for space in mgr.spaces:
        s = space.stats()
        assert owners[space.owner]["held_chunks"] == s["mapped_pages"], (space.name, s)
        assert host["owners"][space.host_owner]["held_chunks"] == s["host_pages"], (space.name, s)


def close_clean(pool, mgr) -> None:
    """Closing the manager leaves no chunk held in either tier."""
    mgr.close()
    pool.validate()
    assert all(o["held_chunks"] == 0 for o in pool.owners() if o["name"] != "arena"), pool.owners()
    host = pool.host_tier()
    assert host["free_chunks"] == host["created_chunks"] and host_held(pool) == 0, host
    assert pool.close() == 0


def scribble(pool) -> None:
    """Another owner takes the free device chunks (those the swap-out gave
    back) and overwrites them, so a swap_in must really copy the bytes back."""
    other = PageSpace(pool, "scribble", 64)
    k = min(pool.available_chunks(other.owner), other.n_pages)
    if k:
        other.map(0, k)
        for p in range(k):
            ctypes.memset(other.page_addr(p), 0xEE, C)
    other.close()


def release_and_close(pool) -> None:
    """Closes the pool, first releasing the held stream (a failed test must
    not leave a copy waiting behind it at close)."""
    if ORDERED and pool._handle:
        pool.release_stream(HELD)
    pool.close()


def inject(pool, kind: str, nth: int, direction: str = "out") -> None:
    """pool.inject_fault(kind, nth); on the fake driver the fake's failure of
    the matching entry point."""
    if FAKE and kind in ("copy", "host_alloc"):
        import fakecuda

        name = {"host_alloc": "cuMemHostAlloc",
                "copy": "cuMemcpyDtoHAsync" if direction == "out" else "cuMemcpyHtoDAsync"}[kind]
        fakecuda.load().fail_call(name, nth, fakecuda.CUDA_ERROR_OUT_OF_MEMORY)
    else:
        pool.inject_fault(kind, nth)


# ---- the two ways of sharing -------------------------------------------------------------


def setup_prefix(mgr, book) -> tuple[str, str]:
    """r1 computes a 16-token prompt and decodes 2 tokens; r2's prompt starts
    with the same 16 tokens (a prefix hit) and goes on by 8 more, then it
    decodes 2. Returns the two ids."""
    run(mgr, book, "r1", T[:16])
    decode(mgr, book, "r1", T[16:18])
    run(mgr, book, "r2", T[:16] + U[:8])
    decode(mgr, book, "r2", U[8:10])
    return "r1", "r2"


def setup_fork(mgr, book) -> tuple[str, str]:
    """r1 computes 10 tokens and is forked into r2 (full blocks shared, the
    partial block and Mamba state copied); r2 decodes 6 tokens, r1 3."""
    run(mgr, book, "r1", T[:10])
    mgr.fork("r1", "r2")
    book.write("r2")
    decode(mgr, book, "r2", U[:6])
    decode(mgr, book, "r1", T[10:13])
    return "r1", "r2"


def setup_window(mgr, book) -> tuple[str, str]:
    """A short hitter still inside the window: r1 computes 12 tokens and
    decodes 1; r2's prompt is those 12 and 2 more. Sliding (window 8) and
    chunked (chunk 8) layers still need the blocks of the hit."""
    run(mgr, book, "r1", T[:12])
    decode(mgr, book, "r1", T[12:13])
    run(mgr, book, "r2", T[:12] + U[:2])
    return "r1", "r2"


SETUPS = {"prefix": setup_prefix, "fork": setup_fork, "window": setup_window}


# ---- shared blocks stay resident; round trip bit-exact ------------------------------------

# (model, how the requests share, which one is swapped, its blocks that the
# other request holds too, chunks it swaps out). "prefix": r2 hit r1's 16
# tokens and ran 10 past them; "window": r2 hit r1's 12 tokens and ran 2
# past them; "fork": r2 is r1's child (see the setups).
SHARE_ROWS = [
    # Blocks of a chunk each: the shared blocks stay, each private block goes.
    ("full", "prefix", "r2", 4, 3),
    ("full", "prefix", "r1", 4, 1),
    ("full", "fork", "r2", 2, 2),  # the child's copy of the partial block and its new one
    ("full", "fork", "r1", 2, 2),
    ("full", "window", "r2", 3, 1),
    # Two blocks per chunk: a chunk with a shared block, or with the other
    # request's private block, stays resident whole.
    ("half", "prefix", "r2", 4, 1),  # its first private block shares r1's chunk
    ("half", "prefix", "r1", 4, 0),  # nothing of r1's is alone in a chunk: nothing moves
    ("half", "fork", "r2", 2, 0),
    ("half", "window", "r1", 3, 0),
    # Blocks straddling chunks: the part of a block over a shared chunk stays.
    ("straddle", "prefix", "r2", 4, 4),
    ("straddle", "prefix", "r1", 4, 1),
    ("straddle", "fork", "r2", 2, 2),
    ("straddle", "fork", "r1", 2, 2),
    # Sliding window 8: a hitter that has moved past the window shares nothing.
    ("sliding", "prefix", "r2", 0, 3),
    ("sliding", "fork", "r2", 0, 2),
    ("sliding", "window", "r2", 2, 1),
    ("sliding", "window", "r1", 2, 1),
    # Chunked local, chunk 8: the same within a chunk.
    ("chunked", "prefix", "r2", 0, 1),
    ("chunked", "fork", "r1", 0, 2),
    ("chunked", "window", "r2", 1, 1),
    ("chunked", "window", "r1", 1, 1),
    # Mamba: a hit or a fork copies the state, so the state block is never shared.
    ("mamba", "prefix", "r2", 0, 1),
    ("mamba", "fork", "r2", 0, 1),
    # Cross-attention: per request after a prefix hit, shared by a fork.
    ("full+cross", "prefix", "r2", 4, 5),
    ("full+cross", "prefix", "r1", 4, 3),
    ("full+cross", "fork", "r2", 4, 2),
    # MLA: as full attention.
    ("mla", "prefix", "r2", 4, 3),
    ("mla", "fork", "r1", 2, 2),
    ("mla", "window", "r1", 3, 1),
    # Every kind at once, six groups.
    ("all", "prefix", "r2", 8, 13),
    ("all", "fork", "r2", 6, 9),
]


@pytest.mark.parametrize("model,setup,victim,n_shared,n_swapped", SHARE_ROWS,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in SHARE_ROWS])
def test_shared_blocks_stay_resident_and_the_round_trip_is_bit_exact(model, setup, victim, n_shared, n_swapped):
    pool, mgr, book = make(model)
    try:
        r1, r2 = SETUPS[setup](mgr, book)
        other = r1 if victim == r2 else r2
        check_ledgers(pool, mgr)
        shared, want = shared_blocks(mgr, victim), expected_swapped(mgr, victim)
        assert (sum(map(len, shared)), sum(map(len, want))) == (n_shared, n_swapped)
        before = {g: set(b) for g, b in enumerate(group_blocks(mgr, victim))}

        assert mgr.swap_out_bytes(victim) == n_swapped * C  # what the swap will move, asked first
        assert mgr.swap_out(victim) == n_swapped * C
        assert mgr.is_swapped_out(victim) and not mgr.is_swapped_out(other)
        assert mgr.swap_out_bytes(victim) == 0
        assert not mgr.can_allocate(victim, 1)
        mgr.wait_swap(victim)
        assert mgr.swap_ready(victim)
        check_swapped_out(mgr, victim, want)
        assert host_held(pool) == n_swapped
        assert mgr.usage()["swapped_bytes"] == n_swapped * C and mgr.usage()["swapped_requests"] == 1
        # Block ids do not change; what stays resident still reads its bytes.
        assert {g: set(b) for g, b in enumerate(group_blocks(mgr, victim))} == before
        book.check(victim, resident_blocks(mgr, victim))
        for g, s in enumerate(shared):
            assert s <= resident_blocks(mgr, victim)[g], f"group {g}: a shared block left the device"
        book.check(other)
        check_ledgers(pool, mgr)

        # The other request runs on over the shared blocks; the freed chunks are overwritten.
        decode(mgr, book, other, U[20:23])
        book.check(other)
        scribble(pool)
        check_ledgers(pool, mgr)

        assert mgr.can_swap_in(victim)
        mgr.swap_in(victim)
        assert not mgr.is_swapped_out(victim)
        mgr.wait_swap(victim)
        assert mgr.swap_ready(victim)
        book.check(victim)
        book.check(other)
        assert host_held(pool) == 0
        assert {g: set(b) for g, b in enumerate(group_blocks(mgr, victim))} == before
        check_ledgers(pool, mgr)
        decode(mgr, book, victim, U[30:33])  # it runs on
        book.check(victim)
        book.check(other)
        check_ledgers(pool, mgr)
        u = mgr.usage()
        assert (u["swap_outs"], u["swap_ins"], u["swapped_requests"]) == (1, 1, 0)
        close_clean(pool, mgr)
    finally:
        pool.close()


# ---- the other user of a shared block finishes while this one is swapped out --------------

# (model, setup, blocks r2 shares with r1, chunks its first swap_out moves,
# prefix hit of a new request with r1's tokens while r2 is out, chunks a
# second swap_out moves once r1 is gone)
OTHER_FINISHES_ROWS = [
    ("full", "prefix", 4, 3, 16, 7),
    ("half", "prefix", 4, 1, 16, 4),
    # r1's partial block 2 was full when it finished: it stays cached, and
    # its chunk (shared with r2's straddling block) stays out of the swap.
    ("straddle", "fork", 2, 2, 12, 6),
    ("sliding", "window", 2, 1, 12, 3),
    ("chunked", "window", 1, 1, 12, 2),
    ("mamba", "prefix", 0, 1, 16, 1),  # the hit is r1's cached checkpoint, never r2's
    ("full+cross", "fork", 4, 2, 12, 6),  # the fork's cross blocks go too, the second time
    ("mla", "prefix", 4, 3, 16, 7),
    ("all", "prefix", 8, 13, 16, 21),
]


@pytest.mark.parametrize("model,setup,n_shared,n_first,hit,n_second", OTHER_FINISHES_ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in OTHER_FINISHES_ROWS])
def test_the_sharer_finishing_while_swapped_out_leaves_the_blocks_resident(model, setup, n_shared, n_first, hit,
                                                                             n_second):
    pool, mgr, book = make(model)
    try:
        r1, r2 = SETUPS[setup](mgr, book)
        r1_tokens = list(mgr.requests[r1].token_ids)
        shared = shared_blocks(mgr, r2)
        want = expected_swapped(mgr, r2)
        assert (sum(map(len, shared)), sum(map(len, want))) == (n_shared, n_first)
        assert mgr.swap_out(r2) == n_first * C
        mgr.wait_swap(r2)
        mgr.free(r1)
        # r2 alone holds the formerly shared blocks: still resident and
        # readable; they did not move to the host tier.
        assert mgr.is_swapped_out(r2) and mgr.swap_ready(r2)
        assert shared_blocks(mgr, r2) == [set() for _ in shared]
        check_swapped_out(mgr, r2, want)
        res = resident_blocks(mgr, r2)
        assert all(s <= res[g] for g, s in enumerate(shared))
        book.check(r2, res)
        assert host_held(pool) == n_first
        check_ledgers(pool, mgr)
        # They keep their prefix-cache hashes: a new request with r1's tokens hits them.
        got = run(mgr, book, "r3", r1_tokens)
        assert got == hit
        book.check("r3")
        mgr.free("r3")
        scribble(pool)
        check_ledgers(pool, mgr)

        mgr.swap_in(r2)
        mgr.wait_swap(r2)
        book.check(r2)
        assert host_held(pool) == 0
        check_ledgers(pool, mgr)
        # Nobody shares them now: a second swap_out takes them too.
        want2 = expected_swapped(mgr, r2)
        assert sum(map(len, want2)) == n_second
        assert mgr.swap_out(r2) == n_second * C
        mgr.wait_swap(r2)
        check_swapped_out(mgr, r2, want2)
        scribble(pool)
        mgr.swap_in(r2)
        mgr.wait_swap(r2)
        book.check(r2)
        decode(mgr, book, r2, U[40:42])
        book.check(r2)
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        pool.close()


# ---- finishing a swapped-out request ----------------------------------------------------

# (model, setup, when r2 finishes, prefix hit of a new request with r2's
# tokens afterwards). "swapped": its copies are done; "swapping_out": its
# copies still wait behind a held caller stream (free() waits for them, then
# drops them); "swapping_in": swap_in() was just called; "close": the
# manager is closed with r2 swapped out.
FREE_ROWS = [
    ("full", "prefix", "swapped", 16),  # r2's own full blocks lost their hashes while out
    ("full", "prefix", "swapping_out", 16),
    ("full", "prefix", "swapping_in", 24),  # ... and got them back on swap_in: they stay cached
    ("full", "prefix", "close", None),
    ("half", "prefix", "swapped", 20),  # its block in r1's chunk never left, nor lost its hash
    ("half", "prefix", "swapping_in", 24),
    ("straddle", "fork", "swapped", 8),  # a block half swapped out loses its hash too
    ("sliding", "window", "swapping_out", 12),
    ("chunked", "window", "swapped", 12),
    ("mamba", "prefix", "swapped", 24),  # the checkpoint r2 released to the cache before
    ("full+cross", "fork", "swapping_in", 12),
    ("mla", "prefix", "swapping_out", 16),
    ("all", "prefix", "swapped", 16),
    ("all", "prefix", "close", None),
]


@pytest.mark.parametrize("model,setup,when,hit", FREE_ROWS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in FREE_ROWS])
def test_finishing_a_swapped_request_drops_its_host_copy(model, setup, when, hit):
    if when == "swapping_out" and not ORDERED:
        pytest.skip("needs a copy held back behind a stream (host backend)")
    pool, mgr, book = make(model)
    try:
        r1, r2 = SETUPS[setup](mgr, book)
        r2_tokens = list(mgr.requests[r2].token_ids)
        want = expected_swapped(mgr, r2)
        n = sum(map(len, want))
        timer = None
        if when == "swapping_out":
            pool.hold_stream(HELD)  # r2's last kernel still runs: the copies wait for it
            mgr.swap_out(r2, stream=HELD)
            assert all(mgr.spaces[g].state(k) == SWAPPING_OUT for g, ks in enumerate(want) for k in ks)
            assert not mgr.swap_ready(r2)
            timer = threading.Timer(0.05, pool.release_stream, (HELD,))
            timer.start()
        else:
            mgr.swap_out(r2)
            mgr.wait_swap(r2)
            check_swapped_out(mgr, r2, want)
            if when == "swapping_in":
                mgr.swap_in(r2)  # its copies back are queued; nothing has finished them
                assert all(mgr.spaces[g].state(k) == SWAPPING_IN for g, ks in enumerate(want) for k in ks)
        assert host_held(pool) == n
        if when == "close":
            close_clean(pool, mgr)
            return
        mgr.free(r2)  # waits for copies still running, then drops both tiers' chunks
        if timer is not None:
            timer.join()
        assert r2 not in mgr.requests
        assert host_held(pool) == 0
        host = pool.host_tier()
        assert host["created_chunks"] == host["free_chunks"], host
        for space in mgr.spaces:
            assert space.stats()["host_pages"] == space.stats()["swapping_pages"] == 0
        check_ledgers(pool, mgr)
        book.check(r1)  # the sharer's blocks are untouched
        decode(mgr, book, r1, U[50:52])
        book.check(r1)
        # What r2 leaves in the prefix cache: blocks it shared (still r1's),
        # and after a swap-in its own full blocks, which had their hashes back.
        got = run(mgr, book, "r4", r2_tokens)
        assert got == hit
        book.check("r4")
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        release_and_close(pool)


# ---- prefix-cache entries of a swapped request -----------------------------------------

# (model, tokens the request computes as its prompt, tokens it decodes,
# query, hit before it swaps out, while it is out, after it is back)
PREFIX_ROWS = [
    ("full", 16, 2, 18, 16, 0, 16),
    ("straddle", 16, 2, 18, 16, 0, 16),
    ("sliding", 16, 2, 18, 16, 0, 16),
    ("sliding", 16, 5, 21, 20, 0, 20),  # no shorter hit: block 1 was never computed (one-shot prompt)
    # Chunked: the blocks of finished chunks were released to the cache: not
    # the request's, they stay resident and hittable.
    ("chunked", 16, 2, 18, 16, 16, 16),
    ("chunked", 16, 5, 21, 20, 16, 20),
    # Mamba: every checkpoint the request passed is cached, not held by it.
    ("mamba", 16, 5, 21, 20, 20, 20),
    ("full+cross", 16, 2, 18, 16, 0, 16),
    ("mla", 16, 5, 21, 20, 0, 20),
    ("all", 16, 5, 21, 20, 0, 20),
]


@pytest.mark.parametrize("model,prompt,steps,query,before,during,after", PREFIX_ROWS,
                         ids=[f"{r[0]}-{r[1]}+{r[2]}" for r in PREFIX_ROWS])
def test_a_swapped_request_gives_up_its_prefix_hashes_until_swapped_in(model, prompt, steps, query, before,
                                                                        during, after):
    pool, mgr, book = make(model)
    try:
        run(mgr, book, "r", T[:prompt])
        decode(mgr, book, "r", T[prompt:prompt + steps])

        def probe():
            got = mgr.add_request("q", T[:query])
            mgr.free("q")
            mgr.check()
            return got

        hits = [probe()]
        mgr.swap_out("r")
        mgr.wait_swap("r")
        hits.append(probe())
        scribble(pool)
        mgr.swap_in("r")
        mgr.wait_swap("r")
        hits.append(probe())
        assert hits == [before, during, after]
        # A hit after the swap-in reads the request's bytes.
        run(mgr, book, "q2", T[:query])
        book.check("q2")
        book.check("r")
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        pool.close()


# ---- bad input ------------------------------------------------------------------------


def snapshot(pool, mgr):
    return ({r: (mgr.is_swapped_out(r), mgr.requests[r].num_tokens,
                 [mgr.block_table(r, layer) for layer in range(mgr.model.num_layers)]) for r in mgr.requests},
            [(o["name"], o["held_chunks"]) for o in pool.owners()], host_held(pool))


# (id, r2 swapped out and waited ("out") or then swap_in() called ("in"),
# the call, the error it raises (None: it succeeds), its message)
BAD_ROWS = [
    ("swap_out-unknown", "out", lambda m: m.swap_out("nope"), KeyError, "unknown request 'nope'"),
    ("swap_in-unknown", "out", lambda m: m.swap_in("nope"), KeyError, "unknown request 'nope'"),
    ("swap_ready-unknown", "out", lambda m: m.swap_ready("nope"), KeyError, "unknown request 'nope'"),
    ("wait_swap-unknown", "out", lambda m: m.wait_swap("nope"), KeyError, "unknown request 'nope'"),
    ("can_swap_in-unknown", "out", lambda m: m.can_swap_in("nope"), KeyError, "unknown request 'nope'"),
    ("is_swapped_out-unknown", "out", lambda m: m.is_swapped_out("nope"), KeyError, "unknown request 'nope'"),
    ("swap_out-twice", "out", lambda m: m.swap_out("r2"), ValueError,
     r"request 'r2' is swapped out already; swap_out\(\) takes a resident request"),
    ("swap_in-resident", "out", lambda m: m.swap_in("r1"), ValueError, "request 'r1' is not swapped out"),
    ("swap_in-swapping-in", "in", lambda m: m.swap_in("r2"), ValueError, "request 'r2' is not swapped out"),
    ("allocate-swapped", "out", lambda m: m.allocate_slots("r2", 1, new_token_ids=[7]), ValueError,
     r"cannot allocate slots for request 'r2': it is swapped out; swap_in\(\) it first"),
    ("fork-swapped", "out", lambda m: m.fork("r2", "c"), ValueError, "cannot fork request 'r2': it is swapped out"),
    ("can_allocate-swapped", "out", lambda m: m.can_allocate("r2", 1) is False, None, None),
    ("can_swap_in-resident", "out", lambda m: m.can_swap_in("r1") is False, None, None),
    ("can_swap_in-swapping-in", "in", lambda m: m.can_swap_in("r2") is False, None, None),
    ("swap_ready-resident", "out", lambda m: m.swap_ready("r1") is True, None, None),
    ("wait_swap-resident", "out", lambda m: m.wait_swap("r1") is None, None, None),
]


@pytest.mark.parametrize("prep,call,exc,match", [r[1:] for r in BAD_ROWS], ids=[r[0] for r in BAD_ROWS])
def test_bad_swap_calls_are_refused_and_change_nothing(prep, call, exc, match):
    pool, mgr, book = make("full+cross")
    try:
        r1, r2 = setup_prefix(mgr, book)
        mgr.swap_out(r2)
        mgr.wait_swap(r2)
        if prep == "in":
            mgr.swap_in(r2)
        before = snapshot(pool, mgr)
        if exc is None:
            assert call(mgr)
        else:
            with pytest.raises(exc, match=match):
                call(mgr)
        assert snapshot(pool, mgr) == before
        assert "c" not in mgr.requests
        check_ledgers(pool, mgr)
        if prep == "out":
            mgr.swap_in(r2)
        mgr.wait_swap(r2)
        book.check(r2)
        book.check(r1)
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        pool.close()


def test_swap_out_of_a_request_still_swapping_in_lands_it_first():
    """Documented: swap_out() of a request whose swap_in() has not landed
    makes it resident first; the round trip stays bit-exact."""
    pool, mgr, book = make("full+cross")
    try:
        r1, r2 = setup_prefix(mgr, book)
        n = mgr.swap_out(r2)
        mgr.swap_in(r2)  # no wait: still swapping in
        assert mgr.swap_out(r2) == n
        mgr.wait_swap(r2)
        check_swapped_out(mgr, r2, expected_swapped(mgr, r2))
        scribble(pool)
        mgr.swap_in(r2)
        mgr.wait_swap(r2)
        book.check(r2)
        book.check(r1)
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        pool.close()


# ---- a host tier that is off, too small or failing; device faults on the way back -----------

# (id, model, cpu budget, direction, prep, fault (kind, nth) or None, error, message)
# prep: "" nothing; "r1-out": r1 swaps out first (1 host chunk); "squeeze":
# another owner takes every free device chunk before swap_in.
FAULT_ROWS = [
    ("host-off", "full", 0, "out", "", None, OutOfMemoryError,
     r"swap_out\('r2'\): the host tier has room for 0 chunks, the request needs 3 \(raise the pool's cpu_budget\)"),
    ("host-too-small", "full", "4MiB", "out", "", None, OutOfMemoryError,
     "the host tier has room for 2 chunks, the request needs 3"),
    ("host-taken", "full", "6MiB", "out", "r1-out", None, OutOfMemoryError,
     "the host tier has room for 2 chunks, the request needs 3"),
    ("host-too-small-two-groups", "full+cross", "8MiB", "out", "", None, OutOfMemoryError,
     "the host tier has room for 4 chunks, the request needs 5"),
    ("copy-out-1", "full", "64MiB", "out", "", ("copy", 1), AllocatorError,
     r"kv_swap_out: copying page \d+ to the host failed"),
    ("copy-out-3", "full", "64MiB", "out", "", ("copy", 3), AllocatorError,
     r"kv_swap_out: copying page \d+ to the host failed"),
    # The first group's chunks are swapping out already: they are brought back.
    ("copy-out-second-group", "full+cross", "64MiB", "out", "", ("copy", 4), AllocatorError,
     r"kv_swap_out: copying page \d+ to the host failed"),
    ("host-slab-retried", "full", "64MiB", "out", "", ("host_alloc", 1), None, None),
    ("copy-in-1", "full", "64MiB", "in", "", ("copy", 1), (AllocatorError, OutOfMemoryError),
     "kv_swap_in: swapping in failed"),
    ("map-in-2", "full", "64MiB", "in", "", ("map", 2), (AllocatorError, OutOfMemoryError),
     "kv_swap_in: swapping in failed"),
    # The first group is back already: it is swapped out again.
    ("copy-in-second-group", "full+cross", "64MiB", "in", "", ("copy", 4), (AllocatorError, OutOfMemoryError),
     "kv_swap_in: swapping in failed"),
    ("device-full", "full", "64MiB", "in", "squeeze", None, OutOfMemoryError,
     r"kv_swap_in: the pool has no 3 free chunks to swap in"),
]


@pytest.mark.parametrize("model,host,direction,prep,fault,exc,match", [r[1:] for r in FAULT_ROWS],
                         ids=[r[0] for r in FAULT_ROWS])
def test_a_failed_swap_leaves_the_request_as_it_was(model, host, direction, prep, fault, exc, match):
    pool, mgr, book = make(model, host=host)
    squeezer, squeezed = None, []
    try:
        r1, r2 = setup_prefix(mgr, book)
        want = expected_swapped(mgr, r2)
        n = sum(map(len, want))
        if prep == "r1-out":
            mgr.swap_out(r1)
            mgr.wait_swap(r1)
        held_before = host_held(pool)
        if direction == "in":
            mgr.swap_out(r2)
            mgr.wait_swap(r2)
            held_before = host_held(pool)
            if prep == "squeeze":
                squeezer = pool.register_owner("squeeze")
                squeezed = pool.acquire(squeezer, pool.available_chunks(squeezer))
                assert not mgr.can_swap_in(r2)
        before = snapshot(pool, mgr)
        if fault:
            inject(pool, *fault, direction)
        op = mgr.swap_out if direction == "out" else mgr.swap_in
        if exc is None:
            op(r2)
        else:
            with pytest.raises(exc, match=match):
                op(r2)
        if fault:
            inject(pool, fault[0], 0, direction)
        if exc is not None:
            # Nothing changed: resident and readable, or still swapped out
            # (a group swapped in and out again holds its device chunks
            # until that copy is done).
            mgr.wait_swap(r2)
            assert snapshot(pool, mgr) == before
            assert host_held(pool) == held_before
            if direction == "out":
                assert not mgr.is_swapped_out(r2) and mgr.swap_ready(r2)
                book.check(r2)
                assert all(mgr.spaces[g].state(k) == PINNED for g, ks in enumerate(want) for k in ks)
            else:
                assert mgr.is_swapped_out(r2)
                check_swapped_out(mgr, r2, want)
            book.check(r1) if not mgr.is_swapped_out(r1) else None
            check_ledgers(pool, mgr)
            # The same call goes through once the cause is gone.
            if squeezer is not None:
                pool.release(squeezer, squeezed)
                squeezed = []
                assert mgr.can_swap_in(r2)
            if prep == "r1-out":
                mgr.swap_in(r1)
            if direction == "out" and host != "64MiB":
                pool.set_cpu_budget("64MiB")
            op(r2)
        if direction == "out":
            mgr.wait_swap(r2)
            check_swapped_out(mgr, r2, want)
            assert host_held(pool) == n
            scribble(pool)
            mgr.swap_in(r2)
        mgr.wait_swap(r2)
        book.check(r2)
        book.check(r1) if not mgr.is_swapped_out(r1) else None
        check_ledgers(pool, mgr)
        close_clean(pool, mgr)
    finally:
        if squeezed:
            pool.release(squeezer, squeezed)
        pool.close()


# ---- landing: a swap-in's chunks before their copies back are done ------------------------
#
# These were bugs: GroupBlockPool.swap_in() treated the chunks as resident at
# once (free slots unblocked, prefix hashes back, pages open to compaction)
# while the copies back were still queued. Now they are "landing" until the
# request's swap is done (swap_ready, wait_swap or its next step). Below, the copy stream is held
# back behind another request's swap-out (its last kernel still running, a
# held caller stream), so the copy back lands late, deterministically; on a
# GPU the same happens whenever the copies are slower than the next kernels.


def _stall_copies(pool, mgr, book, victim_prompt):
    """X (its own large page) and the victim; the victim swaps out and its
    freed chunks are overwritten; then X swaps out behind a held stream, so
    the copy stream stalls, and the victim's swap_in() queues its copies
    behind X's: they land only once the stream is released."""
    run(mgr, book, "X", [1] * 7)
    run(mgr, book, "A", victim_prompt)
    mgr.swap_out("A")
    mgr.wait_swap("A")
    scribble(pool)


@host_only
def test_no_slot_over_a_chunk_swapping_in_is_handed_out():
    pool, mgr, book = make("half")  # two blocks per chunk
    try:
        _stall_copies(pool, mgr, book, U[:3])  # A: one block, its chunk's other slot free
        run(mgr, book, "Z", [3] * 3)
        pool.hold_stream(HELD)
        mgr.swap_out("X", stream=HELD)
        mgr.swap_in("A")
        run(mgr, book, "B", [4] * 3)  # placed in the free slot of A's chunk (still SWAPPING_IN)
        book.check("B")
        pool.release_stream(HELD)
        mgr.wait_swap("A")
        mgr.wait_swap("X")
        book.check("A")
        book.check("B")  # fails: the copy back of A's chunk overwrote B's block
        close_clean(pool, mgr)
    finally:
        release_and_close(pool)


@host_only
def test_compaction_leaves_a_block_swapping_in_alone():
    pool, mgr, book = make("half")
    try:
        _stall_copies(pool, mgr, book, U[:3])
        run(mgr, book, "Z", [3] * 3)  # a page with a free slot: a compaction destination
        pool.hold_stream(HELD)
        mgr.swap_out("X", stream=HELD)
        mgr.swap_in("A")
        mgr.compact()  # as free() and allocate_slots() do: moves A's block into Z's page
        pool.release_stream(HELD)
        mgr.wait_swap("A")
        mgr.wait_swap("X")
        book.check("Z")
        book.check("A")  # fails: A's block holds what its chunk held before the copy landed
        close_clean(pool, mgr)
    finally:
        release_and_close(pool)


@host_only
def test_no_prefix_hit_on_blocks_still_swapping_in():
    pool, mgr, book = make("full")
    try:
        _stall_copies(pool, mgr, book, T[:9])  # A: two full (hashed) blocks and a partial one
        pool.hold_stream(HELD)
        mgr.swap_out("X", stream=HELD)
        mgr.swap_in("A")
        run(mgr, book, "B", T[:9])  # B's prompt hits A's two full blocks (8 tokens)
        book.check("B")  # no hit on blocks still landing: B computed its own
        pool.release_stream(HELD)
        mgr.wait_swap("A")
        book.check("A")
        close_clean(pool, mgr)
    finally:
        release_and_close(pool)


def test_live_bytes_needed_counts_blocks_a_swapped_request_shares_once():
    pool, mgr, book = make("full")
    try:
        r1, r2 = setup_prefix(mgr, book)  # r1: 18 tokens; r2: 26 tokens, 16 of them r1's blocks
        spec = SPECS["full"]
        assert mgr.live_bytes_needed() == spec.live_bytes(18) + spec.live_bytes(26) - 4 * BS * spec.bytes_per_token()
        mgr.swap_out(r2)
        mgr.wait_swap(r2)
        # On the device r1's 18 tokens are live (4 blocks of them shared with r2, counted once).
        assert mgr.live_bytes_needed() == spec.live_bytes(18)  # fails: 18 - 16 tokens' worth
        close_clean(pool, mgr)
    finally:
        pool.close()


# ---- address space of swapped requests --------------------------------------------


@pytest.mark.parametrize("model", ["full", "half", "straddle"])
def test_swapped_requests_keep_their_addresses_without_taking_the_running_ones(model):
    """A swapped-out request keeps its block ids (its VA), so the manager's
    address space covers both tiers' budgets: with nearly the whole device
    budget swapped out, a new request can still take nearly all of it. A
    space sized to the device budget alone would run out of blocks here
    (found as a swap ping-pong in bench kv's ellm+swap column)."""
    pool, mgr, book = make(model, device="64MiB", host="64MiB")
    n = int(0.7 * 64 * MiB / mgr.model.bytes_per_token_all_layers()) // BS * BS  # most of the budget
    a = list(range(5000, 5000 + n))
    b = list(range(9000, 9000 + n))
    run(mgr, book, "a", a)
    mgr.swap_out("a")
    mgr.wait_swap("a")
    run(mgr, book, "b", b)  # asserts the whole prompt is placed
    book.check("b")
    assert not mgr.can_swap_in("a")  # its chunks are b's now
    mgr.free("b")
    assert mgr.can_swap_in("a")
    mgr.swap_in("a")
    mgr.wait_swap("a")
    book.check("a")
    check_ledgers(pool, mgr)
    close_clean(pool, mgr)


def test_can_swap_in_with_a_margin_counts_the_spare_chunks():
    """can_swap_in(margin_chunks=m) is true only while the pool has the
    request's chunks and m more (free, or under cached blocks only); a
    negative margin is refused."""
    pool, mgr, book = make("full")
    run(mgr, book, "a", list(range(5000, 5000 + 8 * BS)))
    mgr.swap_out("a")
    mgr.wait_swap("a")
    need = sum(len(c) for c in mgr.requests["a"].swap_chunks)
    cached = sum(s.stats()["reclaimable_pages"] for s in mgr.spaces)  # chunks under cached blocks only
    spare = pool.available_chunks(mgr.spaces[0].owner) + cached - need
    assert need > 0 and spare > 0
    assert mgr.can_swap_in("a", margin_chunks=spare)
    assert not mgr.can_swap_in("a", margin_chunks=spare + 1)
    with pytest.raises(ValueError, match="margin_chunks must be >= 0"):
        mgr.can_swap_in("a", margin_chunks=-1)
    mgr.free("a")
    close_clean(pool, mgr)
