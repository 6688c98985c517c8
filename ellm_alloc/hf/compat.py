"""The transformers versions ElasticCache supports (5.17 to 5.24), and the
one difference callers see: the name generate() and forward() take a cache
under. transformers 5.24 renamed `past_key_values=` to `cache=` (the old name
still works there, with a deprecation warning); Mamba-style models call it
`cache_params=`.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import transformers
from packaging.version import Version

__all__ = ["CACHE_KWARG", "SUPPORTED", "cache_kwarg_of", "check_version"]

SUPPORTED = (Version("5.17"), Version("5.25"))  # [low, high)
_VERSION = Version(transformers.__version__)

#: The keyword generate() takes a cache under, in the installed transformers.
CACHE_KWARG = "cache" if _VERSION >= Version("5.24.0.dev0") else "past_key_values"


def check_version() -> None:
    """Warns, naming the range, when the installed transformers is one
    ElasticCache was not tested against (it may still work: the Cache API
    changes slowly)."""
    low, high = SUPPORTED
    if not low <= Version(_VERSION.base_version) < high:
        warnings.warn(f"ellm_alloc.hf is tested with transformers >= {low}, < {high}; "
                      f"transformers {transformers.__version__} is installed", stacklevel=3)


def cache_kwarg_of(model: Any) -> str | None:
    """The name under which `model.forward` takes a cache (`cache`,
    `past_key_values` or `cache_params`), or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values", "cache_params"):
        if name in params:
            return name
    return None
