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

StateSlots: one fixed-size state per sequence (a conv or recurrent state of a
linear-attention / Mamba layer). Slots are packed back to back, slot i at
i * slot_bytes, so `view()[:batch]` is contiguous and the memory held is
batch * slot_bytes rounded up to whole chunks, never a chunk per sequence.
`fit(batch)` maps the chunks under slots [0, batch).
"""
from __future__ import annotations

import math

import torch

from ..kv.space import PageSpace
from ..pool import Pool

__all__ = ["StateSlots", "TokenRanges"]


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
    """K and V of one attention layer for max_batch sequences of up to max_len tokens.

    shapes: (heads, head_dim) of K and of V.
    """

    def __init__(self, pool: Pool, name: str, max_batch: int, max_len: int,
                 shapes: tuple[tuple[int, int], tuple[int, int]], dtype: torch.dtype):
        self.max_batch, self.max_len, self.dtype = max_batch, max_len, dtype
        self.chunk = pool.stats()["chunk_bytes"]
        self.item = torch.empty((), dtype=dtype).element_size()
        self.shapes = tuple(shapes)
        self.token_bytes = [h * d * self.item for h, d in self.shapes]
        self.region_pages = [_ceil_div(max_len * tb, self.chunk) for tb in self.token_bytes]
        self.first_page = [0, max_batch * self.region_pages[0]]
        self.space = PageSpace(pool, name, max_batch * sum(self.region_pages))
        self.batch = 0
        self.start = self.end = 0
        self.rel = [(0, 0), (0, 0)]  # mapped pages of every sequence's region, per plane
        self._views: list[torch.Tensor] | None = None

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[max_batch, heads, max_len, head_dim] views of K and V (read only the fitted range)."""
        if self._views is None:
            out = []
            for p, (h, d) in enumerate(self.shapes):
                t = self.space.view(self.dtype, self.first_page[p] * self.chunk, (self.max_batch, self.max_len, h, d),
                                    (self.region_pages[p] * self.chunk // self.item, h * d, d, 1))
                out.append(t.permute(0, 2, 1, 3))
            self._views = out
        return self._views[0], self._views[1]

    def _pages(self, p: int, start: int, end: int) -> tuple[int, int]:
        if end <= start:
            return (0, 0)
        tb = self.token_bytes[p]
        return (start * tb // self.chunk, _ceil_div(end * tb, self.chunk))

    def fit(self, batch: int, start: int, end: int) -> None:
        """Sequences [0, batch) hold tokens [start, end); nothing else stays
        mapped. All or nothing: on OutOfMemoryError nothing changed."""
        rel = [self._pages(p, start, end) for p in range(2)]
        if batch == self.batch and rel == self.rel:
            self.start, self.end = start, end
            return
        empty = (0, 0)
        mapped: list[int] = []
        try:
            for p in range(2):
                for seq in range(batch):
                    old = self.rel[p] if seq < self.batch else empty
                    base = self.first_page[p] + seq * self.region_pages[p]
                    for lo, hi in _minus(rel[p], old):
                        self.space.map(base + lo, hi - lo)
                        mapped.extend(range(base + lo, base + hi))
        except BaseException:
            for page in mapped:
                self.space.unmap(page)
            raise
        for p in range(2):
            for seq in range(max(batch, self.batch)):
                old = self.rel[p] if seq < self.batch else empty
                new = rel[p] if seq < batch else empty
                base = self.first_page[p] + seq * self.region_pages[p]
                for lo, hi in _minus(old, new):
                    for page in range(base + lo, base + hi):
                        self.space.unmap(page)
        self.batch, self.start, self.end, self.rel = batch, start, end, rel

    def mapped_bytes(self) -> int:
        return self.batch * sum(hi - lo for lo, hi in self.rel) * self.chunk

    def needed_bytes(self) -> int:
        return self.batch * (self.end - self.start) * sum(self.token_bytes)

    def close(self) -> None:
        self._views = None
        self.batch, self.start, self.end, self.rel = 0, 0, 0, [(0, 0), (0, 0)]
        self.space.close()


class StateSlots:
    """One fixed-size state of `shape` per sequence, for up to max_batch sequences."""

    def __init__(self, pool: Pool, name: str, max_batch: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.max_batch, self.shape, self.dtype = max_batch, tuple(shape), dtype
        self.chunk = pool.stats()["chunk_bytes"]
        self.item = torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = math.prod(self.shape) * self.item
        if self.slot_bytes <= 0:
            raise ValueError(f"{name}: a state of shape {self.shape} holds no bytes")
        self.space = PageSpace(pool, name, _ceil_div(max_batch * self.slot_bytes, self.chunk))
        self.batch = 0
        self.pages = 0  # pages [0, pages) are mapped
        self._view: torch.Tensor | None = None

    def view(self) -> torch.Tensor:
        """[max_batch, *shape]; read only the slots below the fitted batch."""
        if self._view is None:
            size = (self.max_batch, *self.shape)
            strides = [1] * len(size)
            for i in range(len(size) - 2, -1, -1):
                strides[i] = strides[i + 1] * size[i + 1]
            self._view = self.space.view(self.dtype, 0, size, tuple(strides))
        return self._view

    def fit(self, batch: int) -> None:
        """Maps the chunks under slots [0, batch), unmaps the others."""
        pages = _ceil_div(batch * self.slot_bytes, self.chunk)
        if pages > self.pages:
            self.space.map(self.pages, pages - self.pages)
        for page in range(pages, self.pages):
            self.space.unmap(page)
        self.batch, self.pages = batch, pages

    def mapped_bytes(self) -> int:
        return self.pages * self.chunk

    def needed_bytes(self) -> int:
        return self.batch * self.slot_bytes

    def close(self) -> None:
        self._view = None
        self.batch = self.pages = 0
        self.space.close()
