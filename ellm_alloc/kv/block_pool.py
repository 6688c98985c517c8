"""GroupBlockPool: one group's small pages, carved from large pages of the pool.

Block (small page) id = large page id * ratio + slot. A large page is mapped
when its first block is needed and goes back to the pool as soon as none of
its blocks is live or cached: that is how the KV cache deflates. A page whose
blocks are only cached (evictable prefix blocks) stays mapped but is marked
reclaimable in C++, so the torch arena can take it without calling Python;
`sync()` learns which pages were taken and forgets their cached blocks.

Placement is request-aware (Jenga): a request's blocks go to large pages
opened for it first, then to free slots anywhere, then to a fresh page from
the pool, and only then is a cached block evicted. Free slots go before fresh
pages because here a fresh page is not free: it is memory the torch arena
could use. Pages that end up sparsely used anyway (their other requests
finished) are packed by compaction: live blocks move into the free slots of
fuller pages and the emptied pages go back to the pool.
"""
from __future__ import annotations

from collections import OrderedDict

from ..errors import OutOfMemoryError
from .layout import KVGroup, PageLayout
from .space import PageSpace

# Eviction priority of a cached block: lower goes first.
EVICT_OUT_OF_WINDOW = 0
EVICT_TAIL = 1
EVICT_PREFIX = 2
NUM_PRIORITIES = 3


class NoFreeBlocks(Exception):
    """The group cannot place another block: pool exhausted and nothing evictable."""


class PageReclaimed(Exception):
    """A cached page was reclaimed by the pool between sync() and its use."""


