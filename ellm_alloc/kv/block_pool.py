"""GroupBlockPool: one group's small pages, carved from large pages of the pool.

Block (small page) id = large page id * ratio + slot. A large page is the unit
of placement and addressing, not of mapping: only the chunks under used
blocks (live or cached) are mapped, so a request alone in a large page holds
the chunks its blocks cover, not the whole page. A block may straddle a chunk
boundary (Mamba-2.8B's 13 MiB states sit two to a 26 MiB page and share the
middle chunk), so every chunk counts the live and the cached blocks over it:

    mapped     iff  live + cached > 0      (C++ may have reclaimed it since: see sync)
    pinned     iff  live > 0
    reclaimable iff live == 0 and cached > 0

A chunk that no used block covers goes back to the pool at once: that is how
the KV cache deflates. A reclaimable chunk (only evictable prefix blocks over
it) can be taken by the torch arena without calling Python; `sync()` learns
which chunks were taken and forgets the cached blocks over them.

Placement is request-aware (Jenga); a request's blocks go to the large page
opened for it last while it has a free slot. Beyond that, two policies:

* Own pages, in groups whose requests grow block by block (full, sliding,
  chunked, MLA), whose chunk holds at most MAX_RESERVED_BLOCKS_PER_CHUNK
  blocks and whose window keeps MIN_CHUNKS_KEPT chunks' worth of them: an
  orphan page (a free slot, and none of the requests it was opened for
  still running), which the request adopts, else a fresh page. Other
  running requests' free slots are left to their growth. A finishing
  request's pages then empty whole and nothing is copied to give its memory
  back; the price is each running request's last chunk, partly used (at
  most a chunk). Measured on `bench kv` chat: Qwen3-Next-like's attention
  blocks spread over other requests' pages needed 1,466 block copies (a
  quarter of its run) to reach utilisation 0.931; in pages of their own,
  0.942 with 9.
* Packed, elsewhere (a Mamba state is one block per request, cross-attention
  takes all its blocks at admission, and one request's tail chunk of tiny
  blocks or of a short window would hold more than the request): the
  fullest page with a free slot, else a fresh page. Free slots come first
  because a fresh page is not free: it is memory the torch arena could use;
  the fullest first so that sparse pages are left to empty as their
  requests finish.

When the pool is short: a free slot over mapped chunks, or the slot of an
evicted cached block; and if placement still fails for want of chunks, the
request's blocks are placed again the way chunks_needed() counts them
(cached blocks' slots, the cheapest free slots, fresh pages), which is what
can_allocate() promised. Pages that end up sparsely used anyway (packed
pages whose requests finished; in own-page groups, orphans) are packed by
compaction: live blocks move into the free slots of fuller pages when that
unmaps more chunks than it maps, pages that give back the most chunks per
block moved first. Own pages of running requests are left out of it.

Swap (the pool's host tier). A preempted request's blocks can move to host
memory chunk by chunk and come back at the same addresses, so block ids and
tables stay valid. Only a chunk whose every block is either held by that
request alone or free is swapped: a block shared with a running request (a
prefix hit, a fork) keeps its chunk resident, and so does a neighbour's block.
While a chunk is swapped its blocks stay live (their holder still holds them)
but are not resident:

    swapped    iff  chunk_swapped == SWAPPED (C++: swapping out or swapped)
    landing    iff  chunk_swapped == LANDING: swapped in, mapped, its copy
                    back maybe still running (until the manager's swap_done)
    a free slot over a swapped or landing chunk is "blocked": no block is
    placed there (the copy back would overwrite it)
    a swapped block has no prefix-cache hash (nobody may hit it); it gets it
    back once landed
    a page with a swapped or landing chunk is left out of compaction

A swapped block whose holder lets go is simply free, and its chunk's host
copy is dropped once no live block is left over it.

Demotion (a second-level prefix cache on the host tier). A cached block that
is evicted (trimming, the balloon, or room for a new block) goes to the host
tier instead when it is worth keeping (a prompt or output block, not one out
of its window) and the tier has room. It moves as a unit with every cached
block that shares one of its chunks, and only when no live block does:

    demoted   iff  in a unit: ref == 0, hash kept (lookups hit it), its
                   chunks swapped; its slot stays taken (same address)
    a hit on a demoted block promotes its unit: the chunks are swapped in,
    the bytes waited for, and its blocks are cached (evictable) again

Demoted units are dropped least recently demoted first when the tier needs
room for a newer one, and when the group runs out of address space.
"""
from __future__ import annotations

from collections import OrderedDict

from ..errors import AllocatorError, OutOfMemoryError
from .layout import KVGroup, PageLayout
from .space import PageSpace

# chunk_swapped values.
SWAPPED, LANDING = 1, 2

# Eviction priority of a cached block: lower goes first.
EVICT_OUT_OF_WINDOW = 0
EVICT_TAIL = 1
EVICT_PREFIX = 2
NUM_PRIORITIES = 3

# Compaction empties a page only when it gives back this many times the bytes
# its moves copy. Copies cost memory bandwidth (and on the host backend page
# faults on both sides); on the chat workload, Qwen3-Next-like moved 2,584
# blocks at 1 (utilisation 0.949) and 1,466 at 1.5 (0.931).
COMPACTION_RETURN = 1.5


# Own-page placement (see the top): kinds whose requests grow block by block,
# in groups whose chunk holds at most MAX_RESERVED_BLOCKS_PER_CHUNK blocks
# and whose window keeps at least MIN_CHUNKS_KEPT chunks' worth of them, so
# that a request's partly used last chunk is a small part of what it holds.
# Tiny blocks (few heads, few layers) or a short window (gpt-oss-20b-like's
# 128 tokens: 9 blocks, under two chunks) would leave a tail chunk holding
# more than the request; measured on `bench kv` multi_turn, that window in
# pages of its own: utilisation 0.873, packed 0.899 (0.926 with every group packed).
RESERVING_KINDS = ("full", "mla", "sliding", "chunked")
MAX_RESERVED_BLOCKS_PER_CHUNK = 16
MIN_CHUNKS_KEPT = 4


