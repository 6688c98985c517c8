"""enable(): install the pool as torch's allocator, on CUDA or on CPU.

CUDA: torch calls ellm_malloc / ellm_free (csrc/c_api.h) through
torch.cuda.memory.CUDAPluggableAllocator. Under a pluggable allocator torch's
own memory statistics raise, so while enabled the common torch.cuda.memory_*
functions are routed to the pool's figures. GPU-only code: it runs only where
torch has CUDA, and has never run on a GPU in this repository. The pool, arena
and stats it relies on are the same code the host-pool tests exercise.

CPU: a c10::Allocator in the torch shim (torch_shim.cpp, compiled against the
installed torch) is installed with c10::SetCPUAllocator; its allocate/free go
to a host pool's arena. Every CPU tensor made afterwards (weights,
activations) lives in the pool, beside the KV spaces of an ElasticCache or a
KV manager drawing on the same pool. This is what runs on a machine without
a GPU, and it cannot be undone in a running process.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
import warnings
from pathlib import Path

from .. import _native as N
from ..config import Settings
from ..errors import EnableError
from ..pool import Pool
from ..stats import format_summary, torch_style

_lock = threading.Lock()
# settings, allocator object, shim library, pool views: kept alive for the process
_state: dict = {"pools": {}}


def enabled() -> bool:
    return "settings" in _state


def enabled_device() -> str | None:
    """'cuda' or 'cpu': whose allocations the pool serves; None before enable()."""
    return _state["settings"].device if enabled() else None


def enable(device=None, budget=None, chunk_size=None, va_size=None, prealloc=None, cpu_budget=None) -> Settings:
    """Makes every torch allocation on `device` come from ellm_alloc's chunk pool.

    device: "cuda", "cpu", or None (default, or ELLM_ALLOC_DEVICE): CUDA when
        torch has a usable GPU, else CPU.
    budget: bytes, a string such as "40GiB", or a fraction of the device's free
        memory (host memory for "cpu"; default 0.9, or ELLM_ALLOC_BUDGET).
    chunk_size: physical chunk size (default: the driver's granularity, 2 MiB).
    va_size: VA reserved for the arena (default 4 x budget).
    prealloc: bytes of chunks created up front (default 0: created on demand, in batches).
    cpu_budget: bytes or a string such as "16GiB" of host memory (pinned on a
        GPU) that KV pages may be swapped out to, the pool's host tier
        (Pool.set_cpu_budget); 0 or "0" turns it off (default 0, or
        ELLM_ALLOC_CPU_BUDGET). memory_stats() shows it as ellm.host.* keys.

    CUDA: call it before the first CUDA tensor. CPU: tensors made before keep
    their own memory; every later CPU tensor comes from the pool. Calling it
    again with the same settings does nothing; with other settings (another
    device included) it raises EnableError.
    """
    torch = _import_torch()
    settings = Settings.resolve(budget, chunk_size, va_size, prealloc, device,
                                cuda_available=_cuda_usable(torch), cpu_budget=cpu_budget)
    with _lock:
        if enabled():
            if _state["settings"] != settings:
                raise EnableError(
                    f"ellm_alloc is already enabled with {_state['settings']}; the allocator cannot "
                    f"be reconfigured in a running process (asked for {settings})"
                )
            return settings
        if settings.device == "cuda":
            _enable_cuda(torch, settings)
        else:
            _enable_cpu(torch, settings)
        _state["settings"] = settings
        return settings


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise EnableError(f"torch is not importable: {e}") from None
    return torch


def _cuda_usable(torch) -> bool:
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def _configure(settings: Settings, backend: bytes) -> None:
    N.lib.ellm_configure(
        backend, settings.budget.bytes, settings.budget.fraction, settings.chunk_size,
        settings.va_size, settings.prealloc,
    )


def _enable_cuda(torch, settings: Settings) -> None:
    _check_torch(torch)
    _configure(settings, b"cuda")
    _install_thrower(torch)
    alloc = torch.cuda.memory.CUDAPluggableAllocator(N.LIB_PATH, "ellm_malloc", "ellm_free")
    hooks = alloc.allocator()
    for setter, symbol in (
        ("set_init_fn", "ellm_init"),
        ("set_reset_fn", "ellm_reset"),
        ("set_memory_fraction_fn", "ellm_memory_fraction"),
        ("set_record_stream_fn", "ellm_record_stream"),
    ):
        if hasattr(hooks, setter):
            getattr(hooks, setter)(_address(symbol))
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise EnableError(
            "CUDA memory was already allocated with torch's native allocator; call "
            "ellm_alloc.enable() at the top of the script, before the first CUDA tensor "
            f"(torch said: {e})"
        ) from None
    _state["allocator"] = alloc
    _route_torch_memory_functions(torch)


def _enable_cpu(torch, settings: Settings) -> None:
    """Builds the host pool of device 0 and routes torch's CPU allocator to it."""
    try:
        shim = ctypes.CDLL(str(build_torch_shim(torch)))
    except Exception as e:  # without the shim there is no CPU allocator to install
        raise EnableError(f"CPU routing needs the torch shim, which could not be built: {e}") from None
    _configure(settings, b"host")
    handle = N.lib.ellm_device_pool(0)
    if not handle:
        raise EnableError(f"cannot create the host pool: {N.last_error()}")
    pool = _pool_view(0, handle, settings)
    fn = shim.ellm_torch_install_cpu_allocator
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t] + [ctypes.c_void_p] * 4
    if fn(handle, pool.arena_base, pool.stats()["va_bytes"], _address("ellm_pool_malloc"),
          _address("ellm_pool_free"), _address("ellm_last_error"), _address("ellm_last_status")) != 0:
        raise EnableError("torch's CPU allocator is already routed to another pool in this process")
    if not shim.ellm_torch_cpu_allocator_installed():
        raise EnableError("torch did not take the CPU allocator (another one was set at a higher priority)")
    _state["shim"] = shim


