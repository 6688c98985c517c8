"""The KV cache on the shared chunk pool.

spec          typed layer specs and ModelKVSpec (JSON in and out)
hf_config     ModelKVSpec from transformers config objects
presets       named specs with published dimensions
layout        grouping and two-level (small/large) page sizes
space         PageSpace: a VA range of large pages backed by pool chunks
block_pool    small pages carved from large pages, request-aware placement
single_type   one manager per layer type: windows, hits, eviction priority
manager       KVCacheManager: the scheduler-facing API, paged views
contiguous    ContiguousKV: per-sequence contiguous K/V (vAttention-style)
"""
from .layout import KVGroup, PageLayout, plan_layout
from .manager import KVCacheManager
from .spec import (
    ChunkedLocalSpec,
    CrossAttentionSpec,
    FullAttentionSpec,
    LayerSpec,
    MambaSpec,
    MLASpec,
    ModelKVSpec,
    SlidingWindowSpec,
)

__all__ = [
    "ChunkedLocalSpec", "CrossAttentionSpec", "FullAttentionSpec", "KVCacheManager", "KVGroup",
    "LayerSpec", "MLASpec", "MambaSpec", "ModelKVSpec", "PageLayout", "SlidingWindowSpec", "plan_layout",
]
