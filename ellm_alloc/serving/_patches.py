"""Every change ellm_alloc.serving makes to transformers, in one place.

transformers' continuous batching builds its paged KV cache in
`ContinuousBatchingManager._create_batch_processor`, by calling the name
`PagedAttentionCache` of `transformers.generation.continuous_batching.
continuous_api`. That name is the one seam: while an elastic model is
registered, it is bound to a factory that builds an
`ElasticPagedAttentionCache` for a registered model's config and the stock
class for any other model. Nothing else in transformers is replaced; the
scheduler, batch processor, inputs/outputs and model runner talk to the
elastic cache through the interface they already use.

Two additions, no replacement: the name "ellm_slo" is added to the
scheduler's `SCHEDULER_MAPPING` (the SLO-aware scheduler, selected with
ContinuousBatchingConfig(scheduler_type="ellm_slo")), and, per model instance
rather than per class, the model's `generate_batch` attribute is shadowed by
a wrapper that refuses, before any work starts, a request that could not fit
in the pool even alone.

All are undone when the last registration goes (`unregister`).

Versions: the interface the cache implements is read from transformers'
internals, which change between releases. SUPPORTED is the range the project
pins (pyproject's `hf` extra); VERIFIED lists the releases the serving tests
ran on. Any other version is refused with its number.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable

#: The transformers releases this module may patch: [low, high).
SUPPORTED = ((5, 17), (5, 25))
#: Releases tests/test_serving.py ran on.
VERIFIED = ("5.24.0",)

_lock = threading.Lock()
# id(config) -> (config, builder): the configs of models made elastic, and
# what builds their cache. Keyed by identity: transformers hands the cache the
# model's text config object, and two models may have equal configs.
_registry: dict[int, tuple[Any, Callable[..., Any]]] = {}
_original_cache_cls: Any = None


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_transformers() -> Any:
    """Imports transformers' continuous batching and checks that this version
    is one we know how to serve on; returns the continuous_api module.
    Raises RuntimeError naming the installed version otherwise."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("ellm_alloc.serving needs transformers (pip install 'ellm_alloc[hf]')") from e
    version = transformers.__version__
    low, high = SUPPORTED
    if not (low <= _parse(version) < high):
        raise RuntimeError(
            f"ellm_alloc.serving supports transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
            f"(verified on {', '.join(VERIFIED)}); transformers {version} is installed. Its continuous batching "
            f"internals may differ: install a supported version."
        )
    try:
        from transformers.generation.continuous_batching import continuous_api
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.cache_allocators import (  # noqa: F401
            FULL_ATTENTION,
            SLIDING_ATTENTION,
        )
    except ImportError as e:
        raise RuntimeError(
            f"transformers {version}: its continuous batching lacks what ellm_alloc.serving uses "
            f"({e}); verified on {', '.join(VERIFIED)}"
        ) from e
    missing = [name for name in ("update", "extend_read_and_write_indices", "can_store_request_tokens")
               if not hasattr(PagedAttentionCache, name)]
    if getattr(continuous_api, "PagedAttentionCache", None) is None or missing:
        raise RuntimeError(
            f"transformers {version}: PagedAttentionCache lacks {missing or ['its continuous_api binding']}; "
            f"ellm_alloc.serving was verified on {', '.join(VERIFIED)}"
        )
    return continuous_api


def _cache_factory(*args: Any, **kwargs: Any) -> Any:
    """Stands in for PagedAttentionCache in continuous_api: the elastic cache
    for a registered model's config, the stock one otherwise."""
    config = kwargs.get("config", args[0] if args else None)
    with _lock:
        entry = _registry.get(id(config))
        original = _original_cache_cls
    if entry is not None and entry[0] is config:
        return entry[1](*args, **kwargs)
    return original(*args, **kwargs)


def register(config: Any, build_cache: Callable[..., Any]) -> None:
    """Routes cache construction for `config` to build_cache (same arguments
    as PagedAttentionCache). The first registration installs the factory."""
    global _original_cache_cls
    continuous_api = check_transformers()
    from .scheduler import SCHEDULER_NAME, SLOAwareScheduler

    with _lock:
        entry = _registry.get(id(config))
        if entry is not None and entry[0] is config:
            raise ValueError("this model is already elastic: close() its ElasticServing first")
        if not _registry:
            _original_cache_cls = continuous_api.PagedAttentionCache
            continuous_api.PagedAttentionCache = _cache_factory
            _scheduler_mapping()[SCHEDULER_NAME] = SLOAwareScheduler
        _registry[id(config)] = (config, build_cache)


def unregister(config: Any) -> None:
    """Undoes register(); the last one puts transformers' class back."""
    global _original_cache_cls
    from transformers.generation.continuous_batching import continuous_api

    from .scheduler import SCHEDULER_NAME, SLOAwareScheduler

    with _lock:
        entry = _registry.get(id(config))
        if entry is None or entry[0] is not config:
            return
        del _registry[id(config)]
        if not _registry and _original_cache_cls is not None:
            if continuous_api.PagedAttentionCache is _cache_factory:
                continuous_api.PagedAttentionCache = _original_cache_cls
            _original_cache_cls = None
            if _scheduler_mapping().get(SCHEDULER_NAME) is SLOAwareScheduler:
                del _scheduler_mapping()[SCHEDULER_NAME]


def _scheduler_mapping() -> dict:
    # continuous_api imported the dict object itself: adding to it is seen there.
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    return SCHEDULER_MAPPING


def is_patched() -> bool:
    """Whether the cache factory or the scheduler name is installed now (tests
    check close() undoes both)."""
    from transformers.generation.continuous_batching import continuous_api

    from .scheduler import SCHEDULER_NAME

    return continuous_api.PagedAttentionCache is _cache_factory or SCHEDULER_NAME in _scheduler_mapping()


def wrap_generate_batch(model: Any, check: Callable[[list[list[int]], Any, dict], None]) -> None:
    """Shadows model.generate_batch with a version that calls
    check(inputs, generation_config, kwargs) first, so a request that can
    never fit raises in the caller instead of failing the whole batch inside
    the generation thread."""
    bound = type(model).generate_batch.__get__(model)

    @functools.wraps(bound)
    def generate_batch(inputs, generation_config=None, *args, **kwargs):
        check(inputs, generation_config, kwargs)
        return bound(inputs, generation_config, *args, **kwargs)

    generate_batch._ellm_elastic = True
    model.generate_batch = generate_batch


def unwrap_generate_batch(model: Any) -> None:
    current = model.__dict__.get("generate_batch")
    if current is not None and getattr(current, "_ellm_elastic", False):
        del model.__dict__["generate_batch"]
