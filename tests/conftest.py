"""Shared fixtures for the CPU test suite (host backend: memfd chunks, real addresses).

Every pool made through `pool` / `make_pool` is checked on teardown: its
arena and ledger invariants hold (validate()) and closing it reports zero
leaked blocks. Tests that deliberately leave blocks live close their pool
themselves (a closed pool is skipped by the teardown check).
"""
from __future__ import annotations

import ctypes
import os

import pytest

from ellm_alloc import Pool
from ellm_alloc import _native as N

# tests/routed/ holds files that need torch's CPU allocator routed to a pool,
# which cannot be undone in a process: tests/test_cpu_routing.py runs each of
# them in a process of its own, and a plain run of the suite skips the folder.
collect_ignore = [] if os.environ.get("ELLM_ALLOC_ROUTED_SUITE") else ["routed"]

# ELLM_TEST_BACKEND=fakecuda runs the suite's pools on the CUDA backend
# (csrc/backend_cuda.h, unchanged) over the fake driver of tests/fakecuda/:
# tests/test_fakecuda_suite.py reruns the pool, arena, stream, fault, thread,
# bad-input, KV and ElasticCache files that way, in a process of their own.
# A "cpu" pool then becomes a CUDA pool of the fake device; the host
# backend's test controls become the fake driver's (streams held back,
# failures injected into cuMemCreate / cuMemMap); DLPack views of pool memory
# are CPU tensors, since the fake's device memory is host memory.
FAKE_CUDA = os.environ.get("ELLM_TEST_BACKEND") == "fakecuda"
if FAKE_CUDA:
    import fakecuda as _fakecuda

    from ellm_alloc import pool as _pool_module

    _fake = _fakecuda.driver()
    _fake.foreign_streams(True)  # the suite's stream numbers stand for torch's streams
    _parse_device = _pool_module._parse_device
    _init = Pool.__init__

    def _cuda_instead_of_host(device):
        backend, index = _parse_device(device)
        return ("cuda", index) if backend == "host" else (backend, index)

    def _init_on_fake(self, device="cpu", budget=None, *args, **kw):
        if budget is None and str(device).startswith("cpu"):
            raise ValueError("a host pool needs an explicit budget, e.g. Pool('cpu', budget='1GiB')")
        _init(self, device, budget, *args, **kw)
        self.views_on_cpu()

    _FAULT_CALL = {"create": "cuMemCreate", "map": "cuMemMap"}

    def _inject_fault(self, kind, nth):
        if kind not in _FAULT_CALL:
            raise ValueError(f"fault kind must be 'create' or 'map', got {kind!r}")
        _fake.fail_call(_FAULT_CALL[kind], nth, _fakecuda.CUDA_ERROR_OUT_OF_MEMORY)

    @pytest.fixture(autouse=True)
    def _no_driver_contract_violation():
        """Every misuse of the driver the fake detects fails the test that made it."""
        before = _fake.violations()
        yield
        assert _fake.violations() == before, f"driver contract violated: {_fake.last_violation()}"

    _pool_module._parse_device = _cuda_instead_of_host
    Pool.__init__ = _init_on_fake
    Pool.hold_stream = lambda self, stream: _fake.hold_stream(stream)
    Pool.release_stream = lambda self, stream: _fake.release_stream(stream)
    Pool.drain_copies = lambda self: None  # the fake driver's copies are done when queued
    Pool.inject_fault = _inject_fault

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 2 * MiB  # the host backend's granularity, the default chunk size

_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t


