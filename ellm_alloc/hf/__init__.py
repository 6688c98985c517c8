"""transformers integration: `ElasticCache`, a Cache whose KV memory grows with the tokens.

    from ellm_alloc.hf import ElasticCache
    cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=4096)
    out = model.generate(ids, attention_mask=mask, cache=cache)  # past_key_values= before 5.24

Needs the `hf` extra (transformers>=5.17,<5.25).
"""
from .compat import check_version

check_version()

from .cache import ElasticCache  # noqa: E402

__all__ = ["ElasticCache"]
