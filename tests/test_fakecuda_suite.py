"""The suite's pool, arena, stream, fault, thread, bad-input, KV, ElasticCache
and stateful tests, run a second time on the CUDA backend over the fake driver.

backend_cuda.h itself runs here, unchanged, in a process of its own with
ELLM_TEST_BACKEND=fakecuda (tests/conftest.py): every "cpu" pool of those
files becomes a CUDA pool of the fake device, and a test fails if the fake
logged a driver contract violation during it. The stateful tests run fewer
examples than in the main pass, to keep the suite's time modest.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fakecuda as F

pytestmark = pytest.mark.skipif(not F.available(), reason="no cuda.h, or a library built without the CUDA backend")

FILES = [
    "test_fakecuda_calls.py",
    "test_pool_owners.py",
    "test_arena_stateful.py",
    "test_streams.py",
    "test_faults.py",
    "test_threads.py",
    "test_bad_input.py",
    "test_byte_tensor.py",
    "test_kv_balloon.py",
    "test_kv_straddling.py",
    "test_kv_threads.py",
    "test_kv_contiguous.py",
    "test_kv_bad_input.py",
    "test_kv_manager_stateful.py",
    "test_swap_space.py",
    "test_kv_swap_table.py",
    "test_kv_demotion.py",
    "test_kv_state_update.py",
    "test_hf_cache.py",
    "test_hf_offload.py",
]


@pytest.mark.skipif(os.environ.get("ELLM_TEST_BACKEND") == "fakecuda", reason="already the fake-CUDA pass")
def test_suite_passes_on_the_cuda_backend_over_the_fake_driver():
    F.build()
    env = dict(os.environ, ELLM_TEST_BACKEND="fakecuda", ELLM_STATEFUL_EXAMPLES="25")
    env.pop("ELLM_ALLOC_LIBCUDA", None)  # the child's conftest points it at the fake
    tests = F.ROOT / "tests"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "-p", "no:warnings", *[str(tests / f) for f in FILES]],
        cwd=F.ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert r.returncode == 0, f"fake-CUDA pass failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
