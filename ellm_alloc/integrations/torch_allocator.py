"""enable(): install the pool as torch's CUDA allocator.

torch calls ellm_malloc / ellm_free (csrc/c_api.h) through
torch.cuda.memory.CUDAPluggableAllocator. Under a pluggable allocator torch's
own memory statistics raise, so while enabled the common torch.cuda.memory_*
functions are routed to the pool's figures.

GPU-only code: it runs only where torch has CUDA. The pool, arena and stats
it relies on are the same code the host-pool tests exercise on every machine.
"""
from __future__ import annotations

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
_state: dict = {}  # settings, allocator object, shim library: kept alive for the process


def enabled() -> bool:
    return "settings" in _state


def enable(budget=None, chunk_size=None, va_size=None, prealloc=None) -> Settings:
    """Makes every torch CUDA allocation come from ellm_alloc's chunk pool.

    budget: bytes, a string such as "40GiB", or a fraction of the device's free
        memory (default 0.9, or ELLM_ALLOC_BUDGET).
    chunk_size: physical chunk size (default: the driver's granularity, 2 MiB).
    va_size: VA reserved per device (default 4 x budget).
    prealloc: bytes of chunks created up front (default 0: created on demand, in batches).

    Call it before the first CUDA tensor. Calling it again with the same
    settings does nothing; with other settings it raises EnableError.
    """
    settings = Settings.resolve(budget, chunk_size, va_size, prealloc)
    with _lock:
        if enabled():
            if _state["settings"] != settings:
                raise EnableError(
                    f"ellm_alloc is already enabled with {_state['settings']}; the allocator cannot "
                    f"be reconfigured in a running process (asked for {settings})"
                )
            return settings
        torch = _check_torch()
        N.lib.ellm_configure(
            b"cuda", settings.budget.bytes, settings.budget.fraction, settings.chunk_size,
            settings.va_size, settings.prealloc,
        )
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
        _state.update(settings=settings, allocator=alloc)
        _route_torch_memory_functions(torch)
        return settings


def _check_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise EnableError(f"torch is not importable: {e}") from None
    if not torch.backends.cuda.is_built():
        raise EnableError(
            f"this torch ({torch.__version__}) is a CPU build: there is no CUDA allocator to replace. "
            "Use ellm_alloc.Pool(device='cpu', budget=...) for a host pool."
        )
    if not torch.cuda.is_available():
        raise EnableError("torch.cuda.is_available() is False: no CUDA device or driver here")
    return torch


def _address(symbol: str) -> int:
    import ctypes

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
    import ctypes

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
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def device_pool(device=None) -> Pool:
    """The pool torch allocates from on `device` (created on first use)."""
    if not enabled():
        raise EnableError("ellm_alloc is not enabled; call ellm_alloc.enable() first")
    handle = N.lib.ellm_device_pool(_device_index(device))
    if not handle:
        raise EnableError(N.last_error())
    return Pool._wrap(handle)


def memory_stats(device=None) -> dict:
    p = device_pool(device)
    return dict(torch_style(p.stats(), p.owners()))


def memory_summary(device=None) -> str:
    p = device_pool(device)
    return format_summary(p.stats(), p.owners(), f"cuda:{p.device}")


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
