"""Latency targets for the SLO-aware scheduler (scheduler.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    """Latency targets: time to first token (queueing included) and time per
    output token after the first, in milliseconds."""

    ttft_ms: float
    tpot_ms: float

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"SLO {name} must be a positive number of milliseconds, got {v!r}")
