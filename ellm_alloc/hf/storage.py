"""Pool-backed storage of one ElasticCache layer: token ranges and state slots.

Both classes hold one PageSpace (a reserved VA range, pool chunks mapped under
it on demand) and hand out fixed-address tensor views of it. Their shapes are
those of the first states the model gives, so nothing about the layer has to
be guessed from the config.

TokenRanges: per-token K/V of an attention layer. Each plane (K, V; their head
counts and head dims may differ, as in MLA models that cache decompressed K of
192 and V of 128) gives every sequence a chunk-aligned region of max_len
tokens, token-major. `fit(batch, start, end)` maps, for every sequence below
`batch`, the chunks under tokens [start, end) and unmaps everything else.
All sequences of a batch have the same range (generate() pads on the left),
so the mapped pages of a plane are one interval per sequence, the same for
every sequence: a step that stays inside mapped chunks costs two integer
comparisons and no call into the pool.

PackedStates: the fixed-size states of every linear-attention / Mamba layer
of the cache (conv and recurrent states, one slot per sequence). Each state's
slots are back to back, so `region.view(batch)` is contiguous, and the
regions of all layers are packed together, so the memory held is about
batch x the states' bytes rounded up to whole chunks, not a chunk per layer
and state. A decode step updates the slots in place: no copy beyond the
one transformers' own layer makes, and no map or unmap.

Offload (ElasticCache.offload / restore). TokenRanges swaps whole sequences
to the pool's host tier: `swap_out(rows)` queues the copy of every mapped
page of those rows (every plane) in one all-or-nothing PageSpace.swap_out,
`swap_in(rows)` maps fresh chunks at the same addresses and copies back.
A swapped row keeps its token range (fit() refuses to change it while the
row stays below the batch, and unmapping one of its pages drops its host
copy). `drop(rows)` gives swapped rows' host copies up; they become holes
(rows below the batch with nothing mapped) until fit() or fill() maps fresh
chunks under them. PackedStates does not swap: its slots are packed across
sequences, so one chunk holds several sequences' states; they stay resident
(they are a few slots per sequence, against K/V that grows with every token).
"""
from __future__ import annotations

import math

import torch

from ..kv.space import PageSpace
from ..pool import Pool

