"""The fake CUDA driver's contract: each rule refuses a deliberate misuse with the real driver's code.

These tests call the fake's entry points directly (ctypes), as the CUDA
backend would, and break one rule at a time. A rule the fake did not enforce
would let the misuse succeed, and the test fail. The rules and their sources
in NVIDIA's driver API manual are commented in tests/fakecuda/fakecuda.cpp.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import fakecuda as F

pytestmark = pytest.mark.skipif(not F.available(), reason="no cuda.h, or a library built without the CUDA backend")

G = 2 << 20  # the fake's default granularity


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


PROT_READ, PROT_READWRITE = 1, 3
DEVICE_PROP = AllocProp(type=1, location=Location(type=1, id=0))


class Cu:
    """Typed calls into the fake driver, from a thread with device 0's primary context current."""

    def __init__(self, fake: F.FakeCuda):
        self.fake = fake
        lib = self.lib = fake.lib
        u64, sz, vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        sig = {
            "cuInit": [ctypes.c_uint],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), ctypes.c_int],
            "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
            "cuCtxSetCurrent": [vp],
            "cuMemAddressReserve": [ctypes.POINTER(u64), sz, sz, u64, ctypes.c_ulonglong],
            "cuMemAddressFree": [u64, sz],
            "cuMemCreate": [ctypes.POINTER(u64), sz, ctypes.POINTER(AllocProp), ctypes.c_ulonglong],
            "cuMemRelease": [u64],
            "cuMemMap": [u64, sz, sz, u64, ctypes.c_ulonglong],
            "cuMemUnmap": [u64, sz],
            "cuMemSetAccess": [u64, sz, ctypes.POINTER(AccessDesc), sz],
            "cuMemGetInfo_v2": [ctypes.POINTER(sz), ctypes.POINTER(sz)],
            "cuStreamCreate": [ctypes.POINTER(vp), ctypes.c_uint],
            "cuStreamDestroy_v2": [vp],
            "cuEventCreate": [ctypes.POINTER(vp), ctypes.c_uint],
            "cuEventRecord": [vp, vp],
            "cuEventQuery": [vp],
            "cuEventSynchronize": [vp],
            "cuEventDestroy_v2": [vp],
            "cuMemHostAlloc": [ctypes.POINTER(vp), sz, ctypes.c_uint],
            "cuMemFreeHost": [vp],
            "cuMemcpyHtoDAsync_v2": [u64, vp, sz, vp],
            "cuMemcpyDtoHAsync_v2": [vp, u64, sz, vp],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        assert lib.cuInit(0) == 0
        self.ctx = vp()
        assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), 0) == 0
        self.bind()

    def bind(self):
        assert self.lib.cuCtxSetCurrent(self.ctx) == 0

    def close(self):
        self.lib.cuDevicePrimaryCtxRelease_v2(0)

    def reserve(self, size: int) -> int:
        p = ctypes.c_uint64()
        assert self.lib.cuMemAddressReserve(ctypes.byref(p), size, G, 0, 0) == 0, self.fake.last_violation()
        return p.value

    def create(self, size: int = G) -> int:
        h = ctypes.c_uint64()
        assert self.lib.cuMemCreate(ctypes.byref(h), size, ctypes.byref(DEVICE_PROP), 0) == 0
        return h.value

    def set_access(self, va: int, size: int, flags: int = PROT_READWRITE) -> int:
        desc = AccessDesc(location=Location(type=1, id=0), flags=flags)
        return self.lib.cuMemSetAccess(va, size, ctypes.byref(desc), 1)

    def stream(self) -> int:
        s = ctypes.c_void_p()
        assert self.lib.cuStreamCreate(ctypes.byref(s), 0) == 0
        return s.value

    def event(self) -> int:
        e = ctypes.c_void_p()
        assert self.lib.cuEventCreate(ctypes.byref(e), 0) == 0
        return e.value

    def expect(self, rc: int, code: int, words: str) -> None:
        """`rc` is the driver's code for the misuse, and the fake logged it, naming `words`."""
        assert rc == code, f"expected {code}, got {rc}"
        assert words in self.fake.last_violation(), self.fake.last_violation()


