"""ElasticCache: a transformers Cache over ContiguousKV.

    cache = ElasticCache(model.config, max_batch_size=B, max_cache_len=L)
    model.generate(ids, attention_mask=mask, cache=cache)   # past_key_values= before 5.24

What it keeps from StaticCache: every layer's `keys` / `values` are fixed
tensors of shape [max_batch_size, kv_heads, max_cache_len, head_dim] whose
addresses never move, and sequence `b`'s tokens are one contiguous range of
virtual memory. What it changes: that range is only *reserved*. Chunks of the
pool are mapped under it as the sequence grows (one chunk per
(layer, K/V, sequence) at a time), so a short generation holds a few chunks,
never max_cache_len worth of memory. reset(), crop(), batch_select_indices()
and garbage collection (or close()) unmap them again and the chunks go back
to the pool.

Sliding-window layers (Mistral, Gemma-2/3, Qwen2 with sliding windows) keep
absolute token positions in the same [.., max_cache_len, ..] layout, but only
the chunks under the last `window` tokens stay mapped: a token that leaves
the window gives its chunk back once the chunk holds no windowed token.
Chunked-attention layers (Llama-4) are handled the way transformers does, as
sliding windows of attention_chunk_size tokens.

Shapes returned to attention. Reading an unmapped page faults (SIGSEGV on a
host pool, an illegal address on CUDA), so update() cannot hand the full
max_cache_len view to attention the way StaticLayer does. It returns the
mapped, written prefix `keys[:batch, :, :length]` (for sliding layers: the
window the next queries need, as DynamicSlidingWindowLayer does), a view of
the fixed storage (no copy) except when a multi-token update overruns a
sliding window. get_mask_sizes() reports those exact lengths and offsets, so
transformers' mask functions build masks that match what attention sees
(causal, sliding and padding masks alike): nothing past the current length
is ever read. Because the returned length changes each step, the cache is
not torch.compile-able (is_compileable is False), unless it is built with
fixed_shapes=True: then update() returns StaticCache's fixed shapes, and
unwritten chunks read as zeros through the pool's read-only zero chunk
(ellm_alloc/hf/fixed.py).

Layer support, for any model type: the layer kinds are read from the config
as transformers reads them (`ellm_alloc.kv.hf_config.cache_layer_kinds`:
layer_types, else sliding_window / attention_chunk_size, shared-KV and
attention-free layers keeping nothing), and each layer's heads, head dims
(K's and V's may differ, as in MLA models) and dtype are those of its first
update(). Each attention layer has a PageSpace of its own (pool owner
"hf.full" for every full layer, "hf.sliding<i>" for sliding ones).
Linear-attention and Mamba layers (and hybrids of both) keep their conv and
recurrent states in pool slots shared by all such layers (ellm_alloc.hf.linear,
owner "hf.states<i>"); sparse-attention (DSA) layers keep their indexer keys
in a token range beside K/V (owner "hf.indexer"). Models that accept only a
cache class of their own (MiniMax) get a subclass of it (own_caches). Layer
types that need something else (compressed attention) are refused at
construction with a ValueError naming the layer, transformers' layer class and
the method it needs.

Batches: generate() may use up to max_batch_size sequences (beam search and
num_return_sequences count: pass batch * num_beams). All sequences of the
batch have the same length (left padding, as generate() does). reorder_cache
(beam search), batch_select_indices and batch_repeat_interleave move K/V
between the per-sequence ranges in place.

Memory: by default the pool `ellm_alloc.enable()` routes the model's device
to (CUDA, or CPU: then weights, activations and KV share one pool); a CPU
model without enable() gets a host pool of the cache's own (budget=
argument, default: the machine's memory, a cap: the pool only commits the
chunks in use). Or pass `pool=`. The device, dtype and head shapes are
taken from the first update(). Tensors returned by update() are views of the
cache's memory: do not read them after reset(), crop() or close().

Offload to the host tier: `cache.offload(batch_indices)` moves those
sequences' K/V (every attention layer: full, sliding, the DSA indexer keys)
to the pool's host tier (Pool(..., cpu_budget=...)) asynchronously, at the
page level (ellm_alloc.kv.space.PageSpace.swap_out): their device chunks go
back to the pool once the copies are done (`offload_ready()`,
`wait_swaps()`), while their virtual addresses stay reserved.
`cache.restore()` maps fresh chunks at the same addresses and copies the
bytes back, bit-exact, so the layers' `keys` / `values` tensors stay valid
and generation continues as if nothing happened. Offloaded sequences cannot
be read or written: a forward step, reorder_cache, batch_repeat_interleave
or crop while any sequence is offloaded raises RuntimeError (restore first;
see ElasticCache.offload for why this is an error, not an implicit
restore). batch_select_indices may drop offloaded sequences (their host
copies are freed), not keep them; reset() and close() free every host copy.
Linear-attention / Mamba states are not offloaded: they stay resident (they
share chunks across sequences, and are a few slots per sequence).
transformers' own per-layer offloading (Cache(offloading=True), the layers'
offload() / prefetch() hooks) is not used: the hooks are no-ops and
`offloading` is always False.

Supported transformers: 5.17 to 5.24 (pyproject's `hf` extra; 5.24 names the
generate() argument `cache=`, `past_key_values=` still works there). 5.24's
API is the reference; for the older ones: get_mask_sizes() also takes a
cache_position tensor, crop() also takes a positive length to keep, and
get_max_cache_shape() is provided next to get_max_length().
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import OutOfMemoryError
from ..kv.hf_config import CacheLayerKind, cache_layer_kinds, text_config
from ..kv.space import SWAPPED
from ..pool import Pool
from .linear import ElasticLinearLayer, _as_rows
from .storage import PackedStates, StateRegion, TokenRanges

__all__ = ["ElasticCache"]

try:  # transformers >= 5.2x: the layer it gives shared-KV and attention-free layers
    from transformers.cache_utils import DummyLayer as _NoCacheLayer
except ImportError:  # pragma: no cover - older transformers
    class _NoCacheLayer:  # type: ignore[no-redef]
        """A layer that keeps nothing (shared-KV consumers, MoE/MLP-only layers)."""

        supports_early_init = False
        is_compileable = True
        is_croppable = True

        def __init__(self, **kwargs):
            self.is_initialized = True
            self.keys = self.values = None

        def update(self, key_states, value_states, *args, **kwargs):
            raise RuntimeError("this layer keeps no cache (shared-KV or attention-free): update() is a misuse")

        def offload(self): ...
        def prefetch(self): ...
        def reset(self): ...
        def crop(self, tokens_to_remove: int): ...
        def reorder_cache(self, beam_idx): ...
        def batch_repeat_interleave(self, repeats: int): ...
        def batch_select_indices(self, indices): ...

        def get_max_length(self):
            return -1


def _query_length(q: Any) -> int:
    """5.23 passes the query length; 5.17 passes the cache_position tensor."""
    if isinstance(q, torch.Tensor):
        return int(q.shape[-1]) if q.dim() else int(q)
    return int(q)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-Linux
        return 64 << 30


# What transformers' cache layers need beyond update(), for the refusal message
# of a layer type ElasticCache does not hold.
_NEEDS = {
    "heavily_compressed_attention": "its compressed-attention update()",
    "compressed_sparse_attention": "its compressed-attention update()",
}


def _transformers_layer_class(layer_type: str) -> str:
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
    except ImportError:  # pragma: no cover - older transformers
        return "an unknown cache layer class"
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)
    return cls.__name__ if cls is not None else "the cache layer class its modeling module registers"


class _Backing:
    """What the layers of one cache share: the sizes, the pool (chosen at the
    first update, from the model's device) and every layer's storage, closed
    together by close() or garbage collection."""

    def __init__(self, max_batch: int, max_len: int, pool: Pool | None, budget: Any,
                 fixed_shapes: bool = False):
        self.fixed_shapes = fixed_shapes
        self.max_batch = max_batch
        self.max_len = max_len
        self.pool = pool
        self.budget = budget
        self.own_pool = False
        self.stores: list[TokenRanges | PackedStates] = []
        self.states: PackedStates | None = None  # every linear layer's states, made at the first
        self.device: torch.device | None = None
        self.closed = False
        # Rows that cannot be read or written: OFFLOADED (in the host tier) or
        # DROPPED (their bytes given up by a batch_select_indices that could
        # not finish). Checked by every write path (one dict test when empty).
        self.absent: dict[int, str] = {}
        # Ranges with swap-ins under way (host chunks still held): each layer's
        # update polls its own range until they are done.
        self.pending: set[TokenRanges] = set()

    def pool_for(self, device: torch.device) -> Pool:
        if self.closed:
            raise RuntimeError("ElasticCache is closed")
        if self.device is not None:
            if device != self.device:
                raise ValueError(f"ElasticCache: states on {device}, but the cache is on {self.device} "
                                 "(one cache serves one device)")
            return self.pool
        self.pool = self._pick_pool(device)
        self.device = device
        return self.pool

    def _pick_pool(self, device: torch.device) -> Pool:
        if self.pool is not None:
            pool = self.pool
            want = "cpu" if device.type == "cpu" else "cuda"
            if pool.tensor_device_type != want or (want == "cuda" and device.index is not None
                                                   and pool.device != device.index):
                raise ValueError(f"ElasticCache: the pool ({pool.backend}:{pool.device}) is not on the "
                                 f"model's device {device}")
            return pool
        from ..integrations.torch_allocator import device_pool, enabled_device

        if device.type == "cpu" and enabled_device() == "cpu":  # the pool torch's CPU tensors come from
            return device_pool()
        if device.type == "cpu":
            # A host pool's budget is a cap, not a reservation: chunks are
            # created as they are mapped. Without budget=, the cap is the
            # machine's memory (the layers' shapes are only known one by one,
            # at their first updates, so no tighter worst case exists here).
            budget = self.budget if self.budget is not None else _physical_memory()
            self.own_pool = True
            return Pool("cpu", budget=budget)
        if device.type == "cuda":
            if enabled_device() != "cuda":
                raise RuntimeError(
                    "ElasticCache on a CUDA model needs ellm_alloc's CUDA pool: call ellm_alloc.enable() "
                    "before loading the model, or pass pool="
                )
            return device_pool(device)
        raise ValueError(f"ElasticCache: unsupported device {device} (cpu or cuda)")

    def token_ranges(self, name: str, shapes, dtype: torch.dtype, device: torch.device) -> TokenRanges:
        if self.fixed_shapes:  # zero-filled ranges (fixed.py)
            from .fixed import FixedTokenRanges as ranges
        else:
            ranges = TokenRanges
        store = ranges(self.pool_for(device), name, self.max_batch, self.max_len, shapes, dtype)
        self.stores.append(store)
        return store

    def state_region(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                     batch: int) -> StateRegion:
        """Slots for one more state (pool owner "hf.states<segment>")."""
        if self.states is None:
            self.states = PackedStates(self.pool_for(device), "hf.states", self.max_batch)
            self.stores.append(self.states)
        else:
            self.pool_for(device)  # the same device as the other layers
        self._check_batch(batch)
        return self.states.add(shape, dtype)

    def fit_states(self, batch: int) -> None:
        """Maps the state slots of sequences [0, batch), unmaps the others."""
        self._check_batch(batch)
        if self.states is not None:
            self.states.fit(batch)

    def states_batch(self) -> int:
        return self.states.batch if self.states is not None else 0

    def _check_batch(self, batch: int) -> None:
        if batch > self.max_batch:
            raise ValueError(
                f"ElasticCache: batch of {batch} sequences exceeds max_batch_size={self.max_batch} "
                "(beam search and num_return_sequences multiply the batch; size the cache for that)"
            )

    def token_stores(self) -> list[TokenRanges]:
        return [st for st in self.stores if isinstance(st, TokenRanges)]

    def before_write(self, what: str, store: TokenRanges | None = None) -> None:
        """Refuses `what` while sequences are absent; ends `store`'s finished swap-ins."""
        if self.absent:
            raise RuntimeError(self.absent_message(what))
        if store is not None and store in self.pending:
            self.poll_swaps([store])

    def absent_message(self, what: str) -> str:
        offloaded = sorted(r for r, k in self.absent.items() if k == OFFLOADED)
        dropped = sorted(r for r, k in self.absent.items() if k == DROPPED)
        parts = []
        if offloaded:
            parts.append(f"sequences {offloaded} are offloaded to the host tier (call cache.restore() first)")
        if dropped:
            parts.append(f"sequences {dropped} were dropped by a batch_select_indices that ran out of memory "
                         "(call batch_select_indices again without them, or reset())")
        return f"ElasticCache: cannot {what}: " + "; ".join(parts)

    def poll_swaps(self, stores=None) -> None:
        """Ends the swaps of `stores` (default: those pending) whose copies are
        done; a range stays pending while some are not."""
        for st in list(self.pending if stores is None else stores):
            st.space.finish_swaps()
            if st.space.stats()["swapping_pages"] == 0:
                self.pending.discard(st)
            else:
                self.pending.add(st)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.absent = {}
        self.pending = set()
        for st in self.stores:
            st.close()
        self.stores = []
        self.states = None
        if self.own_pool and self.pool is not None:
            self.pool.close()
        self.pool = None


OFFLOADED, DROPPED = "offloaded", "dropped"


class ElasticLayer(CacheLayerMixin):
    """One attention layer of an ElasticCache (full, or sliding with `window`)."""

    is_compileable = False
    supports_early_init = True

    def __init__(self, backing: _Backing, index: int, window: int | None = None):
        super().__init__()
        self._backing = backing
        self.index = index
        self.window = window
        self.is_sliding = window is not None
        self.max_cache_len = backing.max_len
        self.length = 0  # tokens seen (the position of the next token)
        self.batch = 0  # sequences in use
        self._store: TokenRanges | None = None

    def __repr__(self) -> str:
        kind = f"sliding({self.window})" if self.is_sliding else "full"
        return f"ElasticLayer({self.index}, {kind}, length={self.length}, batch={self.batch})"

    @property
    def is_croppable(self) -> bool:
        """A full layer can be cropped to any length; a sliding one only while
        the tokens the cropped length needs are still in the window."""
        return self.window is None

    # ---- setup --------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Reserves the layer's ranges with the heads, head dims (K's and V's
        may differ), dtype and device of these first states."""
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(f"ElasticCache layer {self.index}: key/value states must be "
                             f"[batch, heads, tokens, head_dim], got {tuple(key_states.shape)} / "
                             f"{tuple(value_states.shape)}")
        if value_states.dtype != key_states.dtype or value_states.device != key_states.device:
            raise ValueError(f"ElasticCache layer {self.index}: key and value states differ in dtype or device")
        shapes = ((key_states.shape[1], key_states.shape[3]), (value_states.shape[1], value_states.shape[3]))
        # Pool owner names: the full layers share "hf.full" (the ledger sums
        # them), each sliding layer is "hf.sliding<i>" as before.
        name = f"hf.sliding{self.index}" if self.is_sliding else "hf.full"
        self._store = self._backing.token_ranges(name, shapes, key_states.dtype, key_states.device)
        self.keys, self.values = self._store.views()
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        (hk, dk), (hv, dv) = self._store.shapes
        shape_k, shape_v = tuple(key_states.shape), tuple(value_states.shape)
        if (key_states.dim() != 4 or value_states.dim() != 4 or shape_k[1] != hk or shape_k[3] != dk
                or shape_v[1] != hv or shape_v[3] != dv or shape_v[0] != shape_k[0] or shape_v[2] != shape_k[2]):
            raise ValueError(
                f"ElasticCache layer {self.index}: expected key states [batch, {hk}, tokens, {dk}] and value "
                f"states [batch, {hv}, tokens, {dv}] (as at the first update), got {shape_k} / {shape_v}"
            )
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(f"ElasticCache layer {self.index}: states are {key_states.dtype} on "
                             f"{key_states.device}, the cache holds {self.dtype} on {self.device}")
        batch = shape_k[0]
        if batch > self._backing.max_batch:
            raise ValueError(
                f"ElasticCache: batch of {batch} sequences exceeds max_batch_size={self._backing.max_batch} "
                "(beam search and num_return_sequences multiply the batch; size the cache for that)"
            )
        if self.length and batch != self.batch:
            raise ValueError(
                f"ElasticCache layer {self.index}: batch changed from {self.batch} to {batch} with "
                f"{self.length} tokens cached; use batch_select_indices / batch_repeat_interleave or reset()"
            )
        end = self.length + shape_k[2]
        if end > self._backing.max_len:
            raise ValueError(
                f"ElasticCache: sequence of {end} tokens exceeds max_cache_len={self._backing.max_len} "
                f"({self.length} cached + {shape_k[2]} new)"
            )

    # ---- the forward path -----------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        backing = self._backing
        if backing.absent or backing.pending:
            backing.before_write("run a forward step", self._store)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        batch, q = key_states.shape[0], key_states.shape[2]
        past, end = self.length, self.length + q
        K, V = self.keys, self.values
        if not self.is_sliding:
            self._store.fit(batch, 0, end)
            K[:batch, :, past:end].copy_(key_states)
            V[:batch, :, past:end].copy_(value_states)
            self.length, self.batch = end, batch
            return K[:batch, :, :end], V[:batch, :, :end]

        w = self.window
        lo = max(past - w + 1, 0)  # the oldest token the first new query sees
        kept_from = max(end - w, 0)  # the oldest token the store keeps once it holds `end`
        if lo >= kept_from:
            # The store still holds every token attention needs: answer with a view.
            self._store.fit(batch, kept_from, end)
            K[:batch, :, past:end].copy_(key_states)
            V[:batch, :, past:end].copy_(value_states)
            self.length, self.batch = end, batch
            return K[:batch, :, lo:end], V[:batch, :, lo:end]
        # Several new tokens overrun the window: attention needs old tokens that
        # the store is about to unmap. Take them first, then slide and keep only
        # the tokens of the new window.
        old_k = K[:batch, :, lo:past].clone()
        old_v = V[:batch, :, lo:past].clone()
        self._store.fit(batch, kept_from, end)
        first = max(past, kept_from)
        K[:batch, :, first:end].copy_(key_states[:, :, first - past:])
        V[:batch, :, first:end].copy_(value_states[:, :, first - past:])
        self.length, self.batch = end, batch
        return torch.cat((old_k, key_states), dim=2), torch.cat((old_v, value_states), dim=2)

    def get_mask_sizes(self, query_length: Any, *args, **kwargs) -> tuple[int, int]:
        """(kv_length, kv_offset) of what update() returns for query_length new tokens."""
        q = _query_length(query_length)
        if not self.is_sliding:
            return self.length + q, 0
        offset = max(self.length - self.window + 1, 0)
        return self.length + q - offset, offset

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:  # transformers < 5.2x name
        return self.max_cache_len

    # ---- memory-level edits -----------------------------------------------------------

    def _kept(self, length: int | None = None) -> tuple[int, int]:
        """The token range this layer holds for every sequence (at `length` tokens)."""
        length = self.length if length is None else length
        start = max(length - self.window, 0) if self.is_sliding else 0
        return start, length

    def refit(self) -> None:
        """Maps exactly what (batch, length) needs: drops sequences at or above batch."""
        if self._store is not None:
            self._store.fit(self.batch, *self._kept())

    def reset(self) -> None:
        self.length = 0
        self.batch = 0
        if self._store is not None:
            self._store.fit(0, 0, 0)

    def crop(self, tokens: int) -> None:
        """crop(-k) drops the last k tokens (5.2x); crop(n) with n > 0 keeps the
        first n (the older convention); crop(0) does nothing."""
        if tokens < 0:
            target = max(self.length + tokens, 0)
        elif tokens == 0:
            return
        else:
            target = min(tokens, self.length)
        if target >= self.length:
            return
        self._backing.before_write("crop")
        if self.is_sliding and target > 0:
            need = max(target - self.window + 1, 0)
            if need < max(self.length - self.window, 0):
                raise RuntimeError(
                    f"ElasticCache layer {self.index}: cannot crop a sliding-window layer (window "
                    f"{self.window}) from {self.length} to {target} tokens: tokens from {need} on are "
                    f"needed but only those from {self.length - self.window} are kept"
                )
        self.length = target
        self.refit()

    def _move_rows(self, src_rows: torch.Tensor) -> None:
        """Sequence i becomes old sequence src_rows[i], for i < len(src_rows)."""
        start, end = self._kept()
        n = src_rows.numel()
        if end == start or n == 0:
            return
        src_rows = src_rows.to(self.device)
        for t in (self.keys, self.values):
            moved = t[:, :, start:end].index_select(0, src_rows)  # a copy: sources may be overwritten
            t[:n, :, start:end].copy_(moved)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized or self.length == 0:
            return
        self._backing.before_write("reorder_cache")
        if beam_idx.numel() != self.batch:
            raise ValueError(f"reorder_cache: {beam_idx.numel()} indices for a batch of {self.batch}")
        self._move_rows(beam_idx.long())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences `indices`. Their chunks of dropped sequences are
        unmapped by ElasticCache.batch_select_indices (or at the next update)."""
        if not self.is_initialized or self.length == 0:
            return
        self._backing.before_write("batch_select_indices")  # ElasticCache's drops absent rows first
        idx = _as_rows(indices, self.batch)
        self._move_rows(idx)
        self.batch = idx.numel()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized or self.length == 0:
            return
        self._backing.before_write("batch_repeat_interleave")
        new = self.batch * repeats
        if new > self._backing.max_batch:
            raise ValueError(f"batch_repeat_interleave: {self.batch} x {repeats} = {new} sequences exceed "
                             f"max_batch_size={self._backing.max_batch}")
        self._store.fit(new, *self._kept())  # maps the new sequences' ranges
        self._move_rows(torch.arange(self.batch).repeat_interleave(repeats))
        self.batch = new

    # transformers' per-layer offloading hooks (Cache(offloading=True), which
    # ElasticCache never sets): no-ops. The memory is the pool's, and moving
    # tensors to the CPU would drop the fixed addresses; ElasticCache.offload
    # moves whole sequences to the pool's host tier at the same addresses.
    def offload(self):
        pass

    def prefetch(self):
        pass


