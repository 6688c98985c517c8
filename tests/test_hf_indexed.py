"""ElasticCache's sparse-attention (DSA, "indexed_attention") layers: the
indexer's keys in pool chunks next to K/V, against DynamicCache on a tiny
DeepSeek-V3.2 built offline."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.hf import ElasticCache  # noqa: E402
from ellm_alloc.hf.cache import ElasticIndexedLayer  # noqa: E402
from ellm_alloc.hf.compat import CACHE_KWARG  # noqa: E402
from ellm_alloc.hf.families import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    with Pool("cpu", budget="512MiB") as p:
        yield p


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("deepseek_v32")).eval()


def batch(b: int = 2, prompt: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (b, prompt), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def held(pool: Pool, name: str) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"] == name)


def indexed(cache) -> list[ElasticIndexedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, ElasticIndexedLayer)]


def test_generate_matches_dynamic_cache_with_indexer_keys_in_pool(model, pool):
    ids, mask = batch()
    gen = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}, **gen)
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        out = model.generate(ids, **{CACHE_KWARG: cache}, **gen)
    assert torch.equal(out, ref)
    layers = indexed(cache)
    assert layers and all(layer.indexer_length == layer.length for layer in layers)
    assert held(pool, "hf.indexer") > 0
    store = layers[0]._indexer
    keys = layers[0]._indexer_view
    assert store.space.base <= keys.data_ptr() < store.space.base + store.space.n_pages * store.space.page_bytes
    cache.reset()
    assert held(pool, "hf.indexer") == 0 and held(pool, "hf.full") == 0
    cache.close()


def test_beam_search_reorders_indexer_keys(model, pool):
    ids, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=2,
              num_return_sequences=2)
    with torch.no_grad():
        ref = model.generate(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}, **kw)
        cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
        out = model.generate(ids, **{CACHE_KWARG: cache}, **kw)
    assert torch.equal(out, ref)
    cache.close()


def test_crop_and_batch_select_match_dynamic_cache(model, pool):
    ids, mask = batch(b=3)
    caches = [DynamicCache(config=model.config),
              ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)]
    logits = []
    for c in caches:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: c})
            c.crop(-2)
            c.batch_select_indices(torch.tensor([2, 0]))
            i, m = ids[[2, 0], :-1], mask[[2, 0], :-1]
            out = model(input_ids=i[:, -1:], attention_mask=m, use_cache=True, **{CACHE_KWARG: c})
        logits.append(out.logits)
    torch.testing.assert_close(logits[1], logits[0])
    layer = indexed(caches[1])[0]
    assert layer.indexer_length == 9 and layer.indexer_batch == 2
    caches[1].close()


def test_bad_indexer_keys(pool):
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_type="some_dsa_lm", num_hidden_layers=1, layer_types=["indexed_attention"])
    cache = ElasticCache(cfg, max_batch_size=2, max_cache_len=16, pool=pool)
    with pytest.raises(ValueError, match=r"indexer keys must be \[batch, tokens, ...\]"):
        cache.update_indexer(torch.zeros(2, 8), 0)
    cache.update_indexer(torch.zeros(2, 4, 8), 0)
    with pytest.raises(ValueError, match=r"indexer keys were \(8,\)"):
        cache.update_indexer(torch.zeros(2, 1, 6), 0)
    with pytest.raises(ValueError, match="batch changed from 2 to 1"):
        cache.update_indexer(torch.zeros(1, 1, 8), 0)
    with pytest.raises(ValueError, match="max_cache_len=16"):
        cache.update_indexer(torch.zeros(2, 13, 8), 0)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        ElasticCache(cfg, max_batch_size=2, max_cache_len=16, pool=pool).update_indexer(torch.zeros(3, 1, 8), 0)
    cache.close()
