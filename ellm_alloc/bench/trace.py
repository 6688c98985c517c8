"""Allocation traces: text, one event per line.

    a ID BYTES [STREAM]   allocate BYTES under ID (on STREAM, default 0)
    f ID                  free ID
    # ...                 comment
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Event:
    op: str  # "a" or "f"
    id: int
    size: int = 0
    stream: int = 0


class TraceError(ValueError):
    pass


def parse(path: str | Path) -> list[Event]:
    """Reads and checks a trace: every free names a live id, every id is allocated once at a time."""
    events: list[Event] = []
    live: set[int] = set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].split()
            if not text:
                continue
            where = f"{path}:{lineno}"
            try:
                if text[0] == "a" and len(text) in (3, 4):
                    ev = Event("a", int(text[1]), int(text[2]), int(text[3]) if len(text) == 4 else 0)
                    if ev.size <= 0 or ev.stream < 0:
                        raise TraceError(f"{where}: size must be > 0 and stream >= 0: {line.strip()!r}")
                    if ev.id in live:
                        raise TraceError(f"{where}: id {ev.id} allocated while still live")
                    live.add(ev.id)
                elif text[0] == "f" and len(text) == 2:
                    ev = Event("f", int(text[1]))
                    if ev.id not in live:
                        raise TraceError(f"{where}: free of id {ev.id}, which is not live")
                    live.remove(ev.id)
                else:
                    raise TraceError(f"{where}: expected 'a ID BYTES [STREAM]' or 'f ID', got {line.strip()!r}")
            except ValueError as e:
                if isinstance(e, TraceError):
                    raise
                raise TraceError(f"{where}: {e}: {line.strip()!r}") from None
            events.append(ev)
    return events


def peak_live(events: list[Event]) -> int:
    live: dict[int, int] = {}
    cur = peak = 0
    for ev in events:
        if ev.op == "a":
            live[ev.id] = ev.size
            cur += ev.size
            peak = max(peak, cur)
        else:
            cur -= live.pop(ev.id)
    return peak
