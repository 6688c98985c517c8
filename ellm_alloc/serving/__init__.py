"""Serving: transformers' continuous batching on an elastic KV pool.

    handle = ellm_alloc.serving.elastic(model, budget="2GiB")
    out = model.generate_batch(prompts, generation_config=gen)
    handle.usage(); handle.close()

    # with latency targets, and a host tier to swap preempted requests to:
    handle = elastic(model, budget="2GiB", cpu_budget="4GiB", slo=SLO(ttft_ms=2000, tpot_ms=100))
    out = model.generate_batch(prompts, generation_config=gen,
                               continuous_batching_config=ContinuousBatchingConfig(scheduler_type="ellm_slo"))

See paged_cache.py for the cache, scheduler.py for the SLO-aware scheduler,
and _patches.py for the seams in transformers they use (and the versions
they were verified on).
"""
from .handle import ElasticServing, RequestTooLargeError, elastic
from .slo import SLO

__all__ = ["SLO", "ElasticServing", "RequestTooLargeError", "elastic"]
