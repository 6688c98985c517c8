"""ElasticPagedAttentionCache: transformers' paged KV cache on a KVCacheManager.

The stock PagedAttentionCache sizes itself once, from free memory, and
preallocates one tensor of `num_blocks` blocks. This one reserves, per layer
group, a virtual range sized for the whole pool budget (the KVCacheManager's
PageSpace) and maps chunks only under the blocks requests hold: capacity
grows while the pool has chunks and shrinks as requests finish.

What transformers' batch processor sees is the interface it already uses:
one "allocator" per attention type (full, sliding) whose `index` picks its
row of the read/write index tensors, token indices into per-layer K/V views,
`can_store_request_tokens` / `free_blocks` for admission and release. Block
allocation, release, sliding-window trimming and compaction are the
manager's. The K/V layout inside a block is the manager's (per block: layer
0's K plane, its V plane, layer 1's K, ...), which is also how transformers
lays out a block, so a token's row index is `block * rows_per_block + slot`.

Preempted requests: transformers' own offloading manager (its pinned CPU
swap pool) is refused; with the stock schedulers they are recomputed, with
the SLO-aware scheduler (scheduler.py) they may be swapped to the pool's host
tier (swap_out / swap_in below). Not supported yet, refused or turned off
with a reason: prefix sharing (the manager's prefix cache is off), the
block-table decode path (flash_attn_with_kvcache),
tensor parallelism, and async batching (block ids may change between steps
through compaction, which async batching would race with).
"""
from __future__ import annotations

import logging
from math import ceil
from typing import Any

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import FULL_ATTENTION, SLIDING_ATTENTION

from ..errors import OutOfMemoryError
from ..kv import KVCacheManager
from ..kv.layout import KVGroup

logger = logging.getLogger("ellm_alloc.serving")

#: The manager's layer kinds and the attention types transformers names them by.
ATTN_TYPE_OF_KIND = {"full": FULL_ATTENTION, "sliding": SLIDING_ATTENTION}
#: Batch tokens when the continuous batching config sets none: the stock
#: engine's default, so that both run the same batches.
DEFAULT_MAX_BATCH_TOKENS = 8192
# A request id no transformers request can have (theirs are "req_<n>" or user
# strings; NUL never appears in them by convention).
_TRASH_ID = "\x00ellm.trash"
_LOOKBACK_SUFFIX = "\x00ellm.lookback"


class _NoSectors:
    """Stands where transformers expects its sector pool: the scheduler asks it
    to free empty sectors before each batch. Here pages go back to the pool
    as soon as they empty, so there is nothing to do but drop the lookback
    holds of the step that just ran (see ElasticPagedAttentionCache)."""

    def __init__(self, cache: "ElasticPagedAttentionCache"):
        self._cache = cache

    def try_to_free_sectors(self) -> None:
        self._cache.release_lookbacks()

    @property
    def num_free_sectors(self) -> int:
        return self._cache.free_chunks()