def _check_torch(torch) -> None:
    if not torch.backends.cuda.is_built():
        raise EnableError(
            f"this torch ({torch.__version__}) is a CPU build: there is no CUDA allocator to replace. "
            "Use ellm_alloc.enable(device='cpu') to route CPU tensors to a host pool."
        )
    if not torch.cuda.is_available():
        raise EnableError("torch.cuda.is_available() is False: no CUDA device or driver here")


def _address(symbol: str) -> int:
    return ctypes.cast(getattr(N.lib, symbol), ctypes.c_void_p).value


# ---- out-of-memory as torch.OutOfMemoryError --------------------------------


def _install_thrower(torch) -> None:
    """Installs a thrower of c10::OutOfMemoryError (built against this torch),
    falling back to std::runtime_error with an 'out of memory' message."""
    N.lib.ellm_set_default_thrower()
    try:
        shim = build_torch_shim(torch)
    except Exception as e:  # a missing compiler must not stop enable()
        warnings.warn(
            f"ellm_alloc: could not build the torch shim ({e}); out-of-memory will surface as "
            "RuntimeError('CUDA out of memory ...') instead of torch.OutOfMemoryError",
            stacklevel=3,
        )
        return
    lib = ctypes.CDLL(str(shim))
    N.lib.ellm_set_oom_thrower(ctypes.cast(lib.ellm_torch_throw_oom, ctypes.c_void_p))
    buf = ctypes.create_string_buffer(512)
    if not N.lib.ellm_probe_thrower(b"probe", buf, len(buf)) or b"OutOfMemoryError" not in buf.value:
        N.lib.ellm_set_default_thrower()
        warnings.warn(f"ellm_alloc: torch shim misbehaved ({buf.value!r}); using the default thrower",
                      stacklevel=3)
        return
    _state["shim"] = lib


def build_torch_shim(torch, cache_dir: Path | None = None) -> Path:
    """Compiles integrations/torch_shim.cpp against the installed torch, once
    per torch version and ABI; returns the shared object's path."""
    src = Path(__file__).with_name("torch_shim.cpp")
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha1(f"{torch.__version__}|{abi}|{torch_dir}|{src.read_text()}".encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir or os.environ.get("ELLM_ALLOC_CACHE", Path.home() / ".cache" / "ellm_alloc"))
    out = cache_dir / f"libellm_torch_shim-{key}.so"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        os.environ.get("CXX", "c++"), "-O2", "-shared", "-fPIC", "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-I", str(torch_dir / "include"),
        str(src), "-o", str(tmp),
        "-L", str(torch_dir / "lib"), "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the torch shim failed:\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


# ---- figures -------------------------------------------------------------------


def _device_index(device) -> int:
    if enabled_device() == "cpu":  # one host pool serves every CPU tensor
        if device is not None and str(device) not in ("cpu", "cpu:0", "0"):
            raise ValueError(f"ellm_alloc is enabled for CPU tensors; there is no pool for {device!r}")
        return 0
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def _pool_view(index: int, handle: int, settings: Settings) -> Pool:
    """One Pool object per device, so that what KV spaces register on it lives
    as long as the process. The first view of a device's pool gives the pool
    its host tier: the C configuration (ellm_configure) has no cpu budget."""
    pool = _state["pools"].get(index)
    if pool is None or pool._handle != handle:
        pool = Pool._wrap(handle)
        if settings.cpu_budget:
            pool.set_cpu_budget(settings.cpu_budget)
        _state["pools"][index] = pool
    return pool


def device_pool(device=None) -> Pool:
    """The pool torch allocates from on `device` (created on first use)."""
    if not enabled():
        raise EnableError("ellm_alloc is not enabled; call ellm_alloc.enable() first")
    index = _device_index(device)
    handle = N.lib.ellm_device_pool(index)
    if not handle:
        raise EnableError(N.last_error())
    return _pool_view(index, handle, _state["settings"])


def memory_stats(device=None) -> dict:
    p = device_pool(device)
    return dict(torch_style(p.stats(), p.owners(), p.host_tier()))


def memory_summary(device=None) -> str:
    p = device_pool(device)
    return format_summary(p.stats(), p.owners(), f"{'cpu' if p.backend == 'host' else 'cuda'}:{p.device}",
                          p.host_tier())


def empty_cache() -> None:
    N.lib.ellm_reset()


def reset_peak_memory_stats(device=None) -> None:
    device_pool(device).reset_peaks()


def _route_torch_memory_functions(torch) -> None:
    """torch's own stats raise under a pluggable allocator; answer from ours."""

    def memory_allocated(device=None):
        return device_pool(device).stats()["allocated_bytes"]

    def max_memory_allocated(device=None):
        return device_pool(device).stats()["allocated_peak"]

    def memory_reserved(device=None):
        return device_pool(device).stats()["reserved_bytes"]

    def max_memory_reserved(device=None):
        return device_pool(device).stats()["reserved_peak"]

    routed = {
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "empty_cache": empty_cache,
        "memory_stats": memory_stats,
        "memory_summary": lambda device=None, abbreviated=False: memory_summary(device),
    }
    for name, fn in routed.items():
        fn.__name__ = name
        fn.__doc__ = f"ellm_alloc: {name} answered from the chunk pool (routed by ellm_alloc.enable())."
        setattr(torch.cuda, name, fn)
        setattr(torch.cuda.memory, name, fn)
