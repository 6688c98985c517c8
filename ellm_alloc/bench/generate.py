"""`bench generate`: ElasticCache (growing and fixed-shape) vs DynamicCache vs StaticCache in one run.

    python -m ellm_alloc.bench generate --model llama3-8b --batch 4 --prompt-len 128 --new-tokens 64 [--json]
    python -m ellm_alloc.bench generate --model gemma3-12b-like ... --find-max-batch --budget 1GiB

The model. A transformers model with random weights (nothing is downloaded)
is built from a config of the preset's family whose KV structure is the
preset's: the same KV heads, head_dim and kind of each layer (full, sliding
window, chunked), in the same pattern. What is scaled down, so that a CPU
runs it in seconds (see SCALED below):

  * layers: one period of the layer pattern, or 4 layers for uniform models
    (Llama-3-8B 32 -> 4; Gemma-3-12B 48 -> 6, i.e. 5 sliding + 1 global;
    Llama-4-Scout 48 -> 4, i.e. 3 chunked + 1 global; Mistral, Qwen2.5 -> 4).
    --layers N repeats the pattern up to N layers (the preset's count on a
    GPU, for realistic KV totals: never run on a GPU here).
  * hidden size 512, query heads = KV heads (no GQA grouping), MLP 1024,
    vocabulary 4096, 2 experts for Llama-4: compute only, the KV is untouched.
  * dtype: float32 on CPU (bf16 matmuls are slow on most CPUs), the preset's
    bfloat16 on CUDA; --dtype overrides. KV bytes scale with it.
  * sliding windows and chunk sizes keep the preset's values unless --window
    is given (so with short sequences sliding layers hold every token).

Jamba (Mamba layers) and Mllama (cross-attention) presets are refused: those
layer kinds are not ElasticCache's (it raises for them).

The caches. Each run is one generate() (greedy, exactly N new tokens, no
stopping) on the same prompts; a LogitsProcessor takes a reading at every
step (after the prefill, then after each decode step):

  * ElasticCache: bytes of pool chunks mapped under it (`mapped_bytes()`) and
    the bytes its kept tokens need (`needed_bytes()`); a host pool on CPU,
    the enabled CUDA pool on a GPU.
  * fixed: ElasticCache(fixed_shapes=True), StaticCache's shapes for
    torch.compile (run eagerly here, as every cache is): the same readings,
    plus the pool's one read-only zero chunk that its unwritten chunks map
    (held while the cache lives). Its sliding layers keep the previous window
    mapped until the step after a multi-token update (the prefill).
  * DynamicCache / StaticCache: the bytes of their layers' key and value
    tensors at that step. DynamicCache's transient concatenation copy within
    a step is not seen (readings are between steps).

`peak_total_bytes`: when torch allocates from the pool (ellm_alloc.enable(),
on CUDA or with CPU routing), the arena's peak allocated bytes over the run
(weights, activations, and DynamicCache's / StaticCache's tensors) plus
ElasticCache's peak mapped KV bytes, which live outside the arena. Otherwise
(a CPU run on a pool of its own) the model's parameter bytes plus the peak
KV bytes: activations are not counted, and the growth of the process's RSS
during the run is reported beside it as an indication.

Timing: tokens/s = batch * new tokens / wall time of generate() (prefill
included); `decode_tokens_per_s` counts decode steps only. An untimed
warm-up generate (DynamicCache, the same shapes) runs first, because CPU
kernels pay a one-off cost for each new sequence length; the three caches run in turn --repeats times
(interleaved, so drift hits all three alike) and the median is reported.

--find-max-batch --budget BYTES: the largest batch whose peak KV bytes fit
BYTES, for each cache, by binary search over a closed-form model of each
cache's peak KV bytes at a given batch (full layers hold every token; sliding
layers hold min(n, W) tokens in ElasticCache, min(n, W - 1) in DynamicCache
and min(W, max_cache_len) slots in StaticCache; ElasticCache rounds each
(layer, K/V, sequence) range to whole chunks). The budget covers KV only
(weights and activations are the same for the three caches). The model is
checked against the measured peaks of the run at --batch
(`model_matches_measured`), which is what makes the search trustworthy
without running generate() at every candidate batch.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import torch

from ..config import human

CACHES = ("elastic", "fixed", "dynamic", "static")
ELASTIC = ("elastic", "fixed")  # the caches whose KV lives in pool chunks
HIDDEN, MLP, VOCAB = 512, 1024, 4096


# ---- the scaled model ----------------------------------------------------------------


def _rep(pattern: list[str], n: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(n)]


def scaled_config(preset: str, layers: int | None = None, window: int | None = None):
    """(config, description) of a small random-weight model with the preset's KV structure."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if preset == "llama3-8b":
        n = layers or 4
        cfg = T.LlamaConfig(**common, num_hidden_layers=n, num_attention_heads=8, num_key_value_heads=8,
                            head_dim=128, max_position_embeddings=8192)
    elif preset == "mistral-7b-v0.1":
        n = layers or 4
        cfg = T.MistralConfig(**common, num_hidden_layers=n, num_attention_heads=8, num_key_value_heads=8,
                              head_dim=128, sliding_window=window or 4096)
    elif preset == "qwen2.5-7b":
        n = layers or 4
        # Qwen2's config has no head_dim: hidden / heads = 512 / 4 = 128, with 4 KV heads.
        cfg = T.Qwen2Config(**common, num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4,
                            use_sliding_window=False, max_window_layers=n)
    elif preset == "gemma3-12b-like":
        n = layers or 6
        cfg = T.Gemma3TextConfig(**common, num_hidden_layers=n, num_attention_heads=8, num_key_value_heads=8,
                                 head_dim=256, query_pre_attn_scalar=256, sliding_window=window or 1024,
                                 layer_types=_rep(["sliding_attention"] * 5 + ["full_attention"], n))
    elif preset == "llama4-scout-like":
        n = layers or 4
        cfg = T.Llama4TextConfig(**common, intermediate_size_mlp=MLP, num_hidden_layers=n,
                                 num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                                 num_local_experts=2, num_experts_per_tok=1,
                                 attention_chunk_size=window or 8192, no_rope_layer_interval=4,
                                 layer_types=_rep(["chunked_attention"] * 3 + ["full_attention"], n))
    elif preset in ("jamba-like", "mllama-like"):
        raise ValueError(f"preset {preset!r} has Mamba or cross-attention layers, which ElasticCache does not "
                         "hold; use llama3-8b, gemma3-12b-like, llama4-scout-like, mistral-7b-v0.1 or qwen2.5-7b")
    else:
        from ..kv.presets import preset_names

        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(preset_names())}")
    return cfg


