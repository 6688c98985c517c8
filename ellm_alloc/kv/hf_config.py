"""Read a transformers config's cache layers (no downloads, no model list).

    from transformers import LlamaConfig
    from ellm_alloc.kv.hf_config import cache_layer_kinds, from_hf_config
    kinds = cache_layer_kinds(config)     # what a transformers cache keeps per layer
    spec = from_hf_config(LlamaConfig(num_hidden_layers=32, num_key_value_heads=8))

Only the config's attributes are read; transformers itself is never imported
here, so any object with the right attributes works.

Layer kinds (`cache_layer_kinds`) follow the rules transformers 5.x applies
when it builds a cache from a config, for every model type alike:

* `layer_types` when the config has it (legacy names such as "mamba" and
  "attention" mapped to "linear_attention" and "full_attention"); its length,
  not num_hidden_layers, is the number of cache layers, so configs naming
  fewer or more cache layers than hidden layers are read as the model uses
  them (a heterogeneous config's `per_layer_config` caps the count, as
  transformers pairs the two lists);
* otherwise, per layer: "sliding_attention" when the layer's config has a
  `sliding_window`, else "chunked_attention" when it has an
  `attention_chunk_size`, else "full_attention";
* layers that consume another layer's KV (`kv_sharing_modes` "reuse") and
  layers without attention ("moe", "mlp") keep nothing ("dummy");
* a sliding layer without a window (`sliding_window` None, or
  `use_sliding_window` False as Qwen-2 configs set it) attends to every
  token, as the model then does: it is a full layer; likewise a chunked
  layer without `attention_chunk_size`.

`from_hf_config` turns those kinds into the KV planner's specs. Attention
layers take `num_key_value_heads` (else num_attention_heads) and `head_dim`
(else hidden_size // num_attention_heads) from the layer's config. Specific
rules remain only where a family really differs from that: Gemma-2/3 and
Llama-4 configs from before `layer_types` existed, Mistral/Mixtral (the model
ignores layer_types), Mllama (cross-attention), DeepSeek-V2/V3 (MLA, cached
as a latent) and Jamba's Mamba state shapes (other recurrent layers use
the common mamba_expand / mamba_d_conv / mamba_d_state attributes, or raise).

Conventions:

* dtype: the `dtype=` argument, else `config.dtype` (5.x) / `config.torch_dtype`
  (older), else "bfloat16".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .spec import (
    ChunkedLocalSpec,
    CrossAttentionSpec,
    FullAttentionSpec,
    LayerSpec,
    MambaSpec,
    MLASpec,
    ModelKVSpec,
    SlidingWindowSpec,
    canonical_dtype,
)

__all__ = ["ATTENTION_TYPES", "LINEAR_TYPES", "CacheLayerKind", "cache_layer_kinds", "from_hf_config",
           "mllama_vision_tokens", "text_config"]

# Older/legacy names of layer types, mapped to the 5.x ones.
_LEGACY_TYPES = {"attention": "full_attention", "mamba": "linear_attention",
                 "deepseek_sparse_attention": "indexed_attention", "qwen_sparse_attention": "indexed_attention"}
#: Layer types whose cache is per-token K/V (chunked layers are cached as
#: sliding windows of attention_chunk_size tokens, as transformers does).
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: Layer types with a fixed recurrent state per sequence ("hybrid*" also have attention K/V).
LINEAR_TYPES = ("conv", "linear_attention", "hybrid", "hybrid_sliding")
_NO_CACHE_TYPES = ("moe", "mlp", "dummy")


@dataclass(frozen=True)
class CacheLayerKind:
    """What a cache keeps for one layer.

    type: the transformers layer type ("full_attention", "sliding_attention",
        "chunked_attention", "linear_attention", "conv", "hybrid",
        "hybrid_sliding", "dummy", or any other name a config gives).
    window: tokens a sliding, chunked or hybrid_sliding layer attends to.
    states: conv/recurrent state pairs of a linear layer (number_of_conv_states).
    """

    type: str
    window: int | None = None
    states: int = 1

    @property
    def is_attention(self) -> bool:
        return self.type in ATTENTION_TYPES

    @property
    def is_linear(self) -> bool:
        return self.type in LINEAR_TYPES

    @property
    def keeps_nothing(self) -> bool:
        return self.type == "dummy"


def text_config(config: Any) -> Any:
    """The decoder's config of a multimodal config (the config itself otherwise)."""
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def _per_layer_configs(cfg: Any) -> list[Any] | None:
    """One config per layer for heterogeneous configs (5.23's per_layer_config),
    None when the config has no such view."""
    view = getattr(cfg, "per_layer_config", None)
    if view is None or isinstance(view, dict):  # unset, or the raw sparse overrides
        return None
    try:
        return list(view)
    except TypeError:
        return None


