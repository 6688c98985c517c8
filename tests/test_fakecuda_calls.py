"""What DESIGN.md promises about driver calls, counted on the fake CUDA driver.

The real backend_cuda.h runs here; the fake driver counts every entry point.
  * a cached malloc/free pair makes no driver call at all;
  * access is granted once per contiguous mapped run (cuMemSetAccess costs
    ~20 maps on a GPU);
  * physical handles are created ahead of need, in batches, never on a
    cached allocation;
  * a CUDA pool works from a thread that has no current context, and gives
    every driver resource back when closed.
Run by tests/test_fakecuda_suite.py, in the fake-CUDA pass.
"""
from __future__ import annotations

import os
import threading

import pytest

import fakecuda as F

# CUDA pools need the backend pointed at the fake before the process's first
# CUDA pool: these tests run in the fake-CUDA pass (tests/test_fakecuda_suite.py).
pytestmark = pytest.mark.skipif(os.environ.get("ELLM_TEST_BACKEND") != "fakecuda",
                                reason="runs in the fake-CUDA pass of the suite")
from ellm_alloc import Pool
from ellm_alloc.kv.space import PageSpace

MiB = 1 << 20
CHUNK = 2 * MiB


@pytest.fixture
def fake():
    return F.driver()


@pytest.fixture
def cuda_pool(fake):
    pools = []

    def make(budget="64MiB", **kw) -> Pool:
        p = Pool("cuda", budget=budget, **kw)
        pools.append(p)
        return p

    yield make
    for p in pools:
        try:
            p.handle
        except ValueError:
            continue
        p.validate()
        assert p.close() == 0


class Delta:
    """Driver calls made inside a `with` block, by entry point."""

    def __init__(self, fake: F.FakeCuda):
        self.fake = fake

    def __enter__(self):
        self.before = self.fake.calls()
        return self

    def __exit__(self, *exc):
        after = self.fake.calls()
        self.calls = {k: after[k] - self.before[k] for k in after if after[k] != self.before[k]}
        return False


def test_a_cached_malloc_free_pair_makes_no_driver_call(fake, cuda_pool):
    p = cuda_pool()
    sizes = [512, 4096, 8192, 100_000, 3 * MiB]  # small slabs, the exact-size cache, a multi-chunk block

    def step():  # a step's tensors: allocated together, freed together
        for b in reversed([p.malloc(s) for s in sizes]):
            p.free(b)

    step()  # warm: maps and fills the caches
    fast = p.stats()["fast_allocs"]
    with Delta(fake) as d:
        for _ in range(200):
            step()
    assert p.stats()["fast_allocs"] - fast == 200 * len(sizes)  # every malloc was a cache hit
    assert d.calls == {}, f"driver calls on the cached path: {d.calls}"


def test_the_check_catches_a_driver_call_on_the_hot_path(fake, cuda_pool):
    # The same measurement, around a malloc that must map: it sees the calls.
    p = cuda_pool()
    with Delta(fake) as d:
        p.free(p.malloc(CHUNK))
    assert d.calls.get("cuMemMap", 0) >= 1


def test_one_set_access_per_contiguous_run(fake, cuda_pool):
    p = cuda_pool(prealloc="64MiB")
    with Delta(fake) as d:
        a = p.malloc(5 * CHUNK)
    assert d.calls["cuMemMap"] == 5
    assert d.calls["cuMemSetAccess"] == 1
    space = PageSpace(p, "kv", 16)
    with Delta(fake) as d:
        space.map(0, 4)
        space.map(8, 2)
    assert d.calls["cuMemMap"] == 6
    assert d.calls["cuMemSetAccess"] == 2
    for page in (0, 1, 2, 3, 8, 9):
        space.unmap(page)
    space.close()
    p.free(a)


def test_handles_are_created_ahead_of_need(fake, cuda_pool):
    p = cuda_pool(prealloc="16MiB")
    assert p.stats()["created_chunks"] == 8
    with Delta(fake) as d:
        blocks = [p.malloc(CHUNK) for _ in range(8)]  # every chunk already exists
    assert "cuMemCreate" not in d.calls
    for b in blocks:
        p.free(b)
    # Past the preallocation the pool grows in batches: one slow call creates
    # several handles, and the next mallocs create none.
    q = cuda_pool()
    with Delta(fake) as d:
        first = q.malloc(CHUNK)
    batch = d.calls["cuMemCreate"]
    assert batch > 1
    with Delta(fake) as d:
        more = [q.malloc(CHUNK) for _ in range(batch - 1)]
    assert "cuMemCreate" not in d.calls
    for b in [first, *more]:
        q.free(b)


def test_a_pool_works_from_a_thread_with_no_current_context(fake, cuda_pool):
    p = cuda_pool()
    errors = []

    def worker():
        try:
            fake.clear_current()
            a = p.malloc(3 * CHUNK)  # reserve is done; this creates, maps and grants access
            p.free(a)
            p.empty_cache()  # unmaps
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors == []


def test_closing_pools_and_spaces_gives_every_driver_resource_back(fake):
    start = fake.live()
    p = Pool("cuda", budget="64MiB", prealloc="8MiB")
    space = PageSpace(p, "kv", 4)
    space.map(0, 2)
    a = p.malloc(3 * CHUNK)
    p.record_stream(a, 0)
    assert fake.live()["mappings"] > start["mappings"]
    p.free(a)
    space.unmap(0)
    space.close()
    assert p.close() == 0
    assert fake.live() == start
