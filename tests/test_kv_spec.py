"""KV layer specs, the HF-config parser, presets and the JSON format.

Table-driven: each model family's tiny config -> the exact list of layer
specs; each kind's token accounting at the edges (0, 1, W-1, W, W+1, several
chunks); bad input -> ValueError naming the problem; every preset round-trips
through JSON and matches the stored benchmarks/specs file.
"""
from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ellm_alloc.kv.spec import (
    SPEC_TYPES,
    ChunkedLocalSpec,
    CrossAttentionSpec,
    FullAttentionSpec,
    LayerSpec,
    MambaSpec,
    MLASpec,
    ModelKVSpec,
    SlidingWindowSpec,
    spec_from_dict,
    spec_to_dict,
)

SPECS_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "specs"

# Small specs used throughout: 2 KV heads x head_dim 16 in bf16 = 128 B/token/layer.
F = FullAttentionSpec(2, 16)
S8 = SlidingWindowSpec(2, 16, window=8)
C32 = ChunkedLocalSpec(2, 16, chunk_size=32)


def expand(pattern: str, **by_letter: LayerSpec) -> list[LayerSpec]:
    """expand("SSF", S=..., F=...) -> [S, S, F]."""
    return [by_letter[c] for c in pattern]


# ---------------------------------------------------------------------------
# Token accounting per kind
# ---------------------------------------------------------------------------

W, CH = 4, 4
SLIDING = SlidingWindowSpec(2, 16, window=W)
CHUNKED = ChunkedLocalSpec(2, 16, chunk_size=CH)
CROSS = CrossAttentionSpec(2, 16, max_tokens=7)
MAMBA = MambaSpec(conv_shape=(8, 4), ssm_shape=(8, 2))  # (32 + 16) * 2 B = 96 B
MLA = MLASpec(kv_lora_rank=512, rope_dim=64)  # 576 * 2 B = 1152 B/token

# (spec, num_tokens, first_needed_token, tokens_kept, live_bytes)
TOKEN_TABLE = [
    (F, 0, 0, 0, 0),
    (F, 1, 0, 1, 128),
    (F, 5, 0, 5, 640),
    (F, 1000, 0, 1000, 128_000),
    # sliding W=4: keep min(n, W), first needed max(0, n - W)
    (SLIDING, 0, 0, 0, 0),
    (SLIDING, 1, 0, 1, 128),
    (SLIDING, W - 1, 0, W - 1, 384),
    (SLIDING, W, 0, W, 512),
    (SLIDING, W + 1, 1, W, 512),
    (SLIDING, 9, 5, W, 512),
    (SLIDING, 1000, 996, W, 512),
    # chunked C=4: keep the chunk of the last token, C*((n-1)//C) .. n-1
    (CHUNKED, 0, 0, 0, 0),
    (CHUNKED, 1, 0, 1, 128),
    (CHUNKED, CH - 1, 0, CH - 1, 384),
    (CHUNKED, CH, 0, CH, 512),
    (CHUNKED, CH + 1, CH, 1, 128),
    (CHUNKED, 2 * CH, CH, CH, 512),
    (CHUNKED, 2 * CH + 1, 2 * CH, 1, 128),
    (CHUNKED, 3 * CH - 1, 2 * CH, CH - 1, 384),
    (CHUNKED, 10 * CH + 3, 10 * CH, 3, 384),
    # cross: a fixed max_tokens per request, whatever n
    (CROSS, 0, 0, 7, 896),
    (CROSS, 1, 0, 7, 896),
    (CROSS, 500, 0, 7, 896),
    # mamba: no tokens, a fixed state
    (MAMBA, 0, 0, 0, 96),
    (MAMBA, 1, 1, 0, 96),
    (MAMBA, 12345, 12345, 0, 96),
    # MLA: every token, one latent each
    (MLA, 0, 0, 0, 0),
    (MLA, 3, 0, 3, 3 * 1152),
]


@pytest.mark.parametrize("spec,n,first,kept,live", TOKEN_TABLE,
                         ids=[f"{s.kind}-n{n}" for s, n, *_ in TOKEN_TABLE])
def test_token_accounting(spec, n, first, kept, live):
    assert spec.first_needed_token(n) == first
    assert spec.tokens_kept(n) == kept
    assert spec.live_bytes(n) == live