class ElasticIndexedLayer(ElasticLayer):
    """A sparse-attention (DSA) layer, transformers' "indexed_attention": K/V
    as a full ElasticLayer, and the indexer's keys ([batch, tokens, ...], one
    per token) in a token range of their own (pool owner "hf.indexer"),
    mapped as the sequence grows like K and V. update_indexer returns the
    written prefix, as transformers' DynamicIndexedLayer returns its
    concatenation. The indexer positions some models keep
    (indexer_position_ids, a few ints per token) stay an ordinary tensor."""

    def __init__(self, backing: _Backing, index: int):
        super().__init__(backing, index, None)
        self._indexer: TokenRanges | None = None
        self._indexer_view: torch.Tensor | None = None  # [max_batch, max_len, width]
        self._indexer_shape: tuple[int, ...] = ()  # each token's shape
        self.indexer_length = 0
        self.indexer_batch = 0
        self.indexer_position_ids: torch.Tensor | None = None
        self.is_indexer_initialized = False

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        if self._backing.absent or self._backing.pending:
            self._backing.before_write("run a forward step", self._indexer)
        x = indexer_key_states
        if x.dim() < 3:
            raise ValueError(f"ElasticCache layer {self.index}: indexer keys must be [batch, tokens, ...], "
                             f"got {tuple(x.shape)}")
        batch, q, shape = x.shape[0], x.shape[1], tuple(x.shape[2:])
        if self._indexer is None:
            width = math.prod(shape)
            self._indexer = self._backing.token_ranges("hf.indexer", ((1, width),), x.dtype, x.device)
            self._indexer_view = self._indexer.views()[0][:, 0]
            self._indexer_shape = shape
            self.is_indexer_initialized = True
        if shape != self._indexer_shape or x.dtype != self._indexer.dtype:
            raise ValueError(f"ElasticCache layer {self.index}: indexer keys were {self._indexer_shape} "
                             f"{self._indexer.dtype} per token, now {shape} {x.dtype}")
        self._backing._check_batch(batch)
        if self.indexer_length and batch != self.indexer_batch:
            raise ValueError(f"ElasticCache layer {self.index}: batch changed from {self.indexer_batch} to "
                             f"{batch} with {self.indexer_length} indexer keys cached")
        end = self.indexer_length + q
        if end > self._backing.max_len:
            raise ValueError(f"ElasticCache: sequence of {end} tokens exceeds max_cache_len={self._backing.max_len}")
        self._indexer.fit(batch, 0, end)
        view = self._indexer_view
        view[:batch, self.indexer_length:end].copy_(x.reshape(batch, q, -1))
        self.indexer_length, self.indexer_batch = end, batch
        return view[:batch, :end].view(batch, end, *shape)

    def _refit_indexer(self) -> None:
        if self._indexer is not None:
            self._indexer.fit(self.indexer_batch, 0, self.indexer_length)

    def refit(self) -> None:
        super().refit()
        self._refit_indexer()

    def reset(self) -> None:
        super().reset()
        self.indexer_length = self.indexer_batch = 0
        self.indexer_position_ids = None
        self._refit_indexer()

    def crop(self, tokens: int) -> None:
        super().crop(tokens)
        if tokens == 0:
            return
        if self.indexer_position_ids is not None:
            keep = self.indexer_position_ids.shape[-1] + tokens if tokens < 0 else tokens
            self.indexer_position_ids = self.indexer_position_ids[..., :max(keep, 0)]
        target = max(self.indexer_length + tokens, 0) if tokens < 0 else min(tokens, self.indexer_length)
        if target < self.indexer_length:
            self.indexer_length = target
            self._refit_indexer()

    def _move_indexer_rows(self, src_rows: torch.Tensor, batch: int) -> None:
        if self.indexer_length and src_rows.numel():
            part = self._indexer_view[:, :self.indexer_length]
            part[:src_rows.numel()].copy_(part.index_select(0, src_rows.to(part.device)))
        if self.indexer_position_ids is not None:
            self.indexer_position_ids = self.indexer_position_ids.index_select(
                1, src_rows.to(self.indexer_position_ids.device))
        self.indexer_batch = batch

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.indexer_length:
            self._move_indexer_rows(beam_idx.long(), self.indexer_batch)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.indexer_length:
            rows = _as_rows(indices, self.indexer_batch)
            self._move_indexer_rows(rows, rows.numel())  # ElasticCache then refits (unmaps the rest)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.indexer_length:
            new = self.indexer_batch * repeats
            self._indexer.fit(new, 0, self.indexer_length)
            self._move_indexer_rows(torch.arange(self.indexer_batch).repeat_interleave(repeats), new)

    def forget_indexer(self) -> None:
        """After close(): the storage is gone."""
        self._indexer = self._indexer_view = None
        self.indexer_length = self.indexer_batch = 0
        self.is_indexer_initialized = False


