"""elastic(model): transformers' continuous batching on one elastic pool."""
from __future__ import annotations

import weakref
from math import ceil
from typing import Any, Callable

import torch

from ..kv.hf_config import from_hf_config, text_config
from ..kv.layout import plan_layout
from ..kv.spec import ModelKVSpec
from ..pool import Pool
from .slo import SLO


class RequestTooLargeError(ValueError):
    """A request needs more KV memory than the whole pool budget, even alone."""


def elastic(model: Any, pool: Pool | None = None, budget: int | str | None = None, block_size: int | None = None,
            *, slo: SLO | None = None, cpu_budget: int | str | None = None,
            max_large_page_bytes: int | None = None, name: str = "serve",
            clock: Callable[[], float] | None = None) -> "ElasticServing":
    """Makes `model`'s continuous batching (model.generate_batch,
    model.init_continuous_batching) run on a paged KV cache drawn from a pool:
    one virtual range per layer group sized for the whole budget, chunks
    mapped only under the blocks requests hold, blocks allocated and freed by
    a KVCacheManager. Returns the ElasticServing handle; close() it (or use
    it as a context manager) to undo.

    pool: the Pool to draw KV chunks from. Default: the pool ellm_alloc.enable()
        routes the model's device to; a CPU model without enable() needs
        `budget` instead, and gets a host pool of its own of that size.
    budget: bytes ("2GiB") of a pool of the handle's own (CPU models only);
        not with `pool`.
    block_size: tokens per KV block. Default: the continuous batching
        config's page_size, the stock engine's block.
    slo: latency targets, SLO(ttft_ms=..., tpot_ms=...), for the SLO-aware
        scheduler: select it with ContinuousBatchingConfig(scheduler_type=
        "ellm_slo"). The stock schedulers ignore it.
    cpu_budget: host memory ("4GiB") for the pool the handle makes (with
        `budget`): the host tier the SLO-aware scheduler swaps preempted
        requests to. A given or enable()d pool has its own (Pool(cpu_budget=),
        enable(cpu_budget=)).
    max_large_page_bytes: passed to the KVCacheManager's layout planner.
    clock: the seconds clock the SLO-aware scheduler times steps with
        (default time.perf_counter; tests give a virtual one).
    """
    return ElasticServing(model, pool=pool, budget=budget, block_size=block_size, slo=slo, cpu_budget=cpu_budget,
                          max_large_page_bytes=max_large_page_bytes, name=name, clock=clock)


