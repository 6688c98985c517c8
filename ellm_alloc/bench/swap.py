"""`bench swap`: the host tier's swap bandwidth against the copy it rests on,
and what a swap running beside it costs a decode step.

For each KV size a fresh pool (budget and cpu_budget both the size) maps a
PageSpace full of pages and:

  bound     the plain copy a swap cannot beat, timed in the same run on
            buffers of the same size. Host backend: one memcpy (ctypes.memmove)
            per chunk between two pre-faulted host buffers, single-threaded,
            which is exactly what the copy stream's worker thread does. CUDA:
            device <-> pinned host tensor.copy_(non_blocking=True) timed with
            CUDA events (cudaMemcpyAsync, as the swap's cuMemcpy*Async).
  swap out  swap_out() of every page until finish_swaps(wait=True) returns
  swap in   swap_in() of every page until finish_swaps(wait=True) returns
            (so both include the calls' own work: host-tier chunks, device
            mappings, events), checked bit-exact after every round trip.

Bound and swap alternate round by round, so drift of a shared machine hits
both alike. Round 0 is a warm-up and is reported apart as "cold": the first
swap-out touches the host tier's freshly allocated slabs. The timed rounds give the
median (and min / max); GB/s is 1e9 bytes per second; the ratio to the bound
is the goal (>= 0.8) and a miss is printed as such.

Decode latency: a fixed stand-in for one decode step (a chain of matmuls of a
batch-8 activation through square weights, on the pool's device) timed alone
and while a swap-out / swap-in of the largest size that fits is in flight. A
step counts as "during" only if the swap was still in flight when it ended,
so every such step overlapped the copy from start to end.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import statistics
import time

import torch

from ..config import human, parse_size
from ..pool import Pool
from ..kv.space import PageSpace, SWAPPED, PINNED

DEFAULT_SIZES = ("64MiB", "256MiB", "1GiB", "4GiB")
GOAL_RATIO = 0.8
# The decode-step stand-in: batch 8 through LAYERS square matmuls of HIDDEN.
# 4 x 2048^2 fp32 weights are 64 MiB read per step, memory bound like a real
# decode step, so it feels a swap's competing traffic.
BATCH, HIDDEN, LAYERS = 8, 2048, 4
MARGIN = 512 << 20  # memory left free for torch, the interpreter and the OS


class SwapMismatch(RuntimeError):
    """A page's bytes differ after a swap round trip."""


def parse_sizes(texts: list[str] | None, chunk: int) -> list[int]:
    """Byte sizes from '64MiB' or '64MiB,256MiB' forms; each a positive multiple of `chunk`."""
    out = []
    for text in texts or DEFAULT_SIZES:
        for part in str(text).split(","):
            if not part.strip():
                raise ValueError(f"--sizes: empty size in {text!r}")
            n = parse_size(part.strip(), "size")
            if n % chunk:
                raise ValueError(f"--sizes: {part.strip()} ({n} bytes) is not a multiple of the chunk size "
                                 f"{human(chunk)} ({chunk} bytes): a KV page is one chunk")
            out.append(n)
    return out


def _device(device: str) -> torch.device:
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        return torch.device("cuda", d.index or 0)
    return d


