"""Exceptions raised by ellm_alloc."""
from __future__ import annotations

import torch


class OutOfMemoryError(torch.OutOfMemoryError):
    """The pool could not serve a request, even after reclaiming idle chunks.

    A subclass of torch.OutOfMemoryError, so code that catches torch's
    out-of-memory error catches ours too. The message shows the pool's state.
    """


class AllocatorError(RuntimeError):
    """Misuse of the allocator: a free of an unknown pointer, a double free, a
    backend failure, or use from a forked child."""


class EnableError(RuntimeError):
    """enable() cannot install the allocator in this process."""
