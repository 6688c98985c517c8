"""The family sweep: every causal-LM model type of the installed transformers,
built offline from a tiny config, generating with DynamicCache and with
ElasticCache.

    from ellm_alloc.hf.families import model_types, run_family
    result = run_family("phi3")      # FamilyResult(family, outcome, reason, seconds)

Outcomes:

* "equal": greedy generate() (batch 2, left padding) gives the same tokens
  with both caches;
* "refused": ElasticCache's constructor raised ValueError, naming the layer
  it cannot hold (the message is the reason);
* "failed": anything else on ElasticCache's side: an exception during
  generate(), or different tokens;
* "dynamic_failed": the family does not generate with DynamicCache from its
  tiny config here (the reason says why), so there is nothing to compare;
* "skipped": the family needs weights, remote code or a package that is not
  installed (the reason says which).

The tiny config: the model type's default config with every size it has
shrunk (hidden size, layers, heads, vocabulary, experts, ranks, windows; in
sub-configs too), the layer-type list cut to the new depth while keeping one
layer of each type the full list has. Nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .compat import cache_kwarg_of

__all__ = ["FamilyResult", "OUTCOMES", "model_types", "run_family", "tiny_config"]

OUTCOMES = ("equal", "refused", "failed", "dynamic_failed", "skipped")

LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
VOCAB = 256
WINDOW = 6
PROMPT = 10
NEW_TOKENS = 6
PAD = 3  # left padding of sequence 0
MAX_PARAMS = 20_000_000

# Attribute -> tiny value, applied wherever a config (or a sub-config) has the
# attribute with an int value larger than the tiny one.
_SIZES: dict[str, int] = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN, "expert_intermediate_size": HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM, "kv_channels": HEAD_DIM,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "sliding_window": WINDOW, "attention_chunk_size": WINDOW,
    "max_position_embeddings": 512, "max_window_layers": 2, "lru_width": HIDDEN,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
}
# A milder shrink, tried when the first one gives a model that does not run:
# only depth, vocabulary, experts and MLP widths (heads and head dims stay).
_MILD = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
         "shared_expert_intermediate_size", "expert_intermediate_size", "decoder_layers", "encoder_layers",
         "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_experts", "num_local_experts",
         "n_routed_experts", "moe_num_experts", "num_experts_per_tok", "moe_topk", "n_group", "topk_group",
         "attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset",
         "sliding_window", "attention_chunk_size")
_VOCAB_KEYS = ("vocab_size",)  # and every key ending in "vocab_size"
_MISSING_PACKAGE = ("requires the following packages", "pip install", "No module named", "is not installed",
                    "requires the", "install it")
_REMOTE = ("trust_remote_code", "remote code")


@dataclass
class FamilyResult:
    family: str
    outcome: str
    reason: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_types() -> list[str]:
    """Every causal-LM model type of the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _layer_selection(types: list[Any], n: int) -> list[int]:
    """Indices of the layers a tiny config keeps: the first n, then the first
    layer of each type the list has that they miss."""
    keep = list(range(min(n, len(types))))
    seen = {repr(types[i]) for i in keep}
    for i, t in enumerate(types):
        if repr(t) not in seen:
            keep.append(i)
            seen.add(repr(t))
    return keep


_PER_LAYER_LISTS = ("activation_sparsity_pattern", "layer_types", "layers_block_type", "block_types", "mlp_layer_types", "kv_sharing_modes",
                    "intermediate_size", "num_key_value_heads", "num_attention_heads", "sliding_window_pattern")


