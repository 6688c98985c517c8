"""One manager per layer type: which blocks a request needs, which it may
drop as tokens advance, what a prefix-cache hit of L blocks requires, and
how much each cached block is worth keeping.

Every manager keeps, per request, a positional list of block ids: entry i
covers tokens [i*bs, (i+1)*bs), or None once it is out of the window. Every
entry from the first needed block to the end of the list is held (the
manager's check() asserts it), so finding what a step lacks scans nothing. A
Mamba manager updating states out of place also holds, per request, the
block its current step reads the state from (`read_blocks`).
"""
from __future__ import annotations

from .block_pool import EVICT_OUT_OF_WINDOW, EVICT_PREFIX, EVICT_TAIL, GroupBlockPool
from .layout import KVGroup


class SingleTypeManager:
    caches_prefix = True

    def __init__(self, group: KVGroup, pool: GroupBlockPool):
        self.group = group
        self.pool = pool
        self.bs = group.block_size
        self.req_blocks: dict[str, list[int | None]] = {}
        self.num_cached: dict[str, int] = {}  # leading blocks already offered to the prefix cache
        self.released_upto: dict[str, int] = {}  # blocks below this index were released
        # Request -> the block its step reads its state from, held for it
        # outside its table until its next call (see MambaManager).
        self.read_blocks: dict[str, int] = {}

    # -- what a request needs -----------------------------------------------------

    def first_needed_block(self, num_tokens: int) -> int:
        """Blocks before this index hold nothing the next token attends to."""
        return self.group.spec.first_needed_token(num_tokens) // self.bs

    def end_block(self, num_tokens: int) -> int:
        """One past the last block a request of num_tokens needs."""
        return -(-num_tokens // self.bs)

    def _missing(self, blocks: list[int | None], num_tokens: int) -> range:
        """Indices of the blocks num_tokens needs that the table lacks: past
        its end, as every entry from the first needed block on is held."""
        return range(max(self.first_needed_block(num_tokens), len(blocks)), self.end_block(num_tokens))

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        return len(self._missing(self.req_blocks.get(request_id, []), num_tokens))

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Allocates the missing blocks for num_tokens (all or nothing); returns them."""
        blocks = self.req_blocks.setdefault(request_id, [])
        missing = self._missing(blocks, num_tokens)
        if not missing:  # most decode steps
            return []
        new = self.pool.allocate(request_id, len(missing))
        blocks.extend([None] * (missing.start - len(blocks)))  # a window that moved past the table's end
        blocks.extend(new)
        return new

    def remove_skipped(self, request_id: str, num_tokens: int, stream: int = 0) -> int:
        """Releases blocks that fell out of the window; returns how many."""
        return self._release_before(request_id, self.first_needed_block(num_tokens), stream)

    def _release_before(self, request_id: str, end: int, stream: int) -> int:
        """Releases the request's blocks below index `end`, scanning only past
        the ones released before (a long request's decode step stays O(1))."""
        blocks = self.req_blocks.get(request_id, [])
        n = 0
        start = self.released_upto.get(request_id, 0)
        end = min(end, len(blocks))
        for i in range(start, end):
            if blocks[i] is not None:
                self.pool.release(blocks[i], EVICT_OUT_OF_WINDOW, stream)
                blocks[i] = None
                n += 1
        if end > start:
            self.released_upto[request_id] = end
        return n

    def idle_until(self, request_id: str, num_tokens: int) -> int:
        """A length up to which allocate() and remove_skipped() have nothing
        to do for the request, given its table after a step to num_tokens;
        num_tokens itself (no step known idle) unless a manager knows better."""
        return num_tokens

    def release_read_block(self, request_id: str, stream: int = 0) -> int:
        """Drops the request's hold on the block its last step read its state
        from; returns the blocks released (0 or 1). It goes as the state's old
        block would have gone without the hold: cached if it is a checkpoint."""
        b = self.read_blocks.pop(request_id, None)
        if b is None:
            return 0
        self.pool.release(b, EVICT_OUT_OF_WINDOW, stream)
        return 1

    # -- prefix caching --------------------------------------------------------------

    def hit_valid(self, hashes: list[int], num_blocks: int) -> bool:
        """Whether a hit of num_blocks full blocks gives this group what it needs."""
        start = self.first_needed_block(num_blocks * self.bs)
        return all(self.pool.lookup(hashes[i]) is not None for i in range(start, num_blocks))

    def apply_hit(self, request_id: str, hashes: list[int], num_blocks: int) -> None:
        """Takes the cached blocks a hit of num_blocks needs (raises PageReclaimed)."""
        blocks = self.req_blocks.setdefault(request_id, [None] * num_blocks)
        start = self.first_needed_block(num_blocks * self.bs)
        for i in range(start, num_blocks):
            b = self.pool.lookup(hashes[i])
            self.pool.touch(b)
            blocks[i] = b

    def cache_blocks(self, request_id: str, hashes: list[int], num_tokens: int) -> None:
        """Registers the request's newly full blocks in the prefix cache."""
        blocks = self.req_blocks.get(request_id, [])
        start = self.num_cached.get(request_id, 0)
        end = min(num_tokens // self.bs, len(blocks), len(hashes))
        for i in range(start, end):
            if blocks[i] is not None:
                self.pool.cache(blocks[i], hashes[i])
        self.num_cached[request_id] = max(start, end)

    def eviction_priority(self, index: int, prompt_blocks: int) -> int:
        return EVICT_TAIL

    # -- lifetime -------------------------------------------------------------------------

    def start_request(self, request_id: str, prompt_len: int) -> None:
        """A new request with a prompt of prompt_len tokens (before its hit)."""

    def free(self, request_id: str, prompt_blocks: int, stream: int = 0) -> None:
        """Releases every block, tail first, so the tail is the older LRU entry."""
        blocks = self.req_blocks.pop(request_id, [])
        self.num_cached.pop(request_id, None)
        self.released_upto.pop(request_id, None)
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i] is not None:
                prio = self.eviction_priority(i, prompt_blocks) if self.caches_prefix else None
                self.pool.release(blocks[i], prio, stream)
        self.pool.forget_request(request_id)


class FullAttentionManager(SingleTypeManager):
    """Keeps every token; a hit is the leading run of cached blocks. Prompt
    (prefix) blocks are the last to be evicted."""

    def first_needed_block(self, num_tokens: int) -> int:
        return 0

    def remove_skipped(self, request_id: str, num_tokens: int, stream: int = 0) -> int:
        return 0  # nothing falls out of the window

    def idle_until(self, request_id: str, num_tokens: int) -> int:
        return len(self.req_blocks.get(request_id, [])) * self.bs  # the table's blocks are all held

    def eviction_priority(self, index: int, prompt_blocks: int) -> int:
        return EVICT_PREFIX if index < prompt_blocks else EVICT_TAIL


class SlidingWindowManager(SingleTypeManager):
    """Keeps the last W tokens; a hit needs the cached blocks covering the
    window that ends at the hit."""


class ChunkedLocalManager(SingleTypeManager):
    """Keeps the current chunk of C tokens; a hit needs the blocks of the
    chunk the hit ends in."""


class MambaManager(SingleTypeManager):
    """Only the latest state is kept: one live block per request, updated in
    place by the model (out of place, a step also reads the old block when it
    has just left it, see below).

    Checkpoints. The state is saved for the prefix cache only at chosen block
    boundaries: the first boundary at or after the end of the prompt (what a
    follow-up turn, which extends this prompt and its output, hits) and every
    `checkpoint_blocks` blocks. When a request crosses a checkpoint it gets a
    fresh block for its state and the old block, holding the state at the
    checkpoint, stays cached. Between checkpoints the state's block just
    moves to the new position, uncached: no copy, no map, no unmap, whatever
    the state's size. A hit of L blocks needs the state saved at the end of
    block L-1, so hits land only on checkpoints. An old block that someone
    else holds (a fork, a prefix hit not yet moved past) must stay as it is,
    so it is left behind the same way.

    How the state reaches the fresh block depends on the model's kernels:

    * copy (out_of_place=False): allocate() copies it from the old block
      (stream-ordered on CUDA), for kernels that update a state in place;
    * out of place: nothing is copied. The request's hold on the old block
      passes from its table to `read_blocks`: its next step reads the state
      from there and writes the new one into the fresh block (kernels that
      take a read and a write state index). Held, the old block cannot be
      evicted and reused by another request's allocation before the step has
      read it; the hold is dropped at the request's next call.
    """

    def __init__(self, group: KVGroup, pool: GroupBlockPool, checkpoint_blocks: int = 1,
                 out_of_place: bool = False):
        super().__init__(group, pool)
        self.checkpoint_blocks = checkpoint_blocks
        self.out_of_place = out_of_place
        self.prompt_len: dict[str, int] = {}
        self.bytes_copied = 0  # state bytes copied at checkpoints (and for shared blocks)
        self.out_of_place_updates = 0  # steps told to read the state from an old block instead

    def start_request(self, request_id: str, prompt_len: int) -> None:
        self.prompt_len[request_id] = prompt_len

    def is_checkpoint(self, request_id: str, index: int) -> bool:
        """Whether the state at the end of block `index` is saved."""
        end = index + 1
        prompt_end = -(-self.prompt_len.get(request_id, 0) // self.bs)
        return end % self.checkpoint_blocks == 0 or end == prompt_end

    def cache_blocks(self, request_id: str, hashes: list[int], num_tokens: int) -> None:
        """Offers only checkpoint blocks to the prefix cache: the others are
        overwritten in place as the request goes on."""
        blocks = self.req_blocks.get(request_id, [])
        start = self.num_cached.get(request_id, 0)
        end = min(num_tokens // self.bs, len(blocks), len(hashes))
        for i in range(start, end):
            if blocks[i] is not None and self.is_checkpoint(request_id, i):
                self.pool.cache(blocks[i], hashes[i])
        self.num_cached[request_id] = max(start, end)

    def free(self, request_id: str, prompt_blocks: int, stream: int = 0) -> None:
        self.prompt_len.pop(request_id, None)
        super().free(request_id, prompt_blocks, stream)

    def first_needed_block(self, num_tokens: int) -> int:
        return (num_tokens - 1) // self.bs if num_tokens else 0

    def idle_until(self, request_id: str, num_tokens: int) -> int:
        """The end of the state's block, when the table ends there and
        nothing below it is held (what remove_skipped's early return checks)."""
        blocks = self.req_blocks.get(request_id, [])
        cur = self.first_needed_block(num_tokens)
        if cur == len(blocks) - 1 == self.released_upto.get(request_id, 0) and blocks[cur] is not None:
            return (cur + 1) * self.bs
        return num_tokens

    def _last_held(self, blocks: list[int | None]) -> int | None:
        return next((i for i in range(len(blocks) - 1, -1, -1) if blocks[i] is not None), None)

    def _moves_in_place(self, blocks: list[int | None], cur: int) -> bool:
        """Whether the state block reaches index cur by moving as it is."""
        if cur < len(blocks) and blocks[cur] is not None:
            return False
        last = self._last_held(blocks)
        return last is not None and self.pool.sole_uncached_holder(blocks[last])

    def _needs_new_block(self, blocks: list[int | None], cur: int) -> bool:
        held = cur < len(blocks) and blocks[cur] is not None
        return not held and not self._moves_in_place(blocks, cur)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        return int(self._needs_new_block(self.req_blocks.get(request_id, []), self.first_needed_block(num_tokens)))

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        blocks = self.req_blocks.setdefault(request_id, [])
        cur = self.first_needed_block(num_tokens)
        if not self._needs_new_block(blocks, cur):
            return []  # held already, or remove_skipped moves it once every group has its blocks
        (new,) = self.pool.allocate(request_id, 1)
        last = self._last_held(blocks)
        blocks.extend([None] * (cur + 1 - len(blocks)))
        blocks[cur] = new
        if last is not None and not self.out_of_place:  # copying: the state moves on to the fresh block now
            data, step, size = self.pool.space.bytes_view(), self.group.padded_small_bytes, self.group.small_page_bytes
            old = blocks[last]
            data[new * step:new * step + size].copy_(data[old * step:old * step + size])
            self.bytes_copied += size
        return [new]

    def remove_skipped(self, request_id: str, num_tokens: int, stream: int = 0) -> int:
        blocks = self.req_blocks.get(request_id, [])
        cur = self.first_needed_block(num_tokens)
        if self.released_upto.get(request_id, 0) == cur == len(blocks) - 1:
            return 0  # a step within the state's block (held, the table's last): nothing below it to let go
        if self._moves_in_place(blocks, cur):
            last = self._last_held(blocks)
            blocks.extend([None] * (cur + 1 - len(blocks)))
            blocks[cur], blocks[last] = blocks[last], None
        elif self.out_of_place:
            self._hold_for_reading(request_id, blocks, cur)
        return self._release_before(request_id, cur, stream)

    def _hold_for_reading(self, request_id: str, blocks: list[int | None], cur: int) -> None:
        """After allocate() gave the state a fresh block at cur, the old one
        below it becomes the block this step reads: the request's hold on it
        moves from its table to read_blocks. Blocks below released_upto are
        gone already, so a decode step scans none."""
        for i in range(cur - 1, self.released_upto.get(request_id, 0) - 1, -1):
            if blocks[i] is not None:
                self.read_blocks[request_id], blocks[i] = blocks[i], None
                self.out_of_place_updates += 1
                return

    def hit_valid(self, hashes: list[int], num_blocks: int) -> bool:
        return num_blocks == 0 or self.pool.lookup(hashes[num_blocks - 1]) is not None

    def apply_hit(self, request_id: str, hashes: list[int], num_blocks: int) -> None:
        blocks = self.req_blocks.setdefault(request_id, [None] * num_blocks)
        if num_blocks:
            b = self.pool.lookup(hashes[num_blocks - 1])
            self.pool.touch(b)
            blocks[num_blocks - 1] = b


class CrossAttentionManager(SingleTypeManager):
    """A fixed number of encoder tokens per request, allocated at admission.
    Not part of the token prefix: never constrains or takes a prefix hit."""

    caches_prefix = False

    def first_needed_block(self, num_tokens: int) -> int:
        return 0

    def end_block(self, num_tokens: int) -> int:
        return -(-self.group.spec.max_tokens // self.bs)

    def hit_valid(self, hashes: list[int], num_blocks: int) -> bool:
        return True

    def apply_hit(self, request_id: str, hashes: list[int], num_blocks: int) -> None:
        self.req_blocks.setdefault(request_id, [])

    def cache_blocks(self, request_id: str, hashes: list[int], num_tokens: int) -> None:
        pass


MANAGER_FOR_KIND = {
    "full": FullAttentionManager,
    "mla": FullAttentionManager,
    "sliding": SlidingWindowManager,
    "chunked": ChunkedLocalManager,
    "mamba": MambaManager,
    "cross": CrossAttentionManager,
}
