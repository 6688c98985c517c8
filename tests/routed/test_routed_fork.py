"""Forked children (DataLoader workers) and the pool's MAP_SHARED memory.

A child inherits the parent's pool tensors. It may read them and write into
them, but its writes stay its own (the host backend remaps every chunk
copy-on-write in the child, csrc/backend_host.h); it allocates from torch's
native allocator, and the parent sees nothing change.
"""
from __future__ import annotations

import os

import torch
from conftest import in_pool
from torch.utils.data import DataLoader, Dataset

N_ITEMS, WIDTH = 64, 4096


class InPlaceDataset(Dataset):
    """__getitem__ writes into the parent's tensor (as augmentation code often
    does by mistake) and returns what it read, along with the worker's pid."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self):
        return N_ITEMS

    def __getitem__(self, i):
        row = self.data[i]
        seen = row.clone()  # allocated in the child
        row.add_(1000)  # written through the inherited mapping
        return seen, row.clone(), os.getpid()


def test_dataloader_workers_cannot_write_into_the_parent(routed_pool):
    data = torch.arange(N_ITEMS * WIDTH, dtype=torch.float32).reshape(N_ITEMS, WIDTH)
    assert in_pool(routed_pool, data)
    reference = data.clone()
    stats_before = routed_pool.stats()
    loader = DataLoader(InPlaceDataset(data), batch_size=8, num_workers=2, multiprocessing_context="fork")
    pids, rows = set(), 0
    for seen, written, pid in loader:
        pids.update(pid.tolist())
        first = int(seen[0, 0].item()) // WIDTH
        assert torch.equal(seen, reference[first:first + len(seen)])  # the child read the parent's data
        assert torch.equal(written, seen + 1000)  # its write took effect in the child
        rows += len(seen)
    assert rows == N_ITEMS and len(pids) == 2 and os.getpid() not in pids
    assert torch.equal(data, reference), "a worker's write reached the parent's tensor"
    after = routed_pool.stats()
    assert after["invalid_frees"] == stats_before["invalid_frees"]
    routed_pool.validate()


def test_fork_child_allocates_natively_and_frees_inherited_tensors_harmlessly(routed_pool):
    inherited = torch.full((1 << 18,), 7.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports one line through the pipe, then leaves without cleanup
        try:
            torch.set_num_threads(1)  # OpenMP's pool does not survive fork (as in DataLoader workers)
            fresh = torch.ones(1 << 18)  # native memory: the pool is the parent's
            inherited.mul_(3)
            ok = (not in_pool(routed_pool, fresh) and inherited[0].item() == 21.0
                  and fresh.sum().item() == 1 << 18)
            del inherited  # a no-op free of a parent chunk
            os.write(w, b"ok" if ok else b"bad")
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, repr(e).encode()[:200])
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 256) == b"ok"
    os.close(r)
    assert inherited[0].item() == 7.0 and bool((inherited == 7.0).all())
    routed_pool.validate()
