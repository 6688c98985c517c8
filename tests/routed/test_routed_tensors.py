"""Torch CPU tensors on the pool: alignment, size 0, frees from any thread,
out of memory as torch.OutOfMemoryError after reclaiming idle KV chunks."""
from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import in_pool

from ellm_alloc.kv.space import PageSpace

MiB = 1 << 20
CHUNK = 2 * MiB
SIZES = [1, 3, 63, 64, 100, 511, 512, 513, 4096, 8192, 8193, 65536, MiB, CHUNK - 1, CHUNK + 1, 5 * MiB]


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float64])
def test_cpu_tensors_come_from_the_pool_at_least_64_byte_aligned(routed_pool, nbytes, dtype):
    item = torch.empty((), dtype=dtype).element_size()
    t = torch.empty(max(nbytes // item, 1), dtype=dtype)
    assert in_pool(routed_pool, t)
    assert t.data_ptr() % 64 == 0
    t.fill_(1)
    assert bool((t == 1).all())


def test_size_zero_tensors_take_nothing_from_the_pool(routed_pool):
    before = routed_pool.stats()["num_allocs"]
    empties = [torch.empty(0), torch.zeros(0, 7), torch.ones(3, 0, dtype=torch.int64)]
    assert routed_pool.stats()["num_allocs"] == before
    x = torch.cat([empties[0], torch.ones(4)])
    assert x.tolist() == [1.0] * 4
    del empties, x


@torch.jit.script
def _relu_matmul(n: int, fill: float) -> torch.Tensor:
    x = torch.full([n, n], fill)
    return (x @ x).relu()


# The forked call makes its own inputs: a tensor that Python also holds would
# need the GIL on the inter-op thread, which torch.jit.wait keeps.
@torch.jit.script
def _fork_matmul(n: int, fill: float) -> torch.jit.Future[torch.Tensor]:
    return torch.jit.fork(_relu_matmul, n, fill)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frees_from_any_thread_and_from_torch_thread_pools(routed_pool):
    base = routed_pool.stats()
    torch.set_num_threads(2)
    made_here = [torch.randn(256, 256) for _ in range(32)]
    with ThreadPoolExecutor(4) as ex:  # Python threads free tensors made on the main thread
        made_there = list(ex.map(lambda i: torch.full((128, 128 + i), float(i)), range(32)))
        list(ex.map(lambda t: t.mul_(2), made_here))
        ex.map(made_here.__delitem__, [slice(0, 0)] * 4)
    # TorchScript runs a forked call on torch's inter-op thread pool; each
    # matmul splits over the intra-op pool. Results made there are freed here.
    futs = [_fork_matmul(64 + i, float(i)) for i in range(8)]
    results = [torch.jit.wait(f) for f in futs]
    assert all(in_pool(routed_pool, r) for r in results)
    assert all(torch.equal(r, torch.full((64 + i, 64 + i), float(i * i * (64 + i)))) for i, r in enumerate(results))
    for i, t in enumerate(made_there):
        assert t[0, 0].item() == float(i)
    done = threading.Event()

    def drop():
        made_there.clear()
        done.set()

    threading.Thread(target=drop).start()
    done.wait()
    del made_here, results, futs
    gc.collect()
    after = routed_pool.stats()
    assert after["invalid_frees"] == base["invalid_frees"]
    assert after["live_blocks"] <= base["live_blocks"] + 2  # what torch keeps (thread-local scratch)


def test_out_of_memory_raises_torch_error_with_the_pool_state_and_recovers(routed_pool):
    budget = routed_pool.stats()["budget_bytes"]
    keep = torch.ones(MiB)
    with pytest.raises(torch.OutOfMemoryError) as e:
        torch.empty(budget + CHUNK, dtype=torch.uint8)
    text = str(e.value)
    assert "CPU out of memory" in text and "pool(host:0)" in text and "chunks by owner" in text
    assert routed_pool.stats()["ooms"] >= 1
    big = torch.empty(budget // 2, dtype=torch.uint8)  # the process is still usable
    big[-1] = 7
    assert keep.sum().item() == MiB and big[-1].item() == 7
    del big
    routed_pool.validate()


def test_out_of_memory_only_after_reclaiming_idle_kv_chunks(routed_pool):
    """KV pages holding nothing live are taken back for a tensor before the allocator gives up."""
    torch.empty(0)
    routed_pool.empty_cache()
    s = routed_pool.stats()
    free_budget = s["budget_bytes"] - s["reserved_bytes"]
    space = PageSpace(routed_pool, "kv.idle", free_budget // CHUNK)
    try:
        n = s["budget_bytes"] // CHUNK - s["created_chunks"] + s["free_chunks"] - 8  # nearly all the rest
        space.map(0, n)
        for p in range(n):
            space.set_reclaimable(p, priority=0)
        kv_owner = space.owner
        held = next(o for o in routed_pool.owners() if o["owner"] == kv_owner)["held_chunks"]
        assert held == n
        t = torch.empty((n // 2) * CHUNK, dtype=torch.uint8)  # only fits by reclaiming KV pages
        t.fill_(3)
        assert space.stats()["reclaimed_pages"] >= n // 2 - 8
        assert next(o for o in routed_pool.owners() if o["owner"] == kv_owner)["reclaimed"] > 0
        del t
    finally:
        space.take_reclaimed()
        space.close()
