"""The routed suite: torch's CPU allocator goes to one host pool.

Each file here runs in a fresh process started by tests/test_cpu_routing.py,
which sets ELLM_ALLOC_BUDGET. enable() runs when this conftest is imported,
before any test module, so every CPU tensor the tests make comes from the
pool. The fixtures of tests/conftest.py that bind host pools to device
indices are not used here: device 0 belongs to the enabled pool.
"""
from __future__ import annotations

import pytest

import ellm_alloc

ellm_alloc.enable(device="cpu")


@pytest.fixture
def routed_pool():
    """The enabled pool; after the test it must validate (ledger and arena)."""
    pool = ellm_alloc.device_pool()
    yield pool
    pool.validate()


def in_pool(pool, tensor) -> bool:
    base, va = pool.arena_base, pool.stats()["va_bytes"]
    return base <= tensor.data_ptr() < base + va