class NoFreeBlocks(Exception):
    """The group cannot place another block: pool exhausted and nothing evictable."""


class PageReclaimed(Exception):
    """A cached block's chunk was reclaimed by the pool between sync() and its use."""


class GroupBlockPool:
    def __init__(self, space: PageSpace, layout: PageLayout, group: KVGroup):
        chunk = layout.chunk_bytes
        self.space = space
        self.group = group
        self.ratio = layout.ratio(group)
        self.chunks_per_page = group.large_page_bytes // chunk
        self.chunk_bytes = chunk
        self.n_pages = n = space.n_pages // self.chunks_per_page
        step = group.padded_small_bytes
        # Chunks (offsets in the page) under each slot, and slots over each chunk.
        self.slot_chunks = [range(s * step // chunk, -(-(s + 1) * step // chunk)) for s in range(self.ratio)]
        self.chunk_slots = [[s for s, r in enumerate(self.slot_chunks) if c in r] for c in range(self.chunks_per_page)]
        self.ref = [0] * (n * self.ratio)  # per block: requests holding it
        self.shared: set[int] = set()  # blocks with more than one holder
        self.block_hash: dict[int, int] = {}  # cached (hashed) blocks -> hash
        self.cached: dict[int, int] = {}  # hash -> block (the prefix cache of this group)
        self.evictable = [OrderedDict() for _ in range(NUM_PRIORITIES)]  # LRU per priority
        self.priority: dict[int, int] = {}  # evictable block -> priority
        self.page_free: dict[int, list[int]] = {}  # open page (a block used) -> free slots
        self.page_live = [0] * n  # blocks with ref > 0
        self.page_cached = [0] * n  # blocks with ref == 0 still cached
        self.unmapped = list(range(n - 1, -1, -1))  # stack of pages with no used block
        self.leftovers: set[int] = set()  # open pages with a free slot
        # Own-first placement without scanning a long request's pages:
        self.req_pages: dict[str, dict[int, int]] = {}  # request -> {page opened for it: when, latest}
        self.openers: dict[int, set[str]] = {}  # page -> requests it was opened for
        self.own_free: dict[str, set[int]] = {}  # request -> its pages that have a free slot
        self.orphans: set[int] = set()  # open pages with a free slot and no running opener
        # Pages that may have a free slot over mapped chunks (a superset: a
        # page joins when it frees a slot or maps a chunk, and leaves when
        # _place_short finds it has none).
        self.mapped_free: set[int] = set()
        # Own pages or packed (see the top); tests set it to drive both.
        per_chunk = chunk // group.padded_small_bytes
        most_blocks = group.spec.tokens_kept(1 << 40) // group.block_size + 1
        self.reserve_own_pages = (group.kind in RESERVING_KINDS and per_chunk <= MAX_RESERVED_BLOCKS_PER_CHUNK
                                  and most_blocks >= MIN_CHUNKS_KEPT * max(per_chunk, 1))
        self.opened = 0
        n_chunks = n * self.chunks_per_page
        self.chunk_live = [0] * n_chunks  # live blocks over each chunk
        self.chunk_cached = [0] * n_chunks  # evictable blocks over each chunk
        self.chunk_mapped = bytearray(n_chunks)  # what we mapped and the pool has not (visibly) taken
        self.mapped_chunks = 0
        self.chunk_swapped = bytearray(n_chunks)  # 0, SWAPPED (in the host tier) or LANDING
        self.swapped_chunks = 0  # SWAPPED ones
        self.page_swapped = [0] * n  # swapped or landing chunks per page
        self.blocked: dict[int, set[int]] = {}  # page -> free slots over a swapped chunk
        self.swap_hashes: dict[int, int] = {}  # swapped block -> the hash it gives up meanwhile
        self.evictions = 0
        self.blocks_moved = 0  # by compaction (move_block)
        # Demoted units (see the module docstring): id -> (chunks, [(block, its
        # eviction priority)]), least recently demoted first.
        self.demote_enabled = False  # set by the manager (prefix caching on)
        self.units: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
        self.demoted_lru: OrderedDict[int, None] = OrderedDict()
        self.block_unit: dict[int, int] = {}  # demoted block -> its unit
        self.page_demoted = [0] * n  # demoted blocks per page
        self._next_unit = 0
        self.demotions = 0  # blocks
        self.promotions = 0  # blocks
        self.max_pages: int | None = None  # a static partition's fixed size (benchmark baseline)

    def block_chunks(self, b: int) -> range:
        """Chunks (space page ids) under block b."""
        page, slot = divmod(b, self.ratio)
        r = self.slot_chunks[slot]
        base = page * self.chunks_per_page
        return range(base + r.start, base + r.stop)

    # ---- mapping to the C++ side ---------------------------------------------

    def sync(self) -> None:
        """Forgets the cached blocks over chunks the pool reclaimed behind our back."""
        taken = self.space.take_reclaimed()
        if not taken:  # nearly always
            return
        for k in taken:  # all first: dropping a block below revisits its other chunks
            assert self.chunk_mapped[k] and not self.chunk_live[k], f"chunk {k}: reclaimed while live or unmapped"
            self.chunk_mapped[k] = 0
            self.mapped_chunks -= 1
        for k in taken:
            page, offset = divmod(k, self.chunks_per_page)
            for slot in self.chunk_slots[offset]:
                b = page * self.ratio + slot
                if b in self.priority:
                    self._uncache(b)
                    self._slot_freed(b)
                    self._chunks_changed(b)
            self._close_if_unused(page)

    def _chunk_changed(self, k: int, stream: int = 0) -> None:
        """Puts chunk k's C++ state in line with the blocks over it (once none is live)."""
        if self.chunk_live[k]:
            return
        if self.chunk_swapped[k]:  # nobody wants its host copy any more
            assert self.chunk_swapped[k] == SWAPPED, f"chunk {k}: let go of while landing"
            self.space.unmap(k, stream)
            self._unswapped(k)
            return
        if not self.chunk_mapped[k]:
            return
        if self.chunk_cached[k]:
            page, offset = divmod(k, self.chunks_per_page)
            prio = max(self.priority.get(page * self.ratio + s, 0) for s in self.chunk_slots[offset])
            self.space.set_reclaimable(k, prio, stream)  # False: reclaimed; sync() drops its blocks
        else:
            self.space.unmap(k, stream)  # False: reclaimed already, and now acknowledged
            self.chunk_mapped[k] = 0
            self.mapped_chunks -= 1

    def _chunks_changed(self, b: int, stream: int = 0) -> None:
        for k in self.block_chunks(b):
            self._chunk_changed(k, stream)

    def _pin_chunks(self, b: int) -> None:
        """Makes every chunk under b mapped and pinned, for b to become live.
        Raises OutOfMemoryError or PageReclaimed having undone its work."""
        chunks = self.block_chunks(b)
        try:
            run = None  # first of the unmapped chunks seen last, mapped together
            for k in chunks:
                if not self.chunk_mapped[k]:
                    run = k if run is None else run
                    continue
                if run is not None:
                    self._map_run(run, k)
                    run = None
                if not self.chunk_live[k] and not self.space.pin(k):
                    raise PageReclaimed(k)
            if run is not None:
                self._map_run(run, chunks.stop)
        except (OutOfMemoryError, PageReclaimed):
            for k in chunks:
                self._chunk_changed(k)  # reclaimable again, or unmapped
            raise

    def _map_run(self, lo: int, hi: int) -> None:
        self.space.map(lo, hi - lo)
        self.chunk_mapped[lo:hi] = b"\x01" * (hi - lo)
        self.mapped_free.add(lo // self.chunks_per_page)
        self.mapped_chunks += hi - lo

    def _slot_freed(self, b: int) -> None:
        page = b // self.ratio
        if self.page_swapped[page] and any(self.chunk_swapped[k] for k in self.block_chunks(b)):
            self.blocked.setdefault(page, set()).add(b % self.ratio)
            return
        self.page_free[page].append(b % self.ratio)
        self.mapped_free.add(page)
        self._has_free_slot(page)

    def _has_free_slot(self, page: int) -> None:
        if page not in self.leftovers:
            self.leftovers.add(page)
            openers = self.openers.get(page)
            if not openers:
                self.orphans.add(page)
            for rid in openers or ():
                self.own_free[rid].add(page)

    def _no_free_slot(self, page: int) -> None:
        self.leftovers.discard(page)
        self.orphans.discard(page)
        for rid in self.openers.get(page, ()):
            self.own_free[rid].discard(page)

    def _close_if_unused(self, page: int) -> None:
        """A page with no used block leaves the open pages (its chunks are unmapped)."""
        if page in self.page_free and not (self.page_live[page] or self.page_cached[page] or self.page_demoted[page]):
            del self.page_free[page]
            self._no_free_slot(page)
            self.unmapped.append(page)

    # ---- allocation ------------------------------------------------------------

    def allocate(self, request_id: str, n: int) -> list[int]:
        """n fresh blocks for request_id, placed request-aware; all or nothing."""
        self.sync()  # placement reads the chunks' states: forget the cached blocks the pool took
        try:
            return self._allocate_n(request_id, n, self._place)
        except NoFreeBlocks:
            room = self.space.pool.available_chunks(self.space.owner)
            if room >= n * max(len(r) for r in self.slot_chunks) or self.chunks_needed(n) > room:
                raise  # not for want of chunks (a failed map), or no placement fits either
        # Short of chunks: placement may have spent them where other free
        # slots needed fewer. Place as chunks_needed() counts, which
        # can_allocate() promised.
        return self._allocate_n(request_id, n, self._place_counted)

    def _allocate_n(self, request_id: str, n: int, place) -> list[int]:
        got: list[int] = []
        try:
            for _ in range(n):
                while True:
                    try:
                        got.append(place(request_id))
                        break
                    except PageReclaimed:
                        self.sync()
        except NoFreeBlocks:
            for b in got:
                self.release(b, cache_priority=None)
            raise
        return got

    def _place_counted(self, request_id: str) -> int:
        """The slot chunks_needed() counts on next: one that costs no chunk
        (a free slot over mapped chunks, a cached block's), else, while the
        pool has a chunk, the free slot with the fewest chunks to map, else a
        fresh page's."""
        try:
            b = self._place_short()
            if b is not None:
                return b
            if self.space.pool.available_chunks(self.space.owner):
                best = min(((self._slot_cost(p, s), p, s) for p in self.leftovers for s in self.page_free[p]),
                           default=None)
                if best is not None:
                    return self._take_slot(best[1], best[2])
                page = self._open_page(request_id)
                if page is not None:
                    return self._take_slot(page)
        except OutOfMemoryError:
            self.sync()  # the failed acquire may have reclaimed other groups' chunks
        raise NoFreeBlocks(f"group {self.group.group_id} ({self.group.kind}): the pool is short")

    def _slot_cost(self, page: int, slot: int) -> int:
        """Chunks under a free slot still to map."""
        r = self.slot_chunks[slot]
        base = page * self.chunks_per_page
        return self.chunk_mapped[base + r.start:base + r.stop].count(0)

    def _place(self, request_id: str) -> int:
        while True:
            no_page = False
            try:
                b = self._place_fresh(request_id)
                if b is not None:
                    return b
                no_page = True
            except OutOfMemoryError:
                self.sync()  # the failed acquire may have reclaimed other groups' chunks
                if self._demote_for_room():
                    continue
            b = self._place_short()
            if b is not None:
                return b
            # Out of address space, not memory: demoted blocks hold slots (each
            # pass demotes or drops something, so 2 x cached + demoted falls).
            if not (no_page and self.drop_demoted(1)):
                raise NoFreeBlocks(f"group {self.group.group_id} ({self.group.kind}): no free or evictable block")

    def _place_fresh(self, request_id: str) -> int | None:
        """A slot for the request's next block while the pool has chunks;
        None when the group has no page left to open. Its own pages come
        first (the one opened last). Then, packed: the fullest page with a
        free slot, else a fresh page. Own pages (see the module docstring):
        an orphan page, which it adopts, else a fresh page; other running
        requests' free slots are left to them (out of pages, any will do)."""
        own = self.own_free.get(request_id)
        if own:
            return self._take_slot(max(own, key=self.req_pages[request_id].__getitem__))
        if not self.reserve_own_pages:
            page = self._fullest(self.leftovers) if self.leftovers else self._open_page(request_id)
            return self._take_slot(page) if page is not None else None
        if self.orphans:
            page = self._fullest(self.orphans)
            b = self._take_slot(page)
            self._adopt(page, request_id)
            return b
        page = self._open_page(request_id)
        if page is None and self.leftovers:
            page = self._fullest(self.leftovers)
        return self._take_slot(page) if page is not None else None

    def _adopt(self, page: int, request_id: str) -> None:
        """Orphan `page` becomes request_id's own: its next blocks go there."""
        self.opened += 1
        self.req_pages.setdefault(request_id, {})[page] = self.opened
        self.openers[page] = {request_id}
        own = self.own_free.setdefault(request_id, set())
        if page in self.leftovers:
            own.add(page)
            self.orphans.discard(page)

    def _fullest(self, pages) -> int:
        """Of `pages` (open, with a free slot), the one with the fewest free
        slots (the lowest on ties): filling full pages first leaves sparse
        ones to empty by themselves as their requests finish, instead of
        spreading new blocks over them for compaction to move later."""
        free = self.page_free
        return min(pages, key=lambda p: (len(free[p]), p))

    def _place_short(self) -> int | None:
        """The pool is short: a free slot over mapped chunks costs nothing,
        nor does the slot of an evicted cached block."""
        while self.mapped_free:
            page = next(iter(self.mapped_free))
            slot = next((s for s in self.page_free.get(page, ()) if not self._slot_cost(page, s)), None)
            if slot is not None:
                return self._take_slot(page, slot)
            self.mapped_free.discard(page)  # stale: it is added again when it gets one
        b = self._evict_one()
        return None if b is None else self._take_slot(b // self.ratio, slot=b % self.ratio)

    def _open_page(self, request_id: str) -> int | None:
        if not self.unmapped or (self.max_pages is not None and self.mapped_pages() >= self.max_pages):
            return None
        page = self.unmapped.pop()
        self.page_free[page] = list(range(self.ratio - 1, -1, -1))
        self.opened += 1
        self.req_pages.setdefault(request_id, {})[page] = self.opened
        self.openers.setdefault(page, set()).add(request_id)
        self.own_free.setdefault(request_id, set())
        self._has_free_slot(page)
        return page

    def _cheapest_slot(self, page: int) -> int:
        """The free slot of `page` with the fewest chunks still to map."""
        free = self.page_free[page]
        if self.chunks_per_page == 1:
            return free[-1]
        return min(free, key=lambda s: (self._slot_cost(page, s), s))

    def _take_slot(self, page: int, slot: int | None = None) -> int:
        """Makes a free slot of `page` a live block. On OutOfMemoryError or
        PageReclaimed nothing changed, except that a page left unused closes."""
        if slot is None:
            slot = self._cheapest_slot(page)
        b = page * self.ratio + slot
        try:
            self._pin_chunks(b)
        except (OutOfMemoryError, PageReclaimed):
            self._close_if_unused(page)
            raise
        free = self.page_free[page]
        if free[-1] == slot:
            free.pop()
        else:
            free.remove(slot)
        if not free:
            self._no_free_slot(page)
        self.ref[b] = 1
        self.page_live[page] += 1
        for k in self.block_chunks(b):
            self.chunk_live[k] += 1
        return b

    def _least_valuable(self) -> tuple[int, int] | None:
        """The cached block to go first, with its priority."""
        for prio, lru in enumerate(self.evictable):
            if lru:
                return next(iter(lru)), prio  # least recently released
        return None

    def _evict_one(self) -> int | None:
        """Drops the cached block that matters least; returns its id, a free
        slot whose chunks are still mapped: the caller takes it or calls
        _chunks_changed."""
        found = self._least_valuable()
        if found is None:
            return None
        b = found[0]
        self._uncache(b)
        self._slot_freed(b)
        self.evictions += 1
        return b

    # ---- compaction ----------------------------------------------------------------

    def plan_compaction(self) -> tuple[list[tuple[int, int]], int]:
        """Moves (live block, destination page) that empty partly used pages
        into the free slots of the fullest ones, the pages with the fewest
        live blocks per mapped chunk first (the most memory back per byte
        copied), each page only when that unmaps more chunks than its blocks
        map at their destinations, by at least COMPACTION_RETURN times the
        bytes the moves copy; and
        the chunks the moves map (the pool must have them, since a page's
        chunks go only once all its blocks have moved). Only pages with no
        cached block take part, so the prefix cache is left as it is, and in
        own-page groups only orphans: a running request's pages fill as it
        grows."""
        partly = [p for p, free in self.page_free.items()
                  if free and self.page_live[p] and not self.page_cached[p] and not self.page_swapped[p]
                  and not (self.reserve_own_pages and p in self.openers)]
        partly.sort(key=self._blocks_per_mapped_chunk)
        free = {p: list(self.page_free[p]) for p in partly}
        to_map: set[int] = set()  # chunks the planned moves map
        moves: list[tuple[int, int]] = []
        lo, hi = 0, len(partly) - 1
        while lo < hi:
            src = partly[lo]
            if sum(len(free[partly[k]]) for k in range(lo + 1, hi + 1)) < self.page_live[src]:
                break  # the fuller pages left cannot take its blocks
            plan, new_chunks, h = [], set(), hi
            for b in self._page_blocks(src):
                if self.ref[b] == 0:
                    continue
                while not free[partly[h]]:
                    h -= 1
                dst = partly[h]
                planned = to_map | new_chunks
                slot = min(free[dst], key=lambda s: (len(self._chunks_to_map(dst, s, planned)), s))
                free[dst].remove(slot)
                new_chunks.update(self._chunks_to_map(dst, slot, to_map))
                plan.append((b, dst, slot))
            freed = sum(1 for k in range(src * self.chunks_per_page, (src + 1) * self.chunks_per_page)
                        if self.chunk_mapped[k])
            # Worth it only when the page gives back COMPACTION_RETURN times
            # the bytes the moves copy: a page of a few large blocks (recurrent
            # states of many layers) would otherwise copy megabytes to return
            # one chunk.
            copied = len(plan) * self.group.small_page_bytes
            if freed <= len(new_chunks) or (freed - len(new_chunks)) * self.chunk_bytes < COMPACTION_RETURN * copied:
                for _, dst, slot in plan:
                    free[dst].append(slot)
                break  # the pages after it give back less per block moved
            moves.extend((b, dst) for b, dst, _ in plan)
            to_map |= new_chunks
            hi = h
            lo += 1
        return moves, len(to_map)

    def _blocks_per_mapped_chunk(self, page: int) -> tuple[float, int]:
        """Compaction's order: live blocks to move per chunk emptying `page`
        unmaps (then the page id, for determinism)."""
        base = page * self.chunks_per_page
        mapped = self.chunk_mapped[base:base + self.chunks_per_page].count(1)
        return self.page_live[page] / max(mapped, 1), page

    def _chunks_to_map(self, page: int, slot: int, planned: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Chunks under a free slot still to map (beyond those `planned`)."""
        return [k for k in self.block_chunks(page * self.ratio + slot) if not self.chunk_mapped[k] and k not in planned]

    def _page_blocks(self, page: int) -> range:
        return range(page * self.ratio, (page + 1) * self.ratio)

    def move_block(self, src: int, dst_page: int, copy) -> int:
        """Moves live block src into a free slot of dst_page: copy(src, dst)
        moves the bytes, then src's holders, hash and slot pass to dst. The
        caller rewrites block tables. Returns dst; raises OutOfMemoryError
        (nothing moved) when dst's chunks cannot be mapped."""
        dst = self._take_slot(dst_page)
        copy(src, dst)
        self.blocks_moved += 1
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
        self._slot_freed(src)
        for k in self.block_chunks(src):
            self.chunk_live[k] -= 1
            self._chunk_changed(k)
        self._close_if_unused(page)
        return dst

    def evict(self, n: int) -> int:
        """Takes up to n cached blocks off the device, least valuable first:
        demoted to the host tier when worth keeping and it has room, else
        evicted. Either way their chunks are back in the pool on return: the
        balloon asks for memory it needs now."""
        self.sync()  # chunks another owner reclaimed since are gone already
        done = demoted = 0
        while done < n:
            found = self._least_valuable()
            if found is None:
                break
            moved = self._demote(found[0]) if self._worth_demoting(found[1]) else 0
            if moved:
                done += moved
                demoted += moved
                continue
            b = self._evict_one()  # the same block, unless a failed demotion's sync() dropped it
            done += 1
            self._chunks_changed(b)
            self._close_if_unused(b // self.ratio)
        if demoted:
            self.space.finish_swaps(wait=True)  # the copies out end; their device chunks go back
        return done

    # ---- references ------------------------------------------------------------

    def touch(self, b: int) -> None:
        """Another holder for block b (a prefix-cache hit or a fork); a
        demoted b is promoted first. Raises PageReclaimed when a chunk under
        it was reclaimed since the last sync(), or it could not be promoted."""
        if b in self.block_unit:
            self._promote(b)
        if self.ref[b] == 0:
            self._pin_chunks(b)
            prio = self.priority.pop(b)
            del self.evictable[prio][b]
            page = b // self.ratio
            self.page_cached[page] -= 1
            self.page_live[page] += 1
            for k in self.block_chunks(b):
                self.chunk_cached[k] -= 1
                self.chunk_live[k] += 1
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
        self.swap_hashes.pop(b, None)  # a swapped block let go of keeps no hash
        cache = cache_priority is not None and b in self.block_hash
        if cache:
            self.priority[b] = cache_priority
            self.evictable[cache_priority][b] = None
            self.page_cached[page] += 1
        else:
            self._uncache(b)
            self._slot_freed(b)
        for k in self.block_chunks(b):
            self.chunk_live[k] -= 1
            self.chunk_cached[k] += cache
            self._chunk_changed(k, stream)
        self._close_if_unused(page)

    def forget_request(self, request_id: str) -> None:
        for page in self.req_pages.pop(request_id, {}):
            holders = self.openers[page]
            holders.discard(request_id)
            if not holders:
                del self.openers[page]
                if page in self.leftovers:
                    self.orphans.add(page)
        self.own_free.pop(request_id, None)

    # ---- prefix cache ------------------------------------------------------------

    def cache(self, b: int, h: int) -> None:
        """Registers block b (full, live) under hash h unless h is cached already."""
        if h not in self.cached and b not in self.block_hash:
            self.cached[h] = b
            self.block_hash[b] = h

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)

    def sole_uncached_holder(self, b: int) -> bool:
        """Whether one request holds b and the prefix cache does not: once
        that request lets go, b is simply free."""
        return self.ref[b] == 1 and b not in self.block_hash

    def _uncache(self, b: int) -> None:
        """Forgets b's hash; an evictable b stops being cached (its chunks'
        counts drop, their C++ state is the caller's to update)."""
        h = self.block_hash.pop(b, None)
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        prio = self.priority.pop(b, None)
        if prio is not None:
            del self.evictable[prio][b]
            self.page_cached[b // self.ratio] -= 1
            for k in self.block_chunks(b):
                self.chunk_cached[k] -= 1

    # ---- swap to the host tier --------------------------------------------------------

    def swappable_chunks(self, blocks: list[int]) -> list[int]:
        """Chunks under `blocks` (one request's, each held by it alone) that
        can go to the host tier: mapped, and every block over them one of
        `blocks` or free."""
        mine = set(blocks)
        out: list[int] = []
        seen: set[int] = set()
        for b in blocks:
            page = b // self.ratio
            for k in self.block_chunks(b):
                if k in seen:
                    continue
                seen.add(k)
                if not self.chunk_mapped[k] or self.chunk_cached[k]:
                    continue
                offset = k - page * self.chunks_per_page
                if all(page * self.ratio + s in mine or self._is_free(page * self.ratio + s)
                       for s in self.chunk_slots[offset]):
                    out.append(k)
        return sorted(out)

    def _is_free(self, b: int) -> bool:
        return self.ref[b] == 0 and b not in self.priority and b not in self.block_unit

    def swap_out(self, chunks: list[int], blocks: list[int], stream: int = 0) -> None:
        """Moves `chunks` (from swappable_chunks(blocks)) to the host tier.
        All or nothing: OutOfMemoryError (host tier full) or a copy failure
        leaves everything resident."""
        if not chunks:
            return
        self.space.swap_out(chunks, stream)
        for k in chunks:
            self.chunk_mapped[k] = 0
            self.mapped_chunks -= 1
        self._mark_swapped(chunks)
        swapped = set(chunks)
        for b in blocks:
            h = self.block_hash.get(b)
            if h is not None and any(k in swapped for k in self.block_chunks(b)):
                self._uncache(b)
                self.swap_hashes[b] = h

    def _mark_swapped(self, chunks: list[int]) -> None:
        """`chunks` went to the host tier: no block may be placed over them."""
        for k in chunks:
            was = self.chunk_swapped[k]
            self.chunk_swapped[k] = SWAPPED
            self.swapped_chunks += 1
            if was:  # landing (a swap-in backed out): counted, its slots blocked
                continue
            page, offset = divmod(k, self.chunks_per_page)
            self.page_swapped[page] += 1
            free = self.page_free[page]
            for slot in self.chunk_slots[offset]:
                if slot in free:
                    free.remove(slot)
                    self.blocked.setdefault(page, set()).add(slot)
            if not free:
                self._no_free_slot(page)

    def swap_in(self, chunks: list[int], stream: int = 0) -> None:
        """Maps fresh chunks under swapped `chunks` at their addresses and
        queues the copies back; they are landing until landed(). All or
        nothing: OutOfMemoryError when the pool cannot give them."""
        if not chunks:
            return
        self.space.swap_in(chunks, stream)
        for k in chunks:
            self.chunk_swapped[k] = LANDING
            self.swapped_chunks -= 1
            self.chunk_mapped[k] = 1
            self.mapped_chunks += 1

    def landed(self, chunks: list[int]) -> None:
        """The copies back under `chunks` are done, or ordered before any later
        use: their free slots take blocks again, their blocks get their
        prefix hashes back, their pages may be compacted."""
        for k in chunks:
            assert self.chunk_swapped[k] == LANDING, f"chunk {k} is not landing"
            self._unswapped(k)
        for k in chunks:
            page = k // self.chunks_per_page
            for slot in self.chunk_slots[k % self.chunks_per_page]:
                b = page * self.ratio + slot
                h = self.swap_hashes.get(b)
                if h is not None and not any(self.chunk_swapped[c] for c in self.block_chunks(b)):
                    del self.swap_hashes[b]
                    self.cache(b, h)

    def _unswapped(self, k: int) -> None:
        """Chunk k is no longer swapped nor landing: its blocked free slots
        whose chunks are all resident (or unbacked) can take blocks again."""
        if self.chunk_swapped[k] == SWAPPED:
            self.swapped_chunks -= 1
        self.chunk_swapped[k] = 0
        page, offset = divmod(k, self.chunks_per_page)
        self.page_swapped[page] -= 1
        blocked = self.blocked.get(page)
        for slot in self.chunk_slots[offset]:
            b = page * self.ratio + slot
            if not any(self.chunk_swapped[c] for c in self.block_chunks(b)):
                if blocked and slot in blocked:
                    blocked.discard(slot)
                    self.page_free[page].append(slot)
                    self.mapped_free.add(page)
                    self._has_free_slot(page)
        if blocked is not None and not blocked:
            del self.blocked[page]

    # ---- second-level prefix cache: demotion to the host tier ----------------------------

    def _worth_demoting(self, priority: int) -> bool:
        # A block out of its window is never hit again; without a host tier there is nowhere to go.
        return self.demote_enabled and priority >= EVICT_TAIL and self.space.pool.cpu_budget() > 0

    def _demotion_unit(self, b: int) -> tuple[list[int], list[int]] | None:
        """The chunks under cached block b and every cached block sharing one
        of them, transitively: what must move together. None when a live
        block or an unmapped chunk is among them (then b is evicted instead)."""
        blocks, chunks = [b], []
        seen_blocks, seen_chunks = {b}, set()
        i = 0
        while i < len(blocks):
            for k in self.block_chunks(blocks[i]):
                if k in seen_chunks:
                    continue
                if self.chunk_live[k] or not self.chunk_mapped[k]:
                    return None
                seen_chunks.add(k)
                chunks.append(k)
                page, offset = divmod(k, self.chunks_per_page)
                for slot in self.chunk_slots[offset]:
                    other = page * self.ratio + slot
                    if other in self.priority and other not in seen_blocks:
                        seen_blocks.add(other)
                        blocks.append(other)
            i += 1
        return sorted(chunks), blocks

    def _demote(self, b: int) -> int:
        """Moves cached block b's unit to the host tier, dropping the least
        recently demoted units for room; returns the blocks demoted, 0
        (nothing changed) when it cannot: a live neighbour, no host room, a
        failed copy, or a chunk the pool just reclaimed."""
        unit = self._demotion_unit(b)
        if unit is None:
            return 0
        chunks, blocks = unit
        while True:
            try:
                self.space.swap_out(chunks)
                break
            except OutOfMemoryError:
                if not self.drop_demoted(1):
                    return 0  # the tier is full of other owners' chunks, or off
            except (ValueError, RuntimeError, AllocatorError):
                self.sync()  # a chunk reclaimed meanwhile, or a failed copy: evicting loses a cache entry only
                return 0
        uid = self._next_unit
        self._next_unit += 1
        self.units[uid] = (chunks, [(blk, self.priority[blk]) for blk in blocks])
        self.demoted_lru[uid] = None
        for blk in blocks:
            prio = self.priority.pop(blk)
            del self.evictable[prio][blk]
            page = blk // self.ratio
            self.page_cached[page] -= 1
            self.page_demoted[page] += 1
            self.block_unit[blk] = uid
            for k in self.block_chunks(blk):
                self.chunk_cached[k] -= 1
        for k in chunks:
            self.chunk_mapped[k] = 0
            self.mapped_chunks -= 1
        self._mark_swapped(chunks)
        self.demotions += len(blocks)
        return len(blocks)

    def _demote_for_room(self) -> bool:
        """Demotes the least valuable cached unit, if worth keeping, and waits
        for its chunks to go back to the pool."""
        found = self._least_valuable()
        if found is None or not self._worth_demoting(found[1]) or not self._demote(found[0]):
            return False
        self.space.finish_swaps(wait=True)
        return True

    def _promote(self, b: int) -> None:
        """Brings demoted block b's unit back: its blocks are cached again at
        their addresses, their bytes landed (the hit reads them next). When
        the pool has no chunks for it the unit is dropped instead and
        PageReclaimed raised: the hit is lost, as if it had been evicted."""
        uid = self.block_unit[b]
        chunks, blocks = self.units[uid]
        try:
            self.space.swap_in(chunks)
        except OutOfMemoryError:
            self._drop_unit(uid)
            raise PageReclaimed(chunks[0]) from None
        self.space.swap_wait(chunks)
        del self.units[uid], self.demoted_lru[uid]
        for k in chunks:
            self._unswapped(k)
            self.chunk_mapped[k] = 1
            self.mapped_chunks += 1
        for blk, prio in blocks:
            del self.block_unit[blk]
            page = blk // self.ratio
            self.page_demoted[page] -= 1
            self.page_cached[page] += 1
            self.priority[blk] = prio
            self.evictable[prio][blk] = None
            for k in self.block_chunks(blk):
                self.chunk_cached[k] += 1
        for k in chunks:
            self._chunk_changed(k)  # reclaimable, as cached chunks are; their host chunks go back
        self.promotions += len(blocks)

    def drop_demoted(self, n_units: int = 1) -> int:
        """Forgets the n least recently demoted units (their host copies go
        back to the tier); returns the host chunks given back."""
        freed = 0
        for uid in list(self.demoted_lru)[:n_units]:
            freed += len(self.units[uid][0])
            self._drop_unit(uid)
        return freed

    def _drop_unit(self, uid: int) -> None:
        chunks, blocks = self.units.pop(uid)
        del self.demoted_lru[uid]
        for k in chunks:
            self.space.unmap(k)  # a swapped page: its host copy is dropped
            self._unswapped(k)
        for blk, _ in blocks:  # after every chunk: their slots are free, not blocked
            del self.block_unit[blk]
            h = self.block_hash.pop(blk)
            if self.cached.get(h) == blk:
                del self.cached[h]
            self.page_demoted[blk // self.ratio] -= 1
            self._slot_freed(blk)
        for page in {blk // self.ratio for blk, _ in blocks}:
            self._close_if_unused(page)

    def demoted_blocks(self) -> int:
        return len(self.block_unit)

    def demoted_chunks(self) -> int:
        return sum(len(chunks) for chunks, _ in self.units.values())

    # ---- figures -------------------------------------------------------------------

    def num_evictable(self) -> int:
        return sum(len(lru) for lru in self.evictable)

    def num_free_slots(self) -> int:
        return sum(len(f) for f in self.page_free.values())

    def mapped_pages(self) -> int:
        """Open large pages: those with a used block."""
        return len(self.page_free)

    def chunks_needed(self, n: int) -> int:
        """Chunks the pool must still give for n more blocks of this group:
        evictable blocks first, then free slots cheapest first, then fresh pages."""
        n -= self.num_evictable()
        if n <= 0:
            return 0
        if self.chunks_per_page == 1:  # an open page's one chunk is mapped: its free slots cost nothing
            n -= self.num_free_slots()
            return -(-n // self.ratio) if n > 0 else 0
        costs = sorted((self._slot_cost(p, s), p, s) for p, free in self.page_free.items() for s in free)
        chunks: set[int] = set()
        for _, p, s in costs[:n]:
            chunks.update(self._chunks_to_map(p, s))
        whole, rest = divmod(n - min(n, len(costs)), self.ratio)
        # A fresh page's first `rest` slots cover its chunks up to the end of slot rest - 1.
        return len(chunks) + whole * self.chunks_per_page + (self.slot_chunks[rest - 1].stop if rest else 0)

    def live_blocks(self) -> int:
        return sum(self.page_live)

    def extra_holders(self) -> int:
        """Holders beyond the first, summed over shared blocks: how many block
        copies sharing saves."""
        return sum(self.ref[b] - 1 for b in self.shared)

    def check(self) -> None:
        """Asserts the pool's bookkeeping is consistent (tests call it after every step)."""
        live_over = [0] * len(self.chunk_live)
        cached_over = [0] * len(self.chunk_live)
        for page, free in self.page_free.items():
            blocks = self._page_blocks(page)
            live = sum(1 for b in blocks if self.ref[b] > 0)
            cached = sum(1 for b in blocks if self.ref[b] == 0 and b in self.priority)
            assert live == self.page_live[page], (page, live, self.page_live[page])
            assert cached == self.page_cached[page], (page, cached, self.page_cached[page])
            demoted = sum(1 for b in blocks if b in self.block_unit)
            assert demoted == self.page_demoted[page], (page, demoted, self.page_demoted[page])
            blocked = self.blocked.get(page, set())
            assert live + cached + demoted + len(free) + len(blocked) == self.ratio, \
                (page, live, cached, demoted, free, blocked)
            assert len(set(free)) == len(free) and not blocked & set(free)
            for slot in blocked:
                assert any(self.chunk_swapped[k] for k in self.block_chunks(page * self.ratio + slot)), (page, slot)
            assert (page in self.leftovers) == bool(free)
            assert live or cached or demoted, f"page {page} is open with nothing in it"
            for b in blocks:
                for k in self.block_chunks(b):
                    live_over[k] += self.ref[b] > 0
                    cached_over[k] += self.ref[b] == 0 and b in self.priority
        assert live_over == self.chunk_live and cached_over == self.chunk_cached, "chunk counts drifted"
        for rid, pages in self.req_pages.items():
            assert self.own_free[rid] == {p for p in pages if p in self.leftovers}, rid
        assert self.orphans == {p for p in self.leftovers if not self.openers.get(p)}, "orphans drifted"
        for page, free in self.page_free.items():
            if any(not self._slot_cost(page, s) for s in free):
                assert page in self.mapped_free, f"page {page} has a free slot over mapped chunks, unlisted"
        demoted_chunks: set[int] = set()
        for uid, (chunks, blocks) in self.units.items():
            assert uid in self.demoted_lru and not demoted_chunks & set(chunks), uid
            demoted_chunks.update(chunks)
            for b, prio in blocks:
                assert self.block_unit[b] == uid and self.ref[b] == 0 and b not in self.priority, b
                assert self.cached[self.block_hash[b]] == b, f"demoted block {b} lost its hash"
                assert set(self.block_chunks(b)) <= set(chunks), (b, chunks)
        assert len(self.demoted_lru) == len(self.units)
        assert sum(len(blocks) for _, blocks in self.units.values()) == len(self.block_unit)
        for k, mapped in enumerate(self.chunk_mapped):
            state = self.space.state(k)
            if self.chunk_swapped[k] == SWAPPED:  # 4 swapping out, 5 swapped; a request's or a demoted unit's
                assert not mapped and not self.chunk_cached[k] and state in (4, 5), (k, mapped, state)
                assert bool(self.chunk_live[k]) != (k in demoted_chunks), (k, self.chunk_live[k])
            elif self.chunk_live[k]:
                assert mapped and state in (1, 6), (k, mapped, state)  # 6: swapping in
            elif self.chunk_swapped[k] == LANDING:
                raise AssertionError(f"chunk {k} is landing with no live block over it")
            elif self.chunk_cached[k]:
                # 0 is possible: reclaimed by the pool, not yet seen by sync().
                assert mapped and state in (2, 0), (k, mapped, state)
            else:
                assert not mapped and state == 0, f"chunk {k} is mapped with nothing over it"
        assert self.mapped_chunks == sum(self.chunk_mapped)
        assert self.swapped_chunks == self.chunk_swapped.count(SWAPPED)
        for page in range(self.n_pages):
            base = page * self.chunks_per_page
            assert self.page_swapped[page] == sum(1 for v in self.chunk_swapped[base:base + self.chunks_per_page] if v)
        for b in self.swap_hashes:
            assert self.ref[b] and any(self.chunk_swapped[k] for k in self.block_chunks(b)), b
        for page in self.unmapped:
            assert page not in self.page_free
        assert len(self.unmapped) + len(self.page_free) == self.n_pages
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        assert self.shared == {b for b, r in enumerate(self.ref) if r > 1}, "`shared` is not the blocks with 2+ holders"