def _shrink(d: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    depth = d.get("num_hidden_layers")
    for k, v in d.items():
        if isinstance(v, dict) and k != "per_layer_config":
            out[k] = _shrink(v, sizes)
        elif isinstance(v, bool) or v is None:
            out[k] = v
        elif isinstance(v, int) and (k == "vocab_size" or k.endswith("vocab_size")):
            out[k] = min(v, VOCAB)
        elif isinstance(v, int) and k.endswith("_token_id"):
            out[k] = v if v < VOCAB else VOCAB - 1
        elif isinstance(v, int) and k in sizes:
            out[k] = min(v, sizes[k])
        else:
            out[k] = v
    new_depth = out.get("num_hidden_layers")
    if not isinstance(depth, int) or not isinstance(new_depth, int) or new_depth >= depth:
        return out
    pattern = next((out[k] for k in ("layer_types", "layers_block_type", "block_types", "mlp_layer_types")
                    if isinstance(out.get(k), list) and len(out[k]) == depth), None)
    keep = _layer_selection(pattern, new_depth) if pattern is not None else list(range(new_depth))
    for k in _PER_LAYER_LISTS:
        if isinstance(out.get(k), list) and len(out[k]) == depth:
            out[k] = [out[k][i] for i in keep]
    if isinstance(out.get("hybrid_override_pattern"), str) and len(out["hybrid_override_pattern"]) == depth:
        out["hybrid_override_pattern"] = "".join(out["hybrid_override_pattern"][i] for i in keep)
    if isinstance(out.get("per_layer_config"), dict):
        old = {int(i): c for i, c in out["per_layer_config"].items()}
        out["per_layer_config"] = {j: old[i] for j, i in enumerate(keep) if i in old}
    out["num_hidden_layers"] = len(keep)
    for k in ("attn_layer_indices", "hybrid_layer_ids"):  # hybrids that list their attention layers
        if isinstance(out.get(k), list):
            kept = [keep.index(i) for i in out[k] if i in keep]
            out[k] = kept or [len(keep) - 1]
    return out


def tiny_config(model_type: str, mild: bool = False):
    """The tiny config of `model_type` (see the module docstring); mild=True
    shrinks only depth, vocabulary, experts and windows."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in _SIZES.items() if k in _MILD} if mild else _SIZES
    d = _consistent(_shrink(base.to_dict(), sizes), base.to_dict())
    for k in ("model_type", "transformers_version", "architectures"):
        d.pop(k, None)
    return type(base).from_dict(d)


# Sizes that configs derive from others when not given (Zamba's attention
# width, Mamba head widths and dt ranks): left out so that they follow the
# shrunk sizes instead of contradicting them.
_DERIVED = ("attention_hidden_size", "attention_head_dim", "mamba_headdim", "mamba_dt_rank")
# Sizes of one kind: those equal in the default config are kept equal.
_RELATED = (
    ("num_attention_heads", "num_key_value_heads", "n_head", "n_heads", "num_heads", "num_kv_heads", "n_kv_heads"),
    ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_channels"),
)


def _consistent(d: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Restores the relations between sizes that the default config holds
    and a plain shrink breaks."""
    for k in _DERIVED:
        d.pop(k, None)
    # Sizes equal in the default config stay equal (MLA models: as many K/V
    # heads as query heads, head_dim the rope part).
    for group in _RELATED:
        for a in group:
            for b in group:
                if a != b and isinstance(d.get(a), int) and isinstance(d.get(b), int) and base.get(a) == base.get(b):
                    d[a] = d[b] = min(d[a], d[b])
    hidden = d.get("hidden_size")
    # Mamba-2 heads: n_heads * d_head == expand * hidden_size.
    if isinstance(hidden, int) and isinstance(d.get("mamba_d_head"), int) and isinstance(d.get("mamba_n_heads"), int):
        inner = d.get("mamba_expand", 2) * hidden
        if isinstance(d.get("mamba_d_ssm"), int):  # Falcon-H1 gives the inner width itself
            d["mamba_d_ssm"] = inner
        d["mamba_d_head"] = HEAD_DIM
        d["mamba_n_heads"] = max(1, inner // HEAD_DIM)
    if isinstance(hidden, int) and isinstance(d.get("expand"), int) and isinstance(d.get("num_heads"), int) \
            and isinstance(d.get("head_dim"), int) and "state_size" in d:
        d["num_heads"] = max(1, d["expand"] * hidden // d["head_dim"])
    # Hybrids whose default config has no attention layer (Bamba, Granite-4.0-H)
    # get one last layer of attention, as their checkpoints have.
    if "attn_layer_indices" in d and not d["attn_layer_indices"] and isinstance(d.get("num_hidden_layers"), int):
        d["attn_layer_indices"] = [d["num_hidden_layers"] - 1]
    types = d.get("layer_types")
    if isinstance(types, list) and types and set(types) == {"linear_attention"} and "mamba_n_heads" in d:
        d["layer_types"] = types[:-1] + ["attention"]
    return d


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, VOCAB), (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :PAD] = 0
    mask[0, :PAD] = 0
    return ids, mask


def _skip_reason(e: BaseException) -> str | None:
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, ImportError) or any(m in text for m in _MISSING_PACKAGE):
        return f"needs a package that is not installed: {text.splitlines()[0][:300]}"
    if any(m in text for m in _REMOTE):
        return f"needs remote code: {text.splitlines()[0][:300]}"
    return None


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:400]}"


def _build_and_reference(model_type: str, mild: bool):
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = tiny_config(model_type, mild=mild)
    with torch.device("meta"):  # count first: a mild shrink may leave a large model
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    if params > MAX_PARAMS:
        raise RuntimeError(f"the tiny config still has {params / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    name = cache_kwarg_of(model)
    if name is None:
        raise _NoCache(f"{type(model).__name__}.forward takes no cache (cache / past_key_values / cache_params)")
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", VOCAB) or VOCAB
    ids, mask = _batch(vocab)
    gen = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():
        try:
            ref = model.generate(ids, **{name: DynamicCache(config=model.config)}, **gen)
        except ValueError as e:
            if "cache of its own" not in str(e):
                raise
            # The model takes only its own Cache subclass (MiniMax): that is the reference.
            ref = model.generate(ids, **gen)
    return model, name, ids, gen, ref


class _NoCache(Exception):
    pass


def run_family(model_type: str) -> FamilyResult:
    """Builds `model_type` from its tiny config and compares the two caches."""
    from .cache import ElasticCache

    t0 = time.perf_counter()

    def result(outcome: str, reason: str) -> FamilyResult:
        return FamilyResult(model_type, outcome, reason, round(time.perf_counter() - t0, 2))

    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        built, errors = None, []
        for mild in (False, True):
            try:
                built = _build_and_reference(model_type, mild)
                break
            except _NoCache as e:
                return result("dynamic_failed", str(e))
            except Exception as e:  # noqa: BLE001 - every error is an outcome
                skip = _skip_reason(e)
                if skip:
                    return result("skipped", skip)
                errors.append(_short(e))
        if built is None:
            return result("dynamic_failed", f"tiny config: {errors[0]}; milder shrink: {errors[1]}")
        model, name, ids, gen, ref = built
        try:
            cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=8 * (PROMPT + NEW_TOKENS))
        except ValueError as e:
            return result("refused", str(e))
        except Exception as e:  # noqa: BLE001 - anything but a clear refusal is a failure
            return result("failed", f"construction: {_short(e)}")
        try:
            with torch.no_grad():
                out = model.generate(ids, **{name: cache}, **gen)
        except Exception as e:  # noqa: BLE001
            return result("failed", f"generate: {_short(e)}")
        finally:
            cache.close()
        if out.shape != ref.shape or not torch.equal(out, ref):
            differ = (out.shape != ref.shape) or int((out != ref).sum())
            return result("failed", f"tokens differ from DynamicCache's ({differ} positions)")
        return result("equal", "")