@pytest.fixture
def cu():
    fake = F.load()
    fake.quiet(True)  # the violations below are deliberate
    c = Cu(fake)
    yield c
    fake.quiet(False)
    c.close()


def _writable(addr: int) -> bool:
    """Whether a byte at `addr` can be written, without faulting: read(2) into it fails with EFAULT when not."""
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        return libc.read(r, addr, 1) == 1
    finally:
        os.close(r)
        os.close(w)


def test_calls_before_cuinit_are_refused():
    # A fresh process: nothing has called cuInit there.
    code = textwrap.dedent(f"""
        import ctypes
        lib = ctypes.CDLL({str(F.build())!r})
        lib.fakecuda_set_quiet(1)
        p = ctypes.c_uint64()
        print(lib.cuMemAddressReserve(ctypes.byref(p), ctypes.c_size_t({G}), ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_ulonglong(0)))
        assert lib.cuInit(0) == 0
        print(lib.cuInit(1))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(F.CUDA_ERROR_NOT_INITIALIZED), str(F.CUDA_ERROR_INVALID_VALUE)]


def test_a_thread_without_a_current_context_is_refused(cu):
    got = {}

    def fresh_thread():
        p = ctypes.c_uint64()
        got["reserve"] = cu.lib.cuMemAddressReserve(ctypes.byref(p), G, G, 0, 0)
        got["why"] = cu.fake.last_violation()

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert got["reserve"] == F.CUDA_ERROR_INVALID_CONTEXT
    assert "no current context" in got["why"]


def test_sizes_and_addresses_must_be_granularity_aligned(cu):
    p = ctypes.c_uint64()
    h = ctypes.c_uint64()
    cu.expect(cu.lib.cuMemAddressReserve(ctypes.byref(p), G + 4096, G, 0, 0), F.CUDA_ERROR_INVALID_VALUE, "granularity")
    cu.expect(cu.lib.cuMemCreate(ctypes.byref(h), G // 2, ctypes.byref(DEVICE_PROP), 0), F.CUDA_ERROR_INVALID_VALUE, "granularity")
    va, handle = cu.reserve(4 * G), cu.create()
    cu.expect(cu.lib.cuMemMap(va + 4096, G, 0, handle, 0), F.CUDA_ERROR_INVALID_VALUE, "granularity")
    assert cu.lib.cuMemRelease(handle) == 0
    assert cu.lib.cuMemAddressFree(va, 4 * G) == 0


def test_granularity_is_configurable():
    code = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {str(F.ROOT / 'tests')!r})
        import fakecuda
        fakecuda.driver()
        from ellm_alloc import Pool
        p = Pool("cuda", budget="64MiB")
        print(p.stats()["chunk_bytes"])
        p.close()
    """)
    env = dict(os.environ, FAKECUDA_GRANULARITY=str(4 << 20))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[-1] == str(4 << 20)


def test_map_only_inside_a_reservation_and_never_twice(cu):
    va, h1, h2 = cu.reserve(2 * G), cu.create(), cu.create()
    cu.expect(cu.lib.cuMemMap(va + 2 * G, G, 0, h1, 0), F.CUDA_ERROR_INVALID_VALUE, "not inside one reserved range")
    cu.expect(cu.lib.cuMemMap(va + G, 2 * G, 0, h1, 0), F.CUDA_ERROR_INVALID_VALUE, "exceeds the allocation")
    assert cu.lib.cuMemMap(va, G, 0, h1, 0) == 0
    cu.expect(cu.lib.cuMemMap(va, G, 0, h2, 0), F.CUDA_ERROR_INVALID_VALUE, "already mapped")
    assert cu.lib.cuMemUnmap(va, G) == 0
    for h in (h1, h2):
        assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, 2 * G) == 0