@pytest.mark.parametrize("spec,bpt,state", [
    (FullAttentionSpec(8, 128), 2 * 8 * 128 * 2, 0),
    (FullAttentionSpec(8, 128, "float32"), 2 * 8 * 128 * 4, 0),
    (FullAttentionSpec(8, 128, "float8_e4m3fn"), 2 * 8 * 128, 0),
    (SlidingWindowSpec(4, 64, "float16", window=10), 2 * 4 * 64 * 2, 0),
    (ChunkedLocalSpec(1, 8, "float64", chunk_size=3), 2 * 8 * 8, 0),
    (CrossAttentionSpec(8, 128, max_tokens=6404), 4096, 0),
    (MLASpec(kv_lora_rank=512, rope_dim=64), 576 * 2, 0),
    (MLASpec(dtype="float8_e4m3fn", kv_lora_rank=512, rope_dim=64), 576, 0),
    # Jamba-v0.1 Mamba layer: conv (8192, 4) + ssm (8192, 16) in bf16
    (MambaSpec(conv_shape=(8192, 4), ssm_shape=(8192, 16)), 0, (8192 * 4 + 8192 * 16) * 2),
    (MambaSpec(dtype="float32", conv_shape=(3,), ssm_shape=(2, 5)), 0, (3 + 10) * 4),
], ids=lambda v: v.kind if isinstance(v, LayerSpec) else None)
def test_sizes(spec, bpt, state):
    assert spec.bytes_per_token() == bpt
    assert spec.state_bytes() == state


@given(n=st.integers(0, 10_000), w=st.integers(1, 600))
def test_windowed_kinds_invariants(n, w):
    for spec in (SlidingWindowSpec(1, 1, window=w), ChunkedLocalSpec(1, 1, chunk_size=w)):
        first, kept = spec.first_needed_token(n), spec.tokens_kept(n)
        assert 0 <= first <= n and kept == n - first
        assert (kept == 0) == (n == 0) and kept <= w
        assert spec.first_needed_token(n + 1) >= first  # never needs an evicted token again
    # chunked: the kept range starts on a chunk boundary and holds the last token
    c = ChunkedLocalSpec(1, 1, chunk_size=w)
    if n:
        assert c.first_needed_token(n) % w == 0 and c.first_needed_token(n) <= n - 1 < c.first_needed_token(n) + w


def test_dtype_helpers():
    import torch

    s = FullAttentionSpec(2, 16, torch.float16)
    assert s.dtype == "float16" and s.itemsize == 2 and s.torch_dtype is torch.float16
    assert FullAttentionSpec(2, 16, "float8_e5m2").torch_dtype is torch.float8_e5m2
    assert FullAttentionSpec(2, 16, "torch.bfloat16").dtype == "bfloat16"
    assert FullAttentionSpec(2, 16, "half").dtype == "float16"


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

BAD_SPECS = [
    (lambda: FullAttentionSpec(-1, 128), r"FullAttentionSpec\.kv_heads must be positive, got -1"),
    (lambda: FullAttentionSpec(8, 0), r"head_dim must be positive, got 0"),
    (lambda: FullAttentionSpec(True, 128), r"kv_heads must be an int, got True"),
    (lambda: FullAttentionSpec(8.0, 128), r"kv_heads must be an int, got 8\.0"),
    (lambda: FullAttentionSpec(8, 128, "float13"), r"dtype 'float13' is not a supported"),
    (lambda: FullAttentionSpec(8, 128, "complex64"), r"dtype 'complex64'"),
    (lambda: FullAttentionSpec(8, 128, 2), r"dtype must be a torch dtype name"),
    (lambda: SlidingWindowSpec(8, 128, window=0), r"SlidingWindowSpec\.window must be positive, got 0"),
    (lambda: SlidingWindowSpec(8, 128, window=None), r"window must be an int, got None"),
    (lambda: ChunkedLocalSpec(8, 128, chunk_size=-4), r"chunk_size must be positive, got -4"),
    (lambda: CrossAttentionSpec(8, 128, max_tokens=0), r"max_tokens must be positive"),
    (lambda: MambaSpec(conv_shape=(), ssm_shape=(1,)), r"conv_shape must not be empty"),
    (lambda: MambaSpec(conv_shape=(4, 0), ssm_shape=(1,)), r"conv_shape\[1\] must be positive"),
    (lambda: MambaSpec(conv_shape=4, ssm_shape=(1,)), r"conv_shape must be a sequence"),
    (lambda: MambaSpec(kv_heads=-1, conv_shape=(1,), ssm_shape=(1,)), r"kv_heads must be >= 0"),
    (lambda: MLASpec(kv_heads=2, kv_lora_rank=512, rope_dim=64), r"kv_heads must be 1"),
    (lambda: MLASpec(head_dim=128, kv_lora_rank=512, rope_dim=64), r"head_dim must be kv_lora_rank \+ rope_dim = 576"),
    (lambda: MLASpec(kv_lora_rank=0, rope_dim=64), r"kv_lora_rank must be positive"),
    (lambda: F.tokens_kept(-1), r"num_tokens must be an int >= 0"),
    (lambda: SLIDING.first_needed_token(-3), r"num_tokens must be an int >= 0"),
    (lambda: CROSS.tokens_kept(-1), r"num_tokens must be an int >= 0"),
    (lambda: ModelKVSpec("x", ()), r"has no layers"),
    (lambda: ModelKVSpec("", (F,)), r"name must be a non-empty string"),
    (lambda: ModelKVSpec("x", (F, "full")), r"layer 1 is not a LayerSpec"),
]