def _window_of(cfg: Any) -> int | None:
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return getattr(cfg, "sliding_window", None) or None


def cache_layer_kinds(config: Any) -> list[CacheLayerKind]:
    """The kind of every cache layer of `config` (its text config for
    multimodal ones), by the rules of the module docstring. Raises ValueError
    when the config gives no layer count."""
    cfg = text_config(config)
    per_layer = _per_layer_configs(cfg)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        types = [_LEGACY_TYPES.get(t, t) for t in types]
        if per_layer is not None:
            types = types[:len(per_layer)]
    else:
        if per_layer is None:
            per_layer = [cfg] * _num_layers(cfg)
        types = ["sliding_attention" if getattr(c, "sliding_window", None) is not None
                 else "chunked_attention" if getattr(c, "attention_chunk_size", None) is not None
                 else "full_attention" for c in per_layer]
    sharing = getattr(cfg, "kv_sharing_modes", None)
    if sharing is not None:
        types = ["dummy" if mode == "reuse" else t for t, mode in zip(types, sharing)] + types[len(sharing):]
    kinds = []
    for i, t in enumerate(types):
        c = per_layer[i] if per_layer is not None else cfg
        if t in _NO_CACHE_TYPES:
            kinds.append(CacheLayerKind("dummy"))
        elif t in ("sliding_attention", "chunked_attention"):
            window = _window_of(c) if t == "sliding_attention" else getattr(c, "attention_chunk_size", None)
            kinds.append(CacheLayerKind(t, window) if window else CacheLayerKind("full_attention"))
        elif t in LINEAR_TYPES:
            window = _window_of(c) if t == "hybrid_sliding" else None
            kinds.append(CacheLayerKind(t, window, states=getattr(c, "number_of_conv_states", 1) or 1))
        else:
            kinds.append(CacheLayerKind(t))
    return kinds

def from_hf_config(
    config: Any,
    *,
    name: str | None = None,
    dtype: Any = None,
    cross_attention_tokens: int | None = None,
    max_images: int = 1,
) -> ModelKVSpec:
    """The KV spec of a transformers config, for any model type.

    name: the ModelKVSpec's name (default: config.name_or_path, else model_type).
    dtype: the KV-cache dtype (default: the config's dtype, else bfloat16).
    cross_attention_tokens: Mllama only: vision tokens per request, overriding
        the count derived from the vision config (required when a bare
        MllamaTextConfig, which has no vision config, is given).
    max_images: Mllama only: images per request (default 1).

    Layers that keep nothing ("dummy": shared-KV consumers, MoE/MLP-only
    layers) have no spec and are left out. Raises ValueError for a layer type
    the planner has no spec for (naming it), a recurrent layer whose state
    shape the config does not give, or an inconsistent config.
    """
    model_type = getattr(config, "model_type", None)
    rule = _FAMILY_RULES.get(model_type, _generic)
    kv_dtype = canonical_dtype(dtype) if dtype is not None else _config_dtype(config)
    if name is None:
        name = getattr(config, "name_or_path", None) or str(model_type)
    layers = rule(config, kv_dtype, cross_attention_tokens=cross_attention_tokens, max_images=max_images)
    return ModelKVSpec(name, tuple(layers))


# --- helpers ------------------------------------------------------------------