__all__ = ["PackedStates", "StateRegion", "TokenRanges"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _minus(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of interval a = [lo, hi) outside interval b."""
    lo, hi = a
    if lo >= hi:
        return []
    blo, bhi = b
    if blo >= bhi or bhi <= lo or blo >= hi:
        return [a]
    return [r for r in ((lo, blo), (bhi, hi)) if r[0] < r[1]]


class TokenRanges:
    """Per-token planes of one attention layer (K and V; a DSA layer's
    indexer keys) for max_batch sequences of up to max_len tokens.

    shapes: (heads, head_dim) of each plane.
    """

    def __init__(self, pool: Pool, name: str, max_batch: int, max_len: int,
                 shapes: tuple[tuple[int, int], ...], dtype: torch.dtype):
        self.max_batch, self.max_len, self.dtype = max_batch, max_len, dtype
        self.chunk = pool.stats()["chunk_bytes"]
        self.item = torch.empty((), dtype=dtype).element_size()
        self.shapes = tuple(shapes)
        self.token_bytes = [h * d * self.item for h, d in self.shapes]
        self.region_pages = [_ceil_div(max_len * tb, self.chunk) for tb in self.token_bytes]
        self.first_page = [max_batch * sum(self.region_pages[:p]) for p in range(len(self.shapes))]
        self.space = PageSpace(pool, name, max_batch * sum(self.region_pages))
        self.batch = 0
        self.start = self.end = 0
        self.rel = [(0, 0)] * len(self.shapes)  # mapped pages of every sequence's region, per plane
        self.swapped: set[int] = set()  # rows whose pages are in the host tier (swapping out or swapped)
        self.holes: set[int] = set()  # rows below the batch with nothing mapped (dropped while swapped)
        self._views: list[torch.Tensor] | None = None

    def views(self) -> tuple[torch.Tensor, ...]:
        """[max_batch, heads, max_len, head_dim] views of each plane (read only the fitted range)."""
        if self._views is None:
            out = []
            for p, (h, d) in enumerate(self.shapes):
                t = self.space.view(self.dtype, self.first_page[p] * self.chunk, (self.max_batch, self.max_len, h, d),
                                    (self.region_pages[p] * self.chunk // self.item, h * d, d, 1))
                out.append(t.permute(0, 2, 1, 3))
            self._views = out
        return tuple(self._views)

    def _pages(self, p: int, start: int, end: int) -> tuple[int, int]:
        if end <= start:
            return (0, 0)
        tb = self.token_bytes[p]
        return (start * tb // self.chunk, _ceil_div(end * tb, self.chunk))

    def fit(self, batch: int, start: int, end: int) -> None:
        """Sequences [0, batch) hold tokens [start, end); nothing else stays
        mapped. All or nothing: on OutOfMemoryError nothing changed.

        Swapped rows at or above `batch` are dropped (their host copies
        freed); a swapped row below it keeps its pages, so its token range
        cannot change (RuntimeError). Holes below `batch` get fresh chunks."""
        planes = range(len(self.shapes))
        rel = [self._pages(p, start, end) for p in planes]
        if batch == self.batch and rel == self.rel and not self.holes:
            self.start, self.end = start, end
            return
        if rel != self.rel and any(r < batch for r in self.swapped):
            raise RuntimeError(f"{self.space.name}: sequences {sorted(r for r in self.swapped if r < batch)} are "
                               "swapped out to the host tier; their token range cannot change until swapped in")
        empty = (0, 0)

        def held(seq: int, p: int) -> tuple[int, int]:
            return self.rel[p] if seq < self.batch and seq not in self.holes else empty

        mapped: list[int] = []
        try:
            for p in planes:
                for seq in range(batch):
                    old = held(seq, p)
                    base = self.first_page[p] + seq * self.region_pages[p]
                    for lo, hi in _minus(rel[p], old):
                        self.space.map(base + lo, hi - lo)
                        mapped.extend(range(base + lo, base + hi))
        except BaseException:
            for page in mapped:
                self.space.unmap(page)
            raise
        for p in planes:
            for seq in range(max(batch, self.batch)):
                old = held(seq, p)
                new = rel[p] if seq < batch else empty
                base = self.first_page[p] + seq * self.region_pages[p]
                for lo, hi in _minus(old, new):
                    for page in range(base + lo, base + hi):
                        self.space.unmap(page)  # a swapped page: its host copy goes
        self.batch, self.start, self.end, self.rel = batch, start, end, rel
        self.swapped = {r for r in self.swapped if r < batch}
        self.holes = set()

    # ---- swap to the pool's host tier (ElasticCache.offload / restore) ----

    def row_pages(self, rows) -> list[int]:
        """The pages under the token range of each of `rows`, every plane."""
        out: list[int] = []
        for p, (lo, hi) in enumerate(self.rel):
            for r in rows:
                base = self.first_page[p] + r * self.region_pages[p]
                out.extend(range(base + lo, base + hi))
        return out

    def resident(self, rows) -> list[int]:
        """Those of `rows` that hold mapped pages here now."""
        return [r for r in rows if r < self.batch and r not in self.swapped and r not in self.holes]

    def swap_out(self, rows, stream: int = 0) -> list[int]:
        """Queues the copy of the resident ones of `rows` to the host tier,
        after `stream`'s work so far; returns them. All or nothing (the
        PageSpace's swap_out)."""
        mine = [r for r in self.resident(rows) if any(lo < hi for lo, hi in self.rel)]
        if mine:
            self.space.swap_out(self.row_pages(mine), stream)
            self.swapped.update(mine)
        return mine

    def swap_in(self, rows, stream: int = 0) -> list[int]:
        """Maps fresh chunks under the swapped ones of `rows` (same addresses)
        and queues the copies back; work queued on `stream` from now sees
        them. Returns them. All or nothing: OutOfMemoryError when the pool
        cannot give the chunks."""
        mine = [r for r in rows if r in self.swapped]
        if mine:
            pages = self.row_pages(mine)
            self.space.swap_in(pages, stream)
            self.swapped.difference_update(mine)
            self.space.swap_wait(pages, stream)
        return mine

    def drop(self, rows) -> None:
        """The swapped ones of `rows` give up their bytes (host chunks back
        to the tier) and become holes."""
        for r in rows:
            if r in self.swapped:
                for page in self.row_pages([r]):
                    self.space.unmap(page)
                self.swapped.discard(r)
                self.holes.add(r)

    def fill(self, rows) -> None:
        """Maps fresh chunks under the holes among `rows` (their bytes are
        whatever the chunks held). All or nothing."""
        mine = sorted(r for r in rows if r in self.holes)
        mapped: list[int] = []
        try:
            for p, (lo, hi) in enumerate(self.rel):
                if lo < hi:
                    for r in mine:
                        base = self.first_page[p] + r * self.region_pages[p]
                        self.space.map(base + lo, hi - lo)
                        mapped.extend(range(base + lo, base + hi))
        except BaseException:
            for page in mapped:
                self.space.unmap(page)
            raise
        self.holes.difference_update(mine)

    def host_bytes(self) -> int:
        """Bytes of this range's rows in the host tier."""
        return len(self.swapped) * sum(hi - lo for lo, hi in self.rel) * self.chunk

    def mapped_bytes(self) -> int:
        """Device chunks held (swapped rows and holes hold none, or soon none)."""
        rows = self.batch - len(self.swapped) - len(self.holes)
        return rows * sum(hi - lo for lo, hi in self.rel) * self.chunk

    def needed_bytes(self) -> int:
        return self.batch * (self.end - self.start) * sum(self.token_bytes)

    def close(self) -> None:
        self._views = None
        self.batch, self.start, self.end, self.rel = 0, 0, 0, [(0, 0)] * len(self.shapes)
        self.swapped, self.holes = set(), set()
        self.space.close()  # drops swapped pages' host copies too


class StateRegion:
    """The slots of one state (one conv or recurrent state of one layer) in a
    PackedStates: max_batch slots of `shape`, back to back."""

    def __init__(self, store: "PackedStates", segment: int, offset: int, shape: tuple[int, ...],
                 dtype: torch.dtype):
        self.store, self.segment, self.offset = store, segment, offset
        self.shape, self.dtype = tuple(shape), dtype
        self.slot_bytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        size = (store.max_batch, *self.shape)
        strides = [1] * len(size)
        for i in range(len(size) - 2, -1, -1):
            strides[i] = strides[i + 1] * size[i + 1]
        self._view = store.spaces[segment].view(dtype, offset, size, tuple(strides))

    def view(self, batch: int) -> torch.Tensor:
        """[batch, *shape], contiguous; batch must not exceed the store's fitted batch."""
        return self._view[:batch]

    def move_rows(self, src_rows: torch.Tensor) -> None:
        """Slot i becomes old slot src_rows[i], for i < len(src_rows)."""
        n = src_rows.numel()
        if n:
            moved = self._view.index_select(0, src_rows.to(self._view.device))  # a copy: sources may be overwritten
            self._view[:n].copy_(moved)


class PackedStates:
    """Every fixed-size state (conv and recurrent states of linear-attention /
    Mamba layers) of one cache, for up to max_batch sequences.

    Each state gets a region of max_batch slots, regions packed back to back
    (256-byte aligned) in segments of pool pages, in the order the layers
    first update them. Small states therefore share chunks: the memory held
    is about batch x (sum of slot bytes), rounded up to whole chunks once per
    segment, not once per layer. A state larger than a segment gets a segment
    of its own. `fit(batch)` maps the pages under slots [0, batch) of every
    region and unmaps the rest; a page shared by two regions stays mapped
    while either needs it. Nothing here swaps to the host tier: a chunk holds
    several sequences' slots, so ElasticCache.offload leaves states resident.
    """

    ALIGN = 256
    SEGMENT_PAGES = 16

    def __init__(self, pool: Pool, name: str, max_batch: int):
        self.pool, self.name, self.max_batch = pool, name, max_batch
        self.chunk = pool.stats()["chunk_bytes"]
        self.spaces: list[PageSpace] = []
        self.used: list[int] = []  # bytes taken in each segment
        self.regions: list[StateRegion] = []
        self.mapped: list[set[int]] = []  # mapped pages of each segment
        self.batch = 0

    def add(self, shape: tuple[int, ...], dtype: torch.dtype) -> StateRegion:
        """A region for a new state, mapped for the fitted batch (its slots
        read as zeros, as transformers' fresh states do)."""
        slot = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if slot <= 0:
            raise ValueError(f"{self.name}: a state of shape {tuple(shape)} holds no bytes")
        need = self.max_batch * slot
        seg = len(self.spaces) - 1
        offset = _ceil_div(self.used[seg], self.ALIGN) * self.ALIGN if seg >= 0 else 0
        if seg < 0 or offset + need > self.spaces[seg].n_pages * self.chunk:
            pages = max(self.SEGMENT_PAGES, _ceil_div(need, self.chunk))
            self.spaces.append(PageSpace(self.pool, f"{self.name}{len(self.spaces)}", pages))
            self.used.append(0)
            self.mapped.append(set())
            seg, offset = len(self.spaces) - 1, 0
        self.used[seg] = offset + need
        region = StateRegion(self, seg, offset, shape, dtype)
        self.regions.append(region)
        try:
            self._fit_pages(self.batch)
        except BaseException:
            self.regions.pop()
            raise
        if self.batch:
            region.view(self.batch).zero_()
        return region

    def _needed(self, batch: int) -> list[set[int]]:
        need: list[set[int]] = [set() for _ in self.spaces]
        for r in self.regions:
            if batch:
                lo, hi = r.offset, r.offset + batch * r.slot_bytes
                need[r.segment].update(range(lo // self.chunk, _ceil_div(hi, self.chunk)))
        return need

    def _fit_pages(self, batch: int) -> None:
        need = self._needed(batch)
        added: list[tuple[int, int]] = []
        try:
            for seg, pages in enumerate(need):
                for page in sorted(pages - self.mapped[seg]):
                    self.spaces[seg].map(page)
                    added.append((seg, page))
        except BaseException:  # all or nothing
            for seg, page in added:
                self.spaces[seg].unmap(page)
            raise
        for seg, page in added:
            self.mapped[seg].add(page)
        for seg, pages in enumerate(need):
            for page in sorted(self.mapped[seg] - pages):
                self.spaces[seg].unmap(page)
            self.mapped[seg] = set(pages)

    def fit(self, batch: int) -> None:
        """Slots [0, batch) of every region are mapped, nothing else is.
        All or nothing: on OutOfMemoryError nothing changed. Slots that were
        not mapped before read as zeros."""
        if batch == self.batch:
            return
        if batch > self.max_batch:
            raise ValueError(f"{self.name}: batch {batch} exceeds max_batch_size={self.max_batch}")
        old = self.batch
        self._fit_pages(batch)
        self.batch = batch
        for r in self.regions:
            if batch > old:
                r._view[old:batch].zero_()

    def mapped_bytes(self) -> int:
        return sum(len(m) for m in self.mapped) * self.chunk

    def needed_bytes(self) -> int:
        return self.batch * sum(r.slot_bytes for r in self.regions)

    def close(self) -> None:
        self.regions = []
        self.batch = 0
        for space in self.spaces:
            space.close()
        self.spaces, self.used, self.mapped = [], [], []
