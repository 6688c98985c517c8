"""ElasticCache: a transformers Cache over ContiguousKV.

    cache = ElasticCache(model.config, max_batch_size=B, max_cache_len=L)
    model.generate(ids, attention_mask=mask, past_key_values=cache)

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
not torch.compile-able (is_compileable is False; use StaticCache for
compiled decoding).

Layer support: full, sliding and chunked attention layers, as
`ellm_alloc.kv.hf_config.from_hf_config` reads them from the config. Models
with Mamba / linear-attention, cross-attention or MLA layers are refused at
construction with a ValueError naming the layers.

Batches: generate() may use up to max_batch_size sequences (beam search and
num_return_sequences count: pass batch * num_beams). All sequences of the
batch have the same length (left padding, as generate() does). reorder_cache
(beam search), batch_select_indices and batch_repeat_interleave move K/V
between the per-sequence ranges in place.

Memory: by default the pool `ellm_alloc.enable()` routes the model's device
to (CUDA, or CPU: then weights, activations and KV share one pool); a CPU
model without enable() gets a host pool of the cache's own (budget=
argument, default: the cache's worst case, so it never refuses while still
only committing the chunks in use). Or pass `pool=`. The device, dtype and head shapes are
taken from the first update(). Tensors returned by update() are views of the
cache's memory: do not read them after reset(), crop() or close().

Supported transformers: 5.17 to 5.23 (pyproject's `hf` extra). 5.23's API is
the reference; for the older one: get_mask_sizes() also takes a
cache_position tensor, crop() also takes a positive length to keep, and
get_max_cache_shape() is provided next to get_max_length().
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kv.contiguous import ContiguousKV
from ..kv.hf_config import from_hf_config
from ..kv.spec import ChunkedLocalSpec, ModelKVSpec, SlidingWindowSpec
from ..pool import Pool

__all__ = ["ElasticCache"]

_HOST_CHUNK = 2 << 20  # host pools' chunk (the granularity) when we create the pool
_SUPPORTED = ("full", "sliding", "chunked")


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def _query_length(q: Any) -> int:
    """5.23 passes the query length; 5.17 passes the cache_position tensor."""
    if isinstance(q, torch.Tensor):
        return int(q.shape[-1]) if q.dim() else int(q)
    return int(q)


def _cache_spec(spec: ModelKVSpec) -> ModelKVSpec:
    """The spec ContiguousKV holds: chunked layers become sliding windows of
    chunk_size tokens, which is how transformers caches them."""
    layers = tuple(
        SlidingWindowSpec(s.kv_heads, s.head_dim, s.dtype, window=s.chunk_size)
        if isinstance(s, ChunkedLocalSpec) else s
        for s in spec.layers
    )
    return ModelKVSpec(spec.name, layers)


class _Store:
    """One ContiguousKV and the (batch, tokens) it is mapped for. fit() is
    idempotent, so every layer sharing a store may call it."""

    def __init__(self, kv: ContiguousKV):
        self.kv = kv
        self.shape = (0, 0)

    def fit(self, batch: int, num_tokens: int) -> None:
        if self.shape == (batch, num_tokens):
            return
        kv = self.kv
        for seq in range(kv.max_batch):
            want = num_tokens if seq < batch else 0
            if kv.lengths[seq] != want:
                kv.ensure(seq, want)
        self.shape = (batch, num_tokens)


class _Backing:
    """What the layers share: sizes, the pool and the stores. Built at the
    first update (or early_initialization), torn down by close()."""

    def __init__(self, config: Any, spec: ModelKVSpec, max_batch: int, max_len: int,
                 pool: Pool | None, budget: Any):
        self.config = config
        self.spec = spec
        self.max_batch = max_batch
        self.max_len = max_len
        self.pool = pool
        self.budget = budget
        self.own_pool = False
        self.stores: list[_Store] = []
        self.layer_store: dict[int, _Store] = {}
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.closed = False

    @property
    def built(self) -> bool:
        return self.device is not None

    def _worst_case_bytes(self, spec: ModelKVSpec, chunk: int) -> int:
        total = 0
        for s in spec.layers:
            tb = s.kv_heads * s.head_dim * s.itemsize
            per_seq = -(-self.max_len * tb // chunk)
            if s.kind == "sliding":
                per_seq = min(per_seq, -(-s.window * tb // chunk) + 1)
            total += 2 * self.max_batch * per_seq * chunk
        return max(total, chunk)

    def _pick_pool(self, device: torch.device, spec: ModelKVSpec) -> Pool:
        if self.pool is not None:
            pool = self.pool
            want = "host" if device.type == "cpu" else "cuda"
            if pool.backend != want or (want == "cuda" and device.index is not None
                                        and pool.device != device.index):
                raise ValueError(f"ElasticCache: the pool ({pool.backend}:{pool.device}) is not on the "
                                 f"model's device {device}")
            return pool
        from ..integrations.torch_allocator import device_pool, enabled, enabled_device

        if device.type == "cpu" and enabled_device() == "cpu":  # the pool torch's CPU tensors come from
            return device_pool()
        if device.type == "cpu":
            budget = self.budget if self.budget is not None else self._worst_case_bytes(spec, _HOST_CHUNK)
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

    def build(self, key_states: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError("ElasticCache is closed")
        device, dtype = key_states.device, key_states.dtype
        spec = _cache_spec(from_hf_config(self.config, dtype=dtype))
        pool = self._pick_pool(device, spec)
        full = [i for i, s in enumerate(spec.layers) if s.kind == "full"]
        stores: list[_Store] = []
        try:
            if full:  # full layers grow together: one space, one ensure per sequence and step
                store = _Store(ContiguousKV(spec, pool, self.max_batch, self.max_len,
                                            name="hf.full", layers=full))
                stores.append(store)
                for i in full:
                    self.layer_store[i] = store
            for i, s in enumerate(spec.layers):
                if s.kind == "sliding":  # own space: a layer reads its old window before it slides
                    store = _Store(ContiguousKV(spec, pool, self.max_batch, self.max_len,
                                                name=f"hf.sliding{i}", layers=[i]))
                    stores.append(store)
                    self.layer_store[i] = store
        except BaseException:
            for st in stores:
                st.kv.close()
            if self.own_pool:
                pool.close()
                self.own_pool = False
            self.layer_store.clear()
            raise
        self.spec, self.pool, self.stores = spec, pool, stores
        self.device, self.dtype = device, dtype

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[max_batch, heads, max_len, dim] views of layer's K and V."""
        kv = self.layer_store[layer].kv
        return kv.key(layer).permute(0, 2, 1, 3), kv.value(layer).permute(0, 2, 1, 3)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for st in self.stores:
            st.kv.close()
        self.stores = []
        self.layer_store = {}
        if self.own_pool and self.pool is not None:
            self.pool.close()
        self.pool = None


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
        # A full layer can be cropped to any length; a sliding one only while
        # the tokens the cropped length needs are still in the window.
        self.is_croppable = window is None
        self.max_cache_len = backing.max_len
        self.length = 0  # tokens seen (the position of the next token)
        self.batch = 0  # sequences in use
        self._store: _Store | None = None

    def __repr__(self) -> str:
        kind = f"sliding({self.window})" if self.is_sliding else "full"
        return f"ElasticLayer({self.index}, {kind}, length={self.length}, batch={self.batch})"

    # ---- setup --------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b = self._backing
        if not b.built:
            b.build(key_states)
        if key_states.device != b.device:
            raise ValueError(f"ElasticCache layer {self.index}: states on {key_states.device}, "
                             f"cache on {b.device}")
        self._store = b.layer_store[self.index]
        self.keys, self.values = b.views(self.index)
        self.dtype, self.device = b.dtype, b.device
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        s = self._backing.spec.layers[self.index]
        shape_k, shape_v = tuple(key_states.shape), tuple(value_states.shape)
        if (key_states.dim() != 4 or shape_k[1] != s.kv_heads or shape_k[3] != s.head_dim
                or shape_v != shape_k):
            raise ValueError(
                f"ElasticCache layer {self.index}: expected key/value states of shape "
                f"[batch, {s.kv_heads}, tokens, {s.head_dim}] (from the config), got {shape_k} / {shape_v}"
            )
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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        batch, q = key_states.shape[0], key_states.shape[2]
        past, end = self.length, self.length + q
        K, V = self.keys, self.values
        if not self.is_sliding:
            self._store.fit(batch, end)
            K[:batch, :, past:end].copy_(key_states)
            V[:batch, :, past:end].copy_(value_states)
            self.length, self.batch = end, batch
            return K[:batch, :, :end], V[:batch, :, :end]

        w = self.window
        lo = max(past - w + 1, 0)  # the oldest token the first new query sees
        kept_from = max(end - w, 0)  # the oldest token the store keeps once it holds `end`
        if lo >= kept_from:
            # The store still holds every token attention needs: answer with a view.
            self._store.fit(batch, end)
            K[:batch, :, past:end].copy_(key_states)
            V[:batch, :, past:end].copy_(value_states)
            self.length, self.batch = end, batch
            return K[:batch, :, lo:end], V[:batch, :, lo:end]
        # Several new tokens overrun the window: attention needs old tokens that
        # the store is about to unmap. Take them first, then slide and keep only
        # the tokens of the new window.
        old_k = K[:batch, :, lo:past].clone()
        old_v = V[:batch, :, lo:past].clone()
        self._store.fit(batch, end)
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

    def _kept(self) -> tuple[int, int]:
        """The token range this layer holds for every sequence."""
        start = max(self.length - self.window, 0) if self.is_sliding else 0
        return start, self.length

    def reset(self) -> None:
        self.length = 0
        self.batch = 0
        if self._store is not None:
            self._store.fit(0, 0)

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
        if self.is_sliding and target > 0:
            need = max(target - self.window + 1, 0)
            if need < max(self.length - self.window, 0):
                raise RuntimeError(
                    f"ElasticCache layer {self.index}: cannot crop a sliding-window layer (window "
                    f"{self.window}) from {self.length} to {target} tokens: tokens from {need} on are "
                    f"needed but only those from {self.length - self.window} are kept"
                )
        self.length = target
        if self._store is not None:
            self._store.fit(self.batch, target)

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
        if beam_idx.numel() != self.batch:
            raise ValueError(f"reorder_cache: {beam_idx.numel()} indices for a batch of {self.batch}")
        self._move_rows(beam_idx.long())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences `indices`. Their chunks of dropped sequences are
        unmapped by ElasticCache.batch_select_indices (or at the next update)."""
        if not self.is_initialized or self.length == 0:
            return
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (int(idx.min()) < -self.batch or int(idx.max()) >= self.batch):
            raise IndexError(f"batch_select_indices: index out of range for a batch of {self.batch}")
        idx = idx % self.batch
        self._move_rows(idx)
        self.batch = idx.numel()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized or self.length == 0:
            return
        new = self.batch * repeats
        if new > self._backing.max_batch:
            raise ValueError(f"batch_repeat_interleave: {self.batch} x {repeats} = {new} sequences exceed "
                             f"max_batch_size={self._backing.max_batch}")
        self._store.fit(new, self.length)  # maps the new sequences' ranges
        self._move_rows(torch.arange(self.batch).repeat_interleave(repeats))
        self.batch = new

    def offload(self):  # the memory is the pool's; moving it would drop the fixed addresses
        pass

    def prefetch(self):
        pass


class ElasticCache(Cache):
    """A transformers Cache over ellm_alloc's ContiguousKV (see the module docstring).

    config: the model's config (its text config is used for multimodal ones).
    max_batch_size: most sequences at once (beam search: batch * num_beams).
    max_cache_len: most tokens per sequence (prompt + generated); only VA is
        reserved for it.
    pool: the Pool to map chunks from (default: the pool ellm_alloc.enable()
        routes the model's device to; for a CPU model without enable(), a host
        pool of the cache's own).
    budget: that own host pool's budget (default: the cache's worst case).
    """

    def __init__(self, config: Any, max_batch_size: int = 1, max_cache_len: int | None = None, *,
                 pool: Pool | None = None, budget: Any = None, **kwargs):
        if max_cache_len is None:
            raise ValueError("ElasticCache needs max_cache_len (the most tokens a sequence may reach)")
        if (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0
                or isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0):
            raise ValueError(f"max_batch_size and max_cache_len must be positive ints, got "
                             f"{max_batch_size!r}, {max_cache_len!r}")
        text = _text_config(config)
        spec = from_hf_config(text, dtype="float32")  # layer kinds now; the real dtype at the first update
        bad = [f"{i} ({s.kind})" for i, s in enumerate(spec.layers) if s.kind not in _SUPPORTED]
        if bad:
            raise ValueError(
                f"ElasticCache holds full, sliding and chunked attention layers only; "
                f"{getattr(text, 'model_type', '?')} has unsupported layers: {', '.join(bad)}"
            )
        backing = _Backing(text, spec, max_batch_size, max_cache_len, pool, budget)
        layers = []
        for i, s in enumerate(spec.layers):
            window = s.window if s.kind == "sliding" else s.chunk_size if s.kind == "chunked" else None
            layers.append(ElasticLayer(backing, i, window))
        super().__init__(layers=layers)
        self._backing = backing
        # Unmap everything and close the spaces when the cache is collected.
        self._finalizer = weakref.finalize(self, _Backing.close, backing)

    # ---- whole-cache operations -----------------------------------------------------

    def _refit(self) -> None:
        for layer in self.layers:
            if layer._store is not None:
                layer._store.fit(layer.batch, layer.length)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._refit()  # every layer has moved its rows: now drop the other sequences

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def early_initialization(self, batch_size: int, num_heads: Any, head_dim: Any, dtype: torch.dtype,
                             device: Any) -> None:
        """Builds the spaces ahead of the first update (maps nothing)."""
        heads = num_heads if isinstance(num_heads, int) else num_heads[0]
        dim = head_dim if isinstance(head_dim, int) else head_dim[0]
        fake = torch.empty((batch_size, heads, 0, dim), dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
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
        return self.layers[0].batch if self.layers[0].is_initialized else -1

    # ---- memory figures -------------------------------------------------------------

    @property
    def contiguous_kvs(self) -> list[ContiguousKV]:
        """The ContiguousKV spaces (empty before the first update): one for all
        full layers, one per sliding layer."""
        return [st.kv for st in self._backing.stores]

    @property
    def pool(self) -> Pool | None:
        return self._backing.pool

    def mapped_bytes(self, layer_idx: int | None = None) -> int:
        """Bytes of pool chunks mapped under the cache (or under one layer)."""
        b = self._backing
        if layer_idx is None:
            return sum(st.kv.mapped_bytes() for st in b.stores)
        store = b.layer_store.get(layer_idx)
        if store is None:
            return 0
        kv = store.kv
        pages = set().union(*kv.seq_pages)
        mine = set()
        for kvi in range(2):
            plane = kv.planes[(layer_idx, kvi)]
            first = plane.first_page
            last = first + kv.max_batch * plane.region_bytes // kv.chunk
            mine.update(p for p in pages if first <= p < last)
        return len(mine) * kv.chunk

    def needed_bytes(self) -> int:
        """Bytes the kept tokens need, without rounding to chunks."""
        return sum(st.kv.needed_bytes() for st in self._backing.stores)

    def close(self) -> None:
        """Gives every chunk back and releases the reserved VA; the cache is
        unusable afterwards (and so are tensors update() returned)."""
        for layer in self.layers:
            layer._store = None
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.length = layer.batch = 0
        self._finalizer()

    def __repr__(self) -> str:
        return (f"ElasticCache(max_batch_size={self.max_batch_size}, max_cache_len={self.max_cache_len}, "
                f"mapped={self.mapped_bytes()} B, layers={self.layers})")
