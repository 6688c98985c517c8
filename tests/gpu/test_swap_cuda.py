"""Swap to the host tier on a real GPU: pinned host chunks, copies on the
tier's own copy stream ordered after the caller's stream, bytes bit-exact at
the same device addresses after the round trip; both at the PageSpace level
and for a KVCacheManager request sharing a prefix with another.

NOTE: this file has never run on a GPU. It was written on a machine without
one; its scripts were only dry-run there against the fake CUDA driver of
tests/fakecuda/ (CPU tensors instead of CUDA ones, no real streams). The
same checks run on host pools in tests/test_swap_space.py and
tests/test_kv_swap_table.py (and over the fake driver), so a failure here
points at the CUDA backend (backend_cuda.h: cuMemHostAlloc, cuMemcpy*Async,
events and stream waits) or at the ordering against torch's streams.

Each test runs in a fresh interpreter (conftest's `py`), like the other GPU
tests; the pools here are standalone (no enable()), torch's own allocator
holds the reference copies.
"""
import json

from ellm_alloc.kv.space import PINNED, SWAPPED, SWAPPING_OUT, UNMAPPED

# The scripts' device helpers: what a dry run on the fake driver replaces.
PRELUDE = """
import json, torch
from ellm_alloc import Pool
DEV = "cuda"
def make_pool(**kw):
    return Pool("cuda", **kw)
def cur():  # the caller stream a kernel would run on
    return torch.cuda.current_stream().cuda_stream
def sync():
    torch.cuda.synchronize()
def busy():  # keeps the current stream busy (~50 ms), as a long kernel would
    torch.cuda._sleep(100_000_000)
"""


def test_page_space_round_trip_on_cuda(py):
    r = py(PRELUDE + """
from ellm_alloc.kv.space import PageSpace
C = 2 << 20
out = {}
pool = make_pool(budget=str(16 * C), cpu_budget=str(8 * C))
out["pinned_before"] = pool.host_tier()["pinned_bytes"]
space = PageSpace(pool, "kv", 8)
space.map(0, 6)
view = space.bytes_view()  # made before the swap: it must read the same bytes after
out["device"] = str(view.device)
base = view.data_ptr()
ref = {}
for p in range(6):
    g = torch.Generator(device=DEV).manual_seed(1000 + p)
    ref[p] = torch.randint(0, 256, (C,), dtype=torch.uint8, device=DEV, generator=g)
busy()  # the writes below queue behind a long kernel ...
for p in range(6):
    view[p * C:(p + 1) * C].copy_(ref[p])
out_pages = [0, 1, 2, 3]
space.swap_out(out_pages, stream=cur())  # ... and the copies to the host behind the writes
out["states_queued"] = [space.state(p) for p in range(8)]
out["finished_at_once"] = space.finish_swaps()  # the copies still wait for the kernel
space.finish_swaps(wait=True)
out["states_swapped"] = [space.state(p) for p in range(8)]
host = pool.host_tier()
owners = pool.owners()
out["device_held"] = owners[space.owner]["held_chunks"]
out["host_held"] = host["owners"][space.host_owner]["held_chunks"]
out["pinned_after"] = host["pinned_bytes"]
out["host_balanced"] = host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"])
out["kv_stats"] = space.stats()
pool.validate()
# The device chunks the swap gave back go to another space, which overwrites them.
other = PageSpace(pool, "scribble", 16)
k = min(pool.available_chunks(other.owner), 16)
other.map(0, k)
other.bytes_view()[:k * C].fill_(0xEE)
sync()
for q in range(k):
    other.unmap(q, stream=cur())
other.close()
out["scribbled"] = k
space.swap_in(out_pages, stream=cur())
space.swap_wait(out_pages, stream=cur())  # the current stream waits for the copies back
out["intact"] = [bool(torch.equal(view[p * C:(p + 1) * C], ref[p])) for p in range(6)]
out["same_address"] = space.bytes_view().data_ptr() == base
space.finish_swaps(wait=True)
out["states_back"] = [space.state(p) for p in range(8)]
out["host_held_back"] = pool.host_tier()["owners"][space.host_owner]["held_chunks"]
# Swapped out again and dropped (the request is gone): both tiers give their chunks back.
space.swap_out([4, 5], stream=cur())
space.finish_swaps(wait=True)
for p in (4, 5):
    space.unmap(p)
out["host_held_dropped"] = pool.host_tier()["owners"][space.host_owner]["held_chunks"]
pool.validate()
space.close()
host = pool.host_tier()
out["host_free_at_end"] = host["free_chunks"] == host["created_chunks"]
out["device_kv_held_at_end"] = sum(o["held_chunks"] for o in pool.owners() if o["name"] != "arena")
out["leaked"] = pool.close()
print(json.dumps(out))
""")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["device"].startswith("cuda"), out
    assert out["states_queued"] == [SWAPPING_OUT] * 4 + [PINNED] * 2 + [UNMAPPED] * 2, out
    assert out["finished_at_once"] == 0, "a copy did not wait for the kernel queued before swap_out()"
    assert out["states_swapped"] == [SWAPPED] * 4 + [PINNED] * 2 + [UNMAPPED] * 2, out
    assert out["device_held"] == 2 and out["host_held"] == 4, out  # device chunks unmapped, host holds them
    assert out["pinned_before"] == 0 and out["pinned_after"] >= 4 * (2 << 20), out  # pinned host slabs
    assert out["host_balanced"], out
    assert out["kv_stats"]["host_pages"] == 4 and out["kv_stats"]["mapped_pages"] == 2, out
    assert out["scribbled"] >= 4, out
    assert out["intact"] == [True] * 6 and out["same_address"], out
    assert out["states_back"] == [PINNED] * 6 + [UNMAPPED] * 2 and out["host_held_back"] == 0, out
    assert out["host_held_dropped"] == 0, out
    assert out["host_free_at_end"] and out["device_kv_held_at_end"] == 0 and out["leaked"] == 0, out


