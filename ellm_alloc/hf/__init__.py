"""transformers integration: `ElasticCache`, a Cache whose KV memory grows with the tokens.

    from ellm_alloc.hf import ElasticCache
    cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=4096)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache)

Needs the `hf` extra (transformers>=5.17,<5.24).
"""
from .cache import ElasticCache

__all__ = ["ElasticCache"]