class ElasticServing:
    """What elastic() did to a model, and the means to undo it.

    `pool`: the Pool in use. `kv`: the KVCacheManager of the latest cache
    transformers built (None before the first generate_batch / batch
    processor). `usage()`: that manager's usage(). `decisions()`: the
    SLO-aware scheduler's counts of its decisions ({} with another
    scheduler). `close()`: frees every
    request, closes the caches' ranges, restores transformers and the
    model, and closes the pool if the handle made it.
    """

    def __init__(self, model: Any, *, pool: Pool | None, budget: Any, block_size: int | None, slo: Any,
                 cpu_budget: Any, max_large_page_bytes: int | None, name: str,
                 clock: Callable[[], float] | None):
        from . import _patches

        _patches.check_transformers()
        if not hasattr(model, "generate_batch") or not hasattr(model, "config"):
            raise TypeError(f"elastic() takes a transformers model with continuous batching, "
                            f"got {type(model).__name__}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 4):
            raise ValueError(f"block_size must be an int >= 4, got {block_size!r}")
        if pool is not None and budget is not None:
            raise ValueError("pass pool= or budget=, not both: a given pool has its own budget")
        if pool is not None and not isinstance(pool, Pool):
            raise TypeError(f"pool must be an ellm_alloc Pool, got {type(pool).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if slo is not None and not isinstance(slo, SLO):
            raise TypeError(f"slo must be an ellm_alloc.serving.SLO(ttft_ms=..., tpot_ms=...), got {slo!r}")
        if cpu_budget is not None and budget is None:
            raise ValueError("cpu_budget= sizes the host tier of the pool the handle makes (with budget=); a given "
                             "or enable()d pool has its own (Pool(cpu_budget=), enable(cpu_budget=))")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a function returning seconds, got {clock!r}")
        self.slo = slo
        self.clock = clock
        self._scheduler = None
        self.model = model
        self.config = model.config.get_text_config()
        self.block_size = block_size
        self.max_large_page_bytes = max_large_page_bytes
        self.name = name
        # Layer kinds are checked now, so that an unsupported model fails here
        # rather than in the generation thread.
        self._spec = self.kv_spec(self.config, model.dtype)
        from .paged_cache import ATTN_TYPE_OF_KIND, _layers_by_attn_type

        _layers_by_attn_type(self.config)
        for layer in self._spec.layers:
            if layer.kind not in ATTN_TYPE_OF_KIND:
                raise ValueError(f"{self._spec.name}: {layer.kind!r} layers are not served by transformers' "
                                 f"continuous batching nor by the elastic cache (full and sliding only)")
        self.pool, self.own_pool = self._pick_pool(pool, budget, cpu_budget, model.device)
        self._caches: weakref.WeakSet = weakref.WeakSet()
        self._latest = None
        self._closed = False
        registered = False
        try:
            _patches.register(self.config, self._build_cache)
            registered = True
            _patches.wrap_generate_batch(model, self._check_batch)
        except BaseException:
            if registered:  # (a refused registration is another handle's)
                _patches.unregister(self.config)
            if self.own_pool:
                self.pool.close()
            raise

    @staticmethod
    def _pick_pool(pool: Pool | None, budget: Any, cpu_budget: Any, device: torch.device) -> tuple[Pool, bool]:
        """The pool to use, and whether the handle made it (and closes it)."""
        if pool is not None:
            if pool.tensor_device_type != device.type:
                raise ValueError(f"the pool's tensors are on {pool.tensor_device_type}, the model is on {device}")
            return pool, False
        from ..integrations.torch_allocator import device_pool, enabled_device

        if device.type == "cuda":
            if budget is not None:
                raise ValueError("budget= makes a host pool, for CPU models; a CUDA model uses ellm_alloc.enable()'s "
                                 "pool (or pass pool=)")
            if enabled_device() != "cuda":
                raise ValueError("a CUDA model needs ellm_alloc's CUDA pool: call ellm_alloc.enable() before loading "
                                 "it, or pass pool=")
            return device_pool(device), False
        if device.type != "cpu":
            raise ValueError(f"elastic serving runs on CUDA or CPU models, not {device.type}")
        if budget is None:
            if enabled_device() == "cpu":
                return device_pool(), False
            raise ValueError("a CPU model needs budget= (the KV pool's size, e.g. '2GiB') or pool=")
        return Pool("cpu", budget=budget, cpu_budget=cpu_budget or 0), True

    def kv_spec(self, config: Any, dtype: torch.dtype) -> ModelKVSpec:
        return from_hf_config(text_config(config), dtype=dtype)

    # -- refusing what cannot fit ------------------------------------------------------

    def check_fits(self, total_tokens: int, request_id: str = "", block_size: int | None = None) -> None:
        """Raises RequestTooLargeError when a lone request of total_tokens
        (prompt + max_new_tokens) needs more chunks than the pool's whole
        budget: blocks at their largest (a sliding layer's window), one trash
        block per group, each group rounded up to whole chunks."""
        chunk = self.pool.stats()["chunk_bytes"]
        budget = self.pool.stats()["budget_bytes"]
        from .paged_cache import blocks_alone

        layout = plan_layout(self._spec, block_size or self.block_size or 256, chunk, self.max_large_page_bytes)
        need = sum(ceil((blocks_alone(g, total_tokens) + 1) * g.padded_small_bytes / chunk) for g in layout.groups)
        if need > budget // chunk:
            who = f"request {request_id!r}" if request_id else "a request"
            raise RequestTooLargeError(
                f"{who} of {total_tokens} tokens (prompt + max_new_tokens) needs {need * chunk} bytes of KV "
                f"({need} chunks) even alone; the pool's budget is {budget} bytes"
            )

    def _check_batch(self, inputs: Any, generation_config: Any, kwargs: dict) -> None:
        if self._closed:
            return
        gen = generation_config if generation_config is not None else self.model.generation_config
        max_new = kwargs.get("max_new_tokens")
        if max_new is None:
            max_new = getattr(gen, "max_new_tokens", None) or 0
        cb = kwargs.get("continuous_batching_config")
        block_size = self.block_size or (cb.page_size if cb is not None else None)
        if block_size is None:
            from transformers import ContinuousBatchingConfig

            block_size = ContinuousBatchingConfig().page_size
        for i, prompt in enumerate(inputs or []):
            self.check_fits(len(prompt) + max_new, request_id=f"inputs[{i}]", block_size=block_size)

    # -- caches transformers builds ------------------------------------------------------

    def _build_cache(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RuntimeError("this ElasticServing was closed")
        from .paged_cache import ElasticPagedAttentionCache

        return ElasticPagedAttentionCache(self, *args, **kwargs)

    def _adopt(self, cache: Any) -> None:
        self._caches.add(cache)
        self._latest = cache

    def _adopt_scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def decisions(self) -> dict[str, int]:
        """The latest SLO-aware scheduler's decision counts ({} if none ran)."""
        return {} if self._scheduler is None else dict(self._scheduler.decisions)

    @property
    def kv(self):
        """The KVCacheManager of the latest cache (None before one was built)."""
        return None if self._latest is None else self._latest.kv

    @property
    def cache(self):
        """The latest ElasticPagedAttentionCache transformers built."""
        return self._latest

    def usage(self) -> dict:
        if self._latest is None or self._latest._closed:
            return {}
        return self._latest.usage()

    # -- undo ---------------------------------------------------------------------------

    def close(self) -> None:
        """Undoes elastic(): transformers and the model are restored, every
        cache's requests are freed and its ranges closed, and the pool is
        closed if this handle made it. Stop any ContinuousBatchingManager
        running on it first; a persistent one cached on the model is
        destroyed here."""
        if self._closed:
            return
        from . import _patches

        self._closed = True
        _patches.unwrap_generate_batch(self.model)
        _patches.unregister(self.config)
        cached = getattr(self.model, "_cached_continuous_batching_manager", None)
        processor = getattr(cached, "batch_processor", None)
        if processor is not None and getattr(processor, "cache", None) in set(self._caches):
            self.model.destroy_cached_continuous_batching_manager()
        for cache in list(self._caches):
            cache.close()
        if self._latest is not None:
            self._latest.close()
        if self.own_pool:
            self.pool.close()

    def __enter__(self) -> "ElasticServing":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"ElasticServing({type(self.model).__name__}, pool={self.pool!r}, {state})"