class GroupBlockPool:
    def __init__(self, space: PageSpace, layout: PageLayout, group: KVGroup):
        self.space = space
        self.group = group
        self.ratio = layout.ratio(group)
        n = space.n_pages
        self.ref = [0] * (n * self.ratio)  # per block: requests holding it
        self.shared: set[int] = set()  # blocks with more than one holder
        self.block_hash: dict[int, int] = {}  # cached (hashed) blocks -> hash
        self.cached: dict[int, int] = {}  # hash -> block (the prefix cache of this group)
        self.evictable = [OrderedDict() for _ in range(NUM_PRIORITIES)]  # LRU per priority
        self.priority: dict[int, int] = {}  # evictable block -> priority
        self.page_free: dict[int, list[int]] = {}  # mapped page -> free slots
        self.page_live = [0] * n  # blocks with ref > 0
        self.page_cached = [0] * n  # blocks with ref == 0 still cached
        self.unmapped = list(range(n - 1, -1, -1))  # stack of never-used/returned page ids
        self.leftovers: set[int] = set()  # mapped pages with a free slot
        self.req_pages: dict[str, list[int]] = {}  # pages opened for a request
        self.evictions = 0
        self.max_pages: int | None = None  # a static partition's fixed size (benchmark baseline)

    # ---- mapping to the C++ side ---------------------------------------------

    def sync(self) -> None:
        """Forgets the cached blocks of pages the pool reclaimed behind our back."""
        for page in self.space.take_reclaimed():
            first = page * self.ratio
            for b in range(first, first + self.ratio):
                assert self.ref[b] == 0, "a reclaimed page held a live block"
                self._uncache(b)
            self.page_free.pop(page, None)
            self.page_cached[page] = 0
            self.leftovers.discard(page)
            self.unmapped.append(page)

    def _page_changed(self, page: int, stream: int = 0) -> None:
        """Puts a page's C++ state in line with its blocks."""
        if self.page_live[page]:
            return
        if self.page_cached[page] == 0:
            self.space.unmap(page, stream)
            del self.page_free[page]
            self.leftovers.discard(page)
            self.unmapped.append(page)
        else:
            prio = max(self.priority[b] for b in self._page_blocks(page) if b in self.priority)
            self.space.set_reclaimable(page, prio, stream)

    def _page_blocks(self, page: int) -> range:
        return range(page * self.ratio, (page + 1) * self.ratio)

    # ---- allocation ------------------------------------------------------------

    def allocate(self, request_id: str, n: int) -> list[int]:
        """n fresh blocks for request_id, placed request-aware; all or nothing."""
        got: list[int] = []
        try:
            for _ in range(n):
                got.append(self._allocate_one(request_id))
        except NoFreeBlocks:
            for b in got:
                self.release(b, cache_priority=None)
            raise
        return got

    def _allocate_one(self, request_id: str) -> int:
        while True:
            try:
                return self._place(request_id)
            except PageReclaimed:
                self.sync()

    def _place(self, request_id: str) -> int:
        own = self.req_pages.setdefault(request_id, [])
        for page in reversed(own):
            if self.page_free.get(page):
                return self._take_slot(page)
        if self.leftovers:
            page = min(self.leftovers)  # deterministic; low pages fill first
            return self._take_slot(page)
        page = self._fresh_page()
        if page is not None:
            own.append(page)
            return self._take_slot(page)
        b = self._evict_one()
        if b is None:
            raise NoFreeBlocks(f"group {self.group.group_id} ({self.group.kind}): no free or evictable block")
        return self._take_slot(b // self.ratio, slot=b % self.ratio)

    def _fresh_page(self) -> int | None:
        if not self.unmapped or (self.max_pages is not None and self.mapped_pages() >= self.max_pages):
            return None
        page = self.unmapped[-1]
        try:
            self.space.map(page)
        except OutOfMemoryError:
            self.sync()  # the failed acquire may have reclaimed our own pages
            return None
        self.unmapped.pop()
        self.page_free[page] = list(range(self.ratio - 1, -1, -1))
        self.leftovers.add(page)
        return page

    def _take_slot(self, page: int, slot: int | None = None) -> int:
        if self.page_live[page] == 0 and not self.space.pin(page):
            raise PageReclaimed(page)
        free = self.page_free[page]
        if slot is None:
            slot = free.pop()
        else:
            free.remove(slot)
        if not free:
            self.leftovers.discard(page)
        b = page * self.ratio + slot
        self.ref[b] = 1
        self.page_live[page] += 1
        return b

    def _evict_one(self) -> int | None:
        """Drops the cached block that matters least; returns its id (now free)."""
        for lru in self.evictable:
            if lru:
                b = next(iter(lru))  # least recently released
                page = b // self.ratio
                self._uncache(b)
                self.page_free[page].append(b % self.ratio)
                self.leftovers.add(page)
                self.evictions += 1
                return b
        return None

    # ---- compaction ----------------------------------------------------------------

    def plan_compaction(self) -> list[tuple[int, int]]:
        """Moves (live block, destination page) that empty the sparsest partly
        used pages into the free slots of the fullest ones. Only pages with no
        cached block take part, so the prefix cache is left as it is."""
        partly = [p for p, free in self.page_free.items()
                  if free and self.page_live[p] and not self.page_cached[p]]
        partly.sort(key=lambda p: (self.page_live[p], p))
        slots = {p: len(self.page_free[p]) for p in partly}
        moves: list[tuple[int, int]] = []
        lo, hi = 0, len(partly) - 1
        while lo < hi:
            src = partly[lo]
            if sum(slots[partly[k]] for k in range(lo + 1, hi + 1)) < self.page_live[src]:
                break  # the rest cannot empty another page
            for b in self._page_blocks(src):
                if self.ref[b] == 0:
                    continue
                while slots[partly[hi]] == 0:
                    hi -= 1
                moves.append((b, partly[hi]))
                slots[partly[hi]] -= 1
            lo += 1
        return moves

    def move_block(self, src: int, dst_page: int, copy) -> int:
        """Moves live block src into a free slot of dst_page: copy(src, dst)
        moves the bytes, then src's holders, hash and slot pass to dst. The
        caller rewrites block tables. Returns dst."""
        dst = self._take_slot(dst_page)
        copy(src, dst)
        self.ref[dst] = self.ref[src]
        if src in self.shared:
            self.shared.discard(src)
            self.shared.add(dst)
        h = self.block_hash.pop(src, None)
        if h is not None:
            self.block_hash[dst] = h
            if self.cached.get(h) == src:
                self.cached[h] = dst
        page = src // self.ratio
        self.ref[src] = 0
        self.page_live[page] -= 1
        self.page_free[page].append(src % self.ratio)
        self.leftovers.add(page)
        self._page_changed(page)
        return dst

    def evict(self, n: int) -> int:
        """Evicts up to n cached blocks (pages left empty go back to the pool)."""
        self.sync()  # pages another owner reclaimed since are gone already
        done = 0
        while done < n:
            b = self._evict_one()
            if b is None:
                break
            done += 1
            self._page_changed(b // self.ratio)
        return done

    # ---- references ------------------------------------------------------------

    def touch(self, b: int) -> None:
        """Another holder for block b (a prefix-cache hit or a fork). Raises
        PageReclaimed when its page was reclaimed since the last sync()."""
        page = b // self.ratio
        if self.ref[b] == 0:
            if self.page_live[page] == 0 and not self.space.pin(page):
                raise PageReclaimed(page)
            prio = self.priority.pop(b)
            del self.evictable[prio][b]
            self.page_cached[page] -= 1
            self.page_live[page] += 1
        self.ref[b] += 1
        if self.ref[b] == 2:
            self.shared.add(b)

    def release(self, b: int, cache_priority: int | None, stream: int = 0) -> None:
        """Drops one holder of block b. Once no holder is left the block stays
        cached (evictable, with that priority) if it has a hash, else it is free."""
        assert self.ref[b] > 0, f"block {b} released more often than held"
        self.ref[b] -= 1
        if self.ref[b] == 1:
            self.shared.discard(b)
        if self.ref[b]:
            return
        page = b // self.ratio
        self.page_live[page] -= 1
        if cache_priority is not None and b in self.block_hash:
            self.priority[b] = cache_priority
            self.evictable[cache_priority][b] = None
            self.page_cached[page] += 1
        else:
            self._uncache(b)
            self.page_free[page].append(b % self.ratio)
            self.leftovers.add(page)
        self._page_changed(page, stream)

    def forget_request(self, request_id: str) -> None:
        self.req_pages.pop(request_id, None)

    # ---- prefix cache ------------------------------------------------------------

    def cache(self, b: int, h: int) -> None:
        """Registers block b (full, live) under hash h unless h is cached already."""
        if h not in self.cached and b not in self.block_hash:
            self.cached[h] = b
            self.block_hash[b] = h

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)

    def _uncache(self, b: int) -> None:
        h = self.block_hash.pop(b, None)
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        prio = self.priority.pop(b, None)
        if prio is not None:
            del self.evictable[prio][b]
            self.page_cached[b // self.ratio] -= 1

    # ---- figures -------------------------------------------------------------------

    def num_evictable(self) -> int:
        return sum(len(lru) for lru in self.evictable)

    def num_free_slots(self) -> int:
        return sum(len(f) for f in self.page_free.values())

    def mapped_pages(self) -> int:
        return len(self.page_free)

    def live_blocks(self) -> int:
        return sum(self.page_live)

    def extra_holders(self) -> int:
        """Holders beyond the first, summed over shared blocks: how many block
        copies sharing saves."""
        return sum(self.ref[b] - 1 for b in self.shared)

    def check(self) -> None:
        """Asserts the pool's bookkeeping is consistent (tests call it after every step)."""
        for page, free in self.page_free.items():
            blocks = self._page_blocks(page)
            live = sum(1 for b in blocks if self.ref[b] > 0)
            cached = sum(1 for b in blocks if self.ref[b] == 0 and b in self.priority)
            assert live == self.page_live[page], (page, live, self.page_live[page])
            assert cached == self.page_cached[page], (page, cached, self.page_cached[page])
            assert live + cached + len(free) == self.ratio, (page, live, cached, free)
            assert len(set(free)) == len(free)
            assert (page in self.leftovers) == bool(free)
            assert live or cached, f"page {page} is mapped with nothing in it"
            state = self.space.state(page)
            # 0 is possible: reclaimed by the pool, not yet seen by sync().
            assert state in ((1,) if live else (2, 0)), (page, state, live, cached)
        for page in self.unmapped:
            assert page not in self.page_free and self.space.state(page) == 0
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        assert self.shared == {b for b, r in enumerate(self.ref) if r > 1}, "`shared` is not the blocks with 2+ holders"
