"""Telemetry: the pool's ledger over time, by owner.

    from ellm_alloc.telemetry import record
    with record(cache=cache) as rec:                 # or record(pool=...)
        model.generate(ids, past_key_values=cache,
                       logits_processor=[rec.logits_processor()])
    ellm_alloc.plot_timeline(rec, "timeline.png")

When samples are taken (the hooks are deliberately simple, no background thread):

* generate steps: `rec.logits_processor()` is a transformers LogitsProcessor
  that takes one sample each time generate() asks for the next token (after
  the prefill, then after every decode step). It returns the scores untouched.
* allocator events: while the `with` block runs, `PageSpace.map` / `unmap`
  (a KV chunk mapped or unmapped, e.g. by ElasticCache as sequences grow),
  `PageSpace.swap_out` / `swap_in` / `finish_swaps` (KV pages moving to the
  host tier and back; finish_swaps only when a swap ended) and `Pool.malloc`
  / `free` calls made from Python on the recorded pool each take a sample
  (`events=False` turns this off; `every=N` keeps one event in N).
  The wrappers are installed on entry and removed on exit. Allocations torch
  makes through the CUDA allocator go straight to C and are not seen as
  events; they show up in the next step or explicit sample.
* explicitly: `rec.sample("label")`.

A sample holds: time (s since the start), step (generate step, or None),
label, bytes per owner (the torch arena, each KV space by its name), free
chunk bytes, budget and created bytes, the arena's allocated bytes, `host`:
the host tier's bytes (swapped-out KV) the same way (`owners`, `free`,
`created`, `budget`; budget 0 when the tier is off), and `device`: a pynvml
view of the GPU (total / used / free and this process's usage) when a GPU
and the driver's NVML are present, else None. Every pynvml call is guarded:
any error turns the device view off for the recording.
(The pynvml path has never run on a GPU in this repository.)

The pool: the `pool=` argument; else the pool of `cache=` (an ElasticCache,
whose pool exists only after its first update, so it is looked up at each
sample); else ellm_alloc's enabled CUDA pool. With none of these, samples
carry the device view only.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator

from .config import human
from .stats import host_chunks_by_owner

__all__ = ["Recorder", "record", "render_frame", "nvml_view"]


# ---- the device view (pynvml) ------------------------------------------------------


class _Nvml:
    """A guarded NVML handle for one GPU. GPU-only code: never run on a GPU here."""

    def __init__(self, index: int = 0):
        self.ok = False
        self.handle = None
        try:
            import torch

            if not torch.cuda.is_available():
                return
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.ok = True
        except Exception:  # no driver, no NVML, no GPU, CPU build of torch: no device view
            self.ok = False

    def view(self) -> dict | None:
        if not self.ok:
            return None
        nv = self._nv
        try:
            info = nv.nvmlDeviceGetMemoryInfo(self.handle)
            mine = None
            try:
                for p in nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid == os.getpid():
                        mine = int(p.usedGpuMemory or 0)
            except Exception:
                mine = None  # some drivers refuse per-process figures (containers, MIG)
            return {"total": int(info.total), "used": int(info.used), "free": int(info.free),
                    "process_used": mine}
        except Exception:
            self.ok = False
            return None


def nvml_view(index: int = 0) -> dict | None:
    """One pynvml reading of GPU `index` (None without a GPU or NVML)."""
    return _Nvml(index).view()


# ---- sampling ------------------------------------------------------------------------


def _ledger(pool) -> dict:
    st = pool.stats()
    chunk = st["chunk_bytes"]
    owners: dict[str, int] = {}
    for o in pool.owners():  # owners may share a name (ElasticCache's full layers: "hf.full"): summed
        if o["active"]:
            owners[o["name"]] = owners.get(o["name"], 0) + o["held_chunks"] * chunk
    return {
        "owners": owners,
        "free": st["free_chunks"] * chunk,
        "created": st["created_chunks"] * chunk,
        "budget": st["budget_bytes"],
        "allocated": st["allocated_bytes"],
        "chunk": chunk,
        "host": _host_ledger(pool.host_tier()),
    }


def _host_ledger(host: dict) -> dict:
    chunk = host["chunk_bytes"]
    return {
        "owners": {name: n * chunk for name, n in host_chunks_by_owner(host).items()},
        "free": host["free_chunks"] * chunk,
        "created": host["created_chunks"] * chunk,
        "budget": host["budget_bytes"],
    }


class Recorder:
    """Collects samples of a pool's ledger. Thread-safe; see the module docstring."""

    def __init__(self, pool=None, cache=None, device_index: int = 0, nvml: bool = True,
                 events: bool = True, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._pool = pool
        self._cache = cache
        self.events = events
        self.every = every
        self.samples: list[dict] = []
        self.step: int | None = None
        self._t0 = time.perf_counter()
        self._nvml = _Nvml(device_index) if nvml else None
        self._lock = threading.Lock()
        self._event_count = 0

    @property
    def pool(self):
        if self._pool is not None:
            return self._pool
        if self._cache is not None:
            p = getattr(self._cache, "pool", None)
            if p is not None:
                return p
        from .integrations.torch_allocator import device_pool, enabled

        if enabled():
            self._pool = device_pool()
            return self._pool
        return None

    def sample(self, label: str = "", step: int | None = None) -> dict:
        pool = self.pool
        s: dict[str, Any] = {
            "time": time.perf_counter() - self._t0,
            "step": step if step is not None else self.step,
            "label": label,
        }
        if pool is not None and getattr(pool, "_handle", None):
            s.update(_ledger(pool))
        else:
            s.update(owners={}, free=0, created=0, budget=0, allocated=0, chunk=0,
                     host={"owners": {}, "free": 0, "created": 0, "budget": 0})
        s["device"] = self._nvml.view() if self._nvml is not None else None
        with self._lock:
            self.samples.append(s)
        return s

    def _event(self, label: str, pool) -> None:
        if pool is not self.pool and getattr(pool, "_handle", 0) != getattr(self.pool, "_handle", -1):
            return
        self._event_count += 1
        if self._event_count % self.every == 0:
            self.sample(label)

    def logits_processor(self):
        """A transformers LogitsProcessor sampling once per generate step."""
        from transformers import LogitsProcessor

        rec = self

        class _Sampler(LogitsProcessor):
            def __init__(self):
                self.start = None

            def __call__(self, input_ids, scores):
                if self.start is None:
                    self.start = input_ids.shape[-1]
                rec.step = input_ids.shape[-1] - self.start
                rec.sample("step")
                return scores

        return _Sampler()

    # figures over the recording
    def owner_names(self, host: bool = False) -> list[str]:
        """Owners seen in the samples, in first-seen order: of the device pool,
        or (host=True) those holding host-tier chunks."""
        names: list[str] = []
        for s in self.samples:
            for n in (s["host"]["owners"] if host else s["owners"]):
                if n not in names:
                    names.append(n)
        return names

    def host_tier_used(self) -> bool:
        """Whether the host tier was on (a budget) in any sample."""
        return any(s["host"]["budget"] for s in self.samples)

    def peak(self, owner: str | None = None) -> int:
        """Peak bytes of one owner, or of every owner together (None)."""
        if owner is None:
            return max((sum(s["owners"].values()) for s in self.samples), default=0)
        return max((s["owners"].get(owner, 0) for s in self.samples), default=0)


@contextlib.contextmanager
def record(pool=None, cache=None, *, nvml: bool = True, events: bool = True, every: int = 1
           ) -> Iterator[Recorder]:
    """Records the ledger while the block runs; yields the Recorder (see the module docstring)."""
    from .kv.space import PageSpace
    from .pool import Pool

    rec = Recorder(pool, cache, nvml=nvml, events=events, every=every)
    rec.sample("start")
    patched: list[tuple[type, str, Any]] = []
    if events:
        def wrap(cls, name, pool_of, changed=lambda out: True):
            orig = getattr(cls, name)

            def hooked(self, *a, **k):
                out = orig(self, *a, **k)
                if changed(out):
                    rec._event(f"{cls.__name__}.{name}", pool_of(self))
                return out

            hooked.__wrapped__ = orig
            setattr(cls, name, hooked)
            patched.append((cls, name, orig))

        wrap(PageSpace, "map", lambda sp: sp.pool)
        wrap(PageSpace, "unmap", lambda sp: sp.pool)
        wrap(PageSpace, "swap_out", lambda sp: sp.pool)
        wrap(PageSpace, "swap_in", lambda sp: sp.pool)
        # Polled while copies run: a sample only when some swap ended (pages changed tier).
        wrap(PageSpace, "finish_swaps", lambda sp: sp.pool, changed=lambda ended: ended > 0)
        wrap(Pool, "malloc", lambda p: p)
        wrap(Pool, "free", lambda p: p)
    try:
        yield rec
    finally:
        for cls, name, orig in reversed(patched):
            setattr(cls, name, orig)
        rec.sample("end")


# ---- a text frame (python -m ellm_alloc top) ------------------------------------------


def _bars(rows: list[tuple[str, int]], budget: int, width: int) -> list[str]:
    out = []
    for name, b in rows:
        n = round(width * b / budget)
        out.append(f"  {name:<18} {'#' * n:<{width}} {human(b):>10} {100 * b / budget:5.1f}%")
    return out


def render_frame(pool, title: str = "", width: int = 40, device: dict | None = None) -> str:
    """One text frame of the pool's ledger by owner, with bars against the budget."""
    lines = [title] if title else []
    if pool is not None:
        led = _ledger(pool)
        budget = led["budget"] or 1
        lines.append(f"pool {pool.backend}:{pool.device}  budget {human(led['budget'])}  "
                     f"chunk {human(led['chunk'])}  created {human(led['created'])}  "
                     f"arena allocated {human(led['allocated'])}")
        rows = list(led["owners"].items()) + [("(free chunks)", led["free"]),
                                               ("(not created)", max(0, led["budget"] - led["created"]))]
        lines += _bars(rows, budget, width)
        host = led["host"]
        if host["budget"]:
            lines.append(f"host tier (swapped-out KV)  budget {human(host['budget'])}  "
                         f"created {human(host['created'])}")
            rows = list(host["owners"].items()) + [("(free chunks)", host["free"]),
                                                   ("(not created)", max(0, host["budget"] - host["created"]))]
            lines += _bars(rows, host["budget"], width)
    if device is not None:
        mine = device.get("process_used")
        lines.append(f"device: used {human(device['used'])} of {human(device['total'])}, free "
                     f"{human(device['free'])}; this process "
                     f"{human(mine) if mine is not None else 'n/a'}")
    return "\n".join(lines)
