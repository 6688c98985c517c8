"""ctypes binding of libellm_alloc_core.so (csrc/c_api.h).

The shared object is loaded once per process. Every signature is declared
here, and nowhere else, so the rest of the package calls typed functions.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path

LIB_NAME = "libellm_alloc_core.so"

# Status codes (csrc/backend.h).
OK = 0
OUT_OF_MEMORY = 1
INVALID_POINTER = 2
DOUBLE_FREE = 3
BACKEND_ERROR = 4
INVALID_ARGUMENT = 5
FORKED_CHILD = 6
INJECTED_FAULT = 7
UNAVAILABLE = 8


class Stats(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "allocated_bytes allocated_peak active_bytes active_peak reserved_bytes reserved_peak "
            "cached_bytes va_bytes num_allocs num_frees fast_allocs chunk_maps chunk_unmaps "
            "chunk_moves cache_flushes ooms invalid_frees live_blocks chunk_bytes budget_bytes "
            "created_chunks free_chunks chunk_creates reclaim_calls failed_acquires num_owners"
        ).split()
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


class OwnerStats(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 64),
        ("held_chunks", ctypes.c_uint64),
        ("peak_chunks", ctypes.c_uint64),
        ("received", ctypes.c_uint64),
        ("given", ctypes.c_uint64),
        ("reclaimed", ctypes.c_uint64),
        ("active", ctypes.c_int32),
    ]


class KvStats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "mapped_pages reclaimable_pages maps unmaps reclaimed_pages "
        "host_pages swapping_pages swap_outs swap_ins swapped_out_pages swapped_in_pages").split()]


class HostTierStats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "chunk_bytes budget_bytes created_chunks free_chunks slabs pinned_bytes num_owners failed_acquires").split()]


RECLAIM_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)


def _candidates() -> list[Path]:
    found = []
    if os.environ.get("ELLM_ALLOC_LIB"):
        found.append(Path(os.environ["ELLM_ALLOC_LIB"]))
    found.append(Path(__file__).with_name(LIB_NAME))
    # Editable installs put the built library in site-packages/ellm_alloc/
    # while the Python sources stay in the checkout.
    try:
        for f in importlib.metadata.files("ellm_alloc") or []:
            if f.name == LIB_NAME:
                found.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for entry in sys.path:
        found.append(Path(entry) / "ellm_alloc" / LIB_NAME)
    return found


def _load() -> ctypes.CDLL:
    for path in _candidates():
        if path.is_file():
            return ctypes.CDLL(str(path))
    raise ImportError(
        f"{LIB_NAME} not found. Build it with `pip install -e .` (or `make test`), "
        "or point ELLM_ALLOC_LIB at it."
    )


lib = _load()
LIB_PATH = lib._name

_P = ctypes.c_void_p
_SZ = ctypes.c_size_t
_U64 = ctypes.c_uint64
_I = ctypes.c_int


def _sig(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("ellm_last_error", ctypes.c_char_p)
_sig("ellm_last_status", _I)
_sig("ellm_build_info", ctypes.c_char_p)
_sig("ellm_pool_create", _P, ctypes.c_char_p, _I, _SZ, ctypes.c_double, _SZ, _SZ, _SZ)
_sig("ellm_pool_destroy", ctypes.c_int64, _P)
_sig("ellm_pool_malloc", _P, _P, _SZ, _SZ)
_sig("ellm_pool_free", _I, _P, _P, _SZ)
_sig("ellm_pool_record_stream", _I, _P, _P, _SZ)
_sig("ellm_pool_empty_cache", _SZ, _P)
_sig("ellm_pool_stats", None, _P, ctypes.POINTER(Stats))
_sig("ellm_pool_owner_stats", _I, _P, _I, ctypes.POINTER(OwnerStats))
_sig("ellm_pool_reset_peaks", None, _P)
_sig("ellm_pool_set_budget", _I, _P, _SZ)
_sig("ellm_pool_validate", _I, _P, ctypes.c_char_p, _SZ)
_sig("ellm_pool_backend", ctypes.c_char_p, _P)
_sig("ellm_pool_device", _I, _P)
_sig("ellm_pool_arena_base", _SZ, _P)
_sig("ellm_pool_register_owner", _I, _P, ctypes.c_char_p, RECLAIM_FN, _P)
_sig("ellm_pool_unregister_owner", _I, _P, _I)
_sig("ellm_pool_acquire", _I, _P, _I, _SZ, ctypes.POINTER(ctypes.c_uint32))
_sig("ellm_pool_release", _I, _P, _I, _SZ, ctypes.POINTER(ctypes.c_uint32))
_sig("ellm_pool_chunk_handle", _U64, _P, ctypes.c_uint32)
_sig("ellm_pool_set_headroom", _I, _P, _I, _SZ)
_sig("ellm_pool_available_chunks", _SZ, _P, _I)
_sig("ellm_kv_create", _P, _P, ctypes.c_char_p, _SZ)
_sig("ellm_kv_destroy", ctypes.c_int64, _P)
_sig("ellm_kv_base", _SZ, _P)
_sig("ellm_kv_owner", _I, _P)
_sig("ellm_kv_map", _I, _P, ctypes.c_uint32, ctypes.c_uint32)
_sig("ellm_kv_unmap", _I, _P, ctypes.c_uint32, _SZ)
_sig("ellm_kv_set_reclaimable", _I, _P, ctypes.c_uint32, ctypes.c_uint32, _SZ)
_sig("ellm_kv_pin", _I, _P, ctypes.c_uint32)
_sig("ellm_kv_state", _I, _P, ctypes.c_uint32)
_sig("ellm_kv_take_reclaimed", _SZ, _P, ctypes.POINTER(ctypes.c_uint32), _SZ)
_sig("ellm_kv_reclaim", _SZ, _P, _SZ)
_sig("ellm_kv_get_stats", None, _P, ctypes.POINTER(KvStats))
_sig("ellm_kv_set_zero_fill", _I, _P, _I)
_sig("ellm_kv_zero_pages", _U64, _P)
_sig("ellm_kv_host_owner", _I, _P)
_sig("ellm_kv_swap_out", _I, _P, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, _SZ)
_sig("ellm_kv_swap_in", _I, _P, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, _SZ)
_sig("ellm_kv_finish_swaps", _SZ, _P, _I)
_sig("ellm_kv_swap_wait", _I, _P, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, _SZ)
_sig("ellm_pool_set_cpu_budget", _I, _P, _SZ)
_sig("ellm_pool_host_stats", None, _P, ctypes.POINTER(HostTierStats))
_sig("ellm_pool_host_owner_stats", _I, _P, _I, ctypes.POINTER(OwnerStats))
_sig("ellm_pool_zero_chunk", _I, _P, ctypes.POINTER(_I), ctypes.POINTER(_U64), ctypes.POINTER(_U64))
_sig("ellm_dlpack_view", _P, _P, _SZ, _U64)
_sig("ellm_dlpack_discard", None, _P)
_sig("ellm_dlpack_live", ctypes.c_int64)
_sig("ellm_pool_views_on_cpu", _I, _P, _I)
_sig("ellm_host_hold_stream", _I, _P, _SZ)
_sig("ellm_host_release_stream", _I, _P, _SZ)
_sig("ellm_host_drain_copies", _I, _P)
_sig("ellm_host_inject_fault", _I, _P, _I, ctypes.c_int64)
_sig("ellm_configure", _I, ctypes.c_char_p, _SZ, ctypes.c_double, _SZ, _SZ, _SZ)
_sig("ellm_bind_device", _I, _I, _P)
_sig("ellm_device_pool", _P, _I)
_sig("ellm_set_default_thrower", None)
_sig("ellm_set_oom_thrower", None, _P)
_sig("ellm_probe_thrower", _I, ctypes.c_char_p, ctypes.c_char_p, _SZ)
_sig("ellm_malloc", _P, ctypes.c_ssize_t, _I, _P)
_sig("ellm_free", None, _P, ctypes.c_ssize_t, _I, _P)
_sig("ellm_init", None, _I)
_sig("ellm_reset", None)
_sig("ellm_memory_fraction", None, ctypes.c_double, _I)
_sig("ellm_record_stream", None, _P, _P)
_sig("ellm_bench_pairs", ctypes.c_double, _P, ctypes.POINTER(_SZ), _SZ, _SZ, _I)


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [_P, ctypes.c_char_p, _P]


def dlpack_capsule(managed: int):
    """A "dltensor" capsule around a DLManagedTensor* from ellm_dlpack_view.

    No capsule destructor: the consumer (torch) renames the capsule and calls
    the tensor's deleter; a capsule never consumed is discarded by the caller.
    """
    return _PyCapsule_New(managed, b"dltensor", None)


def last_error() -> str:
    return (lib.ellm_last_error() or b"").decode()


def last_status() -> int:
    return lib.ellm_last_status()


def build_info() -> str:
    return lib.ellm_build_info().decode()