class ElasticGroupAllocator:
    """One attention type's K/V: per-layer token views of the group's range,
    and the token -> row index maps transformers' attention kernels read."""

    supports_block_sharing = False
    supports_block_table = False
    use_block_sharing = False
    blocks_per_sector = 1

    def __init__(self, cache: "ElasticPagedAttentionCache", index: int, layer_type: str, group: KVGroup):
        self.cache = cache
        self.index = index
        self.layer_type = layer_type
        self.group = group
        self.layer_indices = list(group.layers)
        spec = group.spec
        self.tokens_per_page = group.block_size
        self.bytes_per_block = group.padded_small_bytes
        self.sliding_window = getattr(spec, "window", None)
        dtype = spec.torch_dtype
        item = torch.empty((), dtype=dtype).element_size()
        row_bytes = spec.kv_heads * spec.head_dim * item
        if group.padded_small_bytes % row_bytes:
            raise ValueError(
                f"layer group {group.group_id} ({group.kind}): its blocks are padded to {group.padded_small_bytes} B, "
                f"not a whole number of {row_bytes}-byte token rows; pick another block_size"
            )
        self.rows_per_block = group.padded_small_bytes // row_bytes
        space = cache.kv.spaces[group.group_id]
        total_rows = space.n_pages * space.page_bytes // row_bytes
        bs = group.block_size
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for li, layer in enumerate(group.layers):
            planes = []
            for kv in range(2):
                first_row = (2 * li + kv) * bs  # the plane's offset inside every block
                planes.append(space.view(dtype, first_row * row_bytes, (total_rows - first_row, spec.kv_heads,
                                                                        spec.head_dim),
                                         (spec.kv_heads * spec.head_dim, spec.head_dim, 1)))
            self._views[layer] = (planes[0], planes[1])

    # -- trash rows: padding reads row 0 of the trash block (zeros), padding
    # -- writes go to row 1, row 2 marks "new token here" in sliding reads.
    # -- Read each time: compaction may move the trash block.

    @property
    def _trash_row(self) -> int:
        # Between runs no trash block is held; transformers then only resets
        # its index tensors, which the next batch rewrites before any use.
        block = self.cache.trash_block(self.group.group_id)
        return 0 if block is None else block * self.rows_per_block

    @property
    def read_trash_index(self) -> int:
        return self._trash_row

    @property
    def write_trash_index(self) -> int:
        return self._trash_row + 1

    @property
    def sentinel_index(self) -> int:
        return self._trash_row + 2

    @property
    def block_table(self) -> dict[str, list[int | None]]:
        """Each request's blocks (None: out of the window), as the offloading
        manager reads them before a soft reset."""
        tables = self.cache.kv.managers[self.group.group_id].req_blocks
        return {rid: list(blocks) for rid, blocks in tables.items() if "\x00" not in rid}

    # -- sizes ---------------------------------------------------------------------

    def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
        m = self.cache.kv.managers[self.group.group_id]
        total = past_length + query_length
        if request_id in self.cache.kv.requests:
            return m.num_new_blocks(request_id, total)
        return m.end_block(total) - m.first_needed_block(total)

    def get_seqlen_k(self, past_length: int, query_length: int) -> int:
        """Keys attention sees per query batch: all past tokens (full), or the
        last window - 1 of them (sliding), then the new ones."""
        if self.sliding_window is None:
            return past_length + query_length
        return query_length + min(past_length, self.sliding_window - 1)

    # -- token -> row maps -----------------------------------------------------------

    def _rows(self, table: list[int | None], start: int, end: int, missing: int | None) -> list[int]:
        """Rows of positions [start, end); a position without a block maps to
        `missing` (ValueError when None: attention would read freed memory)."""
        bs, stride = self.tokens_per_page, self.rows_per_block
        out: list[int] = []
        pos = start
        while pos < end:
            i, slot = divmod(pos, bs)
            n = min(bs - slot, end - pos)
            b = table[i] if i < len(table) else None
            if b is None:
                if missing is None:
                    raise ValueError(f"{self.layer_type} group {self.group.group_id}: no block for position {pos}")
                out.extend([missing] * n)
            else:
                base = b * stride + slot
                out.extend(range(base, base + n))
            pos += n
        return out

    def _table(self, request_id: str) -> list[int | None]:
        return self.cache.kv.managers[self.group.group_id].req_blocks[request_id]

    def get_write_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
        # A sliding layer's oldest new tokens may already be out of the window
        # (query longer than it): their blocks were never kept, they go to trash.
        return self._rows(self._table(request_id), past_length, past_length + query_length, self.write_trash_index)

    def get_read_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
        if self.sliding_window is None:  # written first, then read back whole
            return self._rows(self._table(request_id), 0, past_length + query_length, None)
        # Past tokens still in the window, then one marker per new token (their
        # K/V come from the step's own states). A split prefill step reads
        # through its lookback hold: allocating it may have trimmed the window.
        kept = min(past_length, self.sliding_window - 1)
        holder = self.cache.lookback_holder(request_id)
        past = self._rows(self._table(holder), past_length - kept, past_length, None)
        return past + [self.sentinel_index] * query_length

    def fill_block_table(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the elastic cache has no block-table decode path (max_blocks_per_request is 0)")

    def get_cache_for_block_table(self, layer_idx: int):
        raise NotImplementedError("the elastic cache has no block-table decode path (max_blocks_per_request is 0)")

    # -- the forward pass ----------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               read_index: torch.Tensor, write_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the step's K/V ([tokens, kv_heads, head_dim]) and returns the
        keys and values attention reads, in read_index order."""
        k_rows, v_rows = self._views[layer_idx]
        if read_index.numel() == 0:  # a batch of fresh prefills: nothing cached to read
            k_rows.index_copy_(0, write_index, key_states)
            v_rows.index_copy_(0, write_index, value_states)
            return key_states, value_states
        if self.sliding_window is None:
            k_rows.index_copy_(0, write_index, key_states)
            v_rows.index_copy_(0, write_index, value_states)
            return k_rows.index_select(0, read_index), v_rows.index_select(0, read_index)
        # Sliding: markers stand for the new tokens, in order; their rows are
        # filled from the step's states (early ones may never reach the cache).
        new_slots = (read_index == self.sentinel_index).view(-1, 1, 1)
        keys = k_rows.index_select(0, read_index).masked_scatter_(new_slots, key_states)
        values = v_rows.index_select(0, read_index).masked_scatter_(new_slots, value_states)
        k_rows.index_copy_(0, write_index, key_states)
        v_rows.index_copy_(0, write_index, value_states)
        return keys, values


class ElasticPagedAttentionCache(PagedAttentionCache):
    """A PagedAttentionCache whose storage and blocks are a KVCacheManager's.

    Built by transformers' batch processor in place of the stock cache while
    the model is elastic (ellm_alloc.serving.elastic); `serving` is that
    ElasticServing, which supplies the pool, the layer specs and the block
    size. Does not call the stock __init__: that sizes and allocates the
    fixed cache tensor this class exists to avoid.
    """

    def __init__(self, serving: Any, config: Any, continuous_batching_config: Any, device: Any,
                 distributed_helper: Any, dtype: torch.dtype = torch.float16,
                 model_supports_logits_to_keep: bool = False) -> None:
        cb = continuous_batching_config
        if distributed_helper is not None and getattr(distributed_helper, "tp_size", 1) > 1:
            raise ValueError("the elastic paged cache does not support tensor parallelism yet")
        if cb.cpu_offload_space:
            raise ValueError(
                f"cpu_offload_space={cb.cpu_offload_space} GiB: the elastic cache does not copy preempted requests "
                "to transformers' CPU swap pool (they are recomputed); set it to 0"
            )
        if cb.use_async_batching:
            # Compaction and the lookback holds change blocks between steps; an
            # async step N+1 would be prepared while step N still reads them.
            logger.info("elastic paged cache: async batching turned off")
            cb.use_async_batching = False
        cb.max_blocks_per_request = 0  # no block-table decode path
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.serving = serving
        self.max_blocks_per_request = 0
        self.allow_block_sharing = False
        self.use_prefix_sharing = False
        self.ellm_pool = serving.pool
        if self.ellm_pool.tensor_device_type != self.device.type:
            raise ValueError(
                f"the pool's tensors are on {self.ellm_pool.tensor_device_type}, the model is on {self.device}"
            )
        block_size = serving.block_size or cb.page_size
        spec = serving.kv_spec(config, dtype)
        self.kv = KVCacheManager(spec, self.ellm_pool, block_size=block_size, enable_prefix_caching=False,
                                 name=serving.name, max_large_page_bytes=serving.max_large_page_bytes)
        try:
            self._build_allocators(config)
        except BaseException:
            self.kv.close()
            raise
        serving._adopt(self)
        self.pool = _NoSectors(self)
        self._lookbacks: dict[str, str] = {}
        self._trash_blocks: list[int] | None = None
        self._closed = False

        chunk = self.kv.layout.chunk_bytes
        budget = self.ellm_pool.stats()["budget_bytes"]
        self.bytes_per_sector = chunk  # the offloading manager sizes its (unused) CPU pool in these
        self.num_blocks = budget // sum(g.padded_small_bytes for g in self.kv.layout.groups)
        self.max_batch_tokens = cb.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
        # Tokens one batch may read: what the budget holds in the group with
        # the fewest bytes per token, as the stock cache counts its capacity.
        self.max_tokens_read = max(budget * a.tokens_per_page // a.bytes_per_block
                                   for a in self.cache_allocators.values())
        types = list(self.cache_allocators)
        self.read_cache_limit = (self.cache_allocators[SLIDING_ATTENTION].sliding_window
                                 if types == [SLIDING_ATTENTION] else None)
        self.max_decode_fast_path_length = 0

    def _build_allocators(self, config: Any) -> None:
        expected = _layers_by_attn_type(config)
        self.cache_allocators: dict[str, ElasticGroupAllocator] = {}
        self.layer_to_allocator: dict[int, ElasticGroupAllocator] = {}
        for g in self.kv.layout.groups:
            layer_type = ATTN_TYPE_OF_KIND.get(g.kind)
            if layer_type is None:
                raise ValueError(f"layers {list(g.layers)} are {g.kind!r}: transformers' continuous batching and the "
                                 f"elastic cache serve only full and sliding-window attention")
            if layer_type in self.cache_allocators:
                raise ValueError(
                    f"the KV layout split the {layer_type} layers into several page groups "
                    f"({self.kv.layout.describe()}); the elastic cache needs one group per attention type: "
                    f"try another block_size or a larger max_large_page_bytes"
                )
            if sorted(g.layers) != expected.get(layer_type):
                raise ValueError(f"{layer_type} layers: the KV spec has {sorted(g.layers)}, transformers groups "
                                 f"{expected.get(layer_type)}")
            window = getattr(g.spec, "window", None)
            if layer_type == SLIDING_ATTENTION and window != getattr(config, "sliding_window", None):
                raise ValueError(f"sliding window {window} differs from the config's {config.sliding_window}")
            allocator = ElasticGroupAllocator(self, len(self.cache_allocators), layer_type, g)
            self.cache_allocators[layer_type] = allocator
            for layer in g.layers:
                self.layer_to_allocator[layer] = allocator
        if self.kv.layout.groups[0].block_size < 4:
            raise ValueError("block_size must be at least 4 (trash, padding and marker rows share a block)")

    # -- trash block: one block per group, held while any request is --------------------

    def trash_block(self, group_id: int) -> int | None:
        """The group's trash block; None while no request is in flight."""
        if self._closed:
            return None
        table = self.kv.managers[group_id].req_blocks.get(_TRASH_ID)
        return table[0] if table else None

    def _hold_trash(self) -> bool:
        if _TRASH_ID in self.kv.requests:
            return True
        self.kv.add_request(_TRASH_ID, [0])
        if not self.kv.allocate_slots(_TRASH_ID, 1):
            self.kv.free(_TRASH_ID)
            return False
        for g, space in zip(self.kv.layout.groups, self.kv.spaces):
            b = self.kv.managers[g.group_id].req_blocks[_TRASH_ID][0]
            # Padding tokens read row 0 under a masked score: it must hold finite values.
            space.bytes_view()[b * g.padded_small_bytes:(b + 1) * g.padded_small_bytes].zero_()
        return True

    def _release_trash_if_idle(self) -> None:
        if _TRASH_ID in self.kv.requests and len(self.kv.requests) == 1:
            self.kv.free(_TRASH_ID)

    # -- lookback holds ---------------------------------------------------------------
    # A sliding group keeps only the window of the request's length. A prefill
    # step that continues a request (past > 0) with several new tokens needs
    # the window before its first new token, which allocating the step's slots
    # may trim. A fork of the request taken before allocating holds those
    # blocks (shared, not copied) until the step has run.

    def lookback_holder(self, request_id: str) -> str:
        return self._lookbacks.get(request_id, request_id)

    def release_lookbacks(self) -> None:
        for holder in self._lookbacks.values():
            self.kv.free(holder)
        self._lookbacks.clear()

    # -- admission and release ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this elastic paged cache was closed (ElasticServing.close())")

    def can_store_request_tokens(self, state: Any, request_len: int, dry_run: bool = False) -> bool:
        self._check_open()
        rid = state.request_id
        past = state.current_len()
        if dry_run:
            return self._fits_now(rid, past + request_len)
        if rid not in self.kv.requests:
            max_new = getattr(state, "max_new_tokens", None)
            self.serving.check_fits(len(state.initial_tokens) + (max_new or 0), request_id=rid,
                                    block_size=self.kv.block_size)
            if not self._hold_trash():
                return False
            self.kv.add_request(rid, list(state.initial_tokens) or [0])
        have = self.kv.requests[rid].num_tokens
        if self.chunks_to_grow([(rid, past + request_len)]) > self.free_chunks():
            return False  # would fail: do not map chunks only to unmap them again
        needs_lookback = (past > 0 and request_len > 1 and rid not in self._lookbacks
                          and SLIDING_ATTENTION in self.cache_allocators)
        if needs_lookback:
            try:
                self.kv.fork(rid, rid + _LOOKBACK_SUFFIX)
            except OutOfMemoryError:
                return False
            self._lookbacks[rid] = rid + _LOOKBACK_SUFFIX
        if self.kv.allocate_slots(rid, max(0, past + request_len - have)):
            self._order_copies()
            return True
        if needs_lookback:
            self.kv.free(self._lookbacks.pop(rid))
        return False

    def _fits_now(self, request_id: str, total_tokens: int) -> bool:
        """Whether a request of total_tokens would get its blocks now."""
        return self.chunks_to_grow([(request_id, total_tokens)]) <= self.free_chunks()

    def chunks_to_grow(self, growth: list[tuple[str, int]]) -> int:
        """Chunks the pool must give for each (request, total tokens) to get
        its blocks, together (free slots of mapped pages counted first). A
        request the manager does not know counts from nothing."""
        needed = [0] * len(self.kv.managers)
        for request_id, total_tokens in growth:
            for i, m in enumerate(self.kv.managers):
                if request_id in self.kv.requests:
                    needed[i] += m.num_new_blocks(request_id, total_tokens)
                else:
                    needed[i] += m.end_block(total_tokens) - m.first_needed_block(total_tokens)
        return self._chunks_short(needed)

    # -- swap to the pool's host tier (the SLO-aware scheduler's preemption) ----------------

    def swap_out(self, request_id: str) -> int:
        """Moves a request's KV to the pool's host tier and waits for the
        copies; its block ids and its length stay. Returns the bytes moved.
        OutOfMemoryError (nothing moved) when the host tier has no room."""
        self._check_open()
        holder = self._lookbacks.pop(request_id, None)
        if holder is not None:
            self.kv.free(holder)
        moved = self.kv.swap_out(request_id)
        self.kv.wait_swap(request_id)
        return moved

    def swap_in(self, request_id: str) -> None:
        """Brings a swapped-out request back, bit-exact, before the next forward."""
        self._check_open()
        self.kv.swap_in(request_id)
        self.kv.wait_swap(request_id)
        self._order_copies()

    def _chunks_short(self, blocks_per_group: list[int]) -> int:
        return sum(bp.chunks_needed(n) for n, bp in zip(blocks_per_group, self.kv.pools) if n > 0)

    def free_chunks(self) -> int:
        self.kv.sync()
        return self.ellm_pool.available_chunks(self.kv.spaces[0].owner)

    def count_storable_requests(self, list_blocks_needed: list[dict[str, int]]) -> int:
        """How many of these requests, in order, would get their blocks (the
        offloading manager's question before it preempts)."""
        room = self.free_chunks()
        total = [0] * len(self.kv.pools)
        for n, blocks_needed in enumerate(list_blocks_needed):
            for name, count in blocks_needed.items():
                total[self.cache_allocators[name].group.group_id] += count
            if self._chunks_short(total) > room:
                return n
        return len(list_blocks_needed)

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        if self._closed:
            return
        holder = self._lookbacks.pop(request_id, None)
        if holder is not None:
            self.kv.free(holder)
        if request_id in self.kv.requests:
            self.kv.free(request_id)
        self._release_trash_if_idle()

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        if self._closed:
            return
        self.release_lookbacks()
        for rid in list(self.kv.requests):
            self.kv.free(rid)

    def reset(self) -> None:
        self.free_all_requests()

    def evict_cached_blocks(self) -> bool:
        return False  # no prefix cache: nothing is kept past its request

    def compute_free_capacity(self, relative: bool = True) -> int | float:
        """Free KV memory: what the pool can still give (the budget, not a
        fixed cache, is the capacity), plus free slots of mapped pages."""
        free = self.free_chunks() * self.kv.layout.chunk_bytes
        free += sum(bp.num_free_slots() * g.padded_small_bytes for g, bp in zip(self.kv.layout.groups, self.kv.pools))
        if not relative:
            return free
        return min(1.0, free / self.ellm_pool.stats()["budget_bytes"])

    # -- prefix sharing (off) and forks ---------------------------------------------------

    def search_prefix_match(self, request_id: str, prompt_ids: list[int]) -> int:
        return 0

    def count_new_complete_blocks(self, state: Any, request_len: int) -> dict[str, int]:
        return {}

    def mark_complete_blocks(self, state: Any, complete_blocks: dict[str, int]) -> None:
        return None

    def prepare_fork_request(self, src_state: Any, dst_req_ids: list[str],
                             copy_src_and_dst: dict[str, tuple[list[int], list[int]]]) -> list[str]:
        """Forks the parent's KV into each child while the pool has room (full
        blocks shared, the partial ones copied now by the manager)."""
        self._check_open()
        forked = []
        for child in dst_req_ids:
            try:
                self.kv.fork(src_state.request_id, child)
            except OutOfMemoryError:
                break
            forked.append(child)
        self._order_copies()
        return forked

    def perform_cache_copy(self, copy_src_and_dst: dict[str, tuple[list[int], list[int]]]) -> None:
        return None  # prepare_fork_request's forks copied already

    def _order_copies(self) -> None:
        """The manager's copies (compaction, forks) run on the default stream;
        transformers' forward runs on a stream of its own."""
        if self.device.type == "cuda":
            torch.cuda.default_stream(self.device).synchronize()

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Frees every request and gives the group ranges back to the pool."""
        if self._closed:
            return
        self.free_all_requests()
        self._closed = True
        self.kv.close()

    def usage(self) -> dict:
        return self.kv.usage()


def _layers_by_attn_type(config: Any) -> dict[str, list[int]]:
    """Layers per attention type as transformers' continuous batching groups
    them (layer_types, else sliding_window for all layers, else full)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING_ATTENTION if getattr(config, "sliding_window", None) is not None else FULL_ATTENTION] * n
    out: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
            raise ValueError(f"layer {i} is {t!r}: transformers' continuous batching serves only full and "
                             f"sliding-window attention")
        out.setdefault(t, []).append(i)
    return out


def blocks_alone(group: KVGroup, total_tokens: int) -> int:
    """Blocks a lone request of total_tokens holds at its largest in a group."""
    blocks = ceil(total_tokens / group.block_size)
    window = getattr(group.spec, "window", None)
    if window is not None:  # the window, straddling at most one more block
        blocks = min(blocks, ceil(window / group.block_size) + 1)
    return blocks
