"""Pool: one device's chunk pool and its torch arena, as a Python object.

`Pool(device="cpu", budget="1GiB")` builds a host pool (memfd-backed, real
addresses) for tests, CPU experiments and the KV manager on CPU.
`Pool(device="cuda:0", ...)` builds a CUDA pool directly; `ellm_alloc.enable()`
makes the one torch allocates from.
"""
from __future__ import annotations

import ctypes
import threading

from . import _native as N
from .config import Budget, human, parse_budget, parse_cpu_budget, parse_size
from .errors import AllocatorError, OutOfMemoryError


def raise_for_status(status: int, context: str = "") -> None:
    """Turns a C status into the matching Python exception."""
    if status == N.OK:
        return
    msg = N.last_error() or context
    if status == N.OUT_OF_MEMORY:
        raise OutOfMemoryError(msg)
    if status in (N.INVALID_ARGUMENT, N.UNAVAILABLE):
        raise ValueError(msg) if status == N.INVALID_ARGUMENT else RuntimeError(msg)
    raise AllocatorError(msg)


MAX_BYTES = 2**63 - 1  # sizes cross the C API as size_t; above this they are refused here


def _check_bytes(value, what: str) -> int:
    """A byte count for the C API: an int in [0, MAX_BYTES], never silently truncated by ctypes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{what} must be >= 0 and at most 2**63-1 bytes, got {value}")
    return value


def _parse_device(device) -> tuple[str, int]:
    text = str(device)
    if text == "cpu" or text.startswith("cpu:"):
        return "host", int(text.split(":")[1]) if ":" in text else 0
    if text == "cuda" or text.startswith("cuda:"):
        return "cuda", int(text.split(":")[1]) if ":" in text else 0
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class SpaceHandle:
    """A KV space's C handle, held by the space and by its pool: whichever
    closes first destroys it. The pool holds these rather than the spaces:
    when a reference cycle is collected, the pool may be finalised before a
    space whose weak references are already cleared, and the space's own
    teardown would then run on a destroyed pool."""

    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = value

    def destroy(self, pool: "Pool") -> int:
        """Unmaps the space's pages and releases its VA; returns the pages
        that were still mapped (0 if it was destroyed already)."""
        pool._spaces.discard(self)
        handle, self.value = self.value, None
        return N.lib.ellm_kv_destroy(handle) if handle else 0

class Pool:
    """A chunk pool with its arena. Thread-safe; every method maps to the C API."""

    def __init__(
        self,
        device: str = "cpu",
        budget: int | float | str | None = None,
        chunk_size: int | str | None = None,
        va_size: int | str | None = None,
        prealloc: int | str = 0,
        cpu_budget: int | str = 0,
    ):
        """cpu_budget: host memory (pinned, on a GPU) that KV pages may be
        swapped into when the device is full (the host tier); 0 is off."""
        backend, index = _parse_device(device)
        if backend == "host" and budget is None:
            raise ValueError("a host pool needs an explicit budget, e.g. Pool('cpu', budget='1GiB')")
        b: Budget = parse_budget(budget)
        handle = N.lib.ellm_pool_create(
            backend.encode(),
            index,
            _check_bytes(b.bytes, "budget"),
            b.fraction,
            _check_bytes(parse_size(chunk_size, "chunk_size"), "chunk_size") if chunk_size is not None else 0,
            _check_bytes(parse_size(va_size, "va_size"), "va_size") if va_size is not None else 0,
            _check_bytes(parse_size(prealloc, "prealloc"), "prealloc") if prealloc else 0,
        )
        if not handle:
            raise_for_status(N.last_status() or N.BACKEND_ERROR, "pool creation failed")
        self._handle = handle
        self._owned = True
        self.backend = backend
        self.device = index
        # Where this pool's tensors live: "cpu" for a host pool, "cuda" else
        # (see views_on_cpu()).
        self.tensor_device_type = "cpu" if backend == "host" else "cuda"
        self._reclaim_callbacks: dict[int, object] = {}  # keep ctypes callbacks alive
        self._spaces: set[SpaceHandle] = set()  # KV spaces drawing on this pool
        self._lock = threading.Lock()
        if parse_cpu_budget(cpu_budget):
            try:
                self.set_cpu_budget(cpu_budget)
            except BaseException:
                self.close()
                raise

    @classmethod
    def _wrap(cls, handle: int) -> "Pool":
        """A non-owning view of a pool created by the C side (the torch registry)."""
        self = cls.__new__(cls)
        self._handle = handle
        self._owned = False
        self.backend = N.lib.ellm_pool_backend(handle).decode()
        self.device = N.lib.ellm_pool_device(handle)
        self.tensor_device_type = "cpu" if self.backend == "host" else "cuda"
        self._reclaim_callbacks = {}
        self._spaces = set()  # KV spaces (PageSpace) register here too
        self._lock = threading.Lock()
        return self

    @property
    def handle(self) -> int:
        if not self._handle:
            raise ValueError("pool is closed")
        return self._handle

    # ---- allocation through the arena -----------------------------------

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocates `size` bytes; returns the address. Raises OutOfMemoryError."""
        _check_bytes(size, "size")
        ptr = N.lib.ellm_pool_malloc(self.handle, size, stream)
        if not ptr:
            if size == 0:
                return 0
            raise_for_status(N.last_status() or N.OUT_OF_MEMORY)
        return ptr

    def free(self, ptr: int, stream: int = 0) -> None:
        raise_for_status(N.lib.ellm_pool_free(self.handle, ptr, stream))

    def record_stream(self, ptr: int, stream: int) -> None:
        raise_for_status(N.lib.ellm_pool_record_stream(self.handle, ptr, stream))

    def empty_cache(self) -> int:
        """Flushes caches and returns idle chunks to the pool; returns how many."""
        return N.lib.ellm_pool_empty_cache(self.handle)

    # ---- figures ----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        s = N.Stats()
        N.lib.ellm_pool_stats(self.handle, ctypes.byref(s))
        return s.as_dict()

    def owners(self) -> list[dict]:
        out = []
        for i in range(self.stats()["num_owners"]):
            o = N.OwnerStats()
            raise_for_status(N.lib.ellm_pool_owner_stats(self.handle, i, ctypes.byref(o)))
            out.append(
                {
                    "owner": i,
                    "name": o.name.decode(),
                    "held_chunks": o.held_chunks,
                    "peak_chunks": o.peak_chunks,
                    "received": o.received,
                    "given": o.given,
                    "reclaimed": o.reclaimed,
                    "active": bool(o.active),
                }
            )
        return out

    def zero_chunk(self) -> dict[str, int]:
        """The pool's shared read-only zero chunk (fixed-shape KV caches): its
        owner in the ledger (-1 until first used), the KV spaces using it (it
        holds one chunk exactly while users > 0) and the pages mapped over it."""
        owner, users, pages = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_uint64()
        raise_for_status(N.lib.ellm_pool_zero_chunk(self.handle, ctypes.byref(owner), ctypes.byref(users),
                                                    ctypes.byref(pages)))
        return {"owner": owner.value, "users": users.value, "mapped_pages": pages.value}

    def set_cpu_budget(self, budget: int | str) -> None:
        """Host memory for swapped-out KV (the host tier); 0 turns it off.
        ValueError below what is swapped out now."""
        nbytes = _check_bytes(parse_cpu_budget(budget), "cpu_budget")
        raise_for_status(N.lib.ellm_pool_set_cpu_budget(self.handle, nbytes))

    def cpu_budget(self) -> int:
        """The host tier's budget in bytes (0: off); cheaper than host_tier()."""
        s = N.HostTierStats()
        N.lib.ellm_pool_host_stats(self.handle, ctypes.byref(s))
        return s.budget_bytes

    def host_tier(self) -> dict:
        """The host tier's ledger: budget, chunks created and free, pinned
        slabs, and the chunks each owner (a KV space) holds there."""
        s = N.HostTierStats()
        N.lib.ellm_pool_host_stats(self.handle, ctypes.byref(s))
        out = {name: getattr(s, name) for name, _ in s._fields_}
        owners = []
        for i in range(out["num_owners"]):
            o = N.OwnerStats()
            raise_for_status(N.lib.ellm_pool_host_owner_stats(self.handle, i, ctypes.byref(o)))
            owners.append({"owner": i, "name": o.name.decode(), "held_chunks": o.held_chunks,
                           "peak_chunks": o.peak_chunks, "active": bool(o.active)})
        out["owners"] = owners
        return out

    def reset_peaks(self) -> None:
        N.lib.ellm_pool_reset_peaks(self.handle)

    def set_budget(self, budget: int | str) -> None:
        """Changes the budget; below the chunks created, free ones are destroyed.
        Raises ValueError below what owners hold."""
        raise_for_status(N.lib.ellm_pool_set_budget(self.handle, _check_bytes(parse_size(budget, "budget"), "budget")))

    def validate(self) -> None:
        """Raises AssertionError naming the first broken invariant of the arena and ledger."""
        buf = ctypes.create_string_buffer(512)
        if N.lib.ellm_pool_validate(self.handle, buf, len(buf)) != N.OK:
            raise AssertionError(buf.value.decode())

    @property
    def arena_base(self) -> int:
        return N.lib.ellm_pool_arena_base(self.handle)

    def byte_tensor(self, addr: int, nbytes: int):
        """A zero-copy torch uint8 tensor over [addr, addr + nbytes) of this pool's memory.

        Built through DLPack on both backends (a CPU tensor on a host pool, a
        CUDA one on a CUDA pool), so torch never asks the driver about the
        address, which may not be mapped yet. The tensor neither maps nor owns
        the memory: touching an unmapped part faults, as on the GPU.
        """
        import torch

        if addr <= 0 or nbytes <= 0 or nbytes > MAX_BYTES or addr + nbytes > 2**64:
            raise ValueError(f"byte_tensor needs a positive address and size (at most 2**63-1 bytes, "
                             f"within the address space), got {addr:#x}, {nbytes}")
        managed = N.lib.ellm_dlpack_view(self.handle, addr, nbytes)
        if not managed:
            raise_for_status(N.last_status() or N.OUT_OF_MEMORY)
        try:
            return torch.utils.dlpack.from_dlpack(N.dlpack_capsule(managed))
        except BaseException:
            N.lib.ellm_dlpack_discard(managed)
            raise

    # ---- other owners (KV spaces) ------------------------------------------

    def register_owner(self, name: str, reclaim=None) -> int:
        """Adds an owner of chunks. `reclaim(want) -> given` may be called from
        C when another owner runs short; it must give chunks back with
        release() and must not block."""
        if reclaim is None:
            cb = N.RECLAIM_FN()
        else:
            def trampoline(_ctx, want, _fn=reclaim):
                try:
                    return int(_fn(want))
                except Exception:  # never let an exception cross into C
                    return 0
            cb = N.RECLAIM_FN(trampoline)
        owner = N.lib.ellm_pool_register_owner(self.handle, name.encode(), cb, None)
        if owner < 0:
            raise_for_status(-owner)
        self._reclaim_callbacks[owner] = cb
        return owner

    def unregister_owner(self, owner: int) -> None:
        raise_for_status(N.lib.ellm_pool_unregister_owner(self.handle, owner))
        self._reclaim_callbacks.pop(owner, None)

    def acquire(self, owner: int, n: int) -> list[int]:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 2**32:
            raise ValueError(f"acquire takes 0 to 2**32 chunks, got {n!r}")
        ids = (ctypes.c_uint32 * max(n, 1))()
        raise_for_status(N.lib.ellm_pool_acquire(self.handle, owner, n, ids))
        return list(ids[:n])

    def release(self, owner: int, ids: list[int]) -> None:
        """Gives chunks back: all of them, or (on a bad id) none, raising ValueError."""
        if any(not 0 <= i < 2**32 for i in ids):
            raise ValueError(f"chunk ids are 32-bit, got {[i for i in ids if not 0 <= i < 2**32][:3]}")
        arr = (ctypes.c_uint32 * max(len(ids), 1))(*ids)
        raise_for_status(N.lib.ellm_pool_release(self.handle, owner, len(ids), arr))

    ARENA_OWNER = 0  # the torch arena registers first in every pool

    def set_headroom(self, nbytes: int, owner: int = ARENA_OWNER) -> None:
        """Keeps nbytes of the budget for `owner` (default: the torch arena) alone."""
        raise_for_status(N.lib.ellm_pool_set_headroom(self.handle, owner, _check_bytes(nbytes, "headroom")))

    def available_chunks(self, owner: int) -> int:
        """Chunks `owner` could take now without reclaiming from another owner."""
        return N.lib.ellm_pool_available_chunks(self.handle, owner)

    # ---- host backend test controls ------------------------------------------

    def views_on_cpu(self) -> None:
        """Test-only: byte_tensor() gives CPU tensors on this pool whatever its
        backend. For a CUDA pool on the fake driver of tests/fakecuda/, whose
        device memory is host memory; on a real GPU they would fault."""
        raise_for_status(N.lib.ellm_pool_views_on_cpu(self.handle, 1))
        self.tensor_device_type = "cpu"

    def hold_stream(self, stream: int) -> None:
        """Host pools: events on `stream` stay incomplete (GPU work in flight)."""
        raise_for_status(N.lib.ellm_host_hold_stream(self.handle, stream))

    def release_stream(self, stream: int) -> None:
        raise_for_status(N.lib.ellm_host_release_stream(self.handle, stream))

    def drain_copies(self) -> None:
        """Waits until the copy streams' queued copies are done (those behind a
        held stream apart), without ending any swap: tests use it to make
        the moment a swap's copies finish deterministic."""
        raise_for_status(N.lib.ellm_host_drain_copies(self.handle))

    FAULT_KINDS = ("create", "map", "copy", "host_alloc")

    def inject_fault(self, kind: str, nth: int) -> None:
        """Host pools: the nth next chunk 'create', 'map', 'copy' (to or from
        the host tier) or host-tier slab allocation ('host_alloc') fails; 0 disarms."""
        if kind not in self.FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {self.FAULT_KINDS}, got {kind!r}")
        raise_for_status(N.lib.ellm_host_inject_fault(self.handle, self.FAULT_KINDS.index(kind), nth))

    # ---- lifetime ---------------------------------------------------------------

    def close(self) -> int:
        """Destroys the pool; returns the number of live blocks it still had (leaks)."""
        if not self._handle or not self._owned:
            self._handle = None
            return 0
        # KV spaces use the pool's backend and chunks: they go first, or their
        # own teardown would later run on a destroyed pool.
        for space in list(self._spaces):
            space.destroy(self)
        leaked = N.lib.ellm_pool_destroy(self._handle)
        self._handle = None
        return leaked

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def summary(self) -> str:
        from .stats import format_summary

        return format_summary(self.stats(), self.owners(), f"{self.backend}:{self.device}", self.host_tier())

    def __repr__(self) -> str:
        if not self._handle:
            return "Pool(closed)"
        s = self.stats()
        return (
            f"Pool({self.backend}:{self.device}, budget={human(s['budget_bytes'])}, "
            f"allocated={human(s['allocated_bytes'])}, mapped={human(s['reserved_bytes'])})"
        )