@pytest.mark.parametrize("make,match", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_base_spec_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        LayerSpec(8, 128)


BAD_JSON_ENTRIES = [
    ({"type": "ful", "kv_heads": 8, "head_dim": 128}, r"unknown layer type 'ful'; expected one of"),
    ({"kv_heads": 8, "head_dim": 128}, r"has no 'type'"),
    ({"type": "sliding", "kv_heads": 8, "head_dim": 128}, r"'sliding' is missing required field\(s\) \['window'\]"),
    ({"type": "full", "kv_heads": 8}, r"missing required field\(s\) \['head_dim'\]"),
    ({"type": "full", "kv_heads": 8, "head_dim": 128, "windw": 3}, r"has no field\(s\) \['windw'\]"),
    ({"type": "full", "kv_heads": "8", "head_dim": 128}, r"kv_heads must be an int, got '8'"),
    ({"type": "full", "kv_heads": 8, "head_dim": 128, "dtype": "fp13"}, r"dtype 'fp13'"),
    ({"type": "full", "kv_heads": 8, "head_dim": 128, "repeat": 0}, r"layers\[0\]: entry\.repeat must be positive"),
    ({"type": "full", "kv_heads": 8, "head_dim": 128, "repeat": "2"}, r"repeat must be an int"),
    ({"type": "full", "kv_heads": 8, "head_dim": 128, "repeat": 10**12}, r"makes more than 4096 layers"),
    ({"type": "mamba", "conv_shape": [4], "ssm_shape": "16"}, r"ssm_shape must be a sequence"),
    (["full", 8, 128], r"layers\[0\] must be a JSON object"),
]


@pytest.mark.parametrize("entry,match", BAD_JSON_ENTRIES, ids=[m for _, m in BAD_JSON_ENTRIES])
def test_bad_json_entry_raises(entry, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ModelKVSpec.from_dict({"name": "m", "layers": [entry]})
    # ... and through a file, with the path in the message
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"name": "m", "layers": [entry]}))
    with pytest.raises(ValueError, match=r"bad\.json: layers\[0\]"):
        ModelKVSpec.from_json(p)


