"""ElasticCache (ellm_alloc.hf) against transformers' DynamicCache on tiny
random-weight models built from configs (no downloads), on host pools."""
from __future__ import annotations

import gc
import os
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.hf import ElasticCache  # noqa: E402

MiB = 1 << 20
CHUNK = 2 * MiB
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
    "gemma3": lambda: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}
GEN = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)


def make_model(name: str, **overrides):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batch(b: int = 2, prompt: int = 12, seed: int = 1):
    """Prompts with left padding: sequence 0 has 4 pad tokens, the others none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (b, prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask


@pytest.fixture(scope="module")
def pool():
    with Pool("cpu", budget="512MiB") as p:
        yield p


def held_chunks(pool: Pool) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"].startswith("hf."))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_dynamic_cache(name, pool):
    model = make_model(name)
    ids, mask = batch()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **GEN)
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + GEN["max_new_tokens"] - 1
    # The same cache, reset, serves a second (smaller) batch.
    cache.reset()
    assert cache.mapped_bytes() == 0 and cache.get_seq_length() == 0
    with torch.no_grad():
        ref1 = model.generate(ids[1:], attention_mask=mask[1:], **GEN)
        out1 = model.generate(ids[1:], attention_mask=mask[1:], past_key_values=cache, **GEN)
    assert torch.equal(out1, ref1)
    cache.close()
    assert held_chunks(pool) == 0


def test_sliding_window_matters_in_these_tests():
    """The Mistral comparison above is only meaningful if the window changes the output."""
    ids, mask = batch()
    with torch.no_grad():
        windowed = make_model("mistral").generate(ids, attention_mask=mask, **GEN)
        unwindowed = make_model("mistral", sliding_window=None).generate(ids, attention_mask=mask, **GEN)
    assert not torch.equal(windowed, unwindowed)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_beam_search_matches_dynamic_cache(name, pool):
    """num_beams=2 reorders the cache (reorder_cache) every step."""
    model = make_model(name)
    ids, mask = batch()
    kw = dict(GEN, num_beams=2, num_return_sequences=2, max_new_tokens=12)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    cache.close()


def forward(model, cache, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


def decode(model, cache, ids, mask, steps: int):
    """Greedy steps on an already filled cache; returns the stacked logits."""
    logits = []
    for _ in range(steps):
        out = forward(model, cache, ids[:, -1:], mask)
        logits.append(out)
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(logits), ids, mask


def twin_caches(model, pool, max_batch=4):
    return DynamicCache(config=model.config), ElasticCache(model.config, max_batch_size=max_batch,
                                                           max_cache_len=64, pool=pool)


def prefill(model, caches, ids, mask):
    outs = [forward(model, c, ids, mask) for c in caches]
    torch.testing.assert_close(outs[0], outs[1])
    ids = torch.cat([ids, outs[0].argmax(-1, keepdim=True)], 1)
    return ids, torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3"])
def test_batch_select_and_repeat_interleave(name, pool):
    model = make_model(name)
    ids, mask = batch(b=3)
    dyn, ela = twin_caches(model, pool)
    ids, mask = prefill(model, (dyn, ela), ids, mask)
    for c in (dyn, ela):  # keep sequences 2 and 0, in that order
        c.batch_select_indices(torch.tensor([2, 0]))
    ids, mask = ids[[2, 0]], mask[[2, 0]]
    assert ela.mapped_bytes() < 3 * 2 * len(ela.layers) * CHUNK  # the third sequence was released
    ref, rids, rmask = decode(model, dyn, ids, mask, 4)
    got, _, _ = decode(model, ela, ids, mask, 4)
    torch.testing.assert_close(got, ref)
    for c in (dyn, ela):
        c.batch_repeat_interleave(2)
    rids, rmask = rids.repeat_interleave(2, 0), rmask.repeat_interleave(2, 0)
    ref, _, _ = decode(model, dyn, rids, rmask, 4)
    got, _, _ = decode(model, ela, rids, rmask, 4)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="max_batch_size"):
        ela.batch_repeat_interleave(2)  # 8 > 4
    ela.close()


def test_reorder_cache_direct(pool):
    model = make_model("gemma3")
    ids, mask = batch(b=3)
    dyn, ela = twin_caches(model, pool)
    ids, mask = prefill(model, (dyn, ela), ids, mask)
    order = torch.tensor([1, 1, 0])
    for c in (dyn, ela):
        c.reorder_cache(order)
    ref, _, _ = decode(model, dyn, ids[order], mask[order], 3)
    got, _, _ = decode(model, ela, ids[order], mask[order], 3)
    torch.testing.assert_close(got, ref)
    ela.close()


def test_crop_full_layers(pool):
    model = make_model("llama")
    ids, mask = batch()
    dyn, ela = twin_caches(model, pool)
    ids, mask = prefill(model, (dyn, ela), ids, mask)
    _, ids, mask = decode(model, ela, ids, mask, 6)
    _, _, _ = decode(model, dyn, ids[:, :-6], mask[:, :-6], 6)
    n = ela.get_seq_length()
    for c in (dyn, ela):
        c.crop(-4)
    assert ela.get_seq_length() == dyn.get_seq_length() == n - 4
    ids, mask = ids[:, :-4], mask[:, :-4]
    ref, _, _ = decode(model, dyn, ids, mask, 5)
    got, _, _ = decode(model, ela, ids, mask, 5)
    torch.testing.assert_close(got, ref)
    # The older convention: a positive length to keep.
    ela.crop(5)
    assert ela.get_seq_length() == 5
    ela.crop(0)  # a no-op
    assert ela.get_seq_length() == 5
    ela.close()


def test_crop_sliding_layers(pool):
    """Sliding layers keep one token of slack: crop(-1) works past the window,
    a deeper crop names the problem. The reference is a fresh DynamicCache
    prefilled with what the cropped cache holds (DynamicCache's own rollback
    past a window needs past recording, which 5.17 returns unsliced)."""
    model = make_model("mistral")
    ids, mask = batch()
    ela = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
    out = forward(model, ela, ids, mask)
    ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    _, ids2, mask2 = decode(model, ela, ids, mask, 3)  # 12 + 3 tokens cached: past the window of 8
    ela.crop(-1)
    ids2, mask2 = ids2[:, :-1], mask2[:, :-1]
    assert ela.get_seq_length() == ids2.shape[1] - 1
    got, _, _ = decode(model, ela, ids2, mask2, 3)
    fresh = DynamicCache(config=model.config)
    forward(model, fresh, ids2[:, :-1], mask2[:, :-1])
    ref, _, _ = decode(model, fresh, ids2, mask2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="sliding-window"):
        ela.crop(-5)
    ela.close()


def test_memory_grows_with_tokens(pool):
    """KV memory is the tokens' chunks, never max_cache_len up front, and goes
    back to the pool on reset(), close() and garbage collection."""
    model = make_model("llama")
    ids, mask = batch()
    max_len = 1 << 18  # 32 MiB of VA per (layer, K/V, sequence) at 128 B/token
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=max_len, pool=pool)
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers * K/V * heads * dim * float32
    assert cache.mapped_bytes() == 0
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    worst = 2 * max_len * bytes_per_token
    assert cache.mapped_bytes() == 2 * 2 * 2 * CHUNK  # one chunk per (layer, K/V, sequence)
    assert cache.mapped_bytes() * 16 <= worst
    assert cache.needed_bytes() == 2 * cache.get_seq_length() * bytes_per_token
    assert held_chunks(pool) == 8
    cache.reset()
    assert cache.mapped_bytes() == 0 and held_chunks(pool) == 0
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert held_chunks(pool) == 8
    del cache
    gc.collect()
    assert held_chunks(pool) == 0


def test_default_host_pool():
    model = make_model("qwen2")
    ids, mask = batch()
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **GEN)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert torch.equal(out, ref)
    # A host pool; on the suite's fake-CUDA pass, "cpu" pools are CUDA pools of the fake device.
    assert cache.pool is not None and cache.pool.backend == ("cuda" if os.environ.get("ELLM_TEST_BACKEND") == "fakecuda" else "host")
    assert cache.pool.tensor_device_type == "cpu"
    assert cache.mapped_bytes() > 0
    cache.close()
    assert cache.mapped_bytes() == 0


def test_sliding_layer_memory_bounded_by_window(pool):
    """Direct updates with 2 KiB tokens (1024 tokens a chunk) and a window of
    1500: the sliding layer keeps at most the chunks under its window, the
    full layer grows, and what update() returns is exactly the window."""
    heads, dim, window = 4, 128, 1500
    cfg = Gemma3TextConfig(**{**TINY, "num_key_value_heads": heads}, head_dim=dim, sliding_window=window,
                           layer_types=["sliding_attention", "full_attention"])
    cache = ElasticCache(cfg, max_batch_size=2, max_cache_len=8192, pool=pool)
    g = torch.Generator().manual_seed(0)
    total = 7000
    keys = torch.randn(2, heads, total, dim, generator=g)
    vals = torch.randn(2, heads, total, dim, generator=g)
    per_window = 2 * 2 * (-(-window * heads * dim * 4 // CHUNK) + 1) * CHUNK  # K/V * seqs * chunks
    pos = 0
    for step in [700, 900, 1, 1, 1200, 1, 3, 1100, 1, 1500, 1200, 1, 1]:
        end = pos + step
        kv_len, kv_off = cache.get_mask_sizes(step, 0)
        k, v = cache.update(keys[:, :, pos:end], vals[:, :, pos:end], 0)
        assert (k.shape[2], kv_off) == (kv_len, max(pos - window + 1, 0))
        assert torch.equal(k, keys[:, :, kv_off:end]) and torch.equal(v, vals[:, :, kv_off:end])
        assert cache.get_mask_sizes(step, 1) == (end, 0)
        kf, _ = cache.update(keys[:, :, pos:end], vals[:, :, pos:end], 1)
        assert torch.equal(kf, keys[:, :, :end])
        pos = end
        assert cache.mapped_bytes(0) <= per_window
    assert pos > 2 * window
    assert cache.mapped_bytes(1) >= 2 * 2 * pos * heads * dim * 4
    assert cache.mapped_bytes(0) * 2 < cache.mapped_bytes(1)
    cache.close()


def test_errors(pool):
    model = make_model("llama")
    ids, mask = batch(b=3)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=20, pool=pool)
    with pytest.raises(ValueError, match="max_cache_len=20"):
        model.generate(ids[:2], attention_mask=mask[:2], past_key_values=cache, **GEN)
    with pytest.raises(ValueError, match="max_cache_len"):
        ElasticCache(model.config, max_batch_size=2)
    compressed = SimpleNamespace(model_type="some_csa_lm", num_hidden_layers=2,
                                 layer_types=["full_attention", "compressed_sparse_attention"])
    with pytest.raises(ValueError, match=r"cannot hold every layer of some_csa_lm: layer 1 "
                                         r"\(.compressed_sparse_attention.: transformers. [^,]+, "
                                         r"needs its compressed-attention update\(\)"):
        ElasticCache(compressed, max_batch_size=1, max_cache_len=64)


def test_not_compileable_and_sizes(pool):
    model = make_model("gemma3")
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    assert not cache.is_compileable
    assert cache.is_sliding == [True, False, True, False]
    assert cache.get_max_length() == 64 and cache.get_max_cache_shape() == 64
    assert cache.get_mask_sizes(5, 0) == (5, 0) and cache.get_mask_sizes(torch.arange(5), 1) == (5, 0)
    ids, mask = batch()
    forward(model, cache, ids, mask)
    k = cache.layers[1].keys
    assert k.shape == (2, 2, 64, 16)  # the fixed [max_batch, heads, max_cache_len, dim] view
    ptr = k.data_ptr()
    forward(model, cache, ids[:, :1], torch.cat([mask, mask[:, :1]], 1))
    assert cache.layers[1].keys.data_ptr() == ptr
    cache.close()


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_continuation_matches_recomputation(name, pool):
    """A second generate() on the same cache prefills several tokens at once on
    top of the cached ones (past the sliding window for Gemma-3); the result is
    what a cache-less recomputation gives."""
    model = make_model(name)
    ids, _ = batch(b=1, prompt=12)
    kw = dict(GEN, max_new_tokens=10)
    cache = ElasticCache(model.config, max_batch_size=1, max_cache_len=128, pool=pool)
    with torch.no_grad():
        first = model.generate(ids, past_key_values=cache, **kw)
        assert torch.equal(first, model.generate(ids, use_cache=False, **kw))
        more = torch.cat([first, torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))], 1)
        second = model.generate(more, past_key_values=cache, **kw)
        assert torch.equal(second, model.generate(more, use_cache=False, **kw))
    cache.close()
