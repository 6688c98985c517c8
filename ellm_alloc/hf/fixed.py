"""Fixed-shape attention layers of ElasticCache, for torch.compile
(`ElasticCache(..., fixed_shapes=True)`).

What attention sees is StaticCache's: update() writes the new tokens at the
layer's next positions and returns its whole [batch, heads, max_cache_len,
head_dim] K and V; get_mask_sizes() is (max_cache_len, 0), so transformers
builds StaticCache's masks. Shapes and addresses never change from step to
step, which is what lets torch.compile trace a decode step once and run it
for every token.

What memory holds is ElasticCache's: each sequence's range is only reserved,
and the chunks under written tokens are the only ones backed by memory of
their own. Every other page of the range maps the pool's one shared,
read-only zero chunk (zero fill: csrc/zero_chunk.h, PageSpace.set_zero_fill),
so attention reads zeros there, exactly what StaticCache's zero-initialised
tensors hold, and a write there faults instead of aliasing another sequence.
Held memory: the tokens' need plus at most one partly filled chunk per
(layer, K/V, sequence), plus the one zero chunk of the whole pool.

Mapping without recompiling. The chunks under a write must be mapped before
the write, and mapping is a call into the pool (ctypes) that torch.compile
cannot trace. So the write itself is a custom operator,
`ellm_alloc::fixed_write(key, keys, values, key_states, value_states)`, that
maps what the new tokens need and then copies them in. The compiled graph
calls it as an opaque function: no graph break, and no recompilation when it
maps a chunk. It declares that it writes `keys` and `values`, so attention's
reads are ordered after it. Why not StaticLayer's index_copy_ in the graph:
inductor writes an index_copy_ into a graph input in place only when the
input is a plain dense tensor; ours are views with a gap between sequences
(each sequence's range is whole chunks), so inductor would copy the whole
tensor out and back, writing every zero page (a fault). A custom operator's
declared write goes into the input in place, whatever its strides.

The position of the next token is a Python int kept on the operator's side
(the layer's `length`) and never read by traced code: traced code that read
it would guard on its value and recompile at every step. Traced code reads
only tensors and values fixed for the cache's life (shapes, the layer's key).
The layer's key is a tensor for the same reason: a new cache of the same
shapes reuses the compiled graph. `cumulative_length`, a tensor advanced in
the graph as StaticLayer's is, answers get_seq_length() inside compiled code.

Limits:
  * The first update() of a layer reserves its KV space (pool calls): run
    the prefill eagerly (generate() does, unless its prefill is chunked), or call
    cache.early_initialization(...) first, as for StaticCache.
  * CUDA graphs (mode="reduce-overhead") replay kernels without running the
    operator, so no chunk would be mapped: not supported.
  * Sliding-window layers keep the full [.., max_cache_len, ..] view with
    absolute positions (transformers' sliding mask hides old tokens); the
    chunks that leave the window go back to zero pages. Attention therefore
    reads max_cache_len positions where StaticSlidingWindowLayer reads the
    window, and a multi-token update keeps the previous window mapped until
    the next one.
  * The CUDA path of the zero chunk (cuMemSetAccess with
    CU_MEM_ACCESS_FLAGS_PROT_READ) is compiled but has never run on a GPU.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from ..pool import Pool
from .cache import ElasticLayer
from .storage import TokenRanges, _minus

__all__ = ["FixedLayer", "FixedTokenRanges"]


class FixedTokenRanges(TokenRanges):
    """TokenRanges whose unmapped pages read as zeros (zero fill), with K and
    V over separate storages.

    Separate storages: torch.compile treats graph inputs that share a storage
    and are written as views of one "synthetic base", and updating that base
    could write the whole range, zero pages included (a fault). K and V are
    therefore built over two byte tensors, one per plane, so torch sees two
    unrelated tensors, as StaticCache's are.
    """

    def __init__(self, pool: Pool, name: str, max_batch: int, max_len: int,
                 shapes: tuple[tuple[int, int], tuple[int, int]], dtype: torch.dtype):
        super().__init__(pool, name, max_batch, max_len, shapes, dtype)
        self.pool = pool
        try:
            self.space.set_zero_fill(True)
        except BaseException:
            self.space.close()
            raise

    def fit(self, batch: int, start: int, end: int) -> None:
        """TokenRanges.fit, then zeros on every chunk it mapped: a recycled
        chunk holds whatever its last owner wrote, and attention reads this
        chunk's unwritten tail too (masked, but masking does not make NaN
        or inf harmless). StaticCache's tensors start as zeros; so do ours."""
        old_batch, old_rel = self.batch, list(self.rel)
        super().fit(batch, start, end)
        flat = self.space.bytes_view()
        for p in range(2):
            for seq in range(batch):
                old = old_rel[p] if seq < old_batch else (0, 0)
                base = self.first_page[p] + seq * self.region_pages[p]
                for lo, hi in _minus(self.rel[p], old):
                    flat[(base + lo) * self.chunk:(base + hi) * self.chunk].zero_()

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._views is None:
            out = []
            for p, (h, d) in enumerate(self.shapes):
                region = self.region_pages[p] * self.chunk
                plane = self.pool.byte_tensor(self.space.page_addr(self.first_page[p]), self.max_batch * region)
                t = plane.view(self.dtype).as_strided((self.max_batch, self.max_len, h, d),
                                                      (region // self.item, h * d, d, 1))
                out.append(t.permute(0, 2, 1, 3))
            self._views = out
        return self._views[0], self._views[1]


# The live fixed layers by key; the operator finds its layer here. Weak, so
# the registry never keeps a cache alive.
_LAYERS: "weakref.WeakValueDictionary[int, FixedLayer]" = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count(1)


@torch.library.custom_op("ellm_alloc::fixed_write", mutates_args=("keys", "values"))
def fixed_write(layer_key: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor,
                value_states: torch.Tensor) -> None:
    """Writes the new tokens of sequences [0, batch) at the layer's next
    positions, mapping the chunks they land on first, and advances the layer.
    Runs eagerly, even inside a compiled graph (see the module docstring)."""
    layer = _LAYERS.get(int(layer_key))
    if layer is None:
        raise RuntimeError("ElasticCache: this fixed-shape layer is closed (or its cache was collected)")
    batch, tokens = key_states.shape[0], key_states.shape[2]
    start = layer._advance(batch, tokens)
    keys[:batch, :, start:start + tokens].copy_(key_states)
    values[:batch, :, start:start + tokens].copy_(value_states)


@fixed_write.register_fake
def _(layer_key, keys, values, key_states, value_states):
    return None


class FixedLayer(ElasticLayer):
    """One attention layer of a fixed-shape ElasticCache (see the module docstring)."""

    is_compileable = True

    def __init__(self, backing: Any, index: int, window: int | None = None):
        super().__init__(backing, index, window)
        # The sequence length as a tensor, for get_seq_length() inside compiled
        # code (an int there would be guarded on and recompile every step).
        self.cumulative_length = torch.zeros((), dtype=torch.int64)
        self._key_int = next(_NEXT_KEY)
        self._key = torch.tensor(self._key_int, dtype=torch.int64)  # a tensor: not guarded on
        _LAYERS[self._key_int] = self

    def __repr__(self) -> str:
        kind = f"sliding({self.window})" if self.is_sliding else "full"
        return f"FixedLayer({self.index}, {kind}, length={self.length}, batch={self.batch})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            # Fixed addresses, as StaticLayer marks its tensors.
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def _check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The checks on shapes, dtype and device alone: values fixed for the
        cache's life, so traced code may read them without recompiling."""
        (hk, dk), (hv, dv) = self._store.shapes
        shape_k, shape_v = tuple(key_states.shape), tuple(value_states.shape)
        if (key_states.dim() != 4 or value_states.dim() != 4 or shape_k[1] != hk or shape_k[3] != dk
                or shape_v[1] != hv or shape_v[3] != dv or shape_v[0] != shape_k[0]
                or shape_v[2] != shape_k[2]):
            raise ValueError(
                f"ElasticCache layer {self.index}: expected key states [batch, {hk}, tokens, {dk}] and "
                f"value states [batch, {hv}, tokens, {dv}] (as at the first update), got {shape_k} / {shape_v}"
            )
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(f"ElasticCache layer {self.index}: states are {key_states.dtype} on "
                             f"{key_states.device}, the cache holds {self.dtype} on {self.device}")
        if shape_k[0] > self._backing.max_batch:
            raise ValueError(
                f"ElasticCache: batch of {shape_k[0]} sequences exceeds max_batch_size="
                f"{self._backing.max_batch} (beam search and num_return_sequences multiply the batch; "
                "size the cache for that)"
            )

    def _advance(self, batch: int, tokens: int) -> int:
        """Eager side of the operator: checks the host-side length and batch,
        maps what the write needs (sliding layers: drops what left the
        window) and returns the first new position."""
        if self._store is None:
            raise RuntimeError("ElasticCache is closed")
        past, end = self.length, self.length + tokens
        if self.length and batch != self.batch:
            raise ValueError(
                f"ElasticCache layer {self.index}: batch changed from {self.batch} to {batch} with "
                f"{self.length} tokens cached; use batch_select_indices / batch_repeat_interleave or reset()"
            )
        if end > self._backing.max_len:
            raise ValueError(
                f"ElasticCache: sequence of {end} tokens exceeds max_cache_len={self._backing.max_len} "
                f"({past} cached + {tokens} new)"
            )
        # A sliding layer keeps the tokens the first new query still sees.
        start = max(past - self.window + 1, 0) if self.is_sliding else 0
        self._store.fit(batch, start, end)
        self.length, self.batch = end, batch
        return past

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        batch, tokens = key_states.shape[0], key_states.shape[2]
        # The whole tensors go in, not [:batch] views, so the operator's
        # declared write is to graph inputs themselves, which inductor
        # performs in place (checked; views of inputs were not tried).
        torch.ops.ellm_alloc.fixed_write(self._key, self.keys, self.values, key_states, value_states)
        self.cumulative_length.add_(tokens)
        return self.keys[:batch], self.values[:batch]

    def get_mask_sizes(self, query_length: Any, *args, **kwargs) -> tuple[int, int]:
        """StaticLayer's: the whole range, from position 0 (sliding layers too:
        their K/V keep absolute positions, and the sliding mask hides the rest)."""
        return self.max_cache_len, 0

    def get_seq_length(self, *args, **kwargs):
        """Tokens cached, as a tensor (as StaticLayer answers, so compiled code
        that asks does not recompile each step); 0 before the first update."""
        return self.cumulative_length if self.is_initialized else 0

    def _kept(self, length: int | None = None) -> tuple[int, int]:
        length = self.length if length is None else length
        start = max(length - self.window + 1, 0) if self.is_sliding else 0
        return start, length

    def _still_mapped(self, token: int) -> bool:
        """Whether `token` and every later one still lie in mapped chunks of both
        planes (a sliding layer gives back whole chunks, so tokens a little
        older than the window may still be there)."""
        store = self._store
        return all(lo < hi and token * tb // store.chunk >= lo
                   for tb, (lo, hi) in zip(store.token_bytes, store.rel))

    def reset(self) -> None:
        super().reset()
        self.cumulative_length.zero_()

    def crop(self, tokens: int) -> None:
        """Drops tokens from the end (tokens < 0) or keeps the first `tokens`;
        the chunks past the new length go back to zero pages. A sliding layer
        refuses when tokens the new length needs have left the window."""
        target = max(self.length + tokens, 0) if tokens < 0 else min(tokens, self.length) if tokens else self.length
        if target >= self.length:
            return
        if self.is_sliding and target > 0 and not self._still_mapped(max(target - self.window + 1, 0)):
            raise RuntimeError(
                f"ElasticCache layer {self.index}: cannot crop a sliding-window layer (window {self.window}) "
                f"from {self.length} to {target} tokens: the tokens it needs have left the window"
            )
        self.length = target
        self.refit()
        self.cumulative_length.fill_(target)
