"""Serving: transformers' continuous batching on an elastic KV pool.

    handle = ellm_alloc.serving.elastic(model, budget="2GiB")
    out = model.generate_batch(prompts, generation_config=gen)
    handle.usage(); handle.close()

See ellm_alloc/serving/paged_cache.py for the cache and _patches.py for the
one seam in transformers it uses (and the versions it was verified on).
"""
from .handle import ElasticServing, RequestTooLargeError, elastic
from .slo import SLO

__all__ = ["SLO", "ElasticServing", "RequestTooLargeError", "elastic"]
