"""ellm_alloc: elastic GPU memory for PyTorch LLM inference.

    import ellm_alloc
    ellm_alloc.enable()          # every torch tensor now comes from the chunk pool

On a GPU the pool is torch's CUDA allocator; on a machine without one,
enable() routes torch's CPU allocator to the same pool and arena over host
memory. `ellm_alloc.Pool(device="cpu", budget="1GiB")` makes a standalone
host pool (tests, KV experiments) without touching torch's allocator.
"""
from .config import parse_budget, parse_size
from .errors import AllocatorError, EnableError, OutOfMemoryError
from .integrations.torch_allocator import (
    device_pool,
    empty_cache,
    enable,
    enabled,
    enabled_device,
    memory_stats,
    memory_summary,
    reset_peak_memory_stats,
)
from .pool import Pool


def plot_timeline(rec, path=None, **kwargs):
    """Stacked-area figure of a telemetry recording (see ellm_alloc.plot.plot_timeline)."""
    from .plot import plot_timeline as _plot

    return _plot(rec, path, **kwargs)


__all__ = [
    "AllocatorError",
    "EnableError",
    "OutOfMemoryError",
    "Pool",
    "device_pool",
    "empty_cache",
    "enable",
    "enabled",
    "enabled_device",
    "memory_stats",
    "memory_summary",
    "parse_budget",
    "parse_size",
    "plot_timeline",
    "reset_peak_memory_stats",
]
__version__ = "0.1.0"
