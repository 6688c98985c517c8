"""Linear-attention and Mamba layers of an ElasticCache: conv and recurrent
states in pool chunks.

transformers' LinearAttentionLayer keeps, per layer and state index, a conv
state [batch, channels, kernel] and a recurrent state (any fixed shape led by
the batch), allocated with torch.zeros at the first update and then written
in place with copy_. ElasticLinearLayer is that layer with one change: the
two tensors are views of slots in the cache's PackedStates (pool chunks
shared by every linear layer of the cache) instead of torch allocations. So
the transformers code paths that read and write them run unchanged, which is
what keeps the tokens identical to DynamicCache's, and a decode step costs
the same in-place copy, with no map, unmap or extra copy.

What differs from transformers' layer, and why:
- reset() forgets the states (has_previous_state False); ElasticCache.reset
  also unmaps every slot, so the chunks go back to the pool.
- reorder_cache / batch_select_indices / batch_repeat_interleave move slots
  in place (transformers replaces the tensors, which would leave the pool).
- ElasticCache.offload leaves these states resident (they share chunks
  across sequences); while sequences are offloaded, the write paths here
  (update_*_state, reorder, select, repeat, crop) raise as the attention
  layers do, and so do ElasticCache.get_conv_state / get_recurrent_state
  (Mamba decode kernels update states in place through them), so no state
  advances without its K/V.
- crop needs activate_past_recording(), as in transformers. While recording,
  transformers grows the conv state past the kernel; that growing tensor is
  an ordinary torch tensor until crop() folds the kept window back into the
  slot.

ElasticHybridLayer is a layer with both (transformers' "hybrid" and
"hybrid_sliding" types, e.g. Falcon-H1): states as above, and per-token K/V as
an ElasticLayer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import LinearAttentionLayer

from .storage import StateRegion

if TYPE_CHECKING:  # pragma: no cover
    from .cache import _Backing

__all__ = ["ElasticLinearLayer"]


class ElasticLinearLayer(LinearAttentionLayer):
    """Conv / recurrent states of one linear-attention or Mamba layer, in pool slots."""

    # The first update (or a batch change) maps chunks through ctypes calls,
    # which torch.compile cannot trace; compiled decoding uses StaticCache.
    is_compileable = False

    def __init__(self, backing: "_Backing", index: int, number_of_states: int = 1):
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
        self._backing = backing
        self.index = index
        self.state_batch = 0  # sequences the bound state views cover
        self._regions: dict[tuple[str, int], StateRegion] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index}, batch={self.state_batch})"

    # ---- binding states to pool slots -------------------------------------------------

    def _bind(self, batch: int) -> None:
        """Points every initialized state at slots [0, batch) of its region."""
        for (kind, i), region in self._regions.items():
            states = self.conv_states if kind == "conv" else self.recurrent_states
            states[i] = region.view(batch)
        self.state_batch = batch

    def _ensure_batch(self, batch: int) -> None:
        if batch == self.state_batch:
            return
        if any(self.has_previous_state.values()):
            raise ValueError(
                f"ElasticCache layer {self.index}: batch changed from {self.state_batch} to {batch} with states "
                "cached; use batch_select_indices / batch_repeat_interleave or reset()"
            )
        self._backing.fit_states(batch)
        self._bind(batch)

    def _add_region(self, kind: str, i: int, states: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        batch = states.shape[0]
        region = self._regions.get((kind, i))
        if region is not None and (region.shape != shape or region.dtype != states.dtype):
            raise ValueError(f"ElasticCache layer {self.index}: {kind} state {i} was {region.shape} "
                             f"{region.dtype} per sequence, now {shape} {states.dtype}")
        if region is None:
            region = self._backing.state_region(shape, states.dtype, states.device, batch)
            self._regions[(kind, i)] = region
        self._ensure_batch(batch)
        return region.view(batch)

    def lazy_initialization(self, conv_states: torch.Tensor | None = None,
                            recurrent_states: torch.Tensor | None = None, state_idx: int = 0,
                            conv_kernel_size: int | None = None) -> None:
        """As transformers' layer, with the zeroed states taken from pool slots."""
        if conv_states is not None:
            if self.device is None:
                self.dtype, self.device = conv_states.dtype, conv_states.device
            kernel = conv_states.shape[-1] if conv_kernel_size is None else conv_kernel_size
            self.conv_kernel_size[state_idx] = kernel
            self.conv_states[state_idx] = self._add_region(
                "conv", state_idx, conv_states, (*conv_states.shape[1:-1], kernel))
            self.is_conv_states_initialized[state_idx] = True
        if recurrent_states is not None:
            if self.device is None:
                self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
            self.recurrent_states[state_idx] = self._add_region(
                "recurrent", state_idx, recurrent_states, tuple(recurrent_states.shape[1:]))
            self.is_recurrent_states_initialized[state_idx] = True

    # ---- the forward path -------------------------------------------------------------

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        if self._backing.absent:
            self._backing.before_write("run a forward step")
        if self.is_conv_states_initialized[state_idx]:
            self._ensure_batch(conv_states.shape[0])
        return LinearAttentionLayer.update_conv_state(self, conv_states, state_idx,
                                                      conv_kernel_size=conv_kernel_size, **kwargs)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if self._backing.absent:
            self._backing.before_write("run a forward step")
        if self.is_recurrent_states_initialized[state_idx]:
            self._ensure_batch(recurrent_states.shape[0])
        return LinearAttentionLayer.update_recurrent_state(self, recurrent_states, state_idx, **kwargs)

    # ---- whole-state edits ------------------------------------------------------------

    def reset(self) -> None:
        """Forgets the states; ElasticCache.reset unmaps their slots."""
        for i in range(self.number_of_states):
            self.has_previous_state[i] = False
        if self.state_batch and self._backing.states_batch() >= self.state_batch:
            for region in self._regions.values():
                region.view(self.state_batch).zero_()

    def forget_slots(self) -> None:
        """After the cache unmapped every slot: states bind again at the next update."""
        self.reset()
        self.state_batch = 0
        for (kind, i) in self._regions:
            (self.conv_states if kind == "conv" else self.recurrent_states)[i] = None

    def crop(self, tokens_to_remove: int) -> None:
        if self._backing.absent:
            self._backing.before_write("crop")
        LinearAttentionLayer.crop(self, tokens_to_remove)
        # Recording the past left conv states in ordinary tensors: fold back
        # the window the next step needs, when it has the slot's shape.
        for (kind, i), region in self._regions.items():
            if kind != "conv" or self.state_batch == 0:
                continue
            slot = region.view(self.state_batch)
            held = self.conv_states[i]
            if held is not None and held.data_ptr() != slot.data_ptr() and held.shape == slot.shape:
                slot.copy_(held)
                self.conv_states[i] = slot

    def _move_state_rows(self, src_rows: torch.Tensor) -> None:
        for region in self._regions.values():
            region.move_rows(src_rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self._regions or self.state_batch == 0:
            return
        self._backing.before_write("reorder_cache")
        if beam_idx.numel() != self.state_batch:
            raise ValueError(f"reorder_cache: {beam_idx.numel()} indices for a batch of {self.state_batch}")
        self._move_state_rows(beam_idx.long())

    def batch_select_indices(self, indices: Any) -> None:
        """Keeps sequences `indices` (moved to the first slots); ElasticCache
        then unmaps the slots past the new batch."""
        if not self._regions or self.state_batch == 0:
            return
        self._backing.before_write("batch_select_indices")  # ElasticCache's drops absent rows first
        idx = _as_rows(indices, self.state_batch)
        self._move_state_rows(idx)
        self._bind(idx.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self._regions or self.state_batch == 0:
            return
        self._backing.before_write("batch_repeat_interleave")
        new = self.state_batch * repeats
        self._backing.fit_states(max(new, self._backing.states_batch()))
        self._move_state_rows(torch.arange(self.state_batch).repeat_interleave(repeats))
        self._bind(new)

    def offload(self):  # transformers' per-layer hook: a no-op (the slots are the pool's, at fixed addresses)
        pass

    def prefetch(self):
        pass


def _as_rows(indices: Any, batch: int) -> torch.Tensor:
    """batch_select_indices' argument (ints, a bool mask or an index tensor) as row numbers."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    idx = idx.long().flatten()
    if idx.numel() and (int(idx.min()) < -batch or int(idx.max()) >= batch):
        raise IndexError(f"batch_select_indices: index out of range for a batch of {batch}")
    return idx % batch
