"""Named KV specs of published models, built from their real dimensions.

    from ellm_alloc.kv.presets import get_preset
    spec = get_preset("gemma3-12b-like")

Each preset builds the transformers config with the dimensions of the model's
published config.json (cited next to it) and runs it through
`from_hf_config`, so the presets also exercise the parser. They need
transformers (`pip install ellm_alloc[hf]`); the same specs are stored as JSON
in benchmarks/specs/ for use without it (`ModelKVSpec.from_json`).

PRESETS holds the five models the KV manager is designed and tuned against.
OUT_OF_SAMPLE holds published configs kept apart for out-of-sample checks;
get_preset() resolves names from both.

Regenerate the JSON files with:  python -m ellm_alloc.kv.presets benchmarks/specs
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from .hf_config import from_hf_config
from .spec import ModelKVSpec

__all__ = ["OUT_OF_SAMPLE", "PRESETS", "get_preset", "preset_names", "write_spec_files"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "KV presets build transformers configs: pip install 'ellm_alloc[hf]', "
            "or load the stored JSON with ModelKVSpec.from_json('benchmarks/specs/<name>.json')"
        ) from e
    return transformers


def llama3_8b() -> ModelKVSpec:
    # meta-llama/Meta-Llama-3-8B config.json: hidden_size 4096, 32 layers,
    # 32 attention heads, 8 KV heads (head_dim 128), bfloat16.
    T = _transformers()
    cfg = T.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="llama3-8b")


def gemma3_12b_like() -> ModelKVSpec:
    # google/gemma-3-12b-it config.json, text_config: hidden_size 3840, 48 layers,
    # 16 attention heads, 8 KV heads, head_dim 256, sliding_window 1024,
    # sliding_window_pattern 6 (5 local layers, then 1 global), bfloat16.
    T = _transformers()
    cfg = T.Gemma3TextConfig(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, sliding_window_pattern=6, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="gemma3-12b-like")


def llama4_scout_like() -> ModelKVSpec:
    # meta-llama/Llama-4-Scout-17B-16E config.json, text_config: hidden_size 5120,
    # 48 layers, 40 attention heads, 8 KV heads, head_dim 128,
    # attention_chunk_size 8192; every 4th layer (no_rope_layer_interval 4) is a
    # global NoPE layer, the others chunked local attention with RoPE; bfloat16.
    T = _transformers()
    cfg = T.Llama4TextConfig(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_local_experts=16, attention_chunk_size=8192, no_rope_layer_interval=4, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="llama4-scout-like")


def jamba_like() -> ModelKVSpec:
    # ai21labs/Jamba-v0.1 config.json (Jamba-1.5-Mini has the same dimensions):
    # hidden_size 4096, 32 layers, 32 attention heads, 8 KV heads (head_dim 128),
    # attention every 8th layer at offset 4 (layers 4, 12, 20, 28), Mamba
    # d_state 16, d_conv 4, expand 2; bfloat16.
    T = _transformers()
    cfg = T.JambaConfig(
        vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, num_experts=16, num_experts_per_tok=2,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="jamba-like")


def mllama_like() -> ModelKVSpec:
    # meta-llama/Llama-3.2-11B-Vision config.json. text_config: hidden_size 4096,
    # 40 layers, 32 attention heads, 8 KV heads (head_dim 128), cross-attention
    # layers [3, 8, 13, 18, 23, 28, 33, 38]. vision_config: image_size 560,
    # patch_size 14, max_num_tiles 4 -> ((560 // 14)**2 + 1) * 4 = 1601 * 4 =
    # 6404 vision tokens for one image per request; bfloat16.
    T = _transformers()
    text = T.MllamaTextConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    )
    vision = T.MllamaVisionConfig(image_size=560, patch_size=14, max_num_tiles=4)
    cfg = T.MllamaConfig(text_config=text, vision_config=vision, dtype="bfloat16")
    return from_hf_config(cfg, name="mllama-like", max_images=1)


def mistral_7b_v01() -> ModelKVSpec:
    # mistralai/Mistral-7B-v0.1 config.json: hidden_size 4096, 32 layers,
    # 32 attention heads, 8 KV heads (head_dim 128), sliding_window 4096; bfloat16.
    T = _transformers()
    cfg = T.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="mistral-7b-v0.1")


def qwen25_7b() -> ModelKVSpec:
    # Qwen/Qwen2.5-7B config.json: hidden_size 3584, 28 layers, 28 attention
    # heads, 4 KV heads (head_dim 128), use_sliding_window false (so every layer
    # is full attention), max_window_layers 28; bfloat16.
    T = _transformers()
    cfg = T.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, use_sliding_window=False,
        sliding_window=131072, max_window_layers=28, dtype="bfloat16",
    )
    return from_hf_config(cfg, name="qwen2.5-7b")


PRESETS: dict[str, Callable[[], ModelKVSpec]] = {
    "llama3-8b": llama3_8b,
    "gemma3-12b-like": gemma3_12b_like,
    "llama4-scout-like": llama4_scout_like,
    "jamba-like": jamba_like,
    "mllama-like": mllama_like,
}

OUT_OF_SAMPLE: dict[str, Callable[[], ModelKVSpec]] = {
    "mistral-7b-v0.1": mistral_7b_v01,
    "qwen2.5-7b": qwen25_7b,
}


def preset_names() -> list[str]:
    """Every name get_preset accepts: PRESETS first, then OUT_OF_SAMPLE."""
    return [*PRESETS, *OUT_OF_SAMPLE]


def get_preset(name: str) -> ModelKVSpec:
    """The ModelKVSpec of a named preset (PRESETS or OUT_OF_SAMPLE)."""
    builder = PRESETS.get(name) or OUT_OF_SAMPLE.get(name)
    if builder is None:
        raise ValueError(f"unknown KV preset {name!r}; known presets: {', '.join(preset_names())}")
    return builder()


def write_spec_files(directory: str | os.PathLike[str]) -> list[str]:
    """Write every preset to <directory>/<name>.json; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in preset_names():
        path = os.path.join(directory, f"{name}.json")
        get_preset(name).to_json(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_spec_files(sys.argv[1] if len(sys.argv) > 1 else os.path.join("benchmarks", "specs")):
        print(p)