class ElasticHybridLayer(ElasticLinearLayer, ElasticLayer):
    """A layer with both recurrent states and per-token K/V (transformers'
    "hybrid" and "hybrid_sliding" types): the states in pool slots as an
    ElasticLinearLayer, the K/V as an ElasticLayer (full, or sliding with
    `window`). Each method dispatches to the part it concerns, as
    transformers' LinearAttentionAndFullAttentionLayer does."""

    is_compileable = False

    def __init__(self, backing: _Backing, index: int, window: int | None, number_of_states: int = 1):
        ElasticLayer.__init__(self, backing, index, window)
        ElasticLinearLayer.__init__(self, backing, index, number_of_states)

    def __repr__(self) -> str:
        kind = f"sliding({self.window})" if self.is_sliding else "full"
        return (f"ElasticHybridLayer({self.index}, {kind}, length={self.length}, batch={self.batch}, "
                f"state_batch={self.state_batch})")

    @property
    def is_croppable(self) -> bool:
        return ElasticLinearLayer.is_croppable.fget(self) and ElasticLayer.is_croppable.fget(self)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # update(key_states, value_states)
            ElasticLayer.lazy_initialization(self, *args)
        else:  # update_conv_state / update_recurrent_state, by keyword
            ElasticLinearLayer.lazy_initialization(self, *args, **kwargs)

    def get_max_length(self) -> int:
        return ElasticLayer.get_max_length(self)

    def reset(self) -> None:
        ElasticLinearLayer.reset(self)
        ElasticLayer.reset(self)

    def crop(self, tokens: int) -> None:
        ElasticLinearLayer.crop(self, tokens)
        ElasticLayer.crop(self, tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        ElasticLinearLayer.reorder_cache(self, beam_idx)
        ElasticLayer.reorder_cache(self, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        ElasticLinearLayer.batch_select_indices(self, indices)
        ElasticLayer.batch_select_indices(self, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        ElasticLinearLayer.batch_repeat_interleave(self, repeats)
        ElasticLayer.batch_repeat_interleave(self, repeats)


class ElasticCache(Cache):
    """A transformers Cache whose K/V live in pool chunks (see the module docstring).

    config: the model's config (its text config is used for multimodal ones).
    max_batch_size: most sequences at once (beam search: batch * num_beams).
    max_cache_len: most tokens per sequence (prompt + generated); only VA is
        reserved for it.
    pool: the Pool to map chunks from (default: the pool ellm_alloc.enable()
        routes the model's device to; for a CPU model without enable(), a host
        pool of the cache's own).
    budget: that own host pool's budget (default: the machine's memory; it is
        a cap, the pool only commits the chunks in use).
    fixed_shapes: StaticCache's shapes, for torch.compile: update() returns
        the whole [batch, heads, max_cache_len, head_dim] views and unwritten
        chunks read as zeros through the pool's shared read-only zero chunk
        (ellm_alloc/hf/fixed.py); is_compileable is then True.
    """

    def __new__(cls, config: Any = None, *args, **kwargs):
        # Models that accept only a cache class of their own get a subclass
        # of both (ellm_alloc.hf.own_caches).
        if cls is ElasticCache and config is not None:
            from .own_caches import own_cache_class

            cls = own_cache_class(ElasticCache, config) or cls
        return super().__new__(cls)

    def __init__(self, config: Any, max_batch_size: int = 1, max_cache_len: int | None = None, *,
                 pool: Pool | None = None, budget: Any = None, fixed_shapes: bool = False, **kwargs):
        if max_cache_len is None:
            raise ValueError("ElasticCache needs max_cache_len (the most tokens a sequence may reach)")
        if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0
                or isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0):
            raise ValueError(f"max_batch_size and max_cache_len must be positive ints, got "
                             f"{max_batch_size!r}, {max_cache_len!r}")
        if not isinstance(fixed_shapes, bool):
            raise TypeError(f"fixed_shapes must be True or False, got {fixed_shapes!r}")
        if kwargs.get("offloading"):
            raise ValueError(_NO_LAYER_OFFLOADING)
        text = text_config(config)
        kinds = cache_layer_kinds(text)
        _refuse_unheld(kinds, getattr(text, "model_type", "?"))
        backing = _Backing(max_batch_size, max_cache_len, pool, budget, fixed_shapes)
        # Cache.__init__ by name: a subclass for a model's own cache class
        # (own_caches) must not run that class's constructor.
        Cache.__init__(self, layers=[_make_layer(backing, i, k) for i, k in enumerate(kinds)])
        self._backing = backing
        # Unmap everything and close the spaces when the cache is collected.
        self._finalizer = weakref.finalize(self, _Backing.close, backing)

    def _attention_layers(self) -> list[ElasticLayer]:
        return [layer for layer in self.layers if isinstance(layer, ElasticLayer)]

    # transformers' Cache(offloading=True) moves each layer to the CPU after its
    # update and back before the next (calling offload(layer_idx, ...), which
    # here is the per-sequence offload below): never on for ElasticCache.
    @property
    def offloading(self) -> bool:
        return False

    @offloading.setter
    def offloading(self, value: bool) -> None:
        if value:
            raise ValueError(_NO_LAYER_OFFLOADING)

    # Mamba-style decode kernels update the conv / recurrent states in place
    # through the tensors these return (causal_conv1d_update,
    # selective_state_update), with no update_*_state call: while sequences
    # are offloaded, handing them out is the first step of a forward step.
    if hasattr(Cache, "get_conv_state"):
        def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
            if self._backing.absent:
                self._backing.before_write("run a forward step")
            return super().get_conv_state(layer_idx, state_idx)

    if hasattr(Cache, "get_recurrent_state"):
        def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
            if self._backing.absent:
                self._backing.before_write("run a forward step")
            return super().get_recurrent_state(layer_idx, state_idx)

    # ---- offload to the pool's host tier -------------------------------------------

    def offload(self, batch_indices: Any = None, *, stream: Any = None) -> int:
        """Moves sequences `batch_indices` (ints, or a 1-D integer tensor; None:
        every sequence not offloaded yet) to the pool's host tier; returns the
        bytes that move.

        Asynchronous: the copies are queued after the work on `stream` (default:
        the device's current stream; on the host backend, a worker thread
        copies) and each page's device chunk goes back to the pool once its
        copy is done. offload_ready() says whether that happened, wait_swaps()
        waits for it; the pool also ends finished copies itself when it needs
        chunks. The tensors' addresses stay reserved, so after restore() every
        view of the cache (the layers' keys / values) is valid again.

        Every attention layer's K/V of those sequences moves (full and
        sliding layers, a DSA layer's indexer keys). Linear-attention / Mamba
        states stay resident: they are packed across sequences, one chunk
        holding several sequences' slots, and are small next to K/V.

        While any sequence is offloaded the cache refuses, with RuntimeError,
        every step that reads or writes rows: a forward step (update),
        reorder_cache, batch_repeat_interleave, crop. An error rather than an
        implicit restore, because a transformers forward step writes every
        row of the batch: an implicit restore would be a hidden, synchronous
        swap-in inside the model's forward, which can run out of device memory
        half-way through the layers with earlier layers already updated; an
        explicit restore() fails before anything runs and leaves the cache as
        it was. batch_select_indices may drop offloaded sequences, not keep
        them. Until restore(), do not read the rows' K/V tensors yourself: the
        pages are unmapped (a fault).

        All or nothing: RuntimeError when the pool has no host tier
        (cpu_budget 0), OutOfMemoryError when the tier has no room for them
        all, AllocatorError when a copy cannot be queued; the sequences then
        stay resident, as they were. ValueError for a fixed_shapes cache (its zero-filled pages
        do not swap) or a sequence offloaded already; IndexError / TypeError /
        ValueError for indices out of range, not ints, or listed twice."""
        backing = self._backing
        rows = self._rows(batch_indices, "offload", exclude_absent=True)
        if backing.fixed_shapes:
            raise ValueError("ElasticCache.offload: a fixed_shapes cache cannot offload (its unmapped pages "
                             "read as zeros through the zero chunk, which does not swap; compiled attention "
                             "reads every row)")
        for r in rows:
            if r in backing.absent:
                raise ValueError(f"ElasticCache.offload: sequence {r} is {backing.absent[r]} already")
        pool = self._require_host_tier("offload")
        if not rows:
            return 0
        stores = backing.token_stores()
        total = sum(len(st.row_pages([r for r in st.resident(rows)])) for st in stores)
        host = pool.host_tier()
        room = host["free_chunks"] + host["budget_bytes"] // host["chunk_bytes"] - host["created_chunks"]
        if total > room:
            raise OutOfMemoryError(f"ElasticCache.offload: the host tier has room for {room} chunks, sequences "
                                   f"{rows} need {total} (raise the pool's cpu_budget)")
        sid = self._stream_id(stream)
        done: list[tuple[TokenRanges, list[int]]] = []
        try:
            for st in stores:
                moved = st.swap_out(rows, sid)
                if moved:
                    done.append((st, moved))
        except BaseException as e:
            for st, moved in done:  # still swapping out: swapping in keeps their device chunks
                try:
                    st.swap_in(moved, sid)
                    st.space.finish_swaps(wait=True)
                except BaseException as undo:  # pragma: no cover - needs a second failure
                    e.add_note(f"ElasticCache.offload could not bring back {st.space.name}'s rows: {undo}")
            self._mark_swapped_rows(rows)
            raise
        for r in rows:
            backing.absent[r] = OFFLOADED
        return total * self._chunk_bytes()

    def restore(self, batch_indices: Any = None, *, stream: Any = None) -> None:
        """Brings offloaded sequences (None: all of them) back: fresh device
        chunks are mapped at the same addresses and the bytes copied back,
        bit-exact; work queued on `stream` (default: the device's current
        stream) from now on sees them (on the host backend this call waits for
        the copies). The host chunks go back to the tier once the copies are
        done (at once on the host backend; on a GPU at the next update,
        offload_ready() or wait_swaps()).

        All or nothing: OutOfMemoryError when the pool cannot give the device
        chunks; the sequences then stay offloaded (retry once memory is free).
        ValueError for a sequence that is not offloaded."""
        backing = self._backing
        if batch_indices is None:
            rows = sorted(r for r, k in backing.absent.items() if k == OFFLOADED)
        else:
            rows = self._rows(batch_indices, "restore")
            for r in rows:
                if backing.absent.get(r) != OFFLOADED:
                    why = "was dropped (out of memory in batch_select_indices)" if r in backing.absent \
                        else "is not offloaded"
                    raise ValueError(f"ElasticCache.restore: sequence {r} {why}")
        if not rows:
            return
        sid = self._stream_id(stream)
        done: list[tuple[TokenRanges, list[int]]] = []
        try:
            for st in backing.token_stores():
                back = st.swap_in(rows, sid)
                if back:
                    done.append((st, back))
        except BaseException as e:
            for st, back in done:  # out again, once their copies back have landed
                try:
                    st.space.finish_swaps(wait=True)
                    st.swap_out(back, sid)
                except BaseException as undo:  # pragma: no cover - needs a second failure
                    e.add_note(f"ElasticCache.restore: {st.space.name} stays restored: {undo}")
            raise
        for r in rows:
            del backing.absent[r]
        backing.poll_swaps([st for st, _ in done])

    def offload_ready(self, batch_indices: Any = None) -> bool:
        """Whether the offload of `batch_indices` (None: every offloaded
        sequence) is complete: every copy done and the device chunks back in
        the pool. Never blocks. ValueError for a sequence not offloaded."""
        backing = self._backing
        if batch_indices is None:
            rows = [r for r, k in backing.absent.items() if k == OFFLOADED]
        else:
            rows = self._rows(batch_indices, "offload_ready")
            for r in rows:
                if backing.absent.get(r) != OFFLOADED:
                    raise ValueError(f"ElasticCache.offload_ready: sequence {r} is not offloaded")
        for st in backing.token_stores():
            pages = st.row_pages([r for r in rows if r in st.swapped])
            if pages:
                st.space.finish_swaps()
                if any(st.space.state(p) != SWAPPED for p in pages):
                    return False
        return True

    def wait_swaps(self) -> None:
        """Waits for every swap of the cache under way: offloaded sequences'
        device chunks are back in the pool, restored ones' host chunks back
        in the host tier."""
        for st in self._backing.token_stores():
            st.space.finish_swaps(wait=True)
        self._backing.pending.clear()

    @property
    def offloaded(self) -> list[int]:
        """The sequences offloaded now (restore() brings them back)."""
        return sorted(r for r, k in self._backing.absent.items() if k == OFFLOADED)

    def offloaded_bytes(self) -> int:
        """Bytes of the cache's K/V in the host tier (or on their way there)."""
        return sum(st.host_bytes() for st in self._backing.token_stores())

    def _rows(self, batch_indices: Any, what: str, exclude_absent: bool = False) -> list[int]:
        """batch_indices as distinct row numbers of the current batch."""
        batch = self.batch_size
        if batch <= 0:
            raise ValueError(f"ElasticCache.{what}: the cache holds no sequences")
        if batch_indices is None:
            return [r for r in range(batch) if not (exclude_absent and r in self._backing.absent)]
        if isinstance(batch_indices, torch.Tensor):
            if batch_indices.dtype == torch.bool or batch_indices.is_floating_point() \
                    or batch_indices.is_complex() or batch_indices.dim() > 1:
                raise TypeError(f"ElasticCache.{what}: batch_indices must be ints or a 1-D integer tensor, got a "
                                f"{batch_indices.dim()}-D {batch_indices.dtype} tensor")
            values = batch_indices.flatten().tolist()
        elif isinstance(batch_indices, (list, tuple, range)):
            values = list(batch_indices)
        else:
            values = [batch_indices]
        rows: list[int] = []
        for v in values:
            if isinstance(v, bool) or not hasattr(v, "__index__") or isinstance(v, torch.Tensor) and (
                    v.dim() or v.dtype == torch.bool or v.is_floating_point()):
                raise TypeError(f"ElasticCache.{what}: batch_indices must be ints or a 1-D integer tensor, "
                                f"got {v!r} in {batch_indices!r}")
            try:
                r = v.__index__()
            except TypeError:  # a float or bool tensor
                raise TypeError(f"ElasticCache.{what}: batch_indices must be ints or a 1-D integer tensor, "
                                f"got {v!r}") from None
            if not 0 <= r < batch:
                raise IndexError(f"ElasticCache.{what}: sequence {r} is out of range for a batch of {batch} "
                                 f"(0 to {batch - 1})")
            if r in rows:
                raise ValueError(f"ElasticCache.{what}: sequence {r} is listed twice")
            rows.append(r)
        return rows

    def _require_host_tier(self, what: str) -> Pool:
        pool = self._backing.pool
        if pool is None:
            raise ValueError(f"ElasticCache.{what}: the cache holds no sequences")
        if pool.host_tier()["budget_bytes"] == 0:
            raise RuntimeError(f"ElasticCache.{what}: the pool has no host tier to offload to (cpu_budget is 0): "
                               "create it with Pool(..., cpu_budget=...) or call pool.set_cpu_budget(...)")
        return pool

    def _stream_id(self, stream: Any) -> int:
        if stream is None:
            dev = self._backing.device
            return torch.cuda.current_stream(dev).cuda_stream if dev is not None and dev.type == "cuda" else 0
        if hasattr(stream, "cuda_stream"):
            return stream.cuda_stream
        if isinstance(stream, bool) or not isinstance(stream, int):
            raise TypeError(f"ElasticCache: stream must be a torch stream or a stream handle (int), got {stream!r}")
        return stream

    def _chunk_bytes(self) -> int:
        return self._backing.pool.stats()["chunk_bytes"]

    def _mark_swapped_rows(self, rows: list[int]) -> None:
        """After a failed offload: rows some store still holds swapped count as offloaded."""
        for st in self._backing.token_stores():
            for r in rows:
                if r in st.swapped:
                    self._backing.absent[r] = OFFLOADED

    # ---- whole-cache operations -----------------------------------------------------

    def _linear_layers(self) -> list[ElasticLinearLayer]:
        return [layer for layer in self.layers if isinstance(layer, ElasticLinearLayer)]

    def reset(self) -> None:
        """Forgets every token and state and gives their chunks back to the
        pool (and offloaded sequences' host chunks back to the host tier)."""
        self._backing.fit_states(0)
        for layer in self._linear_layers():
            layer.forget_slots()
        self._backing.absent = {}  # the layers' fit(0) drops every swapped page
        for layer in self.layers:
            layer.reset()
        for st in self._backing.token_stores():  # ranges no layer resets (none today)
            if st.swapped or st.holes:
                st.fit(0, 0, 0)
        if self._backing.pending:
            self._backing.poll_swaps()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps sequences `indices`, in that order. Offloaded sequences may be
        left out (their host copies are freed), not kept (RuntimeError:
        restore() them first)."""
        if self._backing.absent:
            self._drop_absent(indices)
        super().batch_select_indices(indices)
        # Every layer has moved its rows to the front: now drop the others.
        for layer in self._attention_layers():
            layer.refit()
        kept = [layer.state_batch for layer in self._linear_layers() if layer.state_batch]
        if kept:
            self._backing.fit_states(kept[0])

    def _drop_absent(self, indices: Any) -> None:
        """batch_select_indices with absent rows: refuses to keep one; frees the
        host copies of the others and maps fresh chunks under those the kept
        rows move into, so the layers' row moves find every row mapped."""
        backing = self._backing
        batch = self.batch_size
        keep = _as_rows(indices, batch).tolist()
        kept = sorted(set(keep) & set(backing.absent))
        if kept:
            raise RuntimeError(f"ElasticCache.batch_select_indices keeps sequences {kept}: "
                               + backing.absent_message("keep them").split(": ", 1)[1]
                               + "; sequences left out of indices are dropped")
        gone = sorted(backing.absent)
        stores = backing.token_stores()
        for st in stores:
            st.drop(gone)
        for r in gone:
            backing.absent[r] = DROPPED
        targets = [r for r in gone if r < len(keep)]  # rows the kept ones move into
        try:
            for st in stores:
                st.fill(targets)
        except OutOfMemoryError as e:
            raise OutOfMemoryError(
                f"ElasticCache.batch_select_indices: sequences {gone} were offloaded and are dropped now, but the "
                f"pool has no chunks to move the kept sequences into rows {targets}; nothing else changed (call "
                f"batch_select_indices again once memory is free, or reset()): {e}") from e
        backing.absent = {}

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def _first_attention_index(self, layer_idx: int) -> int:
        """layer_idx, or for layer 0 when it holds no attention, the first
        attention layer (as transformers' Cache answers length questions)."""
        if isinstance(self.layers[layer_idx], ElasticLayer):
            return layer_idx
        if layer_idx == 0:
            for i, layer in enumerate(self.layers):
                if isinstance(layer, ElasticLayer):
                    return i
        raise ValueError(f"ElasticCache: layer {layer_idx} is a {type(self.layers[layer_idx]).__name__}, "
                         "which holds no attention tokens")

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[self._first_attention_index(layer_idx)].get_seq_length()

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return _query_length(query_length), 0
        return self.layers[self._first_attention_index(layer_idx)].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def early_initialization(self, batch_size: int, num_heads: Any, head_dim: Any, dtype: torch.dtype,
                             device: Any) -> None:
        """Reserves the attention layers' ranges ahead of the first update
        (maps nothing); num_heads / head_dim are ints or per-layer lists."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ElasticLayer) and not layer.is_initialized:
                heads = num_heads if isinstance(num_heads, int) else num_heads[i]
                dim = head_dim if isinstance(head_dim, int) else head_dim[i]
                fake = torch.empty((batch_size, heads, 0, dim), dtype=dtype, device=device)
                layer.lazy_initialization(fake, fake)

    # Read-only, as transformers 5.17's Cache declares them (as deprecated
    # properties); 5.23 dropped them. Either way they are the sizes given.
    @property
    def max_batch_size(self) -> int:
        return self._backing.max_batch

    @property
    def max_cache_len(self) -> int:
        return self._backing.max_len

    @property
    def batch_size(self) -> int:
        for layer in self._attention_layers():
            if layer.is_initialized:
                return layer.batch
        for layer in self._linear_layers():
            if layer.state_batch:
                return layer.state_batch
        return -1

    @property
    def is_linear(self) -> list[bool]:
        """Layers with recurrent states only (hybrids hold attention too)."""
        return [isinstance(layer, ElasticLinearLayer) and not isinstance(layer, ElasticLayer)
                for layer in self.layers]

    # ---- memory figures -------------------------------------------------------------

    @property
    def stores(self) -> list[TokenRanges | PackedStates]:
        """Every layer's storage built so far (one PageSpace each)."""
        return list(self._backing.stores)

    @property
    def pool(self) -> Pool | None:
        return self._backing.pool

    def mapped_bytes(self, layer_idx: int | None = None) -> int:
        """Bytes of pool chunks mapped under the cache (or under one layer).
        Offloaded sequences' K/V counts from offload() on as gone (their
        device chunks go back to the pool once the copies are done; see
        offloaded_bytes())."""
        if layer_idx is None:
            return sum(st.mapped_bytes() for st in self._backing.stores)
        layer = self.layers[layer_idx]
        held = sum(st.mapped_bytes() for st in _layer_stores(layer))
        if isinstance(layer, ElasticLinearLayer):  # its slots' bytes: the chunks under them are shared
            held += sum(r.slot_bytes for r in layer._regions.values()) * layer.state_batch
        return held

    def needed_bytes(self) -> int:
        """Bytes the kept tokens (and states) need, without rounding to chunks."""
        return sum(st.needed_bytes() for st in self._backing.stores)

    def close(self) -> None:
        """Gives every chunk back and releases the reserved VA; the cache is
        unusable afterwards (and so are tensors update() returned)."""
        for layer in self._linear_layers():
            layer.forget_slots()
        for layer in self._attention_layers():
            if isinstance(layer, ElasticIndexedLayer):
                layer.forget_indexer()
            layer._store = None
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.length = layer.batch = 0
        self._finalizer()

    def __repr__(self) -> str:
        return (f"ElasticCache(max_batch_size={self.max_batch_size}, max_cache_len={self.max_cache_len}, "
                f"mapped={self.mapped_bytes()} B, layers={self.layers})")


_NO_LAYER_OFFLOADING = (
    "ElasticCache does not do transformers' per-layer offloading (offloading=True: each layer moved to the "
    "CPU and back at every step); use cache.offload(batch_indices) / cache.restore(), which move sequences "
    "to the pool's host tier (cpu_budget) at the same addresses")


def _layer_stores(layer: Any) -> list[TokenRanges | PackedStates]:
    store = getattr(layer, "_store", None)
    return [store] if store is not None else []


def _refuse_unheld(kinds: list[CacheLayerKind], model_type: str) -> None:
    """Raises ValueError, at construction, for layer types ElasticCache does
    not hold, naming the transformers layer class and the method it needs."""
    bad = []
    for i, k in enumerate(kinds):
        if k.is_attention or k.keeps_nothing or k.is_linear or k.type == "indexed_attention":
            continue
        need = _NEEDS.get(k.type, "a cache layer of its own")
        bad.append(f"layer {i} ({k.type!r}: transformers' {_transformers_layer_class(k.type)}, needs {need})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"ElasticCache cannot hold every layer of {model_type}: {shown}")


def _make_layer(backing: _Backing, index: int, kind: CacheLayerKind) -> Any:
    if kind.keeps_nothing:
        return _NoCacheLayer()
    if backing.fixed_shapes and kind.type in ("hybrid", "hybrid_sliding", "indexed_attention"):
        raise ValueError(f"ElasticCache(fixed_shapes=True) holds full, sliding and linear-attention layers; "
                         f"layer {index} is {kind.type!r} (use fixed_shapes=False)")
    if kind.type in ("hybrid", "hybrid_sliding"):
        return ElasticHybridLayer(backing, index, kind.window if kind.type == "hybrid_sliding" else None,
                                  kind.states)
    if kind.is_linear:  # "linear_attention", "conv"
        return ElasticLinearLayer(backing, index, kind.states)
    if kind.type == "indexed_attention":
        return ElasticIndexedLayer(backing, index)
    window = kind.window if kind.type != "full_attention" else None
    if backing.fixed_shapes:
        from .fixed import FixedLayer  # imports this module: bound at first use

        return FixedLayer(backing, index, window)
    return ElasticLayer(backing, index, window)