def test_kv_manager_request_round_trip_on_cuda(py):
    """r2 hits r1's prefix and goes on; r2 swaps out (the shared blocks stay,
    r1 keeps decoding over them), its chunks are overwritten, it swaps back
    in; every block of both reads its bytes; freeing r2 while swapped out
    drops its host copy."""
    r = py(PRELUDE + """
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec, SlidingWindowSpec
out = {}
pool = make_pool(budget="512MiB", cpu_budget="256MiB")
model = ModelKVSpec("m", (FullAttentionSpec(32, 128, "bfloat16"), SlidingWindowSpec(32, 128, "bfloat16", window=64),
                          FullAttentionSpec(32, 128, "bfloat16"),
                          MambaSpec(dtype="float32", conv_shape=(64, 1024), ssm_shape=(448, 1024))))
mgr = KVCacheManager(model, pool, block_size=16, max_cached_fraction=float("inf"), state_checkpoint_tokens=16)
ref = {}  # (request, layer, block index) -> the bytes written there
gen = torch.Generator(device=DEV).manual_seed(0)

def bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t

def write(rid):
    for layer in range(model.num_layers):
        for i, b in enumerate(mgr.block_table(rid, layer)):
            if b is None or (rid, layer, i) in ref:
                continue
            shared = [r for r in mgr.requests if r != rid and (r, layer, i) in ref
                      and i < len(mgr.block_table(r, layer)) and mgr.block_table(r, layer)[i] == b]
            if shared:
                ref[rid, layer, i] = ref[shared[0], layer, i]
                continue
            vals = []
            for t in mgr.layer_tensors(layer):
                x = torch.randint(0, 1 << 14, t[b].shape, dtype=torch.int16 if t.dtype == torch.bfloat16 else
                                  torch.int32, device=DEV, generator=gen)
                x = x.view(t.dtype) if t.dtype == torch.bfloat16 else x.to(torch.uint8)
                t[b].copy_(x)
                vals.append(bits(x).clone())
            ref[rid, layer, i] = vals

def intact(rid):
    ok = True
    for layer in range(model.num_layers):
        for i, b in enumerate(mgr.block_table(rid, layer)):
            if b is None:
                continue
            for t, x in zip(mgr.layer_tensors(layer), ref[rid, layer, i]):
                ok &= bool(torch.equal(bits(t[b]), x))
    return ok

def step(rid, toks):
    for t in toks:
        assert mgr.allocate_slots(rid, 1, new_token_ids=[t], stream=cur())
        write(rid)

prompt = list(range(1, 161))  # 10 blocks: every group caches what a hit of all 10 needs
mgr.add_request("r1", prompt)
assert mgr.allocate_slots("r1", 160, stream=cur())
write("r1")
out["hit"] = mgr.add_request("r2", prompt + list(range(500, 600)))
assert mgr.allocate_slots("r2", 260 - out["hit"], stream=cur())
write("r2")
step("r2", [7, 8, 9])
step("r1", [3, 4])
out["views_on"] = str(mgr.layer_tensors(0)[0].device)
busy()  # r2's last kernel still runs when it is preempted
out["moved"] = mgr.swap_out("r2", stream=cur())
out["ready_at_once"] = mgr.swap_ready("r2")
mgr.wait_swap("r2")
out["ready"] = mgr.swap_ready("r2")
u = mgr.usage()
out["swapped_bytes"] = u["swapped_bytes"]
out["host_held"] = sum(o["held_chunks"] for o in pool.host_tier()["owners"])
out["pinned"] = pool.host_tier()["pinned_bytes"]
mgr.check()
pool.validate()
step("r1", [5, 6, 7])  # r1 runs on over the shared blocks
sync()
out["r1_intact_while_out"] = intact("r1")
# Another request takes the freed chunks and fills them with garbage.
mgr.add_request("g", list(range(9000, 9600)))
out["garbage_fits"] = mgr.allocate_slots("g", 600, stream=cur())
if out["garbage_fits"]:
    for layer in range(model.num_layers):
        for b in mgr.block_table("g", layer):
            if b is not None:
                for t in mgr.layer_tensors(layer):
                    t[b].fill_(1)
sync()
mgr.free("g", stream=cur())
out["can_swap_in"] = mgr.can_swap_in("r2")
mgr.swap_in("r2", stream=cur())
mgr.wait_swap("r2", stream=cur())  # orders the current stream after the copies back
out["r2_intact"] = intact("r2")
out["r1_intact"] = intact("r1")
step("r2", [10, 11])
sync()
out["r2_intact_after_step"] = intact("r2")
out["host_held_back"] = sum(o["held_chunks"] for o in pool.host_tier()["owners"])
mgr.check()
pool.validate()
# Swapped out again and finished while its copies may still run: the host copy is dropped.
mgr.swap_out("r2", stream=cur())
mgr.free("r2", stream=cur())
host = pool.host_tier()
out["host_held_after_free"] = sum(o["held_chunks"] for o in host["owners"])
out["host_balanced"] = host["created_chunks"] == host["free_chunks"]
sync()
out["r1_intact_at_end"] = intact("r1")
mgr.check()
pool.validate()
mgr.close()
out["kv_held_at_end"] = sum(o["held_chunks"] for o in pool.owners() if o["name"] != "arena")
out["leaked"] = pool.close()
print(json.dumps(out))
""")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["views_on"].startswith("cuda"), out
    assert out["hit"] == 160, out
    assert out["moved"] > 0 and out["moved"] % (2 << 20) == 0, out
    assert not out["ready_at_once"], "the swap-out finished before the kernel queued before it"
    assert out["ready"] and out["swapped_bytes"] == out["moved"], out
    assert out["host_held"] * (2 << 20) == out["moved"] and out["pinned"] >= out["moved"], out
    assert out["r1_intact_while_out"] and out["garbage_fits"] and out["can_swap_in"], out
    assert out["r2_intact"] and out["r1_intact"] and out["r2_intact_after_step"], out
    assert out["host_held_back"] == 0, out
    assert out["host_held_after_free"] == 0 and out["host_balanced"], out
    assert out["r1_intact_at_end"] and out["kv_held_at_end"] == 0 and out["leaked"] == 0, out