def test_memory_is_inaccessible_until_set_access_and_read_only_stays_unwritable(cu, mem):
    va, h = cu.reserve(G), cu.create()
    assert cu.lib.cuMemMap(va, G, 0, h, 0) == 0
    assert cu.fake.access(va) == 0
    assert not mem.readable(va)
    assert cu.set_access(va, G, PROT_READ) == 0
    assert mem.readable(va) and not _writable(va)
    assert cu.set_access(va, G, PROT_READWRITE) == 0
    assert _writable(va)
    assert cu.lib.cuMemUnmap(va, G) == 0
    assert not mem.readable(va)
    assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, G) == 0


def test_set_access_only_over_fully_mapped_ranges(cu):
    va, h = cu.reserve(2 * G), cu.create()
    cu.expect(cu.set_access(va, G), F.CUDA_ERROR_INVALID_VALUE, "not a fully mapped run")
    assert cu.lib.cuMemMap(va, G, 0, h, 0) == 0
    cu.expect(cu.set_access(va, 2 * G), F.CUDA_ERROR_INVALID_VALUE, "not a fully mapped run")
    assert cu.set_access(va, G) == 0
    assert cu.lib.cuMemUnmap(va, G) == 0
    assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, 2 * G) == 0


def test_unmap_only_whole_mappings(cu):
    va, h = cu.reserve(2 * G), cu.create(2 * G)
    assert cu.lib.cuMemMap(va, 2 * G, 0, h, 0) == 0
    cu.expect(cu.lib.cuMemUnmap(va, G), F.CUDA_ERROR_INVALID_VALUE, "not a run of whole mappings")
    cu.expect(cu.lib.cuMemUnmap(va + G, G), F.CUDA_ERROR_INVALID_VALUE, "not a run of whole mappings")
    assert cu.lib.cuMemUnmap(va, 2 * G) == 0
    assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, 2 * G) == 0


def test_a_released_handle_lives_until_unmapped_and_cannot_be_mapped_again(cu):
    va, h = cu.reserve(2 * G), cu.create()
    assert cu.lib.cuMemMap(va, G, 0, h, 0) == 0 and cu.set_access(va, G) == 0
    ctypes.memmove(va, b"kept", 4)
    before = cu.fake.live()["allocations"]
    assert cu.lib.cuMemRelease(h) == 0
    assert ctypes.string_at(va, 4) == b"kept"  # still mapped: the memory lives on
    assert cu.fake.live()["allocations"] == before
    cu.expect(cu.lib.cuMemMap(va + G, G, 0, h, 0), F.CUDA_ERROR_INVALID_VALUE, "not a live allocation")
    cu.expect(cu.lib.cuMemRelease(h), F.CUDA_ERROR_INVALID_VALUE, "not a live allocation")
    assert cu.lib.cuMemUnmap(va, G) == 0
    assert cu.fake.live()["allocations"] == before - 1  # freed at the last unmap
    assert cu.lib.cuMemAddressFree(va, 2 * G) == 0


def test_address_free_only_of_a_whole_unmapped_reservation(cu):
    va, h = cu.reserve(2 * G), cu.create()
    assert cu.lib.cuMemMap(va, G, 0, h, 0) == 0
    cu.expect(cu.lib.cuMemAddressFree(va, 2 * G), F.CUDA_ERROR_INVALID_VALUE, "still mapped")
    cu.expect(cu.lib.cuMemAddressFree(va, G), F.CUDA_ERROR_INVALID_VALUE, "differs from the reserved")
    cu.expect(cu.lib.cuMemAddressFree(va + G, G), F.CUDA_ERROR_INVALID_VALUE, "not the start of a reservation")
    assert cu.lib.cuMemUnmap(va, G) == 0
    assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, 2 * G) == 0


def test_events_on_a_held_stream_stay_not_ready_until_released_or_waited(cu):
    s, e = cu.stream(), cu.event()
    cu.fake.hold_stream(s)
    assert cu.lib.cuEventRecord(e, s) == 0
    assert cu.lib.cuEventQuery(e) == F.CUDA_ERROR_NOT_READY
    assert cu.lib.cuEventSynchronize(e) == 0
    assert cu.lib.cuEventQuery(e) == 0
    assert cu.lib.cuEventRecord(e, s) == 0
    assert cu.lib.cuEventQuery(e) == F.CUDA_ERROR_NOT_READY
    cu.fake.release_stream(s)
    assert cu.lib.cuEventQuery(e) == 0
    assert cu.lib.cuEventDestroy_v2(e) == 0
    assert cu.lib.cuStreamDestroy_v2(s) == 0