def check_kv_structure(preset: str, cfg) -> str:
    """Raises unless every scaled layer has the preset's kind, heads and head_dim
    at the same position of the pattern; returns a one-line description."""
    from ..kv.hf_config import from_hf_config
    from ..kv.presets import get_preset

    ref = get_preset(preset).layers
    got = from_hf_config(cfg, dtype="bfloat16").layers
    for i, s in enumerate(got):
        r = ref[i % len(ref)] if len(got) > len(ref) else ref[i]
        if (s.kind, s.kv_heads, s.head_dim) != (r.kind, r.kv_heads, r.head_dim):
            raise AssertionError(f"scaled {preset} layer {i}: {s} does not match the preset's {r}")
    kinds = [s.kind for s in got]
    win = sorted({getattr(s, "window", None) or getattr(s, "chunk_size", None) for s in got} - {None})
    return (f"{len(got)} layers ({', '.join(f'{kinds.count(k)} {k}' for k in dict.fromkeys(kinds))}), "
            f"{got[0].kv_heads} KV heads x {got[0].head_dim}" + (f", window {win}" if win else ""))


def build_model(cfg, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


# ---- the KV bytes model -----------------------------------------------------------------


def _layer_shapes(cfg, dtype: torch.dtype) -> list[tuple[str, int, int | None]]:
    """(kind, token bytes, window) per layer; chunked layers count as sliding
    windows of chunk_size tokens, as transformers and ElasticCache cache them."""
    from ..kv.hf_config import from_hf_config

    item = torch.empty((), dtype=dtype).element_size()
    out = []
    for s in from_hf_config(cfg, dtype="float32").layers:
        tb = s.kv_heads * s.head_dim * item
        w = getattr(s, "window", None) or getattr(s, "chunk_size", None)
        out.append(("sliding" if w else "full", tb, w))
    return out


def model_kv_bytes(cache: str, shapes, batch: int, prompt: int, new: int, max_cache_len: int,
                   chunk: int = 2 << 20) -> int:
    """Peak KV bytes of `cache` over a generate() of `new` tokens after `prompt`.
    The cache holds prompt + new - 1 tokens at the last step (the last token is
    never fed back)."""
    last = prompt + new - 1
    total = 0
    for kind, tb, w in shapes:
        if cache == "static":
            slots = min(w, max_cache_len) if w else max_cache_len
            total += 2 * batch * slots * tb
        elif cache == "fixed":
            # Read after the prefill (n == prompt: every prompt token still
            # mapped, see fixed.py) and after each decode step (from n - w on).
            per = 0
            for n in range(prompt, last + 1) if w else (last,):
                start = max(n - w, 0) if w and n > prompt else 0
                per = max(per, -(-n * tb // chunk) - start * tb // chunk)
            total += 2 * batch * per * chunk
        elif cache == "dynamic":
            total += 2 * batch * (min(last, w - 1) if w else last) * tb
        else:
            per = 0
            for n in range(prompt, last + 1) if w else (last,):
                start = max(n - w, 0) if w else 0
                per = max(per, -(-n * tb // chunk) - start * tb // chunk)
            total += 2 * batch * per * chunk
    if cache == "fixed":
        total += chunk  # the pool's zero chunk
    return total


def find_max_batch(cache: str, shapes, budget: int, prompt: int, new: int, max_cache_len: int,
                   chunk: int) -> int:
    """Largest batch whose modelled peak KV bytes fit `budget` (0 if none)."""
    fits = lambda b: model_kv_bytes(cache, shapes, b, prompt, new, max_cache_len, chunk) <= budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- one run ----------------------------------------------------------------------------


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _tensor_kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _Progress:
    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.last = 0.0

    def update(self, i: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and i < self.total:
            return
        self.last = now
        n = round(30 * i / max(self.total, 1))
        print(f"\r  {self.label:<24} [{'#' * n:<30}] {i}/{self.total}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print("\r" + " " * 72 + "\r", end="", file=sys.stderr, flush=True)


def make_cache(kind: str, cfg, batch: int, max_cache_len: int, pool=None):
    from transformers import DynamicCache, StaticCache

    if kind == "elastic":
        from ..hf import ElasticCache

        return ElasticCache(cfg, max_batch_size=batch, max_cache_len=max_cache_len, pool=pool)
    if kind == "fixed":
        from ..hf import ElasticCache

        return ElasticCache(cfg, max_batch_size=batch, max_cache_len=max_cache_len, pool=pool, fixed_shapes=True)
    if kind == "dynamic":
        return DynamicCache(config=cfg)
    if kind == "static":
        return StaticCache(config=cfg, max_cache_len=max_cache_len)
    raise ValueError(kind)


def _torch_allocates_from(pool, device) -> bool:
    """Whether torch's allocations on `device` come from `pool` (ellm_alloc.enable())."""
    from ..integrations.torch_allocator import device_pool, enabled_device

    return enabled_device() == device.type and device_pool(device).handle == pool.handle


def run_generate(kind: str, model, cfg, ids, mask, new_tokens: int, max_cache_len: int, pool=None,
                 progress: bool = False, recorder=None, label: str = "") -> dict:
    """One generate() with cache `kind`; KV bytes read at every step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from ..hf.compat import CACHE_KWARG

    batch = ids.shape[0]
    cache = make_cache(kind, cfg, batch, max_cache_len, pool)
    cuda = ids.device.type == "cuda"
    peaks = {"kv": 0, "need_at_peak": 0, "slack_chunks": 0, "rss": 0, "times": []}
    bar = _Progress(label or kind, new_tokens, progress)
    chunk = pool.stats()["chunk_bytes"] if pool is not None else 2 << 20

    class Reader(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if kind in ELASTIC:
                # fixed: plus the zero chunk, which the pool holds for it.
                kv = cache.mapped_bytes() + (chunk if kind == "fixed" and pool.zero_chunk()["users"] else 0)
                need = cache.needed_bytes()
                peaks["slack_chunks"] = max(peaks["slack_chunks"], (kv - need) // chunk)
            else:
                kv, need = _tensor_kv_bytes(cache), None
            if kv >= peaks["kv"]:
                peaks["kv"], peaks["need_at_peak"] = kv, need
            peaks["rss"] = max(peaks["rss"], _rss())
            peaks["times"].append(time.perf_counter())
            bar.update(len(peaks["times"]))
            return scores

    procs = LogitsProcessorList([Reader()])
    if recorder is not None:
        procs.append(recorder.logits_processor())
    routed = pool is not None and _torch_allocates_from(pool, ids.device)
    if cuda:  # GPU-only path: never run on a GPU in this repository
        torch.cuda.synchronize()
    if routed:
        pool.reset_peaks()
    rss0 = _rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **{CACHE_KWARG: cache}, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=procs)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    bar.done()
    times = peaks["times"]
    decode = (times[-1] - times[0]) if len(times) > 1 else 0.0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if routed:
        total = pool.stats()["allocated_peak"] + (peaks["kv"] if kind in ELASTIC else 0)
    else:
        total = weights + peaks["kv"]
    r = {
        "cache": kind,
        "generated_tokens": int(out.shape[1] - ids.shape[1]),
        "wall_s": round(wall, 4),
        "tokens_per_s": round(batch * new_tokens / wall, 2),
        "decode_tokens_per_s": round(batch * (len(times) - 1) / decode, 2) if decode else None,
        "peak_kv_bytes": peaks["kv"],
        "peak_total_bytes": total,
        "rss_growth_bytes": max(0, peaks["rss"] - rss0),
    }
    if kind in ELASTIC:
        r["needed_bytes_at_peak"] = peaks["need_at_peak"]
        r["max_slack_chunks"] = peaks["slack_chunks"]
        cache.close()
    del cache
    return r


# ---- the whole comparison ---------------------------------------------------------------------


def model_record(preset: str, structure: str, cfg, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """What a report says of the scaled model it ran and where (shared with bench serve)."""
    return {
        "preset": preset,
        "model": structure,
        "config": {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
                   "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size},
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }


def run(preset: str, batch: int, prompt_len: int, new_tokens: int, *, max_cache_len: int | None = None,
        layers: int | None = None, window: int | None = None, dtype: str | None = None,
        repeats: int = 3, find_max: bool = False, budget: int | None = None, progress: bool = True,
        device: str | None = None) -> dict:
    if min(batch, prompt_len, new_tokens, repeats) < 1:
        raise ValueError("batch, prompt length, new tokens and repeats must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    total_len = prompt_len + new_tokens
    max_cache_len = max_cache_len or max(2048, total_len)
    if max_cache_len < total_len:
        raise ValueError(f"max_cache_len {max_cache_len} < prompt + new tokens ({total_len})")
    cfg = scaled_config(preset, layers, window)
    structure = check_kv_structure(preset, cfg)
    pool = None
    if device == "cuda":  # GPU-only path: never run on a GPU in this repository
        import ellm_alloc

        ellm_alloc.enable()
        pool = ellm_alloc.device_pool()
    model = build_model(cfg, device, tdtype)
    shapes = _layer_shapes(cfg, tdtype)
    if pool is None:
        from ..pool import Pool

        chunk = 2 << 20
        worst = max(model_kv_bytes(k, shapes, batch, prompt_len, new_tokens, max_cache_len, chunk) for k in ELASTIC)
        pool = Pool("cpu", budget=max(worst * 2, 64 << 20))
    chunk = pool.stats()["chunk_bytes"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    # Untimed warm-up at the run's own shapes. CPU kernels (oneDNN) build a
    # primitive per new shape: without this, whichever cache runs first with a
    # growing KV length (ElasticCache, DynamicCache) pays several times its
    # decode time in one-off costs. The same lengths then serve both.
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    runs: dict[str, list[dict]] = {k: [] for k in CACHES}
    for rep in range(repeats):
        for kind in CACHES:
            runs[kind].append(run_generate(kind, model, cfg, ids, mask, new_tokens, max_cache_len, pool,
                                           progress, label=f"{kind} ({rep + 1}/{repeats})"))
    results = {}
    for kind, rs in runs.items():
        r = dict(rs[-1])
        r["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in rs)
        dec = [x["decode_tokens_per_s"] for x in rs if x["decode_tokens_per_s"]]
        r["decode_tokens_per_s"] = statistics.median(dec) if dec else None
        r["tokens_per_s_runs"] = [x["tokens_per_s"] for x in rs]
        r["peak_kv_bytes"] = max(x["peak_kv_bytes"] for x in rs)
        r["peak_total_bytes"] = max(x["peak_total_bytes"] for x in rs)
        r["model_peak_kv_bytes"] = model_kv_bytes(kind, shapes, batch, prompt_len, new_tokens, max_cache_len,
                                                  chunk)
        r["model_matches_measured"] = r["model_peak_kv_bytes"] == r["peak_kv_bytes"]
        results[kind] = r
    pool.validate()

    el, fx, st, dy = results["elastic"], results["fixed"], results["static"], results["dynamic"]
    n_layers = len(shapes)
    slack = 2 * n_layers * batch * chunk
    need = el["needed_bytes_at_peak"] or 0
    fixed_need = fx["needed_bytes_at_peak"] or 0
    out: dict[str, Any] = {
        **model_record(preset, structure, cfg, device, tdtype),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "max_cache_len": max_cache_len,
        "repeats": repeats,
        "chunk_bytes": chunk,
        "results": results,
        "checks": {
            "elastic_peak_kv_bytes": el["peak_kv_bytes"],
            "elastic_needed_bytes_at_peak": need,
            "one_chunk_per_layer_kv_seq_bytes": slack,
            "elastic_within_need_plus_one_chunk_each": el["peak_kv_bytes"] <= need + slack,
            "fixed_peak_kv_bytes": fx["peak_kv_bytes"],
            "fixed_needed_bytes_at_peak": fixed_need,
            "fixed_within_need_plus_one_chunk_each_and_zero_chunk":
                fx["peak_kv_bytes"] <= fixed_need + slack + chunk,
            "fixed_over_static_kv": round(fx["peak_kv_bytes"] / st["peak_kv_bytes"], 4)
            if st["peak_kv_bytes"] else None,
            "static_peak_kv_bytes": st["peak_kv_bytes"],
            "sequences_shorter_than_max_cache_len": total_len < max_cache_len,
            "elastic_below_static": el["peak_kv_bytes"] < st["peak_kv_bytes"],
            "elastic_over_static_kv": round(el["peak_kv_bytes"] / st["peak_kv_bytes"], 4)
            if st["peak_kv_bytes"] else None,
            "dynamic_peak_kv_bytes": dy["peak_kv_bytes"],
            "tokens_per_s_ratio_elastic_over_dynamic": round(el["tokens_per_s"] / dy["tokens_per_s"], 4),
            "decode_tokens_per_s_ratio_elastic_over_dynamic":
                round(el["decode_tokens_per_s"] / dy["decode_tokens_per_s"], 4)
                if el["decode_tokens_per_s"] and dy["decode_tokens_per_s"] else None,
            "target_ratio": 0.9,
        },
    }
    if find_max:
        if budget is None:
            raise ValueError("--find-max-batch needs --budget")
        out["max_batch"] = {
            "budget_bytes": budget,
            "method": "binary search over the closed-form peak KV bytes model (KV only), "
                      "checked against this run's measured peaks",
            "model_matches_measured": all(r["model_matches_measured"] for r in results.values()),
            **{k: find_max_batch(k, shapes, budget, prompt_len, new_tokens, max_cache_len, chunk)
               for k in CACHES},
        }
    if device == "cpu":
        pool.close()
    return out


def print_report(r: dict) -> None:
    c = r["checks"]
    print(f"bench generate: {r['preset']} scaled to {r['model']}; {r['device']}, {r['dtype']}, "
          f"{r['torch_threads']} threads")
    print(f"  batch {r['batch']}, prompt {r['prompt_len']}, new tokens {r['new_tokens']}, "
          f"max_cache_len {r['max_cache_len']}, median of {r['repeats']} run(s)")
    print(f"  {'cache':<10}{'peak KV':>12}{'peak total':>13}{'tokens/s':>11}{'decode tok/s':>14}")
    for k, x in r["results"].items():
        dec = f"{x['decode_tokens_per_s']:.1f}" if x["decode_tokens_per_s"] else "-"
        print(f"  {k:<10}{human(x['peak_kv_bytes']):>12}{human(x['peak_total_bytes']):>13}"
              f"{x['tokens_per_s']:>11.1f}{dec:>14}")
    print(f"  elastic peak KV {human(c['elastic_peak_kv_bytes'])} <= need {human(c['elastic_needed_bytes_at_peak'])}"
          f" + one chunk per (layer, K/V, sequence) {human(c['one_chunk_per_layer_kv_seq_bytes'])}: "
          f"{c['elastic_within_need_plus_one_chunk_each']}")
    print(f"  fixed (fixed_shapes=True) peak KV {human(c['fixed_peak_kv_bytes'])} <= need "
          f"{human(c['fixed_needed_bytes_at_peak'])} + one chunk each + the zero chunk: "
          f"{c['fixed_within_need_plus_one_chunk_each_and_zero_chunk']}; fixed / static peak KV "
          f"{c['fixed_over_static_kv']}")
    print(f"  elastic / static peak KV {c['elastic_over_static_kv']}; tokens/s elastic / dynamic "
          f"{c['tokens_per_s_ratio_elastic_over_dynamic']} (decode only "
          f"{c['decode_tokens_per_s_ratio_elastic_over_dynamic']}; target >= {c['target_ratio']})")
    if "max_batch" in r:
        m = r["max_batch"]
        print(f"  largest batch within {human(m['budget_bytes'])} of KV: "
              + ", ".join(f"{k} {m[k]}" for k in CACHES)
              + f" (model matches measured: {m['model_matches_measured']})")