class Mem:
    """Reads and writes pool memory through raw addresses.

    The pattern byte at offset `o` of the block with tag `tag` is a function of
    (tag, o) only, so overlapping samples of one block always agree and two
    blocks (different tags) almost never do.
    """

    SPOT = 16  # bytes written at each sample spot

    @staticmethod
    def pattern(tag: int, offset: int, n: int) -> bytes:
        seed = (tag * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
        return bytes(((seed >> ((o % 4) * 8)) ^ (o * 31) ^ (o >> 8)) & 0xFF for o in range(offset, offset + n))

    @classmethod
    def spots(cls, size: int) -> list[tuple[int, int]]:
        """(offset, length) samples at the start, middle and end of a block of `size` bytes."""
        n = min(cls.SPOT, size)
        return sorted({(0, n), (max(0, size // 2 - n // 2), n), (size - n, n)})

    @classmethod
    def fill(cls, addr: int, size: int, tag: int) -> None:
        for off, n in cls.spots(size):
            ctypes.memmove(addr + off, cls.pattern(tag, off, n), n)

    @classmethod
    def intact(cls, addr: int, size: int, tag: int) -> bool:
        return all(ctypes.string_at(addr + off, n) == cls.pattern(tag, off, n) for off, n in cls.spots(size))

    _pipe: tuple[int, int] | None = None

    @classmethod
    def readable(cls, addr: int) -> bool:
        """Whether the byte at `addr` is mapped and readable, without faulting:
        write(2) from it into a pipe fails with EFAULT when it is not."""
        if cls._pipe is None:
            cls._pipe = os.pipe()
        r, w = cls._pipe
        if _libc.write(w, addr, 1) != 1:
            return False
        os.read(r, 1)
        return True


@pytest.fixture
def mem():
    return Mem


def _is_open(p: Pool) -> bool:
    try:
        p.handle
        return True
    except ValueError:
        return False


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def make_pool(request):
    """Factory of host pools; on teardown each still-open pool must validate and close without leaks.

    When the test itself failed the pools are just closed: its failure is the
    report, not the blocks it left live on the way out."""
    made: list[Pool] = []

    def make(budget="64MiB", **kw) -> Pool:
        p = Pool("cpu", budget=budget, **kw)
        made.append(p)
        return p

    yield make
    call = getattr(request.node, "rep_call", None)
    check = call is not None and call.passed
    for p in made:
        if _is_open(p):
            if not check:
                p.close()
                continue
            p.validate()
            leaked = p.close()
            assert leaked == 0, f"pool closed with {leaked} live blocks"


@pytest.fixture
def pool(make_pool) -> Pool:
    """A fresh 64 MiB host pool, checked on teardown (validate() and zero leaks)."""
    return make_pool("64MiB")


class Bound:
    """A host pool bound to a device index, so the torch entry points
    (ellm_malloc / ellm_free / ellm_record_stream) reach it."""

    def __init__(self, pool: Pool, device: int):
        self.pool = pool
        self.device = device

    def malloc(self, size: int, stream: int = 0) -> int:
        return N.lib.ellm_malloc(size, self.device, stream or None) or 0

    def free(self, ptr: int, size: int, stream: int = 0) -> None:
        N.lib.ellm_free(ptr or None, size, self.device, stream or None)


TORCH_DEVICE = 5  # the device index tests bind their host pools to


@pytest.fixture
def bind():
    """bind(pool) routes the torch entry points for TORCH_DEVICE to `pool`; unbinds on teardown."""
    bound = []

    def do_bind(p: Pool, device: int = TORCH_DEVICE) -> Bound:
        assert N.lib.ellm_bind_device(device, p.handle) == 0, N.last_error()
        bound.append(device)
        return Bound(p, device)

    yield do_bind
    for d in bound:
        N.lib.ellm_bind_device(d, None)


@pytest.fixture(autouse=True)
def _never_routed_here():
    """enable() cannot be undone: a test that enabled it in this process would
    route every later test's tensors. Such checks belong in a fresh process."""
    yield
    if not os.environ.get("ELLM_ALLOC_ROUTED_SUITE"):
        from ellm_alloc import enabled

        assert not enabled(), "this test enabled ellm_alloc in the pytest process"


@pytest.fixture(autouse=True)
def _no_thrower():
    """ctypes callers need ellm_malloc to return NULL on failure, not throw a C++ exception."""
    N.lib.ellm_set_oom_thrower(None)
    yield