@pytest.mark.parametrize("doc,match", [
    ({"layers": []}, r"missing 'name'"),
    ({"name": "m"}, r"missing 'layers'"),
    ({"name": "m", "layers": {}}, r"'layers' must be a list"),
    ({"name": "m", "layers": []}, r"has no layers"),
    ({"name": "m", "layers": [], "extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ([], r"must be a JSON object"),
])
def test_bad_json_document_raises(doc, match):
    with pytest.raises(ValueError, match=match):
        ModelKVSpec.from_dict(doc)


def test_invalid_json_text_raises(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"name": "m", "layers": [')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        ModelKVSpec.from_json(p)


# ---------------------------------------------------------------------------
# Equality, hashing, grouping, JSON of single specs
# ---------------------------------------------------------------------------

def test_identical_specs_are_equal_and_group_together():
    import torch

    a = SlidingWindowSpec(8, 128, "bfloat16", window=1024)
    b = SlidingWindowSpec(kv_heads=8, head_dim=128, dtype=torch.bfloat16, window=1024)
    c = SlidingWindowSpec(8, 128, "bf16", window=1024)
    assert a == b == c and hash(a) == hash(b) == hash(c)
    assert a != SlidingWindowSpec(8, 128, window=512)
    assert a != SlidingWindowSpec(8, 128, "float16", window=1024)
    assert FullAttentionSpec(8, 128) != CrossAttentionSpec(8, 128, max_tokens=1)
    assert MambaSpec(conv_shape=[4, 2], ssm_shape=[4, 8]) == MambaSpec(conv_shape=(4, 2), ssm_shape=(4, 8))
    groups: dict[LayerSpec, list[int]] = {}
    for i, s in enumerate([a, FullAttentionSpec(8, 128), b, c, FullAttentionSpec(8, 128, "bfloat16")]):
        groups.setdefault(s, []).append(i)
    assert list(groups.values()) == [[0, 2, 3], [1, 4]]


def test_specs_are_frozen():
    with pytest.raises(AttributeError):
        F.kv_heads = 4  # type: ignore[misc]


@pytest.mark.parametrize("spec", [F, S8, C32, CROSS, MAMBA, MLA,
                                  MambaSpec(kv_heads=2, head_dim=3, conv_shape=(1,), ssm_shape=(1,))],
                         ids=lambda s: s.kind)
def test_spec_dict_round_trip(spec):
    d = spec_to_dict(spec)
    assert d["type"] == spec.kind and SPEC_TYPES[d["type"]] is type(spec)
    back = spec_from_dict(json.loads(json.dumps(d)))
    assert back == spec and hash(back) == hash(spec)


def test_model_json_uses_repeat_for_runs(tmp_path):
    m = ModelKVSpec("toy", (S8, S8, S8, F, S8, MAMBA, MAMBA))
    d = m.to_dict()
    assert [(e["type"], e.get("repeat", 1)) for e in d["layers"]] == [
        ("sliding", 3), ("full", 1), ("sliding", 1), ("mamba", 2)]
    assert "repeat" not in d["layers"][1]
    p = tmp_path / "toy.json"
    m.to_json(p)
    assert ModelKVSpec.from_json(p) == m
    assert json.loads(p.read_text()) == d


def test_model_totals_and_describe():
    m = ModelKVSpec("toy", (S8, F, S8, MAMBA, CROSS, S8))
    assert m.num_layers == 6
    assert m.kinds() == ("sliding", "full", "sliding", "mamba", "cross", "sliding")
    assert m.bytes_per_token_all_layers() == 5 * 128
    assert m.state_bytes_all_layers() == 96
    # n=10: 3 sliding layers keep 8, full keeps 10, cross 7, mamba its state
    assert m.live_bytes(10) == (3 * 8 + 10 + 7) * 128 + 96
    assert m.groups() == {S8: (0, 2, 5), F: (1,), MAMBA: (3,), CROSS: (4,)}
    lines = m.describe().splitlines()
    assert len(lines) == 1 + 4
    assert lines[0].startswith("toy: 6 layers, 640 B/token, 96 B/request state")
    assert "3 x sliding(kv_heads=2, head_dim=16, bfloat16, window=8)" in lines[1]
    assert lines[1].endswith("layers 0,2,5")
    assert "96 B/request" in lines[3]


# ---------------------------------------------------------------------------
# from_hf_config: one tiny config per family -> the exact layer list
# ---------------------------------------------------------------------------

def _tf():
    """transformers (an optional dependency): tests that build configs skip without it."""
    return pytest.importorskip("transformers")


SMALL = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)  # head_dim 16
J_MAMBA = MambaSpec(conv_shape=(128, 2), ssm_shape=(128, 4))  # expand 2 * hidden 64, d_conv 2, d_state 4

FAMILIES = [
    ("llama", lambda T: T.LlamaConfig(num_hidden_layers=3, **SMALL), expand("FFF", F=F)),
    ("mistral-sliding", lambda T: T.MistralConfig(num_hidden_layers=3, sliding_window=8, **SMALL),
     expand("SSS", S=S8)),
    ("mistral-no-window", lambda T: T.MistralConfig(num_hidden_layers=2, sliding_window=None, **SMALL),
     expand("FF", F=F)),
    ("mixtral", lambda T: T.MixtralConfig(num_hidden_layers=2, sliding_window=8, **SMALL), expand("SS", S=S8)),
    ("qwen2-window-top-layers", lambda T: T.Qwen2Config(
        num_hidden_layers=5, use_sliding_window=True, sliding_window=8, max_window_layers=3, **SMALL),
     expand("FFFSS", F=F, S=S8)),
    ("qwen2-window-off", lambda T: T.Qwen2Config(
        num_hidden_layers=3, use_sliding_window=False, sliding_window=8, max_window_layers=0, **SMALL),
     expand("FFF", F=F)),
    ("qwen2-layer-types", lambda T: T.Qwen2Config(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SMALL),
     expand("SFS", F=F, S=S8)),
    ("qwen3-head-dim", lambda T: T.Qwen3Config(num_hidden_layers=2, head_dim=32, **SMALL),
     expand("FF", F=FullAttentionSpec(2, 32))),
    ("gemma2-alternating", lambda T: T.Gemma2Config(num_hidden_layers=5, head_dim=16, sliding_window=8, **SMALL),
     expand("SFSFS", F=F, S=S8)),
    ("gemma3-text-pattern", lambda T: T.Gemma3TextConfig(
        num_hidden_layers=7, head_dim=16, sliding_window=8, sliding_window_pattern=3, **SMALL),
     expand("SSFSSFS", F=F, S=S8)),
    ("gemma3-multimodal", lambda T: T.Gemma3Config(text_config=dict(
        num_hidden_layers=7, head_dim=16, sliding_window=8, **SMALL)),
     expand("SSSSSFS", F=F, S=S8)),
    ("llama4-text", lambda T: T.Llama4TextConfig(
        num_hidden_layers=8, head_dim=16, attention_chunk_size=32, **SMALL),
     expand("CCCFCCCF", F=F, C=C32)),
    ("llama4-no-rope-list", lambda T: T.Llama4TextConfig(
        num_hidden_layers=4, head_dim=16, attention_chunk_size=32, no_rope_layers=[1, 0, 0, 1], **SMALL),
     expand("CFFC", F=F, C=C32)),
    ("llama4-no-chunk-size", lambda T: T.Llama4TextConfig(
        num_hidden_layers=4, head_dim=16, attention_chunk_size=None, **SMALL),
     expand("FFFF", F=F)),
    ("llama4-multimodal", lambda T: T.Llama4Config(text_config=dict(
        num_hidden_layers=4, head_dim=16, attention_chunk_size=32, **SMALL)),
     expand("CCCF", F=F, C=C32)),
    ("jamba", lambda T: T.JambaConfig(
        num_hidden_layers=8, attn_layer_period=4, attn_layer_offset=1,
        mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, **SMALL),
     expand("MFMMMFMM", F=F, M=J_MAMBA)),
    ("mllama", lambda T: T.MllamaConfig(
        text_config=dict(num_hidden_layers=5, cross_attention_layers=[1, 3], **SMALL),
        vision_config=dict(image_size=28, patch_size=14)),  # (2*2+1) * 4 tiles = 20
     expand("FXFXF", F=F, X=CrossAttentionSpec(2, 16, max_tokens=20))),
    ("deepseek-v2", lambda T: T.DeepseekV2Config(num_hidden_layers=2, kv_lora_rank=32, qk_rope_head_dim=8),
     expand("LL", L=MLASpec(kv_lora_rank=32, rope_dim=8))),
    ("deepseek-v3", lambda T: T.DeepseekV3Config(num_hidden_layers=3, kv_lora_rank=64, qk_rope_head_dim=16),
     expand("LLL", L=MLASpec(kv_lora_rank=64, rope_dim=16))),
]


@pytest.mark.parametrize("make,expected", [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_from_hf_config_families(make, expected):
    from ellm_alloc.kv.hf_config import from_hf_config

    spec = from_hf_config(make(_tf()))
    assert list(spec.layers) == expected


# Configs as older transformers versions shaped them (no layer_types), as
# duck-typed objects: the fallbacks must give the same layouts.
def _old(model_type, **kw):
    base = dict(model_type=model_type, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    return SimpleNamespace(**{**base, **kw})


OLD_CONFIGS = [
    ("qwen2-no-layer-types", _old("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=2), expand("FFSS", F=F, S=S8)),
    ("qwen2-old-explicit-types-window-off", _old(
        "qwen2", num_hidden_layers=2, use_sliding_window=False, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"]), expand("FF", F=F)),
    ("gemma2-no-layer-types", _old("gemma2", num_hidden_layers=3, head_dim=16, sliding_window=8),
     expand("SFS", F=F, S=S8)),
    ("gemma3-sliding-window-pattern", _old("gemma3_text", num_hidden_layers=6, head_dim=16, sliding_window=8,
                                           sliding_window_pattern=2), expand("SFSFSF", F=F, S=S8)),
    ("llama4-no-rope-layers", _old("llama4_text", num_hidden_layers=3, head_dim=16, attention_chunk_size=32,
                                   no_rope_layers=[0, 1, 1]), expand("FCC", F=F, C=C32)),
    ("llama4-interval", _old("llama4_text", num_hidden_layers=4, head_dim=16, attention_chunk_size=32,
                             no_rope_layer_interval=2), expand("CFCF", F=F, C=C32)),
    ("jamba-layers-block-type", _old("jamba", num_hidden_layers=3, hidden_size=64, mamba_expand=2,
                                     mamba_d_conv=2, mamba_d_state=4,
                                     layers_block_type=["mamba", "attention", "mamba"]),
     expand("MFM", F=F, M=J_MAMBA)),
    ("jamba-period-offset", _old("jamba", num_hidden_layers=4, mamba_expand=2, mamba_d_conv=2, mamba_d_state=4,
                                 attn_layer_period=2, attn_layer_offset=0), expand("FMFM", F=F, M=J_MAMBA)),
    ("llama-torch-dtype", _old("llama", num_hidden_layers=1, torch_dtype="float16"),
     [FullAttentionSpec(2, 16, "float16")]),
    # Any model type without a rule of its own: layer_types (its length is the
    # number of cache layers), else sliding_window / attention_chunk_size.
    ("unknown-type-layer-types-fewer", _old("some_lm", num_hidden_layers=3, sliding_window=8,
                                           layer_types=["full_attention", "sliding_attention"]),
     expand("FS", F=F, S=S8)),
    ("unknown-type-layer-types-more", _old("some_lm", num_hidden_layers=1, attention_chunk_size=32,
                                          layer_types=["chunked_attention", "full_attention", "attention"]),
     expand("CFF", F=F, C=C32)),
    ("unknown-type-sliding-window", _old("some_lm", num_hidden_layers=2, sliding_window=8), expand("SS", S=S8)),
    ("unknown-type-window-off", _old("some_lm", num_hidden_layers=2, sliding_window=8, use_sliding_window=False),
     expand("FF", F=F)),
    ("unknown-type-chunked", _old("some_lm", num_hidden_layers=2, attention_chunk_size=32), expand("CC", C=C32)),
    ("unknown-type-shared-kv-and-moe", _old("some_lm", num_hidden_layers=4, kv_sharing_modes=[None, None, "reuse", None],
                                           layer_types=["full_attention", "moe", "full_attention", "full_attention"]),
     expand("FF", F=F)),
]


@pytest.mark.parametrize("cfg,expected", [c[1:] for c in OLD_CONFIGS], ids=[c[0] for c in OLD_CONFIGS])
def test_from_hf_config_older_attributes(cfg, expected):
    from ellm_alloc.kv.hf_config import from_hf_config

    assert list(from_hf_config(cfg).layers) == expected


def test_from_hf_config_dtype_and_name():
    from ellm_alloc.kv.hf_config import from_hf_config

    T = _tf()
    cfg = T.LlamaConfig(num_hidden_layers=2, dtype="float16", **SMALL)
    spec = from_hf_config(cfg)
    assert spec.name == "llama" and {s.dtype for s in spec.layers} == {"float16"}
    spec = from_hf_config(cfg, name="mine", dtype="float8_e4m3fn")
    assert spec.name == "mine" and spec.layers[0] == FullAttentionSpec(2, 16, "float8_e4m3fn")
    assert from_hf_config(T.LlamaConfig(num_hidden_layers=1, **SMALL)).layers[0].dtype == "bfloat16"


def test_mllama_vision_tokens_and_text_only_config():
    from ellm_alloc.kv.hf_config import from_hf_config, mllama_vision_tokens

    T = _tf()
    vision = T.MllamaVisionConfig(image_size=560, patch_size=14, max_num_tiles=4)
    assert mllama_vision_tokens(vision) == 4 * ((560 // 14) ** 2 + 1) == 6404
    assert mllama_vision_tokens(vision, max_images=2) == 2 * 6404
    assert mllama_vision_tokens(SimpleNamespace(image_size=[28, 42], patch_size=14, max_num_tiles=1)) == 2 * 3 + 1
    text = T.MllamaTextConfig(num_hidden_layers=4, cross_attention_layers=[2], **SMALL)
    with pytest.raises(ValueError, match="cross_attention_tokens"):
        from_hf_config(text)
    spec = from_hf_config(text, cross_attention_tokens=100)
    assert spec.layers[2] == CrossAttentionSpec(2, 16, max_tokens=100) and spec.kinds().count("cross") == 1
    full = T.MllamaConfig(text_config=text, vision_config=vision)
    assert from_hf_config(full, max_images=2).layers[2].max_tokens == 2 * 6404
    with pytest.raises(ValueError, match="max_images must be a positive int, got 0"):
        from_hf_config(full, max_images=0)


@pytest.mark.parametrize("cfg,match", [
    (SimpleNamespace(model_type="gpt2"), r"gpt2: num_hidden_layers must be a positive int, got None"),
    (SimpleNamespace(), r"None: num_hidden_layers must be a positive int"),
    (_old("some_lm", num_hidden_layers=1, num_attention_heads=None), r"some_lm: the config has no num_attention_heads"),
    (_old("some_hybrid", num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
     r"layer 0 is 'linear_attention', and from_hf_config has no rule for the recurrent state shape of some_hybrid"),
    (_old("some_lm", num_hidden_layers=2, layer_types=["moe", "mlp"]), r"some_lm: no layer keeps a cache"),
    (_old("gemma2", num_hidden_layers=1, head_dim=16, sliding_window=8, layer_types=["window_attention"]),
     r"layer 0 has unsupported layer type 'window_attention'"),
    (_old("llama", num_hidden_layers=0), r"num_hidden_layers must be a positive int"),
    (_old("llama", num_hidden_layers=1, hidden_size=66), r"hidden_size 66 is not a multiple of num_attention_heads 4"),
    (_old("mllama_text_model", num_hidden_layers=2, cross_attention_layers=[5]), r"cross_attention_layers \[5\]"),
    (_old("deepseek_v3", num_hidden_layers=2, kv_lora_rank=None, qk_rope_head_dim=64), r"MLA needs kv_lora_rank"),
    (_old("llama4_text", num_hidden_layers=3, head_dim=16, attention_chunk_size=8, no_rope_layers=[1]),
     r"no_rope_layers has 1 entries for 3 layers"),
])
def test_from_hf_config_bad_input(cfg, match):
    from ellm_alloc.kv.hf_config import from_hf_config

    kw = {"cross_attention_tokens": 10} if getattr(cfg, "model_type", "") == "mllama_text_model" else {}
    with pytest.raises(ValueError, match=match):
        from_hf_config(cfg, **kw)


def test_from_hf_config_bad_dtype():
    from ellm_alloc.kv.hf_config import from_hf_config

    with pytest.raises(ValueError, match="dtype 'int4'"):
        from_hf_config(_old("llama", num_hidden_layers=1), dtype="int4")


# ---------------------------------------------------------------------------
# Presets: real dimensions, JSON round trip, stored files
# ---------------------------------------------------------------------------

def _layers_of(spec: ModelKVSpec, kind: str) -> list[int]:
    return [i for i, s in enumerate(spec.layers) if s.kind == kind]


PRESET_FACTS = {
    # name: (num_layers, {kind: layer indices or count}, bytes_per_token_all_layers, state bytes)
    "llama3-8b": (32, {"full": 32}, 32 * 2 * 8 * 128 * 2, 0),
    "gemma3-12b-like": (48, {"sliding": 40, "full": list(range(5, 48, 6))}, 48 * 2 * 8 * 256 * 2, 0),
    "llama4-scout-like": (48, {"chunked": 36, "full": list(range(3, 48, 4))}, 48 * 2 * 8 * 128 * 2, 0),
    "jamba-like": (32, {"mamba": 28, "full": [4, 12, 20, 28]}, 4 * 2 * 8 * 128 * 2,
                   28 * (8192 * 4 + 8192 * 16) * 2),
    "mllama-like": (40, {"full": 32, "cross": [3, 8, 13, 18, 23, 28, 33, 38]}, 40 * 2 * 8 * 128 * 2, 0),
    "mistral-7b-v0.1": (32, {"sliding": 32}, 32 * 2 * 8 * 128 * 2, 0),
    "qwen2.5-7b": (28, {"full": 28}, 28 * 2 * 4 * 128 * 2, 0),
}


def test_preset_names():
    from ellm_alloc.kv.presets import OUT_OF_SAMPLE, PRESETS, preset_names

    assert list(PRESETS) == ["llama3-8b", "gemma3-12b-like", "llama4-scout-like", "jamba-like", "mllama-like"]
    assert list(OUT_OF_SAMPLE) == ["mistral-7b-v0.1", "qwen2.5-7b"]
    assert sorted(preset_names()) == sorted(PRESET_FACTS)


@pytest.mark.parametrize("name", list(PRESET_FACTS))
def test_preset_dimensions(name):
    from ellm_alloc.kv.presets import get_preset

    _tf()
    n_layers, by_kind, bpt, state = PRESET_FACTS[name]
    spec = get_preset(name)
    assert spec.name == name and spec.num_layers == n_layers
    for kind, want in by_kind.items():
        got = _layers_of(spec, kind)
        assert (len(got) if isinstance(want, int) else got) == want, kind
    assert sum(len(_layers_of(spec, k)) for k in by_kind) == n_layers
    assert spec.bytes_per_token_all_layers() == bpt
    assert spec.state_bytes_all_layers() == state
    assert {s.dtype for s in spec.layers} == {"bfloat16"}


def test_preset_key_parameters():
    from ellm_alloc.kv.presets import get_preset

    _tf()
    g = get_preset("gemma3-12b-like").groups()
    assert set(g) == {SlidingWindowSpec(8, 256, window=1024), FullAttentionSpec(8, 256)}
    l4 = get_preset("llama4-scout-like").groups()
    assert set(l4) == {ChunkedLocalSpec(8, 128, chunk_size=8192), FullAttentionSpec(8, 128)}
    mm = get_preset("mllama-like").groups()
    assert set(mm) == {FullAttentionSpec(8, 128), CrossAttentionSpec(8, 128, max_tokens=1601 * 4)}
    jm = get_preset("jamba-like").groups()
    assert set(jm) == {FullAttentionSpec(8, 128), MambaSpec(conv_shape=(8192, 4), ssm_shape=(8192, 16))}
    assert set(get_preset("mistral-7b-v0.1").groups()) == {SlidingWindowSpec(8, 128, window=4096)}
    assert set(get_preset("qwen2.5-7b").groups()) == {FullAttentionSpec(4, 128)}


@pytest.mark.parametrize("name", list(PRESET_FACTS))
def test_preset_json_round_trip(name, tmp_path):
    from ellm_alloc.kv.presets import get_preset

    _tf()
    spec = get_preset(name)
    p = tmp_path / f"{name}.json"
    spec.to_json(p)
    back = ModelKVSpec.from_json(p)
    assert back == spec and back.layers == spec.layers
    assert ModelKVSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("name", list(PRESET_FACTS))
def test_stored_spec_file_matches_preset(name):
    """benchmarks/specs/<name>.json is what the preset builds today (regenerate:
    python -m ellm_alloc.kv.presets benchmarks/specs)."""
    from ellm_alloc.kv.presets import get_preset

    path = SPECS_DIR / f"{name}.json"
    stored = ModelKVSpec.from_json(path)  # loads without transformers
    n_layers, _, bpt, state = PRESET_FACTS[name]
    assert (stored.num_layers, stored.bytes_per_token_all_layers(), stored.state_bytes_all_layers()) == (
        n_layers, bpt, state)
    _tf()
    assert stored == get_preset(name)
    assert path.read_text() == get_preset(name).to_json_str()


def test_unknown_preset_lists_names():
    from ellm_alloc.kv.presets import get_preset

    with pytest.raises(ValueError, match=r"unknown KV preset 'llama3-9b'; known presets: llama3-8b, gemma3-12b-like"):
        get_preset("llama3-9b")


@pytest.mark.parametrize("path", sorted(SPECS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_spec_loads_and_has_a_layout(path):
    """The spec files bench kv reads (presets and out-of-sample configs) parse,
    name themselves after their file, and give a page layout at the default sizes."""
    from ellm_alloc.kv import plan_layout

    spec = ModelKVSpec.from_json(path)
    assert spec.name == path.stem
    layout = plan_layout(spec, 16, 2 << 20)
    assert sorted(i for g in layout.groups for i in g.layers) == list(range(spec.num_layers))
