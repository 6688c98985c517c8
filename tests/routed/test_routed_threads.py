"""torch's intra-op threads doing matmuls while another thread drives the KV
manager, all on the one routed pool: activations and KV blocks are taken and
given back concurrently, and neither side loses data."""
from __future__ import annotations

import threading

import torch

from ellm_alloc import OutOfMemoryError
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, ModelKVSpec

MODEL = ModelKVSpec("threads", (FullAttentionSpec(8, 128, "float32"),) * 2)
BS = 16


def test_matmuls_and_the_kv_manager_share_the_pool_from_two_threads(routed_pool):
    torch.set_num_threads(2)
    mgr = KVCacheManager(MODEL, routed_pool, block_size=BS, max_cached_fraction=float("inf"))
    stop = threading.Event()
    errors: list[str] = []
    rounds = [0]

    def kv_driver():
        n = 0
        try:
            while not stop.is_set():
                live = []
                for r in range(8):
                    rid = f"r{n}.{r}"
                    mgr.add_request(rid, [n % 5] * 64 + [r] * 64)  # shared prefixes: cache hits
                    try:
                        if not mgr.allocate_slots(rid, 256):
                            mgr.free(rid)
                            continue
                    except OutOfMemoryError:
                        mgr.free(rid)
                        continue
                    last = mgr.block_table(rid, 0)[-1]  # the request's own block, written in place
                    mgr.layer_tensors(0)[0][last].fill_(float(r))
                    live.append((rid, r))
                for rid, r in live:
                    last = mgr.block_table(rid, 0)[-1]
                    if not bool((mgr.layer_tensors(0)[0][last] == float(r)).all()):
                        errors.append(f"KV of {rid} changed")
                    mgr.free(rid)
                mgr.check()
                n += 1
                rounds[0] += 1
        except Exception as e:  # reported by the main thread
            errors.append(repr(e))

    worker = threading.Thread(target=kv_driver)
    worker.start()
    try:
        a = torch.randn(384, 384)
        expected = a @ a
        for i in range(200):
            c = a @ a  # the intra-op pool splits each matmul across both threads
            acts = [torch.empty(1 << (16 + i % 6)) for _ in range(4)]
            if not torch.equal(c, expected):
                errors.append(f"matmul {i} differs")
            del acts, c
            if rounds[0] >= 5 and i >= 50:
                break
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[:5]
    assert rounds[0] >= 1
    mgr.close()
    s = routed_pool.stats()
    assert s["invalid_frees"] == 0
