"""Plain VA-first best fit, the reference the arena is measured against.

One unbounded VA range; every block (sizes rounded to 512 B, no size classes,
no caches, no streams) goes at the low end of the smallest free segment that
fits, lowest address first; freed blocks coalesce with free neighbours; a
chunk counts as mapped while any live byte lies in it. The arena adds slabs,
per-stream caches and fences on top of this placement; its fragmentation on a
trace should match this model's, which is what "caching does not lose the
VA-first advantage" means in figures.
"""
from __future__ import annotations

import bisect

from .trace import Event

ALIGN = 512


class BestFitModel:
    def __init__(self, chunk_bytes: int = 2 << 20):
        self.chunk = chunk_bytes
        self.by_addr: dict[int, int] = {0: 1 << 62}  # free segments: start -> size
        self.by_end: dict[int, int] = {1 << 62: 0}  # free segments: end -> start
        self.by_size: list[tuple[int, int]] = [(1 << 62, 0)]  # sorted (size, start)
        self.users: dict[int, int] = {}  # chunk index -> live blocks over it
        self.mapped = self.mapped_peak = 0

    def _remove(self, start: int) -> int:
        size = self.by_addr.pop(start)
        del self.by_end[start + size]
        del self.by_size[bisect.bisect_left(self.by_size, (size, start))]
        return size

    def _insert(self, start: int, size: int) -> None:
        self.by_addr[start] = size
        self.by_end[start + size] = start
        bisect.insort(self.by_size, (size, start))

    def malloc(self, size: int) -> int:
        n = -(-size // ALIGN) * ALIGN
        seg_size, start = self.by_size[bisect.bisect_left(self.by_size, (n, -1))]
        self._remove(start)
        if seg_size > n:
            self._insert(start + n, seg_size - n)
        for c in range(start // self.chunk, (start + n - 1) // self.chunk + 1):
            u = self.users.get(c, 0)
            self.mapped += u == 0
            self.users[c] = u + 1
        self.mapped_peak = max(self.mapped_peak, self.mapped)
        return start

    def free(self, start: int, size: int) -> None:
        n = -(-size // ALIGN) * ALIGN
        for c in range(start // self.chunk, (start + n - 1) // self.chunk + 1):
            self.users[c] -= 1
            if self.users[c] == 0:
                del self.users[c]
                self.mapped -= 1
        end = start + n
        if end in self.by_addr:  # free neighbour above
            n += self._remove(end)
        if start in self.by_end:  # free neighbour below
            below = self.by_end[start]
            n += self._remove(below)
            start = below
        self._insert(start, n)

    def replay(self, events: list[Event]) -> int:
        """Peak mapped bytes over the trace."""
        live: dict[int, tuple[int, int]] = {}
        for ev in events:
            if ev.op == "a":
                live[ev.id] = (self.malloc(ev.size), ev.size)
            else:
                self.free(*live.pop(ev.id))
        return self.mapped_peak * self.chunk
