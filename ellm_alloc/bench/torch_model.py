"""A model of PyTorch's native CUDA caching allocator, for side-by-side figures.

It follows the rules of CUDACachingAllocator that decide how much memory is
reserved: sizes rounded to 512 B; blocks <= 1 MiB come from 2 MiB segments,
larger ones from 20 MiB segments (below 10 MiB) or from segments of the
request rounded to 2 MiB; best fit (smallest block, then lowest address) among
the free blocks of the same stream and pool; a block is split when the rest is
large enough (small pool: >= 512 B, large pool: > 1 MiB); freed blocks merge
with free neighbours of the same segment; segments are never returned
(no empty_cache during a run). Only reserved bytes are modelled, not time.
"""
from __future__ import annotations

import bisect

from .trace import Event

K_MIN = 512
K_SMALL = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE = 10 << 20
K_ROUND_LARGE = 2 << 20


class _Block:
    __slots__ = ("seg", "off", "size", "free", "prev", "next", "pool")

    def __init__(self, seg, off, size, pool):
        self.seg, self.off, self.size, self.free, self.pool = seg, off, size, True, pool
        self.prev = self.next = None

    def key(self):
        return (self.size, self.seg, self.off)


class TorchCachingModel:
    def __init__(self):
        self.reserved = 0
        self.reserved_peak = 0
        self.pools: dict[tuple[int, bool], list] = {}  # (stream, small) -> sorted free keys
        self.blocks: dict[tuple, _Block] = {}
        self.live: dict[int, _Block] = {}
        self.nseg = 0

    @staticmethod
    def round_size(n: int) -> int:
        return K_MIN if n < K_MIN else (n + K_MIN - 1) // K_MIN * K_MIN

    def _segment_size(self, rs: int) -> int:
        if rs <= K_SMALL:
            return K_SMALL_BUFFER
        if rs < K_MIN_LARGE:
            return K_LARGE_BUFFER
        return (rs + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE

    def _insert(self, b: _Block):
        b.free = True
        key = b.key()
        self.blocks[key] = b
        bisect.insort(self.pools.setdefault(b.pool, []), key)

    def _remove(self, b: _Block):
        key = b.key()
        lst = self.pools[b.pool]
        lst.pop(bisect.bisect_left(lst, key))
        del self.blocks[key]
        b.free = False

    def malloc(self, id_: int, size: int, stream: int):
        rs = self.round_size(size)
        small = rs <= K_SMALL
        pool = (stream, small)
        lst = self.pools.setdefault(pool, [])
        i = bisect.bisect_left(lst, (rs, -1, -1))
        if i < len(lst):
            b = self.blocks[lst[i]]
            self._remove(b)
        else:
            seg_size = self._segment_size(rs)
            self.nseg += 1
            b = _Block(self.nseg, 0, seg_size, pool)
            b.free = False
            self.reserved += seg_size
            self.reserved_peak = max(self.reserved_peak, self.reserved)
        rest = b.size - rs
        if (small and rest >= K_MIN) or (not small and rest > K_SMALL):
            r = _Block(b.seg, b.off + rs, rest, pool)
            r.prev, r.next = b, b.next
            if b.next:
                b.next.prev = r
            b.next = r
            b.size = rs
            self._insert(r)
        self.live[id_] = b

    def free(self, id_: int):
        b = self.live.pop(id_)
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                self._remove(nb)
                if nb is b.prev:
                    nb.size += b.size
                    nb.next = b.next
                    if b.next:
                        b.next.prev = nb
                    b = nb
                else:
                    b.size += nb.size
                    b.next = nb.next
                    if nb.next:
                        nb.next.prev = b
        self._insert(b)

    def replay(self, events: list[Event]) -> int:
        for ev in events:
            if ev.op == "a":
                self.malloc(ev.id, ev.size, ev.stream)
            else:
                self.free(ev.id)
        return self.reserved_peak
