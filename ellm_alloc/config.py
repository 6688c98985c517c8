"""Settings: budgets, chunk sizes, and the ELLM_ALLOC_* environment variables.

A budget is bytes (int), a string with a unit ("40GiB", "512 MB"), or a
fraction of the device's free memory at enable() (a float in (0, 1], or a
string such as "0.8" or "80%"). The host tier's budget (cpu_budget) is bytes
only, 0 (off) by default.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

DEFAULT_FRACTION = 0.9


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string like '2MiB'. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be bytes or a string like '40GiB', not a bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be an int or a string like '40GiB', got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(
            f"malformed {what} {value!r}: expected bytes or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '40GiB'"
        )
    n = float(m.group(1)) * _UNITS[unit]
    if n < 1:
        raise ValueError(f"{what} must be at least one byte, got {value!r}")
    return int(n)


def parse_cpu_budget(value: int | str | None, what: str = "cpu_budget") -> int:
    """Bytes of host memory for swapped-out KV pages (the host tier); None, 0
    and "0" turn it off. `what` names the value in errors (the argument or
    the environment variable it came from)."""
    # A bool is refused before the off test below, where False == 0 would let it through.
    if isinstance(value, bool):
        raise TypeError(f"{what} must be bytes or a string like '16GiB', not a bool")
    if value is None or value == 0 or (isinstance(value, str) and value.strip() == "0"):
        return 0
    return parse_size(value, what)


@dataclass(frozen=True)
class Budget:
    """Either an absolute byte count or a fraction of free device memory."""

    bytes: int = 0
    fraction: float = 0.0

    def describe(self) -> str:
        return f"{self.bytes} bytes" if self.bytes else f"{self.fraction:.0%} of free device memory"


def parse_budget(value: int | float | str | None) -> Budget:
    if value is None:
        return Budget(fraction=DEFAULT_FRACTION)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget fraction must be in (0, 1], got {value}")
        return Budget(fraction=value)
    if isinstance(value, str):
        s = value.strip()
        if s.endswith("%"):
            try:
                return parse_budget(float(s[:-1]) / 100.0)
            except ValueError as e:
                raise ValueError(f"malformed budget {value!r}: {e}") from None
        if re.fullmatch(r"0?\.[0-9]+|1(\.0*)?", s):
            return parse_budget(float(s))
    return Budget(bytes=parse_size(value, "budget"))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def parse_enable_device(value: str | None, cuda_available: bool) -> str:
    """'cuda' or 'cpu' from enable()'s device argument; None picks CUDA when
    torch has it, else CPU."""
    if value is None:
        return "cuda" if cuda_available else "cpu"
    if not isinstance(value, str):
        raise TypeError(f"device must be 'cpu', 'cuda' or None, got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("cpu", "cuda"):
        return text
    raise ValueError(f"device must be 'cpu', 'cuda' or None (pick CUDA when torch has it), got {value!r}")


@dataclass(frozen=True)
class Settings:
    """What enable() was called with, after defaults and environment."""

    budget: Budget
    chunk_size: int  # 0 = the device's granularity
    va_size: int  # 0 = 4 x budget
    prealloc: int
    device: str = "cuda"  # whose allocator the pool serves: "cuda" or "cpu"
    cpu_budget: int = 0  # host tier bytes; 0 = off

    @staticmethod
    def resolve(budget=None, chunk_size=None, va_size=None, prealloc=None, device=None,
                cuda_available: bool = False, cpu_budget=None) -> "Settings":
        env = os.environ
        if device is None and env.get("ELLM_ALLOC_DEVICE"):
            device = env["ELLM_ALLOC_DEVICE"]
        if budget is None and env.get("ELLM_ALLOC_BUDGET"):
            budget = env["ELLM_ALLOC_BUDGET"]
        if chunk_size is None and env.get("ELLM_ALLOC_CHUNK_SIZE"):
            chunk_size = env["ELLM_ALLOC_CHUNK_SIZE"]
        if va_size is None and env.get("ELLM_ALLOC_VA_SIZE"):
            va_size = env["ELLM_ALLOC_VA_SIZE"]
        if prealloc is None and env.get("ELLM_ALLOC_PREALLOC"):
            prealloc = env["ELLM_ALLOC_PREALLOC"]
        cpu_budget_from = "cpu_budget"
        if cpu_budget is None and env.get("ELLM_ALLOC_CPU_BUDGET"):
            cpu_budget, cpu_budget_from = env["ELLM_ALLOC_CPU_BUDGET"], "ELLM_ALLOC_CPU_BUDGET"
        return Settings(
            budget=parse_budget(budget),
            chunk_size=parse_size(chunk_size, "chunk_size") if chunk_size is not None else 0,
            va_size=parse_size(va_size, "va_size") if va_size is not None else 0,
            prealloc=parse_size(prealloc, "prealloc") if prealloc not in (None, 0, "0") else 0,
            device=parse_enable_device(device, cuda_available),
            cpu_budget=parse_cpu_budget(cpu_budget, cpu_budget_from),
        )
