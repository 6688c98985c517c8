"""Pool.byte_tensor: zero-copy DLPack tensors over pool memory, the path the
KV views take on both backends (a CPU tensor here, a CUDA tensor on a GPU)."""
from __future__ import annotations

import ctypes
import gc
import threading

import pytest
import torch

from ellm_alloc import _native as N

CHUNK = 2 << 20  # the host backend's default chunk


def test_tensor_aliases_pool_memory(pool):
    p = pool.malloc(3 * CHUNK)
    t = pool.byte_tensor(p, 3 * CHUNK)
    assert t.device.type == "cpu" and t.dtype == torch.uint8 and t.shape == (3 * CHUNK,)
    assert t.data_ptr() == p
    t[:16] = torch.arange(16, dtype=torch.uint8)           # written through the tensor ...
    assert ctypes.string_at(p, 16) == bytes(range(16))      # ... read through the address
    ctypes.memmove(p + CHUNK, b"\x07" * 8, 8)               # and the other way round
    assert t[CHUNK:CHUNK + 8].tolist() == [7] * 8
    del t
    pool.free(p)


def test_views_of_a_byte_tensor_keep_their_addresses(pool):
    p = pool.malloc(CHUNK)
    t = pool.byte_tensor(p, CHUNK)
    f = t.view(torch.float32).as_strided((4, 8), (8, 1), 16)
    assert f.data_ptr() == p + 64
    f.fill_(1.5)
    assert t.view(torch.float32)[16:48].eq(1.5).all()
    del t, f
    pool.free(p)


def test_unmapped_range_faults_like_the_gpu(pool, mem):
    """The tensor neither maps nor owns: after free + empty_cache the bytes are gone."""
    p = pool.malloc(CHUNK)
    t = pool.byte_tensor(p, CHUNK)
    pool.free(p)
    pool.empty_cache()
    assert not mem.readable(t.data_ptr())
    del t


@pytest.mark.parametrize("addr,nbytes", [(0, 10), (4096, 0), (4096, -1), (-5, 10)])
def test_bad_ranges_are_refused(pool, addr, nbytes):
    with pytest.raises(ValueError, match="positive address and size"):
        pool.byte_tensor(addr, nbytes)


def test_descriptors_are_freed_by_torch(pool):
    """Many short-lived views from several threads: every DLPack descriptor
    goes back through its deleter, once."""
    p = pool.malloc(CHUNK)
    gc.collect()
    before = N.lib.ellm_dlpack_live()
    kept = pool.byte_tensor(p, CHUNK)
    assert N.lib.ellm_dlpack_live() == before + 1

    def worker():
        for _ in range(2000):
            t = pool.byte_tensor(p, CHUNK)
            assert t.data_ptr() == p
            del t

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    gc.collect()
    assert N.lib.ellm_dlpack_live() == before + 1
    del kept
    gc.collect()
    assert N.lib.ellm_dlpack_live() == before
    pool.free(p)


def test_a_descriptor_torch_refuses_is_discarded(pool, monkeypatch):
    p = pool.malloc(CHUNK)
    gc.collect()
    before = N.lib.ellm_dlpack_live()

    def refuse(capsule):
        raise RuntimeError("consumer refused")

    monkeypatch.setattr(torch.utils.dlpack, "from_dlpack", refuse)
    with pytest.raises(RuntimeError, match="consumer refused"):
        pool.byte_tensor(p, CHUNK)
    assert N.lib.ellm_dlpack_live() == before
    pool.free(p)