def _skip_reason(nbytes: int, dev: torch.device) -> str | None:
    """Why `nbytes` cannot run here now, or None. Bound and swap alternate, so
    their buffers are all live at once. Host: the bound's two buffers, the
    pool's memfd and the host tier, 4x the size. CUDA: the device 2x (bound
    buffer, pool), pinned host memory 2x (bound buffer, host tier)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None  # cannot tell: try
    host_need = (4 if dev.type == "cpu" else 2) * nbytes + MARGIN
    if avail and host_need > avail:
        return f"needs {human(host_need)} of host memory, {human(avail)} available"
    if dev.type == "cuda":  # never run on a GPU (none where this was written)
        free = torch.cuda.mem_get_info(dev)[0]
        if 2 * nbytes + MARGIN > free:
            return f"needs {human(2 * nbytes + MARGIN)} of device memory, {human(free)} free"
    return None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":  # never run on a GPU
        torch.cuda.synchronize(dev)


def _stream(dev: torch.device) -> int:
    """The caller's stream for swap_out / swap_in: torch's current one on CUDA."""
    return torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def _figures(xs: list[float], digits: int = 4) -> dict:
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs)}


# ---- the bound: out() and in_() each time one copy of the size ----

class HostBound:
    """One memmove per chunk between two host buffers, single-threaded: what
    the copy stream's worker thread does, minus the swap's bookkeeping. Both
    directions are the same host-to-host copy."""

    def __init__(self, nbytes: int, chunk: int):
        # fill: every page faulted in before timing, as the pool's chunks are
        self.src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        self.dst = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
        self.nbytes, self.chunk = nbytes, chunk

    def out(self) -> float:
        s, d = self.src.data_ptr(), self.dst.data_ptr()
        t0 = time.perf_counter()
        for off in range(0, self.nbytes, self.chunk):
            ctypes.memmove(d + off, s + off, self.chunk)
        return time.perf_counter() - t0

    in_ = out


class CudaBound:
    """cudaMemcpyAsync device -> pinned host (out) and back (in_), timed with
    CUDA events. Never run on a GPU (there was none where this was written)."""

    def __init__(self, nbytes: int, dev: torch.device):
        self.d = torch.full((nbytes,), 1, dtype=torch.uint8, device=dev)
        self.h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(2)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def out(self) -> float:
        return self._copy(self.h, self.d)

    def in_(self) -> float:
        return self._copy(self.d, self.h)


# ---- the pages' contents: page p holds template + p as int64 ----

def _fill(space: PageSpace, template: torch.Tensor) -> None:
    pages = space.bytes_view().view(torch.int64).view(space.n_pages, -1)
    for p in range(space.n_pages):
        pages[p].copy_(template + p)


def _verify(space: PageSpace, template: torch.Tensor, when: str) -> None:
    """Every page compared in full; distinct random words per page catch lost,
    shifted and exchanged pages alike."""
    pages = space.bytes_view().view(torch.int64).view(space.n_pages, -1)
    for p in range(space.n_pages):
        if space.state(p) != PINNED:
            raise SwapMismatch(f"{when}: page {p} is in state {space.state(p)}, not resident")
        if not torch.equal(pages[p], template + p):
            bad = (pages[p] != template + p).nonzero()[0].item()
            raise SwapMismatch(f"{when}: page {p} differs from what was written, first at byte "
                               f"{bad * 8} of {space.page_bytes}")


# ---- the decode-step stand-in ----

class DecodeStep:
    def __init__(self, dev: torch.device):
        g = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.dev = dev
        self.x = torch.randn(BATCH, HIDDEN, generator=g).to(dev, dtype)
        self.ws = [(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dev, dtype) for _ in range(LAYERS)]
        self.desc = {"batch": BATCH, "hidden": HIDDEN, "matmuls": LAYERS, "dtype": str(dtype).split(".")[-1],
                     "weight_bytes_per_step": LAYERS * HIDDEN * HIDDEN * self.x.element_size(),
                     "torch_threads": torch.get_num_threads()}

    def timed(self) -> float:
        _sync(self.dev)
        t0 = time.perf_counter()
        y = self.x
        for w in self.ws:
            y = y @ w
        _sync(self.dev)
        return time.perf_counter() - t0


def _decode_latency(space: PageSpace, step: DecodeStep, steps: int, template: torch.Tensor) -> dict:
    pages = list(range(space.n_pages))
    stream = _stream(step.dev)
    for _ in range(3):
        step.timed()
    # Alone: half before the swaps and half after, so drift hits both figures alike.
    alone = [step.timed() for _ in range(steps // 2)]
    during: dict[str, list[float]] = {"swap_out": [], "swap_in": []}
    rounds = 0
    # A round trip yields at least one step per direction unless the swap is
    # shorter than a step; stop trying after a bounded number of them.
    while min(map(len, during.values())) < steps and rounds < 2 * steps + 2:
        rounds += 1
        for direction in ("swap_out", "swap_in"):
            getattr(space, direction)(pages, stream)
            while space.stats()["swapping_pages"]:
                dt = step.timed()
                space.finish_swaps(wait=False)
                if space.stats()["swapping_pages"]:  # still in flight at the step's end
                    during[direction].append(dt)
            space.finish_swaps(wait=True)
    alone += [step.timed() for _ in range(steps - len(alone))]
    _verify(space, template, "after the decode-latency swaps")
    ms = lambda xs: _figures([x * 1e3 for x in xs])  # noqa: E731
    out = {"size_bytes": space.n_pages * space.page_bytes, "decode_step": step.desc, "swap_round_trips": rounds,
           "alone_ms": ms(alone)}
    for direction, xs in during.items():
        if xs:
            out[f"during_{direction}_ms"] = ms(xs)
            out[f"added_ms_{direction}"] = round((statistics.median(xs) - statistics.median(alone)) * 1e3, 4)
        else:
            out[f"during_{direction}_ms"] = None  # no step fitted inside one swap
            out[f"added_ms_{direction}"] = None
    return out


# ---- one size ----

def _measure(nbytes: int, dev: torch.device, repeats: int, progress, latency_steps: int | None) -> dict:
    label = human(nbytes)
    pool = Pool(f"cuda:{dev.index}" if dev.type == "cuda" else "cpu", budget=nbytes, cpu_budget=nbytes)
    space = None
    try:
        chunk = pool.stats()["chunk_bytes"]
        bound = CudaBound(nbytes, dev) if dev.type == "cuda" else HostBound(nbytes, chunk)
        space = PageSpace(pool, "kv", nbytes // chunk)
        space.map(0, space.n_pages)
        g = torch.Generator().manual_seed(nbytes)
        template = torch.randint(0, 1 << 62, (chunk // 8,), dtype=torch.int64, generator=g).to(dev)
        _fill(space, template)
        _sync(dev)
        pages, stream = list(range(space.n_pages)), _stream(dev)
        t_out, t_in, b_out, b_in = [], [], [], []
        # Bound and swap alternate round by round, so that drift of a shared
        # machine hits both alike. Round 0 warms both up and is not in the medians.
        for r in range(repeats + 1):
            progress(f"{label}: bound copies and swap round trip {r}/{repeats}"
                     + (" (cold, not in the median)" if r == 0 else ""))
            _sync(dev)
            b_out.append(bound.out())
            b_in.append(bound.in_())
            t0 = time.perf_counter()
            space.swap_out(pages, stream)
            space.finish_swaps(wait=True)
            t_out.append(time.perf_counter() - t0)
            st = space.stats()
            if st["mapped_pages"] or st["host_pages"] != space.n_pages or space.state(0) != SWAPPED:
                raise SwapMismatch(f"{label}: after finish_swaps(wait=True) {st['mapped_pages']} pages are "
                                   f"still mapped and {st['host_pages']} of {space.n_pages} are on the host")
            t0 = time.perf_counter()
            space.swap_in(pages, stream)
            space.finish_swaps(wait=True)
            t_in.append(time.perf_counter() - t0)
            _verify(space, template, f"{label}, round trip {r}")
        del bound  # its buffers are not needed any more (the latency runs)
        res = {"size_bytes": nbytes, "pages": space.n_pages, "chunk_bytes": chunk, "bit_exact": True}
        for name, ts, bs in (("swap_out", t_out, b_out), ("swap_in", t_in, b_in)):
            gbs = [nbytes / t / 1e9 for t in ts[1:]]
            bgbs = [nbytes / t / 1e9 for t in bs[1:]]
            res[name] = {"gb_s": _figures(gbs), "bound_gb_s": _figures(bgbs),
                         "ratio_to_bound": round(statistics.median(gbs) / statistics.median(bgbs), 4),
                         "cold_gb_s": round(nbytes / ts[0] / 1e9, 4),
                         "seconds": [round(t, 6) for t in ts[1:]], "bound_seconds": [round(t, 6) for t in bs[1:]]}
        if latency_steps:
            progress(f"{label}: decode-step latency, {latency_steps} steps alone and during each swap direction")
            res["decode_latency"] = _decode_latency(space, DecodeStep(dev), latency_steps, template)
        return res
    finally:
        if space is not None:
            space.close()
        pool.close()


def _machine(dev: torch.device) -> dict:
    facts = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
             "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if dev.type == "cuda":  # never run on a GPU
        from .gpu import _device_facts

        facts.update(_device_facts())
    else:
        facts.update(device="cpu (host backend)", driver="none (host backend: memfd chunks, copy-stream thread)")
    return facts


def run(sizes: list[str] | None = None, device: str = "cpu", repeats: int = 3, latency_steps: int = 20,
        progress=None, command: str = "python -m ellm_alloc.bench swap") -> dict:
    """Measures every size (skipping, with the reason, one that cannot fit)
    and returns the report, conditions included. ValueError for bad arguments,
    SwapMismatch if a round trip is not bit-exact."""
    for name, v in (("repeats", repeats), ("steps", latency_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--{name} must be a positive int, got {v!r}")
    dev = _device(device)
    progress = progress or (lambda msg: None)
    probe = Pool(f"cuda:{dev.index}" if dev.type == "cuda" else "cpu", budget=1 << 30)
    chunk = probe.stats()["chunk_bytes"]
    probe.close()
    nbytes_list = parse_sizes(sizes, chunk)
    skips = {n: _skip_reason(n, dev) for n in nbytes_list}
    fitting = [n for n in nbytes_list if skips[n] is None]
    results = []
    for n in nbytes_list:
        if skips[n]:
            progress(f"{human(n)}: skipped, {skips[n]}")
            results.append({"size_bytes": n, "skipped": skips[n]})
            continue
        results.append(_measure(n, dev, repeats, progress,
                                latency_steps if fitting and n == max(fitting) else None))
    latency = next((r.pop("decode_latency") for r in results if "decode_latency" in r), None)
    misses = [f"{name} at {human(r['size_bytes'])}: {r[name]['ratio_to_bound']:.3f}"
              for r in results if "skipped" not in r for name in ("swap_out", "swap_in")
              if r[name]["ratio_to_bound"] < GOAL_RATIO]
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(dev),
        "report": {
            "device": str(dev),
            "chunk_bytes": chunk,
            "repeats": repeats,
            "units": "GB/s = 1e9 bytes/s; medians over the timed rounds (round 0 is the cold one)",
            "bound_method": ("cudaMemcpyAsync device <-> pinned host (tensor.copy_ non_blocking), CUDA events"
                             if dev.type == "cuda" else
                             "ctypes.memmove per chunk between two pre-faulted host buffers (single thread)"),
            "goal_ratio_to_bound": GOAL_RATIO,
            "goal_misses": misses,
            "results": results,
            "decode_latency": latency,
        },
    }


def print_report(doc: dict) -> None:
    r = doc["report"]
    m = doc["machine"]
    print(f"swap: KV pages of {human(r['chunk_bytes'])} to the host tier and back on {m['device']} "
          f"({m['cpu']}, {m['cores']} cores, torch {m['torch']}); median of {r['repeats']} round trips "
          f"after a cold one; bound: {r['bound_method']}")
    print(f"  {'size':>10} {'direction':>9} {'GB/s':>7} {'min':>7} {'max':>7} {'bound':>7} {'ratio':>6}"
          f" {'cold':>7}")
    for x in r["results"]:
        if "skipped" in x:
            print(f"  {human(x['size_bytes']):>10} skipped: {x['skipped']}")
            continue
        for name in ("swap_out", "swap_in"):
            d = x[name]
            mark = "" if d["ratio_to_bound"] >= r["goal_ratio_to_bound"] else "  < goal"
            print(f"  {human(x['size_bytes']):>10} {name[5:]:>9} {d['gb_s']['median']:7.2f} {d['gb_s']['min']:7.2f}"
                  f" {d['gb_s']['max']:7.2f} {d['bound_gb_s']['median']:7.2f} {d['ratio_to_bound']:6.3f}"
                  f" {d['cold_gb_s']:7.2f}{mark}")
    print(f"  bit-exact after every round trip: yes; goal ratio >= {r['goal_ratio_to_bound']}: "
          + ("met" if not r["goal_misses"] else "MISSED for " + "; ".join(r["goal_misses"])))
    lat = r["decode_latency"]
    if lat is None:
        print("  decode latency: not measured (no size fits)")
        return
    s = lat["decode_step"]
    print(f"  decode step ({s['matmuls']} matmuls {s['batch']}x{s['hidden']} @ {s['hidden']}x{s['hidden']} "
          f"{s['dtype']}, {s['torch_threads']} torch threads) beside a {human(lat['size_bytes'])} swap, ms:")
    for key, label in (("alone_ms", "alone"), ("during_swap_out_ms", "during swap-out"),
                       ("during_swap_in_ms", "during swap-in")):
        f = lat[key]
        if f is None:
            print(f"    {label:<16} no step fitted inside one swap")
            continue
        added = "" if key == "alone_ms" else f"   added {lat['added_ms_' + key[7:-3]]:+.3f}"
        print(f"    {label:<16} median {f['median']:8.3f}  min {f['min']:8.3f}  max {f['max']:8.3f}"
              f"  (n={f['n']}){added}")
