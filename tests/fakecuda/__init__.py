"""The fake CUDA driver (fakecuda.cpp) for tests: build, load, read its counters.

`build()` compiles tests/fakecuda/fakecuda.cpp into build/fakecuda/ (through
the Makefile rule, so `make test` and a bare `pytest` build it the same way);
`driver()` points the CUDA backend at it (ELLM_ALLOC_LIBCUDA) and returns the
ctypes view of its test controls. The library is test-only: it is not part
of the wheel.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("fakecuda.cpp")
LIB_PATH = ROOT / "build" / "fakecuda" / "libfakecuda.so"

# CUresult values the fake returns (cuda.h).
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_READY = 600

LIVE_FIELDS = ("allocations", "mappings", "reservations", "events", "streams", "host_allocs", "context_retains")


def cuda_header() -> Path | None:
    """cuda.h, where the Makefile looks for it (CUDA_HOME, then /usr/local/cuda)."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda.h").exists():
            return Path(base) / "include" / "cuda.h"
    return None


def available() -> bool:
    """Whether the fake can run here: cuda.h to build it, and a library built with the CUDA backend."""
    from ellm_alloc import _native as N

    return cuda_header() is not None and "cuda" in N.lib.ellm_build_info().decode()


def build() -> Path:
    """Builds the library if it is missing or older than its source; returns its path."""
    if not LIB_PATH.exists() or LIB_PATH.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run(["make", "-s", "-C", str(ROOT), "build/fakecuda/libfakecuda.so"], check=True)
    return LIB_PATH


class FakeCuda:
    """ctypes view of the fake driver's test controls (the exports at the end of fakecuda.cpp)."""

    def __init__(self, path: Path):
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))  # the same handle the backend's dlopen gets
        lib.fakecuda_calls.argtypes = [ctypes.c_char_p]
        lib.fakecuda_calls.restype = ctypes.c_int64
        lib.fakecuda_total_calls.restype = ctypes.c_uint64
        lib.fakecuda_entry_count.restype = ctypes.c_int
        lib.fakecuda_entry_name.argtypes = [ctypes.c_int]
        lib.fakecuda_entry_name.restype = ctypes.c_char_p
        for fn in (lib.fakecuda_hold_stream, lib.fakecuda_release_stream, lib.fakecuda_access):
            fn.argtypes = [ctypes.c_size_t]
        lib.fakecuda_access.restype = ctypes.c_int
        lib.fakecuda_fail_call.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
        lib.fakecuda_last_violation.restype = ctypes.c_char_p
        lib.fakecuda_violations.restype = ctypes.c_uint64
        lib.fakecuda_live.argtypes = [ctypes.POINTER(ctypes.c_uint64)]

    def calls(self, name: str | None = None):
        """Calls of one entry point, or a dict of every entry point's calls."""
        if name is not None:
            n = self.lib.fakecuda_calls(name.encode())
            assert n >= 0, f"the fake driver has no entry point {name}"
            return n
        names = [self.lib.fakecuda_entry_name(i).decode() for i in range(self.lib.fakecuda_entry_count())]
        return {n: self.lib.fakecuda_calls(n.encode()) for n in names}

    def total_calls(self) -> int:
        return self.lib.fakecuda_total_calls()

    def hold_stream(self, stream: int) -> None:
        self.lib.fakecuda_hold_stream(stream)

    def release_stream(self, stream: int) -> None:
        self.lib.fakecuda_release_stream(stream)

    def foreign_streams(self, on: bool) -> None:
        self.lib.fakecuda_set_foreign_streams(int(on))

    def fail_call(self, name: str, nth: int, code: int) -> None:
        assert self.lib.fakecuda_fail_call(name.encode(), nth, code) == 0, name

    def last_violation(self) -> str:
        return self.lib.fakecuda_last_violation().decode()

    def violations(self) -> int:
        return self.lib.fakecuda_violations()

    def quiet(self, on: bool) -> None:
        self.lib.fakecuda_set_quiet(int(on))

    def live(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * len(LIVE_FIELDS))()
        self.lib.fakecuda_live(out)
        return dict(zip(LIVE_FIELDS, out))

    def access(self, va: int) -> int:
        """0: mapped, no access yet; 1: read-only; 3: read/write; -1: not mapped."""
        return self.lib.fakecuda_access(va)

    def clear_current(self) -> None:
        """The calling thread loses its current context (as a fresh thread)."""
        self.lib.fakecuda_clear_current()


_driver: FakeCuda | None = None


def load() -> FakeCuda:
    """Builds the fake and returns its controls, for tests that call its entry points themselves.

    The CUDA backend of this process is left alone: it still loads
    libcuda.so.1 (driver() points it at the fake)."""
    global _driver
    if _driver is None:
        _driver = FakeCuda(build())
    return _driver


def driver() -> FakeCuda:
    """load(), and makes this process's CUDA backend load the fake.

    The backend reads ELLM_ALLOC_LIBCUDA once, when the process first asks for
    a CUDA pool; so this is done at start-up of a process of its own (the
    fake-CUDA pass of the suite, tests/conftest.py), never in the main test
    process, whose later subprocesses (the GPU tier) must see the real driver."""
    fake = load()
    os.environ["ELLM_ALLOC_LIBCUDA"] = str(fake.path)
    return fake