def _config_dtype(config: Any) -> str:
    cands = [getattr(config, "dtype", None), vars(config).get("torch_dtype") if hasattr(config, "__dict__") else None]
    text = getattr(config, "text_config", None)
    if text is not None:
        cands.append(getattr(text, "dtype", None))
    for d in cands:
        if d is not None and d != "auto":
            return canonical_dtype(d)
    return "bfloat16"


def _num_layers(cfg: Any) -> int:
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{getattr(cfg, 'model_type', None)}: num_hidden_layers must be a positive int, got {n!r}")
    return n


def _need(cfg: Any, attr: str) -> Any:
    value = getattr(cfg, attr, None)
    if value is None:
        raise ValueError(f"{getattr(cfg, 'model_type', None)}: the config has no {attr}")
    return value


def _kv_heads(cfg: Any) -> int:
    n = getattr(cfg, "num_key_value_heads", None)
    return n if n is not None else _need(cfg, "num_attention_heads")


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    if hd is not None:
        return hd
    hidden, heads = _need(cfg, "hidden_size"), _need(cfg, "num_attention_heads")
    if hidden % heads:
        raise ValueError(
            f"{cfg.model_type}: no head_dim and hidden_size {hidden} is not a multiple "
            f"of num_attention_heads {heads}"
        )
    return hidden // heads


def _layer_types(cfg: Any) -> list[str] | None:
    """The config's layer_types (legacy names mapped), or None when it has none."""
    lt = getattr(cfg, "layer_types", None)
    return None if lt is None else [_LEGACY_TYPES.get(t, t) for t in lt]


def _attention_spec(cfg: Any, kind: CacheLayerKind, dtype: str) -> LayerSpec:
    kv, hd = _kv_heads(cfg), _head_dim(cfg)
    if kind.type == "sliding_attention":
        return SlidingWindowSpec(kv, hd, dtype, window=kind.window)
    if kind.type == "chunked_attention":
        return ChunkedLocalSpec(kv, hd, dtype, chunk_size=kind.window)
    return FullAttentionSpec(kv, hd, dtype)


def _specs(cfg: Any, kinds: list[CacheLayerKind], dtype: str,
           linear: Callable[[Any], LayerSpec] | None = None) -> list[LayerSpec]:
    """Specs for cache layer kinds, layer by layer (per-layer configs where the
    config has them). A hybrid layer gives its recurrent state, then its
    attention; a dummy layer gives nothing."""
    model_type = getattr(cfg, "model_type", None)
    per_layer = _per_layer_configs(cfg)
    out: list[LayerSpec] = []
    for i, kind in enumerate(kinds):
        c = per_layer[i] if per_layer is not None and i < len(per_layer) else cfg
        if kind.keeps_nothing:
            continue
        if kind.is_attention:
            out.append(_attention_spec(c, kind, dtype))
        elif kind.is_linear:
            if linear is None:
                raise ValueError(
                    f"{model_type}: layer {i} is {kind.type!r}, and from_hf_config has no rule for the recurrent "
                    f"state shape of {model_type} (it knows jamba's and mamba's)"
                )
            out.append(linear(c))
            if kind.type in ("hybrid", "hybrid_sliding"):
                t = "sliding_attention" if kind.window else "full_attention"
                out.append(_attention_spec(c, CacheLayerKind(t, kind.window), dtype))
        else:
            raise ValueError(f"{model_type}: layer {i} has unsupported layer type {kind.type!r}")
    if not out:
        raise ValueError(f"{model_type}: no layer keeps a cache")
    return out


def _kinds_from_types(cfg: Any, types: list[str]) -> list[CacheLayerKind]:
    """cache_layer_kinds for a config whose layer_types a family rule derived."""
    window, chunk = _window_of(cfg), getattr(cfg, "attention_chunk_size", None)
    out = []
    for t in types:
        if t == "sliding_attention" and window:
            out.append(CacheLayerKind(t, window))
        elif t == "chunked_attention" and chunk:
            out.append(CacheLayerKind(t, chunk))
        elif t in ("sliding_attention", "chunked_attention"):
            out.append(CacheLayerKind("full_attention"))
        else:
            out.append(CacheLayerKind(t))
    return out