def test_unknown_or_destroyed_streams_and_events_are_invalid_handles(cu):
    s, e = cu.stream(), cu.event()
    cu.expect(cu.lib.cuEventRecord(e, 0x7777), F.CUDA_ERROR_INVALID_HANDLE, "stream")
    cu.expect(cu.lib.cuStreamDestroy_v2(1), F.CUDA_ERROR_INVALID_HANDLE, "not made by cuStreamCreate")
    assert cu.lib.cuEventRecord(e, 0) == 0  # the legacy default stream is always valid
    assert cu.lib.cuEventDestroy_v2(e) == 0
    cu.expect(cu.lib.cuEventQuery(e), F.CUDA_ERROR_INVALID_HANDLE, "event")
    assert cu.lib.cuStreamDestroy_v2(s) == 0
    cu.expect(cu.lib.cuEventRecord(cu.event(), s), F.CUDA_ERROR_INVALID_HANDLE, "stream")


def test_pinned_host_memory_is_freed_only_once_and_only_if_allocated(cu):
    p = ctypes.c_void_p()
    assert cu.lib.cuMemHostAlloc(ctypes.byref(p), 1 << 16, 1) == 0
    ctypes.memset(p.value, 7, 1 << 16)
    assert cu.lib.cuMemFreeHost(p) == 0
    cu.expect(cu.lib.cuMemFreeHost(p), F.CUDA_ERROR_INVALID_VALUE, "not returned by cuMemHostAlloc")
    cu.expect(cu.lib.cuMemHostAlloc(ctypes.byref(p), 1 << 16, 0x80), F.CUDA_ERROR_INVALID_VALUE, "unknown flags")


def test_copies_need_mapped_accessible_device_memory(cu):
    va, h = cu.reserve(G), cu.create()
    buf = ctypes.create_string_buffer(64)
    assert cu.lib.cuMemMap(va, G, 0, h, 0) == 0
    cu.expect(cu.lib.cuMemcpyDtoHAsync_v2(buf, va, 64, 0), F.CUDA_ERROR_INVALID_VALUE, "not mapped readable")
    assert cu.set_access(va, G, PROT_READ) == 0
    cu.expect(cu.lib.cuMemcpyHtoDAsync_v2(va, buf, 64, 0), F.CUDA_ERROR_INVALID_VALUE, "not mapped writable")
    assert cu.set_access(va, G) == 0
    ctypes.memmove(buf, b"round trip", 10)
    assert cu.lib.cuMemcpyHtoDAsync_v2(va, buf, 64, 0) == 0
    out = ctypes.create_string_buffer(64)
    assert cu.lib.cuMemcpyDtoHAsync_v2(out, va, 64, 0) == 0 and out.raw[:10] == b"round trip"
    assert cu.lib.cuMemUnmap(va, G) == 0
    assert cu.lib.cuMemRelease(h) == 0
    assert cu.lib.cuMemAddressFree(va, G) == 0


def test_mem_get_info_reports_the_configured_total():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(F.ROOT / 'tests')!r})
        import fakecuda
        fakecuda.driver()
        from ellm_alloc import Pool
        p = Pool("cuda", budget=0.5)  # half of the device's free memory
        print(p.stats()["budget_bytes"])
        p.close()
    """)
    env = dict(os.environ, FAKECUDA_TOTAL_BYTES=str(256 << 20))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[-1] == str(128 << 20)


def test_device_memory_runs_out_at_the_configured_total(cu):
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cu.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    h = ctypes.c_uint64()
    too_big = (free.value // G + 1) * G
    assert cu.lib.cuMemCreate(ctypes.byref(h), too_big, ctypes.byref(DEVICE_PROP), 0) == F.CUDA_ERROR_OUT_OF_MEMORY
