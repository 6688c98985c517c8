"""KVCacheManager: the KV cache of one model on the shared chunk pool.

The scheduler-facing API, in the spirit of vLLM v1's kv_cache_manager:

    mgr = KVCacheManager(model_spec, pool, block_size=16)
    hit = mgr.add_request("r1", prompt_token_ids)      # prefix-cache hit, in tokens
    if mgr.can_allocate("r1", len(prompt) - hit):
        mgr.allocate_slots("r1", len(prompt) - hit)
    ...                                                # one decode step:
    mgr.allocate_slots("r1", 1, new_token_ids=[tok])
    mgr.free("r1")

Each group of identical layers has its own VA range of large pages (a
PageSpace, one owner of the pool), its GroupBlockPool and its single-type
manager. Allocation is all-or-nothing across groups: a failure rolls back
every block it took.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import torch

from ..errors import OutOfMemoryError
from ..pool import Pool
from .block_pool import GroupBlockPool, NoFreeBlocks, PageReclaimed
from .layout import KVGroup, PageLayout, plan_layout
from .single_type import MANAGER_FOR_KIND, MambaManager, SingleTypeManager
from .space import PageSpace
from .spec import ModelKVSpec

#: Default tokens between saved recurrent states (see KVCacheManager).
DEFAULT_STATE_CHECKPOINT_TOKENS = 512
#: How the model's kernels update a recurrent state (see KVCacheManager).
STATE_UPDATES = ("copy", "out_of_place")


def chain_hashes(token_ids: list[int], block_size: int, extra_keys: tuple = (), start: int = 0,
                 parents: list[int] | None = None) -> list[int]:
    """Hash of every full block, chained: block i's hash covers tokens
    [0, (i+1)*bs) and the extra keys (e.g. image ids), so equal hashes mean
    equal prefixes. 128-bit BLAKE2b: a collision would hand a request another
    prompt's KV, so a cheap 64-bit hash is not enough. `parents` extends an
    earlier list from block `start`."""
    out = list(parents or [])
    prev = (out[-1].to_bytes(16, "little") if out
            else hashlib.blake2b(repr(extra_keys).encode(), digest_size=16).digest())
    for i in range(start, len(token_ids) // block_size):
        chunk = token_ids[i * block_size:(i + 1) * block_size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(chunk)}q", *chunk), digest_size=16).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


@dataclass
class RequestState:
    request_id: str
    token_ids: list[int]
    extra_keys: tuple = ()
    num_tokens: int = 0  # tokens with a KV slot
    prompt_len: int = 0
    hashes: list[int] = field(default_factory=list)
    offered_blocks: int = 0  # leading full blocks offered to the prefix cache so far
    hit_tokens: int = 0
    # Every group holds what a length up to this needs and drops nothing
    # before it (min of the managers' idle_until at the last allocation).
    idle_until: int = 0
    # Swap: None (resident), OUT (swapping out or swapped) or IN (swapping in);
    # the chunks of each group in the host tier or on their way back.
    swap: str | None = None
    swap_chunks: list[list[int]] = field(default_factory=list)


SWAP_OUT, SWAP_IN = "out", "in"


class KVCacheManager:
    def __init__(
        self,
        model: ModelKVSpec,
        pool: Pool,
        block_size: int = 16,
        max_large_page_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        name: str = "kv",
        capacity_bytes: int | None = None,
        max_cached_fraction: float = 0.02,
        uniform_pages: bool = False,
        static_shares: dict[int, float] | None = None,
        compact: bool = True,
        state_checkpoint_tokens: int | None = None,
        demote_to_host: bool = True,
        state_update: str = "copy",
    ):
        """compact: when freeing leaves large pages sparsely used, move live
        blocks together so their chunks return to the pool (block ids of
        running requests change; read block tables after every call).

        uniform_pages, static_shares and compact=False turn the manager into
        the baselines of `bench kv`: one padded page size for every group
        (engines without two-level pages), and a fixed share of the budget per
        group, held whether used or not (a static per-type partition).

        state_checkpoint_tokens: a recurrent (Mamba / linear-attention) state
        is saved for the prefix cache every this many tokens, and at the
        first block boundary after the prompt; in between it is updated in
        place (see MambaManager). A positive multiple of block_size; by
        default DEFAULT_STATE_CHECKPOINT_TOKENS rounded up to one.

        state_update: how the model updates a recurrent state when a request
        crosses a checkpoint (its state gets a fresh block, the old block
        stays cached as the checkpoint). "copy" (for kernels that update a
        state in place, such as transformers' models): allocate_slots()
        copies the state into the fresh block. "out_of_place" (for kernels
        that read the state from one block and write it to another, as
        serving engines with Mamba prefix caching do): nothing is copied;
        state_source() names the block the step reads, and the block table
        the block it writes.

        demote_to_host: with prefix caching on and a host tier in the pool
        (its cpu_budget), cached blocks taken off the device are demoted to
        the host tier instead of evicted, as long as it has room (a
        second-level prefix cache); a hit on one promotes it back. Request
        swaps come first: swap_out() drops demoted blocks for room."""
        chunk = pool.stats()["chunk_bytes"]
        self.pool = pool
        self.model = model
        self.block_size = block_size
        self.layout: PageLayout = plan_layout(model, block_size, chunk, max_large_page_bytes, uniform_pages)
        if state_checkpoint_tokens is None:
            state_checkpoint_tokens = -(-DEFAULT_STATE_CHECKPOINT_TOKENS // block_size) * block_size
        if (isinstance(state_checkpoint_tokens, bool) or not isinstance(state_checkpoint_tokens, int)
                or state_checkpoint_tokens <= 0 or state_checkpoint_tokens % block_size):
            raise ValueError(f"state_checkpoint_tokens must be a positive multiple of block_size={block_size}, "
                             f"got {state_checkpoint_tokens!r}")
        self.state_checkpoint_tokens = state_checkpoint_tokens
        if state_update not in STATE_UPDATES:
            raise ValueError(f"state_update must be one of {', '.join(map(repr, STATE_UPDATES))}, "
                             f"got {state_update!r}")
        self.state_update = state_update
        self.enable_prefix_caching = enable_prefix_caching
        self.max_cached_fraction = max_cached_fraction
        # Swapped-out requests and demoted blocks keep their addresses: the
        # address space covers both tiers' budgets (VA only, nothing mapped).
        capacity = capacity_bytes or pool.stats()["budget_bytes"] + pool.cpu_budget()
        self.spaces: list[PageSpace] = []
        self.pools: list[GroupBlockPool] = []
        self.managers: list[SingleTypeManager] = []
        for g in self.layout.groups:
            n_large = capacity // g.large_page_bytes + 1  # VA only: any group may hold the whole budget
            # The space maps single chunks; the block pool groups them into large pages.
            space = PageSpace(pool, f"{name}.g{g.group_id}.{g.kind}", n_large * (g.large_page_bytes // chunk))
            bp = GroupBlockPool(space, self.layout, g)
            if static_shares is not None:
                bp.max_pages = int(capacity * static_shares.get(g.group_id, 0.0)) // g.large_page_bytes
            bp.demote_enabled = demote_to_host and enable_prefix_caching
            self.spaces.append(space)
            self.pools.append(bp)
            if g.kind == "mamba":
                self.managers.append(MambaManager(g, bp, state_checkpoint_tokens // block_size,
                                                  out_of_place=state_update == "out_of_place"))
            else:
                self.managers.append(MANAGER_FOR_KIND[g.kind](g, bp))
        self._out_of_place = [m for m in self.managers if isinstance(m, MambaManager) and m.out_of_place]
        self._tokens_that_fit = self._largest_length_that_fits()
        self.static = static_shares is not None
        self.compact_enabled = compact
        self.stats_blocks_moved = 0
        self.requests: dict[str, RequestState] = {}
        self.layer_group = {layer: g for g in self.layout.groups for layer in g.layers}
        # spec.live_bytes summed over layers: per request, the groups' fixed
        # bytes, plus bytes per kept token for each group that keeps tokens
        # (a Mamba group keeps none: nothing to ask its spec per request).
        self._fixed_bytes_per_request = sum(g.spec.state_bytes() * len(g.layers) for g in self.layout.groups)
        self._bytes_per_kept_token = [(g.spec, g.spec.bytes_per_token() * len(g.layers))
                                      for g in self.layout.groups if g.spec.bytes_per_token()]
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self.stats_hit_tokens = 0
        self.stats_query_tokens = 0
        self.stats_swap_outs = 0
        self.stats_swap_ins = 0

    # ---- request lifetime ---------------------------------------------------------

    def sync(self) -> None:
        """Takes note of pages the pool reclaimed since the last call."""
        for bp in self.pools:
            bp.sync()

    def add_request(self, request_id: str, prompt_token_ids: list[int], extra_keys: tuple = ()) -> int:
        """Registers a request and takes its prefix-cache hit; returns the hit in tokens."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already known")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self.sync()
        st = RequestState(request_id, list(prompt_token_ids), tuple(extra_keys), prompt_len=len(prompt_token_ids))
        st.hashes = chain_hashes(st.token_ids, self.block_size, st.extra_keys)
        self.requests[request_id] = st
        for m in self.managers:
            m.start_request(request_id, st.prompt_len)
        self.stats_query_tokens += len(prompt_token_ids)
        if not self.enable_prefix_caching:
            return 0
        for _ in range(3):
            hit_blocks = self._longest_hit(st.hashes, (len(prompt_token_ids) - 1) // self.block_size)
            try:
                for m in self.managers:
                    m.apply_hit(request_id, st.hashes, hit_blocks)
            except PageReclaimed:
                self._drop_request_blocks(request_id)
                self.sync()
                continue
            st.num_tokens = st.hit_tokens = hit_blocks * self.block_size
            self.stats_hit_tokens += st.hit_tokens
            return st.hit_tokens
        return 0

    def _longest_hit(self, hashes: list[int], max_blocks: int) -> int:
        """The most full blocks valid for every group (at least one token is
        always left to compute)."""
        for n in range(min(max_blocks, len(hashes)), 0, -1):
            if all(m.hit_valid(hashes, n) for m in self.managers):
                return n
        return 0

    def num_blocks_needed(self, request_id: str, num_new_tokens: int) -> list[int]:
        st = self._state(request_id)
        total = st.num_tokens + num_new_tokens
        return [m.num_new_blocks(request_id, total) for m in self.managers]

    def can_allocate(self, request_id: str, num_new_tokens: int) -> bool:
        """Whether allocate_slots would succeed now, counting free slots,
        evictable cached blocks and what the pool can still give."""
        self._check_capacity(request_id, num_new_tokens)
        if self._state(request_id).swap == SWAP_OUT:
            return False
        self.sync()
        needed = self.num_blocks_needed(request_id, num_new_tokens)
        chunks_short = sum(bp.chunks_needed(n) for n, bp in zip(needed, self.pools))
        return chunks_short == 0 or chunks_short <= self.pool.available_chunks(self.spaces[0].owner)

    def allocate_slots(self, request_id: str, num_new_tokens: int, new_token_ids: list[int] | None = None,
                       stream: int = 0) -> bool:
        """Gives the request KV slots for num_new_tokens more tokens; False (and
        no slot taken) when memory is short. New token ids (decode output)
        extend the request's tokens for prefix hashing. Either way the blocks
        its last step read states from (state_source) are let go first."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        self._check_capacity(request_id, num_new_tokens)
        st = self._state(request_id)
        self._require_resident(st, "allocate slots for", stream)
        # No sync() here: most decode steps allocate nothing, and a group
        # syncs itself when it allocates (a release needs none: see unmap).
        released = self._release_read_blocks(request_id, stream)
        total = st.num_tokens + num_new_tokens
        if total <= st.idle_until and not released:  # most decode steps: no group has work
            self._advance(st, total, new_token_ids)
            return True
        taken: list[tuple[GroupBlockPool, list[int], SingleTypeManager]] = []
        try:
            for m in self.managers:
                taken.append((m.pool, m.allocate(request_id, total), m))
        except NoFreeBlocks:
            for bp, blocks, m in taken:
                positions = m.req_blocks[request_id]
                for b in blocks:
                    positions[positions.index(b)] = None
                    bp.release(b, None, stream)
                while positions and positions[-1] is None:  # the table ends at a held block again
                    positions.pop()
            return False
        for m in self.managers:
            released += m.remove_skipped(request_id, total, stream)
        st.idle_until = min(m.idle_until(request_id, total) for m in self.managers)
        self._advance(st, total, new_token_ids)
        if released:
            self._trim_cache(stream)
            if self.compact_enabled:
                self.compact(min_free_fraction=0.02, stream=stream)
        return True

    def _advance(self, st: RequestState, total: int, new_token_ids: list[int] | None) -> None:
        """The request's tokens reach `total`, its blocks in place."""
        if new_token_ids:
            st.token_ids.extend(new_token_ids)
        st.num_tokens = total
        if self.enable_prefix_caching:
            self._offer_full_blocks(st)

    def _offer_full_blocks(self, st: RequestState) -> None:
        """Hashes the request's newly full blocks and offers them to every
        group's prefix cache; most decode steps fill none and skip both."""
        if len(st.token_ids) // self.block_size > len(st.hashes):
            st.hashes = chain_hashes(st.token_ids, self.block_size, st.extra_keys, len(st.hashes), st.hashes)
        computed = min(st.num_tokens, len(st.token_ids))
        if computed // self.block_size > st.offered_blocks:
            for m in self.managers:
                m.cache_blocks(st.request_id, st.hashes, computed)
            st.offered_blocks = computed // self.block_size

    def free(self, request_id: str, stream: int = 0) -> None:
        """Releases the request's blocks; full ones stay cached (evictable)."""
        st = self._state(request_id)
        prompt_blocks = st.prompt_len // self.block_size
        if st.swap == SWAP_IN:  # its chunks may still be landing: they are resident to drop
            self._require_resident(st, "free", stream)
        self._release_read_blocks(request_id, stream)
        for m in self.managers:
            m.free(request_id, prompt_blocks, stream)
        del self.requests[request_id]
        self._trim_cache(stream)
        if self.compact_enabled:
            self.compact(min_free_fraction=0.02, stream=stream)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child continues from the parent's exact state (beam search,
        parallel sampling). Full blocks are shared copy-on-write: nobody writes
        them again. The blocks still being written (the partial last block, a
        Mamba layer's current state) are copied into fresh blocks of the
        child's. The child has the parent's length, so its windows need the
        same blocks the parent kept. All or nothing: OutOfMemoryError leaves
        no trace."""
        parent = self._state(parent_id)
        if child_id in self.requests:
            raise ValueError(f"request {child_id!r} is already known")
        self._require_resident(parent, "fork")
        self._release_read_blocks(parent_id)
        self.sync()
        n = parent.num_tokens
        full = n // self.block_size
        child = RequestState(child_id, list(parent.token_ids[:n]), parent.extra_keys, num_tokens=n,
                             prompt_len=parent.prompt_len, hashes=list(parent.hashes[:full]))
        done: list[SingleTypeManager] = []
        try:
            for m, space in zip(self.managers, self.spaces):
                blocks = list(m.req_blocks.get(parent_id, []))
                m.req_blocks[child_id] = [None] * len(blocks)
                m.start_request(child_id, parent.prompt_len)
                done.append(m)
                share_below = len(blocks) if isinstance(m, MANAGER_FOR_KIND["cross"]) else full
                written = [i for i in range(share_below, len(blocks)) if blocks[i] is not None]
                fresh = m.pool.allocate(child_id, len(written))
                step, size = m.group.padded_small_bytes, m.group.small_page_bytes
                data = space.bytes_view() if written else None
                for i, b in zip(written, fresh):
                    data[b * step:b * step + size].copy_(data[blocks[i] * step:blocks[i] * step + size])
                    m.req_blocks[child_id][i] = b
                for i in range(min(share_below, len(blocks))):
                    if blocks[i] is not None:
                        m.pool.touch(blocks[i])
                        m.req_blocks[child_id][i] = blocks[i]
        except (NoFreeBlocks, PageReclaimed):
            for m in done:
                if isinstance(m, MambaManager):
                    m.prompt_len.pop(child_id, None)
                for b in m.req_blocks.pop(child_id, []):
                    if b is not None:
                        m.pool.release(b, None)
                m.pool.forget_request(child_id)
            raise OutOfMemoryError(f"fork of {parent_id!r}: no room for the blocks being written") from None
        self.requests[child_id] = child

    def compact(self, min_free_fraction: float = 0.0, stream: int = 0) -> int:
        """Packs live blocks of sparsely used large pages into free slots of
        fuller ones, so the emptied pages' chunks go back to the pool. A group
        is packed only when its free slots exceed min_free_fraction of its
        open pages' slots. A move that finds no chunk to map into stops the
        packing there. Returns the blocks moved; their ids change in every
        block table."""
        self.sync()
        moved = 0
        for g, bp, m, space in zip(self.layout.groups, self.pools, self.managers, self.spaces):
            if bp.ratio < 2 or bp.num_free_slots() <= min_free_fraction * bp.mapped_pages() * bp.ratio:
                continue
            moves, new_chunks = bp.plan_compaction()
            if not moves or new_chunks > self.pool.available_chunks(space.owner):
                continue
            data = space.bytes_view()
            step, n = g.padded_small_bytes, g.small_page_bytes

            def copy(src: int, dst: int) -> None:
                data[dst * step:dst * step + n].copy_(data[src * step:src * step + n])

            new_id = {}
            try:
                for src, dst_page in moves:
                    new_id[src] = bp.move_block(src, dst_page, copy)
            except (OutOfMemoryError, PageReclaimed):
                pass  # the pool is short, or a neighbour chunk went: the moves made stand
            for blocks in m.req_blocks.values():
                for i, b in enumerate(blocks):
                    if b in new_id:
                        blocks[i] = new_id[b]
            for rid, b in m.read_blocks.items():
                m.read_blocks[rid] = new_id.get(b, b)
            moved += len(new_id)
        self.stats_blocks_moved += moved
        return moved

    def _release_read_blocks(self, request_id: str, stream: int = 0) -> int:
        """The request's next call: its last step has read its state, so the
        blocks it read from (see state_source) are let go; returns how many."""
        released = 0
        for m in self._out_of_place:  # a loop: this runs at every allocate_slots()
            released += m.release_read_block(request_id, stream)
        return released

    def _drop_request_blocks(self, request_id: str) -> None:
        for m in self.managers:
            for b in m.req_blocks.pop(request_id, []):
                if b is not None:
                    m.pool.release(b, None)
            m.released_upto.pop(request_id, None)
            m.num_cached.pop(request_id, None)

    def _trim_cache(self, stream: int = 0) -> None:
        """Deflates the prefix cache to max_cached_fraction of each group's live
        blocks: a cached block holds a slot no live token needs."""
        for bp in self.pools:
            bp.sync()  # count none the pool took: evicting them would trim the cache below its share
            cached, live = bp.num_evictable(), bp.live_blocks()
            if cached > self.max_cached_fraction * live:  # (a fraction of inf keeps everything)
                bp.evict(cached - int(self.max_cached_fraction * live))

    def _state(self, request_id: str) -> RequestState:
        try:
            return self.requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    def _largest_length_that_fits(self) -> int:
        """A request length up to which every group's KV space surely holds
        the request (-1 if none): a group needs at most end_block(n) blocks,
        which grows with n, so a length whose end block fits lets every
        shorter one fit."""
        fits = []
        for m in self.managers:
            n = m.pool.n_pages * m.pool.ratio * self.block_size
            fits.append(n if m.end_block(n) <= m.pool.n_pages * m.pool.ratio else -1)
        return min(fits)

    def _check_capacity(self, request_id: str, num_new_tokens: int) -> None:
        st = self._state(request_id)
        total = st.num_tokens + num_new_tokens
        if total <= self._tokens_that_fit:
            return
        for m in self.managers:
            blocks = m.end_block(total) - m.first_needed_block(total)
            pages = -(-blocks // m.pool.ratio)
            if pages > m.pool.n_pages:
                raise ValueError(
                    f"request {request_id!r} at {total} tokens needs {pages} large pages in group "
                    f"{m.group.group_id} ({m.group.kind}); the KV space holds at most {m.pool.n_pages}"
                )

    # ---- swap to the host tier ------------------------------------------------------

    def swap_out(self, request_id: str, stream: int = 0) -> int:
        """Moves a preempted request's KV to the pool's host tier (Pool's
        cpu_budget), after the work queued on `stream` so far; returns the
        bytes that move. Its device chunks go back to the pool once the
        copies are done (see swap_ready). Blocks it shares with other
        requests, and chunks it shares with their blocks, stay resident.
        Its block ids do not change. All or nothing: OutOfMemoryError when
        the host tier cannot take it all, and the request stays resident.
        ValueError if it is swapped out already (one still swapping in is
        first made resident)."""
        st = self._state(request_id)
        if st.swap == SWAP_OUT:
            raise ValueError(f"request {request_id!r} is swapped out already; swap_out() takes a resident request")
        self._require_resident(st, "swap out", stream)  # a swap-in under way lands first
        self._release_read_blocks(request_id, stream)
        self.sync()
        plan = self._swap_plan(request_id)
        total = sum(len(chunks) for _, chunks, _ in plan)
        room = self._host_room()
        for bp in sorted(self.pools, key=lambda p: p.demoted_chunks(), reverse=True):
            while room < total and bp.units:  # demoted prefix blocks make way for a request
                bp.drop_demoted(1)
                room = self._host_room()
        if total > room:
            raise OutOfMemoryError(f"swap_out({request_id!r}): the host tier has room for {room} chunks, "
                                   f"the request needs {total} (raise the pool's cpu_budget)")
        done = []
        try:
            for bp, chunks, mine in plan:
                bp.swap_out(chunks, mine, stream)
                done.append((bp, chunks))
        except BaseException:
            for bp, chunks in done:  # still swapping out: swapping in keeps their device chunks
                bp.swap_in(chunks, stream)
                bp.space.finish_swaps(wait=True)
            raise
        st.swap = SWAP_OUT
        st.swap_chunks = [chunks for _, chunks, _ in plan]
        self.stats_swap_outs += 1
        return total * self.layout.chunk_bytes

    def _swap_plan(self, request_id: str) -> list[tuple[GroupBlockPool, list[int], list[int]]]:
        """Per group: its pool, the chunks a swap-out moves and the blocks
        they hold (the request's own blocks, on chunks no other block uses)."""
        plan = []
        for m in self.managers:
            mine = [b for b in m.req_blocks.get(request_id, []) if b is not None and m.pool.ref[b] == 1]
            plan.append((m.pool, m.pool.swappable_chunks(mine), mine))
        return plan

    def swap_out_bytes(self, request_id: str) -> int:
        """The bytes swap_out() would move now, which are the device bytes it
        would free (0 for a request unknown or swapped out)."""
        st = self.requests.get(request_id)
        if st is None or st.swap == SWAP_OUT:
            return 0
        return sum(len(chunks) for _, chunks, _ in self._swap_plan(request_id)) * self.layout.chunk_bytes

    def _host_room(self) -> int:
        """Chunks the host tier can still take."""
        host = self.pool.host_tier()
        return host["free_chunks"] + host["budget_bytes"] // host["chunk_bytes"] - host["created_chunks"]

    def can_swap_in(self, request_id: str, margin_chunks: int = 0) -> bool:
        """Whether the pool can give the device chunks swap_in() needs now,
        counting chunks under cached blocks only (swap_in evicts them), with
        `margin_chunks` more to spare (room for the running requests to
        grow, so that the request is not the next one preempted)."""
        if margin_chunks < 0:
            raise ValueError(f"margin_chunks must be >= 0, got {margin_chunks}")
        st = self._state(request_id)
        if st.swap != SWAP_OUT:
            return False
        need = sum(len(c) for c in st.swap_chunks)
        room = self.pool.available_chunks(self.spaces[0].owner)
        room += sum(s.stats()["reclaimable_pages"] for s in self.spaces)
        return need + margin_chunks <= room

    def swap_in(self, request_id: str, stream: int = 0) -> None:
        """Brings a swapped-out request's KV back at the same addresses: fresh
        chunks are mapped and the copies back queued. The request's next
        allocate_slots() (or wait_swap()) orders `stream` after them. All or
        nothing: OutOfMemoryError when the pool cannot give the chunks.
        ValueError if the request is not swapped out."""
        st = self._state(request_id)
        if st.swap != SWAP_OUT:
            raise ValueError(f"request {request_id!r} is not swapped out")
        self.sync()
        done = []
        try:
            for bp, chunks in zip(self.pools, st.swap_chunks):
                while True:
                    try:
                        bp.swap_in(chunks, stream)
                        break
                    except OutOfMemoryError:
                        # The pool reclaims other owners' cached chunks itself;
                        # the group's own are evicted (or demoted) here.
                        if not bp.evict(len(chunks)):
                            raise
                done.append((bp, chunks))
        except BaseException:
            for bp, chunks in done:  # back out, once their copies back have landed
                bp.space.finish_swaps(wait=True)
                mine = [b for b in self.managers[self.pools.index(bp)].req_blocks.get(request_id, [])
                        if b is not None and bp.ref[b] == 1]
                bp.swap_out(chunks, mine, stream)
            raise
        st.swap = SWAP_IN
        self.stats_swap_ins += 1

    def swap_ready(self, request_id: str) -> bool:
        """Whether the request's swap has finished: swapped out, its device
        chunks back in the pool; or swapped in, its bytes back. Never blocks."""
        st = self._state(request_id)
        if st.swap is None:
            return True
        want = 5 if st.swap == SWAP_OUT else 1  # swapped / pinned (kv/space.py)
        for bp, chunks in zip(self.pools, st.swap_chunks):
            if chunks:
                bp.space.finish_swaps()
            if any(bp.space.state(k) != want for k in chunks):
                return False
        if st.swap == SWAP_IN:
            self._swap_done(st)
        return True

    def wait_swap(self, request_id: str, stream: int = 0) -> None:
        """Waits for the request's swap: a swap-out until its device chunks
        are back in the pool; a swap-in until `stream` is ordered after the
        copies back (on the host backend, until they are done)."""
        st = self._state(request_id)
        if st.swap == SWAP_OUT:
            for bp, chunks in zip(self.pools, st.swap_chunks):
                if chunks:
                    bp.space.finish_swaps(wait=True)
        elif st.swap == SWAP_IN:
            self._require_resident(st, "wait for", stream)

    def is_swapped_out(self, request_id: str) -> bool:
        return self._state(request_id).swap == SWAP_OUT

    def _require_resident(self, st: RequestState, what: str, stream: int = 0) -> None:
        """Refuses a swapped-out request; orders `stream` after a swap-in."""
        if st.swap == SWAP_OUT:
            raise ValueError(f"cannot {what} request {st.request_id!r}: it is swapped out; swap_in() it first")
        if st.swap == SWAP_IN:
            for bp, chunks in zip(self.pools, st.swap_chunks):
                if chunks:
                    bp.space.swap_wait(chunks, stream)
                    bp.space.finish_swaps()  # host chunks of the copies done go back now
            self._swap_done(st)

    def _swap_done(self, st: RequestState) -> None:
        if st.swap == SWAP_IN:  # its copies back are done, or ordered before the caller's stream
            for bp, chunks in zip(self.pools, st.swap_chunks):
                bp.landed(chunks)
        st.swap = None
        st.swap_chunks = []

    # ---- ballooning -------------------------------------------------------------------

    def reserve_headroom(self, nbytes: int) -> None:
        """Keeps nbytes of the pool for the torch arena (next step's activations):
        the KV cache cannot take them."""
        self.pool.set_headroom(nbytes)

    def evict(self, num_blocks: int) -> int:
        """Evicts up to num_blocks cached blocks, least valuable first."""
        self.sync()
        done = 0
        for bp in sorted(self.pools, key=lambda p: p.num_evictable(), reverse=True):
            done += bp.evict(num_blocks - done)
        return done

    # ---- figures ----------------------------------------------------------------------

    def live_bytes_needed(self) -> int:
        """Bytes the live tokens need (full: all; sliding: the window; Mamba: its
        state; cross: fixed), summed over requests, with a block that several
        requests share (a prefix hit, a fork) counted once."""
        total = 0
        per_token_groups = self._bytes_per_kept_token
        for st in self.requests.values():
            if st.swap == SWAP_OUT:  # in the host tier: needs no device memory now
                continue
            total += self._fixed_bytes_per_request
            for spec, per_token in per_token_groups:
                total += spec.tokens_kept(st.num_tokens) * per_token
        swapped = {rid for rid, st in self.requests.items() if st.swap == SWAP_OUT}
        for g, bp, m in zip(self.layout.groups, self.pools, self.managers):
            total -= self._extra_resident_holders(bp, m, swapped) * g.small_page_bytes
        return max(total, 0)

    @staticmethod
    def _extra_resident_holders(bp: GroupBlockPool, m: SingleTypeManager, swapped: set[str]) -> int:
        """Holders beyond the first of each shared block, among the requests
        counted above (a swapped-out one's tokens are not)."""
        if not swapped:
            return bp.extra_holders() - KVCacheManager._read_holds_among_extra(bp, m)
        holders: dict[int, int] = {}
        for rid, blocks in m.req_blocks.items():
            if rid not in swapped:
                for b in blocks:
                    if b is not None and b in bp.shared:
                        holders[b] = holders.get(b, 0) + 1
        return sum(n - 1 for n in holders.values() if n > 1)

    @staticmethod
    def _read_holds_among_extra(bp: GroupBlockPool, m: SingleTypeManager) -> int:
        """How many of bp.extra_holders() are holds for reading a state (see
        state_source): those are not holders counted by live_bytes_needed."""
        reads: dict[int, int] = {}
        for b in m.read_blocks.values():
            reads[b] = reads.get(b, 0) + 1
        # Of a block's ref holders, `r` are reads: extra_holders counted ref - 1, the tables' extra is ref - r - 1.
        return sum(max(bp.ref[b] - 1, 0) - max(bp.ref[b] - r - 1, 0) for b, r in reads.items())

    def mapped_bytes(self) -> int:
        """Bytes held for the KV cache: mapped chunks, or the whole partition when static."""
        if self.static:
            return sum(bp.max_pages * bp.group.large_page_bytes for bp in self.pools)
        self.sync()  # a chunk the pool took is no longer ours
        return sum(bp.mapped_chunks for bp in self.pools) * self.layout.chunk_bytes

    def usage(self) -> dict:
        groups = []
        for g, bp, space, m in zip(self.layout.groups, self.pools, self.spaces, self.managers):
            groups.append({
                "group": g.group_id,
                "kind": g.kind,
                "layers": len(g.layers),
                "small_page_bytes": g.small_page_bytes,
                "padding_bytes": g.padding_bytes,
                "mapped_pages": bp.mapped_pages(),
                "large_page_bytes": g.large_page_bytes,
                "mapped_chunks": bp.mapped_chunks,
                "mapped_bytes": bp.mapped_chunks * self.layout.chunk_bytes,
                "live_blocks": bp.live_blocks(),
                "cached_blocks": bp.num_evictable(),
                "free_slots": bp.num_free_slots(),
                "evictions": bp.evictions,
                "blocks_moved": bp.blocks_moved,
                # Cumulative: a step's maps are the difference of two usage() calls.
                "maps": space.stats()["maps"],
                "unmaps": space.stats()["unmaps"],
                "state_bytes_copied": getattr(m, "bytes_copied", 0),
                "out_of_place_updates": getattr(m, "out_of_place_updates", 0),
                "swapped_chunks": bp.swapped_chunks,
                "demoted_blocks": bp.demoted_blocks(),
                "demoted_chunks": bp.demoted_chunks(),
                "demotions": bp.demotions,
                "promotions": bp.promotions,
            })
        mapped = self.mapped_bytes()
        return {
            "mapped_bytes": mapped,
            "live_bytes_needed": self.live_bytes_needed(),
            "utilisation": self.live_bytes_needed() / mapped if mapped else 1.0,
            "requests": len(self.requests),
            "prefix_hit_rate": self.stats_hit_tokens / self.stats_query_tokens if self.stats_query_tokens else 0.0,
            "blocks_moved_by_compaction": self.stats_blocks_moved,
            "bytes_moved_by_compaction": sum(g["blocks_moved"] * g["small_page_bytes"] for g in groups),
            "maps": sum(g["maps"] for g in groups),
            "unmaps": sum(g["unmaps"] for g in groups),
            "state_update": self.state_update,
            "state_bytes_copied": sum(g["state_bytes_copied"] for g in groups),
            "out_of_place_updates": sum(g["out_of_place_updates"] for g in groups),
            # Requests' chunks in the host tier (demoted prefix blocks apart).
            "swapped_bytes": sum(g["swapped_chunks"] - g["demoted_chunks"] for g in groups) * self.layout.chunk_bytes,
            "swapped_requests": sum(1 for st in self.requests.values() if st.swap == SWAP_OUT),
            "swap_outs": self.stats_swap_outs,
            "swap_ins": self.stats_swap_ins,
            "demoted_bytes": sum(g["demoted_chunks"] for g in groups) * self.layout.chunk_bytes,
            "demotions": sum(g["demotions"] for g in groups),
            "promotions": sum(g["promotions"] for g in groups),
            "groups": groups,
        }

    # ---- paged view ----------------------------------------------------------------------

    def block_table(self, request_id: str, layer: int) -> list[int | None]:
        """The request's block ids in the layer's group (None: out of window)."""
        self._state(request_id)
        return list(self.managers[self.layer_group[layer].group_id].req_blocks.get(request_id, []))

    def state_source(self, request_id: str, layer: int) -> int | None:
        """With state_update="out_of_place": the block this step reads the
        layer's recurrent state from, when it is not the block it writes (the
        block table's last block). That is so after an allocate_slots() that
        crossed a checkpoint, or that moved the state off a block shared with
        others (a prefix hit, a fork): the new state goes to a fresh block and
        the old block keeps the state it holds. None when the state is read
        and written in place, and always for attention layers and in "copy"
        mode. The block is held for the request until its next call
        (allocate_slots, free, swap_out or fork), so the step must read it
        before then; like block table ids, compaction may change its id."""
        self._state(request_id)
        return self.managers[self.layer_group[layer].group_id].read_blocks.get(request_id)

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Per-layer tensors over the group's range, indexed by block id:
        (K, V) of shape [num_blocks, block_size, kv_heads, head_dim] (MLA: one
        latent tensor [num_blocks, block_size, latent]; Mamba: one uint8 state
        tensor [num_blocks, state_bytes]). Zero-copy; do not touch blocks that
        are not allocated (unmapped VA faults)."""
        if layer in self._views:
            return self._views[layer]
        g = self.layer_group[layer]
        space = self.spaces[g.group_id]
        nblocks = self.pools[g.group_id].n_pages * self.layout.ratio(g)
        li = g.layers.index(layer)
        page = g.padded_small_bytes
        spec = g.spec
        if g.is_state:
            per = g.small_page_bytes // len(g.layers)
            views = (space.view(torch.uint8, li * per, (nblocks, per), (page, 1)),)
        elif g.kind == "mla":
            item = torch.empty((), dtype=spec.torch_dtype).element_size()
            width = spec.bytes_per_token() // item
            views = (space.view(spec.torch_dtype, li * g.plane_bytes(), (nblocks, g.block_size, width),
                                (page // item, width, 1)),)
        else:
            item = torch.empty((), dtype=spec.torch_dtype).element_size()
            h, d = spec.kv_heads, spec.head_dim
            plane = g.plane_bytes()
            views = tuple(
                space.view(spec.torch_dtype, (li * 2 + kv) * plane, (nblocks, g.block_size, h, d),
                           (page // item, h * d, d, 1))
                for kv in range(2)
            )
        self._views[layer] = views
        return views

    def gather(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Copies the request's kept tokens of one attention layer into
        contiguous (K, V) of shape [tokens, kv_heads, head_dim], with their
        token positions, for plain attention."""
        st = self._state(request_id)
        g = self.layer_group[layer]
        if g.is_state or g.kind == "mla":
            raise ValueError(f"layer {layer} is {g.kind}: gather applies to K/V attention layers")
        k_all, v_all = self.layer_tensors(layer)
        n = st.num_tokens if g.kind != "cross" else g.spec.max_tokens
        positions, ks, vs = [], [], []
        for i, b in enumerate(self.block_table(request_id, layer)):
            if b is None:
                continue
            lo, hi = i * g.block_size, min((i + 1) * g.block_size, n)
            if hi <= lo:
                continue
            ks.append(k_all[b, : hi - lo])
            vs.append(v_all[b, : hi - lo])
            positions.extend(range(lo, hi))
        if not ks:
            empty = k_all.new_empty((0, g.spec.kv_heads, g.spec.head_dim))
            return empty, empty.clone(), []
        return torch.cat(ks), torch.cat(vs), positions

    # ---- lifetime -----------------------------------------------------------------------

    def check(self) -> None:
        """Asserts every invariant of the manager (tests call it after each step)."""
        for m, bp in zip(self.managers, self.pools):
            bp.check()
            holders: dict[int, int] = {}
            for rid, blocks in m.req_blocks.items():
                assert rid in self.requests, f"blocks held for unknown request {rid}"
                for b in blocks:
                    if b is not None:
                        holders[b] = holders.get(b, 0) + 1
            for rid, b in m.read_blocks.items():
                assert rid in self.requests and self.requests[rid].swap is None, f"read block held for {rid}"
                holders[b] = holders.get(b, 0) + 1
            for rid, blocks in m.req_blocks.items():  # what allocate() relies on to scan nothing
                needed = blocks[m.first_needed_block(self.requests[rid].num_tokens):]
                assert None not in needed, f"group {m.group.group_id}: {rid}'s table {blocks} has a gap"
            for b, n in holders.items():
                assert bp.ref[b] == n, f"group {m.group.group_id} block {b}: ref {bp.ref[b]}, held {n}"
            assert sum(1 for r in bp.ref if r) == len(holders)

    def close(self) -> None:
        """Frees every request and gives all pages back to the pool."""
        for rid in list(self.requests):
            self.free(rid)
        self._views.clear()
        for space in self.spaces:
            space.close()
        self.spaces.clear()