# --- families -------------------------------------------------------------------
# Each takes (config, dtype, **options) and returns the list of layer specs.
# Every model type without a rule of its own is read by _generic.


def _generic(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    cfg = text_config(cfg)
    return _specs(cfg, cache_layer_kinds(cfg), dtype)


def _mistral(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    # Mistral/Mixtral apply config.sliding_window to every layer (or none); the
    # model ignores a layer_types kwarg (5.23 only warns about it), so do we.
    t = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return _specs(cfg, _kinds_from_types(cfg, [t] * _num_layers(cfg)), dtype)


def _qwen(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    types = _layer_types(cfg)
    if types is None:
        # Older configs: layers i >= max_window_layers slide when use_sliding_window.
        sliding = bool(getattr(cfg, "use_sliding_window", False)) and getattr(cfg, "sliding_window", None)
        mwl = getattr(cfg, "max_window_layers", 0)
        types = ["sliding_attention" if sliding and i >= mwl else "full_attention"
                 for i in range(_num_layers(cfg))]
    return _specs(cfg, _kinds_from_types(cfg, types), dtype)


def _gemma2(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    types = _layer_types(cfg)
    if types is None:  # older configs: even layers slide, odd layers are global
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(_num_layers(cfg))]
    return _specs(cfg, _kinds_from_types(cfg, types), dtype)


def _gemma3(cfg: Any, dtype: str, **kw: Any) -> list[LayerSpec]:
    if getattr(cfg, "model_type", None) == "gemma3":  # multimodal wrapper
        return _gemma3(cfg.text_config, dtype, **kw)
    types = _layer_types(cfg)
    if types is None:
        # Older (4.x) configs: every `sliding_window_pattern`-th layer is global.
        # (5.x always fills layer_types and keeps the pattern only as the
        # private `_sliding_window_pattern`.)
        pattern = getattr(cfg, "sliding_window_pattern", None) or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(_num_layers(cfg))]
    return _specs(cfg, _kinds_from_types(cfg, types), dtype)


def _llama4(cfg: Any, dtype: str, **kw: Any) -> list[LayerSpec]:
    if getattr(cfg, "model_type", None) == "llama4":  # multimodal wrapper
        return _llama4(cfg.text_config, dtype, **kw)
    types = _layer_types(cfg)
    if types is None:
        # `no_rope_layers[i]` is 1 when layer i USES RoPE (a chunked local
        # layer) and 0 for the global NoPE layers, by default every
        # `no_rope_layer_interval`-th (4th) layer.
        n = _num_layers(cfg)
        flags = getattr(cfg, "no_rope_layers", None)
        if not flags:
            interval = getattr(cfg, "no_rope_layer_interval", 4)
            flags = [int((i + 1) % interval != 0) for i in range(n)]
        if len(flags) != n:
            raise ValueError(f"{cfg.model_type}: no_rope_layers has {len(flags)} entries for {n} layers")
        types = ["chunked_attention" if f else "full_attention" for f in flags]
    return _specs(cfg, _kinds_from_types(cfg, types), dtype)


def _jamba(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    n = _num_layers(cfg)
    types = _layer_types(cfg)  # 5.23: a property, "linear_attention" / "full_attention"
    if types is None:
        block = getattr(cfg, "layers_block_type", None)  # older: "mamba" / "attention"
        if block is not None:
            types = [_LEGACY_TYPES.get(t, t) for t in block]
        else:
            period, offset = cfg.attn_layer_period, cfg.attn_layer_offset
            types = ["full_attention" if i % period == offset else "linear_attention" for i in range(n)]
    # Mamba-1 state of one request, per layer, both in the KV dtype (as
    # transformers allocates them from the activations; vLLM's default
    # mamba cache dtype "auto" is the same):
    #   conv state (intermediate, d_conv)   -- the last d_conv inputs of the causal conv
    #   ssm  state (intermediate, d_state)  -- the selective-scan hidden state
    # with intermediate = mamba_expand * hidden_size. (vLLM keeps d_conv - 1 conv
    # columns; we count d_conv, as transformers' cache does.)
    inter = cfg.mamba_expand * cfg.hidden_size
    mamba = MambaSpec(dtype=dtype, conv_shape=(inter, cfg.mamba_d_conv), ssm_shape=(inter, cfg.mamba_d_state))
    return _specs(cfg, _kinds_from_types(cfg, types), dtype, linear=lambda _c: mamba)


def _mamba(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    # Mamba-1 (mamba, falcon_mamba): the same two states as Jamba's, under the
    # names intermediate_size, conv_kernel and state_size.
    inter = _need(cfg, "intermediate_size")
    mamba = MambaSpec(dtype=dtype, conv_shape=(inter, _need(cfg, "conv_kernel")),
                      ssm_shape=(inter, _need(cfg, "state_size")))
    return _specs(cfg, cache_layer_kinds(cfg), dtype, linear=lambda _c: mamba)


def mllama_vision_tokens(vision_config: Any, max_images: int = 1) -> int:
    """Vision tokens one request's cross-attention layers cache.

    Per tile the vision encoder yields (image_size // patch_size)**2 patches
    plus one class token (its 8-alignment padding is sliced off before the
    projector); an image has up to max_num_tiles tiles:

        tokens = max_images * max_num_tiles * ((image_size // patch_size)**2 + 1)

    (Llama-3.2-11B-Vision: 560, 14, 4 tiles -> 4 * 1601 = 6404 per image.)
    Non-square sizes given as [h, w] use (h // ph) * (w // pw).
    """
    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    (h, w), (ph, pw) = pair(vision_config.image_size), pair(vision_config.patch_size)
    per_tile = (h // ph) * (w // pw) + 1
    return max_images * vision_config.max_num_tiles * per_tile


def _mllama(cfg: Any, dtype: str, *, cross_attention_tokens: int | None = None,
            max_images: int = 1, **_: Any) -> list[LayerSpec]:
    vision = None
    if getattr(cfg, "model_type", None) == "mllama":  # the full config: text + vision
        vision, cfg = cfg.vision_config, cfg.text_config
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive int, got {max_images!r}")
    if cross_attention_tokens is None:
        if vision is None:
            raise ValueError(
                "mllama_text_model config has no vision config: pass the full MllamaConfig, "
                "or cross_attention_tokens=<vision tokens per request>"
            )
        cross_attention_tokens = mllama_vision_tokens(vision, max_images)
    n = _num_layers(cfg)
    cross = set(getattr(cfg, "cross_attention_layers", None) or ())
    bad = sorted(i for i in cross if not 0 <= i < n)
    if bad:
        raise ValueError(f"mllama: cross_attention_layers {bad} are outside 0..{n - 1}")
    kv, hd = _kv_heads(cfg), _head_dim(cfg)
    # Cross-attention layers project the vision states with the same
    # num_key_value_heads and head_dim as self-attention.
    return [CrossAttentionSpec(kv, hd, dtype, max_tokens=cross_attention_tokens) if i in cross
            else FullAttentionSpec(kv, hd, dtype) for i in range(n)]


def _deepseek(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    # MLA cached as vLLM does: the compressed latent (kv_lora_rank) plus the
    # shared RoPE key (qk_rope_head_dim) per token. (transformers' own cache
    # stores decompressed per-head K and V, which is far larger.)
    rank, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if not rank or not rope:
        raise ValueError(f"{cfg.model_type}: MLA needs kv_lora_rank and qk_rope_head_dim, got {rank!r}, {rope!r}")
    spec = MLASpec(dtype=dtype, kv_lora_rank=rank, rope_dim=rope)
    return [spec] * _num_layers(cfg)


_FAMILY_RULES: dict[str, Callable[..., list[LayerSpec]]] = {
    "mistral": _mistral,
    "mixtral": _mistral,
    "qwen2": _qwen,
    "qwen3": _qwen,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3_text": _gemma3,
    "llama4": _llama4,
    "llama4_text": _llama4,
    "jamba": _jamba,
    "mamba": _mamba,
    "falcon_mamba": _mamba,
    "mllama": _mllama,
    "mllama_text_model": _mllama,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}
