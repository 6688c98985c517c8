"""Build a ModelKVSpec from a transformers config object (no downloads).

    from transformers import LlamaConfig
    from ellm_alloc.kv.hf_config import from_hf_config
    spec = from_hf_config(LlamaConfig(num_hidden_layers=32, num_key_value_heads=8))

Only the config's attributes are read; transformers itself is never imported
here, so any object with the right attributes works (and `model_type` picks the
family). Where the installed transformers gives a `layer_types` list (5.x does
for Qwen2/3, Gemma-2/3, Llama-4 and, as a property, Jamba) it is followed;
otherwise the older per-family attributes are used (see each `_family` below).

Conventions:

* head_dim: `config.head_dim` when set, else hidden_size // num_attention_heads.
* kv_heads: `num_key_value_heads`, else num_attention_heads.
* dtype: the `dtype=` argument, else `config.dtype` (5.x) / `config.torch_dtype`
  (older), else "bfloat16".
* A "sliding_attention" layer whose config has no sliding_window (e.g. Qwen2
  with use_sliding_window=False: transformers 5.x then sets sliding_window to
  None) attends to everything, as the model does, so it is a full layer; the
  same holds for a "chunked_attention" layer without attention_chunk_size.
"""
from __future__ import annotations

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

__all__ = ["SUPPORTED_MODEL_TYPES", "from_hf_config", "mllama_vision_tokens"]

# Older/legacy names of layer types, mapped to the 5.x ones.
_LEGACY_TYPES = {"attention": "full_attention", "mamba": "linear_attention"}


def from_hf_config(
    config: Any,
    *,
    name: str | None = None,
    dtype: Any = None,
    cross_attention_tokens: int | None = None,
    max_images: int = 1,
) -> ModelKVSpec:
    """The KV spec of a transformers config.

    name: the ModelKVSpec's name (default: config.name_or_path, else model_type).
    dtype: the KV-cache dtype (default: the config's dtype, else bfloat16).
    cross_attention_tokens: Mllama only: vision tokens per request, overriding
        the count derived from the vision config (required when a bare
        MllamaTextConfig, which has no vision config, is given).
    max_images: Mllama only: images per request (default 1).

    Raises ValueError for an unsupported model_type (naming the supported ones)
    or an inconsistent config.
    """
    model_type = getattr(config, "model_type", None)
    handler = _FAMILIES.get(model_type)
    if handler is None:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    kv_dtype = canonical_dtype(dtype) if dtype is not None else _config_dtype(config)
    if name is None:
        name = getattr(config, "name_or_path", None) or str(model_type)
    layers = handler(config, kv_dtype, cross_attention_tokens=cross_attention_tokens, max_images=max_images)
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
        raise ValueError(f"{cfg.model_type}: num_hidden_layers must be a positive int, got {n!r}")
    return n


def _kv_heads(cfg: Any) -> int:
    n = getattr(cfg, "num_key_value_heads", None)
    return n if n is not None else cfg.num_attention_heads


def _head_dim(cfg: Any) -> int:
    hd = getattr(cfg, "head_dim", None)
    if hd is not None:
        return hd
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"{cfg.model_type}: no head_dim and hidden_size {cfg.hidden_size} is not a multiple "
            f"of num_attention_heads {cfg.num_attention_heads}"
        )
    return cfg.hidden_size // cfg.num_attention_heads


def _layer_types(cfg: Any) -> list[str] | None:
    """The config's layer_types (legacy names mapped), or None when it has none."""
    lt = getattr(cfg, "layer_types", None)
    if lt is None:
        return None
    lt = [_LEGACY_TYPES.get(t, t) for t in lt]
    n = _num_layers(cfg)
    if len(lt) != n:
        raise ValueError(f"{cfg.model_type}: layer_types has {len(lt)} entries for {n} layers")
    return lt


def _attention_specs(cfg: Any, types: list[str], dtype: str,
                     linear: Callable[[], LayerSpec] | None = None) -> list[LayerSpec]:
    """Specs for a list of 5.x layer-type names."""
    kv, hd = _kv_heads(cfg), _head_dim(cfg)
    window = getattr(cfg, "sliding_window", None)
    chunk = getattr(cfg, "attention_chunk_size", None)
    out: list[LayerSpec] = []
    for i, t in enumerate(types):
        if t == "full_attention":
            out.append(FullAttentionSpec(kv, hd, dtype))
        elif t == "sliding_attention":
            out.append(SlidingWindowSpec(kv, hd, dtype, window=window) if window
                       else FullAttentionSpec(kv, hd, dtype))
        elif t == "chunked_attention":
            out.append(ChunkedLocalSpec(kv, hd, dtype, chunk_size=chunk) if chunk
                       else FullAttentionSpec(kv, hd, dtype))
        elif t == "linear_attention" and linear is not None:
            out.append(linear())
        else:
            raise ValueError(f"{cfg.model_type}: layer {i} has unsupported layer type {t!r}")
    return out


# --- families -------------------------------------------------------------------
# Each takes (config, dtype, **options) and returns the list of layer specs.


def _llama(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    # Llama (and its config) has no per-layer types: every layer is full attention.
    return _attention_specs(cfg, ["full_attention"] * _num_layers(cfg), dtype)


def _mistral(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    # Mistral/Mixtral apply config.sliding_window to every layer (or none); the
    # model ignores a layer_types kwarg (5.23 only warns about it), so do we.
    t = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return _attention_specs(cfg, [t] * _num_layers(cfg), dtype)


def _qwen(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    types = _layer_types(cfg)
    if types is None:
        # Older configs: layers i >= max_window_layers slide when use_sliding_window.
        sliding = bool(getattr(cfg, "use_sliding_window", False)) and getattr(cfg, "sliding_window", None)
        mwl = getattr(cfg, "max_window_layers", 0)
        types = ["sliding_attention" if sliding and i >= mwl else "full_attention"
                 for i in range(_num_layers(cfg))]
    elif not getattr(cfg, "use_sliding_window", True):
        # An explicit layer_types with use_sliding_window=False: 5.x sets
        # sliding_window=None, older versions kept the number but did not use it.
        types = ["full_attention" if t == "sliding_attention" else t for t in types]
    return _attention_specs(cfg, types, dtype)


def _gemma2(cfg: Any, dtype: str, **_: Any) -> list[LayerSpec]:
    types = _layer_types(cfg)
    if types is None:  # older configs: even layers slide, odd layers are global
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(_num_layers(cfg))]
    return _attention_specs(cfg, types, dtype)


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
    return _attention_specs(cfg, types, dtype)


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
    return _attention_specs(cfg, types, dtype)


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
    return _attention_specs(cfg, types, dtype, linear=lambda: mamba)


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


_FAMILIES: dict[str, Callable[..., list[LayerSpec]]] = {
    "llama": _llama,
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
    "mllama": _mllama,
    "mllama_text_model": _mllama,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))
