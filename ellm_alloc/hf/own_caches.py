"""ElasticCache for models that accept only a Cache subclass of their own.

A few transformers models check `isinstance(past_key_values, TheirCache)` and
call methods only that class has. For each, ElasticCache(config, ...) builds
a subclass of both ElasticCache and that class (ElasticCache's methods first),
whose extra methods keep their state in the same pool slots as every other
linear layer's. Supported: MiniMax (MiniMaxCache's lightning-attention
state, `get_linear_cache` / `set_linear_cache`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..kv.hf_config import text_config
from .linear import ElasticLinearLayer

__all__ = ["own_cache_class"]


def own_cache_class(elastic_cache: type, config: Any) -> type | None:
    """The ElasticCache subclass the config's model needs, or None."""
    model_type = getattr(text_config(config), "model_type", None)
    maker = _MAKERS.get(model_type)
    return maker(elastic_cache) if maker is not None else None


@functools.cache
def _minimax(elastic_cache: type) -> type:
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    class ElasticMiniMaxCache(elastic_cache, MiniMaxCache):
        """MiniMax's lightning-attention state (K^T V per head, [batch, heads,
        d, d]) is the recurrent state of the layer's ElasticLinearLayer."""

        is_croppable = False  # the state cannot be rolled back, as in MiniMaxCache

        def __len__(self) -> int:
            return len(self.layers)

        def _linear(self, layer_idx: int) -> ElasticLinearLayer:
            layer = self.layers[layer_idx]
            if not isinstance(layer, ElasticLinearLayer):
                raise ValueError(f"ElasticCache: layer {layer_idx} is a {type(layer).__name__}, "
                                 "not a linear-attention layer")
            return layer

        def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
            layer = self._linear(layer_idx)
            return layer.recurrent_states[0] if layer.has_previous_state[0] else None

        def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
            layer = self._linear(layer_idx)
            layer.update_recurrent_state(linear_cache, 0)
            layer.has_previous_state[0] = True

        def batch_repeat_interleave(self, repeats: int) -> None:
            elastic_cache.batch_repeat_interleave(self, repeats)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            elastic_cache.batch_select_indices(self, indices)

        def crop(self, max_length: int) -> None:
            raise RuntimeError("ElasticCache for MiniMax cannot crop: its lightning-attention state "
                               "cannot be rolled back (as MiniMaxCache)")

    return ElasticMiniMaxCache


_MAKERS = {"minimax": _minimax}
