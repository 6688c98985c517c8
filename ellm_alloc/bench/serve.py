"""`bench serve`: a request trace through transformers' continuous batching, stock and elastic, at one KV budget.

    python -m ellm_alloc.bench serve --model llama3-8b --trace benchmarks/workloads/serve/chat.json \\
        [--budget 128MiB] [--max-requests N] [--json] [--timeline PNG]

Modes, run one after the other in one process on the same model:

  stock        (a) transformers' ContinuousBatchingManager as shipped, its
               paged cache sized for the budget through its own knobs
               (below).
  elastic      (b) the same manager after ellm_alloc.serving.elastic(model,
               budget=...): its paged cache is an ElasticPagedAttentionCache
               on a pool of that budget; transformers' FIFO scheduler.
  elastic+slo  (c) the elastic cache with the SLO-aware scheduler
               (serving/scheduler.py) aiming at --ttft-ms / --tpot-ms, and a
               host tier as large as the budget to swap preempted requests
               to. Its preemptions, swaps and recomputed tokens are its own
               decision counts (reported in full under "decisions").

How the stock cache is given the budget. Its paged cache is one tensor of
(num_sectors + 2) sectors (two trash sectors); `num_blocks` in the
ContinuousBatchingConfig is its capacity in whole-model blocks of
`page_size` tokens, which transformers rounds up to whole sectors. The bench
computes the sector and block sizes transformers will use for this model and
dtype and sets num_blocks to the most that keeps the whole tensor, trash
sectors included, within the budget; the tensor transformers then allocates
is read back and reported (`kv_tensor_bytes`). num_blocks set, transformers
does not size the cache from free memory (max_memory_percent only enters its
footprint check). Both modes get the same page_size (the elastic cache's
block size), max_batch_tokens and scheduler ("fifo", its default safety
margin). CPU offloading of preempted requests (cpu_offload_space) exists in
transformers 5.24; it needs pinned host memory, which torch refuses without
an accelerator, so on CPU it is off (the report says so) and on a GPU it is
as large as the budget. The elastic cache recomputes preempted requests.

The trace (JSON; shipped ones in benchmarks/workloads/serve/, made by
benchmarks/make_serve_traces.py):

  {"name": str, "description": str, "arrival_unit": "s",
   "requests": [{"arrival": 0.25, "prompt": 310, "output": 85}, ...]}

`arrival` is in seconds from the start of the replay (multiplied by
--time-scale), `prompt` and `output` token counts. Prompt tokens are random
ids (seeded, the same in every mode); every request generates exactly
`output` tokens (greedy, no EOS). Requests arriving at 0 are queued before
the manager starts; a replay thread adds the others at their arrival times
to the running manager.

The model: generate.py's random-weight model of the preset's KV shape,
scaled down for CPU (one period of the layer pattern, hidden 512, float32 on
CPU), built once and used by every mode.

What is measured, per mode:

  * per-token times: each request streams its tokens with transformers'
    per-token timestamps. TTFT = first token - arrival time in the trace
    (queueing included); TPOT = (last token - first token) / (tokens - 1).
    p50 / p99 over requests (linear interpolation). SLO attainment: the
    fraction of requests with TTFT <= --ttft-ms and TPOT <= --tpot-ms.
  * output_tokens_per_s: all generated tokens / (last token - replay start).
  * preemptions: requests transformers' offloading manager evicted to make
    room (observed on the batch processor instance: its active requests
    before and after each call); recomputed_tokens: the KV tokens a soft
    reset threw away (the request's length at eviction), 0 for a request
    copied to CPU.
  * peak_kv_bytes: stock, the bytes of its cache tensor, allocated once and
    held for the whole run; elastic, the pool ledger's peak chunks of each
    KV group, summed (exact for one group, an upper bound for several).
    peak_kv_bytes_in_use: read after every batch is scheduled (its blocks
    allocated): stock, the bytes of the sectors its allocators hold;
    elastic, the KV manager's mapped chunk bytes.
  * peak_activation_bytes: the pool arena's peak allocated bytes minus the
    weights (and minus the stock cache tensor) when torch allocates from an
    ellm_alloc pool (enable() on a GPU); on CPU torch's own allocator serves
    activations and nothing is measured (null, with the reason).

--timeline PNG: each elastic mode's pool ledger over time (ellm_alloc's
telemetry, sampled at every chunk map / unmap and every step): bytes per KV
group, the host tier, the arena (activations, when torch allocates from the
pool) and the free chunks; elastic+slo's goes to PNG's name with "-slo".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from array import array
from dataclasses import dataclass
from math import ceil, lcm
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import human, parse_size
from . import generate as gen

TRACES = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads" / "serve"
DEFAULT_PAGE_SIZE = 256  # transformers' ContinuousBatchingConfig default
DEFAULT_MAX_BATCH_TOKENS = 8192  # transformers' default when the config sets none
DEFAULT_MAX_BATCH_PROMPT = 2048
DEFAULT_MAX_BATCH_OUTPUT = 16
DEFAULT_TTFT_MS = 2000.0
DEFAULT_TPOT_MS = 200.0
PROMPT_SEED = 1
# Below the model's special ids (pad 0, bos 1, eos 2), never sampled for prompts.
FIRST_PROMPT_ID = 3


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the problem."""


@dataclass(frozen=True)
class TraceRequest:
    id: str
    arrival: float  # seconds from the start of the replay, before --time-scale
    prompt: int
    output: int


# ---- the trace ----------------------------------------------------------------------------


def load_trace(path: str | Path, max_requests: int | None = None) -> dict:
    """{"name", "description", "requests": [TraceRequest, ...] in arrival order}.
    Raises TraceError naming the file and the first problem."""
    where = f"trace {path}"
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{where}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(doc, dict):
        raise TraceError(f"{where}: must be a JSON object with 'requests', got {type(doc).__name__}")
    if doc.get("arrival_unit") != "s":
        raise TraceError(f"{where}: 'arrival_unit' must be \"s\" (arrivals in seconds), got "
                         f"{doc.get('arrival_unit')!r}; bench kv's workloads count decode steps instead")
    raw = doc.get("requests")
    if not isinstance(raw, list) or not raw:
        raise TraceError(f"{where}: 'requests' must be a non-empty list")
    requests, ids = [], set()
    for i, r in enumerate(raw):
        at = f"{where}: request {i}"
        if not isinstance(r, dict):
            raise TraceError(f"{at}: must be an object, got {type(r).__name__}")
        unknown = sorted(set(r) - {"id", "arrival", "prompt", "output"})
        if unknown:
            raise TraceError(f"{at}: unknown field(s) {', '.join(map(repr, unknown))}")
        arrival = r.get("arrival")
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not math.isfinite(arrival) \
                or arrival < 0:
            raise TraceError(f"{at}: 'arrival' must be a number of seconds >= 0, got {arrival!r}")
        for key in ("prompt", "output"):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TraceError(f"{at}: {key!r} must be an int >= 1, got {v!r}")
        rid = r.get("id", f"r{i}")
        if not isinstance(rid, str) or not rid or "\x00" in rid:
            raise TraceError(f"{at}: 'id' must be a non-empty string without NUL, got {rid!r}")
        if rid in ids:
            raise TraceError(f"{at}: duplicate id {rid!r}")
        ids.add(rid)
        requests.append(TraceRequest(rid, float(arrival), r["prompt"], r["output"]))
    requests.sort(key=lambda q: q.arrival)  # stable: file order among equal arrivals
    if max_requests is not None:
        requests = requests[:max_requests]
    return {"name": str(doc.get("name") or Path(path).stem), "description": str(doc.get("description", "")),
            "requests": requests}


def prompt_ids(requests: list[TraceRequest], vocab_size: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return {r.id: torch.randint(FIRST_PROMPT_ID, vocab_size, (r.prompt,), generator=g).tolist() for r in requests}


# ---- the stock engine's configuration for a budget ------------------------------------------


def stock_geometry(config: Any, dtype: torch.dtype, page_size: int) -> dict:
    """The sector and block sizes transformers' PagedAttentionCache derives
    for this model (computed from its allocators, nothing allocated)."""
    from transformers.generation.continuous_batching.cache import (
        ATTN_TYPE_TO_ALLOCATOR,
        FullAttentionCacheAllocator,
        group_layers_by_attn_type,
    )
    from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

    kv_heads = find_num_key_value_heads(config)
    allocators = [ATTN_TYPE_TO_ALLOCATOR[t](index=i, config=config, num_key_value_heads=kv_heads, cache_dtype=dtype,
                                            page_size=page_size, layer_indices=layers, allow_block_sharing=False)
                  for i, (t, layers) in enumerate(group_layers_by_attn_type(config).items())]
    model_block = config.num_hidden_layers * FullAttentionCacheAllocator.get_bytes_per_page(
        kv_heads, find_head_dim(config), dtype, page_size)
    return {"bytes_per_sector": lcm(*(a.bytes_per_block for a in allocators), 128),
            "bytes_per_model_block": model_block, "trash_sectors": 2}


def stock_num_blocks(geometry: dict, budget: int) -> int:
    """The largest num_blocks whose cache tensor (sectors rounded up, plus the
    trash sectors) fits in `budget` bytes; 0 when not even one sector does."""
    sector, block = geometry["bytes_per_sector"], geometry["bytes_per_model_block"]
    sectors = budget // sector - geometry["trash_sectors"]
    return max(0, sectors * sector // block)


def stock_tensor_bytes(geometry: dict, num_blocks: int) -> int:
    """What transformers allocates for num_blocks (its own rounding)."""
    sector = geometry["bytes_per_sector"]
    return (max(1, ceil(num_blocks * geometry["bytes_per_model_block"] / sector)) + geometry["trash_sectors"]) * sector


# ---- observing one engine ---------------------------------------------------------------------


class _EngineObserver:
    """Counts steps and preemptions and reads KV bytes on one batch
    processor, by wrapping two of that instance's methods (the classes are
    untouched): prepare_next_batch (after it, the step's blocks are
    allocated: the moment KV is at its largest) and the offloading
    manager's offload_requests (the one place transformers evicts)."""

    def __init__(self, processor: Any, kv_bytes: Callable[[Any], int], on_step: Callable[[], None] | None = None):
        self.steps = 0
        self.preemptions = 0
        self.offloaded_to_cpu = 0
        self.recomputed_tokens = 0
        self.peak_kv_bytes = 0
        self.peak_decoding = 0  # requests decoding together (their prompts prefilled, their KV held)
        from transformers.generation.continuous_batching.requests import RequestStatus

        self._kv_bytes = kv_bytes
        self._on_step = on_step
        prepare = processor.prepare_next_batch
        offloading = processor.offloading_manager
        offload = offloading.offload_requests
        scheduler = processor.scheduler

        def prepare_next_batch() -> bool:
            ready = prepare()
            if ready:
                self.steps += 1
                decoding = sum(st.status == RequestStatus.DECODING for st in scheduler.active_requests.values())
                self.peak_decoding = max(self.peak_decoding, decoding)
                self.peak_kv_bytes = max(self.peak_kv_bytes, self._kv_bytes(processor.cache))
                if self._on_step is not None:
                    self._on_step()
            return ready

        def offload_requests() -> bool:
            before = {rid: s.current_len() for rid, s in scheduler.active_requests.items()}
            out = offload()
            for rid, length in before.items():
                if rid in scheduler.active_requests or rid not in scheduler.waiting_requests:
                    continue  # still running, or finished
                self.preemptions += 1
                if scheduler.waiting_requests[rid].is_cpu_offloaded:
                    self.offloaded_to_cpu += 1
                else:
                    self.recomputed_tokens += length
            return out

        processor.prepare_next_batch = prepare_next_batch
        offloading.offload_requests = offload_requests


def _stock_kv_in_use(cache: Any) -> int:
    return (cache.pool.num_sectors - cache.pool.num_free_sectors) * cache.bytes_per_sector


def _elastic_kv_mapped(cache: Any) -> int:
    return cache.kv.mapped_bytes()


# ---- one replay ---------------------------------------------------------------------------------


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _digest(tokens: list[int]) -> str:
    return hashlib.sha1(array("q", tokens).tobytes()).hexdigest()[:16]


def replay(model: Any, requests: list[TraceRequest], prompts: dict[str, list[int]], cb_config: Any,
           label: str, kv_bytes: Callable[[Any], int], *, time_scale: float = 1.0,
           progress: Callable[[str], None] | None = None, on_step: Callable[[], None] | None = None,
           on_processor: Callable[[Any], None] | None = None) -> dict:
    """Replays `requests` through a fresh ContinuousBatchingManager on
    `model`; returns per-request token times and tokens and the observer's
    counts. Raises RuntimeError when a request fails or the engine stops."""
    from transformers import GenerationConfig

    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                  max_new_tokens=max(r.output for r in requests))
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    # Builds the batch processor (and its paged cache) here rather than in the
    # generation thread, so that it can be observed from its first step. On
    # CPU this does no model work (no graphs to capture).
    manager.warmup()
    processor = manager.batch_processor
    observer = _EngineObserver(processor, kv_bytes, on_step)
    if on_processor is not None:
        on_processor(processor)
    times: dict[str, list[float]] = {r.id: [] for r in requests}
    tokens: dict[str, list[int]] = {r.id: [] for r in requests}
    stop = threading.Event()

    def add(r: TraceRequest) -> None:
        manager.add_request(prompts[r.id], request_id=r.id, max_new_tokens=r.output, streaming=True,
                            record_timestamps=True, eos_token_id=-1)

    def feed(later: list[TraceRequest]) -> None:
        for r in later:
            if stop.wait(max(0.0, t0 + r.arrival * time_scale - time.perf_counter())):
                return
            add(r)

    at_start = [r for r in requests if r.arrival == 0]
    later = [r for r in requests if r.arrival > 0]
    t0 = time.perf_counter()
    for r in at_start:
        add(r)
    manager.start()
    feeder = threading.Thread(target=feed, args=(later,), name=f"bench-serve-{label}-arrivals", daemon=True)
    feeder.start()
    done: set[str] = set()
    last_report = t0
    try:
        while len(done) < len(requests):
            out = manager.get_result(timeout=0.5)
            now = time.perf_counter()
            if out is None:
                if not manager.is_running():
                    raise RuntimeError(f"{label}: the generation loop stopped with {len(requests) - len(done)} "
                                       f"requests unfinished ({manager.background_thread_status.fatal_error})")
                continue
            rid = out.request_id
            if out.error is not None:
                raise RuntimeError(f"{label}: request {rid!r} failed: {out.error}")
            new = len(out.generated_tokens) - len(tokens[rid])
            if new > 0:
                stamps = out.timestamps or []
                times[rid].extend(stamps[-new:] if len(stamps) >= new else [now] * new)
                tokens[rid] = list(out.generated_tokens)
            if out.is_finished():
                done.add(rid)
            if progress is not None and (now - last_report > 5 or len(done) == len(requests)):
                last_report = now
                progress(f"  {label}: {len(done)}/{len(requests)} requests done, {now - t0:.1f} s, "
                         f"{observer.steps} steps, {observer.preemptions} preemptions")
    finally:
        stop.set()
        feeder.join()
        manager.stop(block=True, timeout=60)
        manager.destroy()
    return {"t0": t0, "times": times, "tokens": tokens, "observer": observer}


def summarize(requests: list[TraceRequest], run: dict, ttft_ms: float, tpot_ms: float, time_scale: float) -> dict:
    """The figures of one replay (see the module docstring)."""
    t0, obs = run["t0"], run["observer"]
    per_request, ttfts, tpots, met = [], [], [], 0
    last = t0
    total = 0
    for r in requests:
        ts = run["times"][r.id]
        toks = run["tokens"][r.id]
        if len(toks) != r.output:
            raise RuntimeError(f"request {r.id!r} generated {len(toks)} tokens, the trace asks for {r.output}")
        ttft = (ts[0] - (t0 + r.arrival * time_scale)) * 1e3
        tpot = (ts[-1] - ts[0]) / (len(ts) - 1) * 1e3 if len(ts) > 1 else None
        ttfts.append(ttft)
        if tpot is not None:
            tpots.append(tpot)
        met += ttft <= ttft_ms and (tpot is None or tpot <= tpot_ms)
        last = max(last, ts[-1])
        total += len(toks)
        per_request.append({"id": r.id, "arrival_s": r.arrival, "prompt": r.prompt, "output": r.output,
                            "ttft_ms": round(ttft, 2), "tpot_ms": None if tpot is None else round(tpot, 3),
                            "tokens_digest": _digest(toks)})
    span = last - t0

    def pcts(xs: list[float]) -> dict:
        return {"p50": _round(_percentile(xs, 0.5)), "p99": _round(_percentile(xs, 0.99)),
                "mean": _round(sum(xs) / len(xs)) if xs else None}

    return {
        "wall_s": round(span, 3),
        "steps": obs.steps,
        "output_tokens": total,
        "output_tokens_per_s": round(total / span, 2) if span > 0 else None,
        "ttft_ms": pcts(ttfts),
        "tpot_ms": pcts(tpots),
        "slo_attainment": round(met / len(requests), 4),
        "preemptions": obs.preemptions,
        "offloaded_to_cpu": obs.offloaded_to_cpu,
        "recomputed_tokens": obs.recomputed_tokens,
        "peak_concurrent_decoding": obs.peak_decoding,
        "requests": per_request,
    }


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# ---- activations, where the pool sees them ---------------------------------------------------


class _ActivationReading:
    """Peak activation bytes from the pool arena, when torch allocates from an
    ellm_alloc pool on the model's device (enable()); None otherwise."""

    def __init__(self, model: Any):
        from ..integrations.torch_allocator import device_pool, enabled_device

        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        self.arena = device_pool(model.device) if enabled_device() == model.device.type else None
        self.method = (
            "pool arena's peak allocated bytes over the replay, minus the weights"
            + " (and minus the stock cache tensor, which the arena also holds)"
            if self.arena is not None else
            "not measured: torch's own CPU allocator serves activations here, not an ellm_alloc pool (on a GPU "
            "with ellm_alloc.enable() the pool arena's peak allocated bytes minus weights are reported)"
        )

    def start(self) -> None:
        if self.arena is not None:
            if self.arena.device_type == "cuda":  # GPU-only path: never run on a GPU in this repository
                torch.cuda.synchronize()
            self.arena.reset_peaks()

    def peak(self, minus: int = 0) -> int | None:
        if self.arena is None:
            return None
        return max(0, self.arena.stats()["allocated_peak"] - self.weights - minus)


# ---- the whole comparison -----------------------------------------------------------------------


def request_kv_bytes(spec: Any, tokens: int, block_size: int, chunk: int = 2 << 20) -> int:
    """KV bytes a lone request of `tokens` holds at its largest (sliding layers: their window)."""
    from ..kv.layout import plan_layout
    from ..serving.paged_cache import blocks_alone

    return sum(blocks_alone(g, tokens) * g.padded_small_bytes for g in plan_layout(spec, block_size, chunk).groups)


def default_budget(spec: Any, requests: list[TraceRequest], block_size: int, chunk: int = 2 << 20) -> int:
    """Half the KV the trace would hold if every request were resident at its
    full length at once (so that arrivals compete for memory), but at least
    what its longest request needs alone plus a trash block per group, in
    whole chunks."""
    from ..kv.layout import plan_layout

    layout = plan_layout(spec, block_size, chunk)

    def need(tokens: int) -> int:
        return request_kv_bytes(spec, tokens, block_size, chunk)

    trash = sum(g.padded_small_bytes for g in layout.groups)
    half_all = sum(need(r.prompt + r.output) for r in requests) // 2
    longest = max(need(r.prompt + r.output) for r in requests) + trash
    # the stock tensor spends two sectors on trash; leave it room for the longest request too
    return ceil(max(half_all, 2 * longest) / chunk) * chunk


@dataclass
class Setting:
    """What every mode of one bench serve run shares."""

    model: Any
    requests: list[TraceRequest]
    prompts: dict[str, list[int]]
    budget: int
    page_size: int
    max_batch_tokens: int
    ttft_ms: float
    tpot_ms: float
    time_scale: float
    activations: "_ActivationReading"
    title: str
    timeline: str | None = None
    progress: Callable[[str], None] | None = None

    def cb_config(self, **kw: Any) -> Any:
        """The continuous batching config every engine shares, plus `kw`."""
        from transformers import ContinuousBatchingConfig

        return ContinuousBatchingConfig(**{"page_size": self.page_size, "max_batch_tokens": self.max_batch_tokens,
                                           "scheduler_type": "fifo", **kw})

    def timeline_path(self, mode: str) -> str | None:
        """Where an elastic mode's timeline goes: --timeline for the FIFO
        one, the same name with '-slo' before the suffix for the SLO-aware one."""
        if not self.timeline or mode == "elastic":
            return self.timeline
        path = Path(self.timeline)
        return str(path.with_name(f"{path.stem}-slo{path.suffix or '.png'}"))

    def replay(self, label: str, config: Any, kv_bytes: Callable[[Any], int], **kw: Any) -> dict:
        return replay(self.model, self.requests, self.prompts, config, label, kv_bytes, time_scale=self.time_scale,
                      progress=self.progress, **kw)

    def summarize(self, run_: dict) -> dict:
        return summarize(self.requests, run_, self.ttft_ms, self.tpot_ms, self.time_scale)


def _resolved(processor: Any) -> dict:
    """The configuration transformers resolved for this batch processor."""
    c = processor.cb_config
    return {"page_size": c.page_size, "max_batch_tokens": c.max_batch_tokens, "scheduler_type": c.scheduler_type,
            "safety_margin": processor.scheduler.safety_margin, "max_requests_per_batch": c.max_requests_per_batch,
            "use_async_batching": c.use_async_batching, "max_memory_percent": c.max_memory_percent,
            "allow_block_sharing": c.allow_block_sharing}


def stock_mode(s: Setting) -> tuple[dict, dict]:
    """transformers' engine as shipped, its cache tensor sized to the budget."""
    geometry = stock_geometry(s.model.config.get_text_config(), s.model.dtype, s.page_size)
    num_blocks = stock_num_blocks(geometry, s.budget)  # run() checked that the longest request fits
    if s.model.device.type == "cpu":
        offload_gib, offload = 0.0, ("off: transformers' CPU swap pool is pinned memory, which torch refuses "
                                     "without an accelerator")
    else:  # GPU-only path: never run on a GPU in this repository
        offload_gib, offload = s.budget / 2**30, "on, as large as the KV budget"
    seen: dict[str, Any] = {}

    def keep(processor: Any) -> None:
        c = processor.cache
        seen.update(_resolved(processor), tensor=c.cache_tensor.numel() * c.cache_tensor.element_size(),
                    num_sectors=c.num_sectors, bytes_per_sector=c.bytes_per_sector)

    s.activations.start()
    run_ = s.replay("stock", s.cb_config(num_blocks=num_blocks, cpu_offload_space=offload_gib), _stock_kv_in_use,
                    on_processor=keep)
    tensor = seen.pop("tensor")
    if tensor != stock_tensor_bytes(geometry, num_blocks) or tensor > s.budget:
        raise RuntimeError(f"the stock cache tensor is {tensor} B, not the {stock_tensor_bytes(geometry, num_blocks)}"
                           f" B expected within the {s.budget} B budget")
    r = s.summarize(run_)
    r.update(
        engine="transformers ContinuousBatchingManager, stock PagedAttentionCache, FIFO scheduler",
        configuration={**seen, "num_blocks": num_blocks, "trash_sectors": geometry["trash_sectors"],
                       "bytes_per_model_block": geometry["bytes_per_model_block"],
                       "cpu_offload_space_gib": offload_gib, "cpu_offload": offload,
                       "attn_implementation": s.model.config._attn_implementation},
        kv_tensor_bytes=tensor,
        peak_kv_bytes=tensor,
        peak_kv_bytes_in_use=run_["observer"].peak_kv_bytes,
        peak_activation_bytes=s.activations.peak(minus=tensor),
    )
    return r, run_["tokens"]


def elastic_mode(s: Setting) -> tuple[dict, dict]:
    """The same engine after ellm_alloc.serving.elastic(model, budget=...)."""
    return _elastic(s, slo_aware=False)


def elastic_slo_mode(s: Setting) -> tuple[dict, dict]:
    """The elastic cache with the SLO-aware scheduler, a host tier as large as the budget."""
    return _elastic(s, slo_aware=True)


def _elastic(s: Setting, slo_aware: bool) -> tuple[dict, dict]:
    from ..pool import Pool
    from ..serving import SLO, elastic

    label = "elastic+slo" if slo_aware else "elastic"
    # The SLO-aware scheduler swaps preempted requests to a host tier the
    # size of the budget, as the stock engine's CPU swap pool is on a GPU.
    kw: dict[str, Any] = dict(block_size=s.page_size)
    if slo_aware:
        kw["slo"] = SLO(ttft_ms=s.ttft_ms, tpot_ms=s.tpot_ms)
    cpu_budget = s.budget if slo_aware else 0
    if s.model.device.type == "cpu":
        serving = elastic(s.model, budget=s.budget, cpu_budget=cpu_budget or None, **kw)
    else:  # GPU-only path, never run on a GPU in this repository: elastic() takes a pool, not a budget, there
        serving = elastic(s.model, pool=Pool(str(s.model.device), budget=s.budget, cpu_budget=cpu_budget), **kw)
    try:
        for q in s.requests:  # refused here, not inside the generation thread
            serving.check_fits(q.prompt + q.output, request_id=q.id, block_size=s.page_size)
        seen: dict[str, Any] = {}
        timeline = s.timeline_path(label)
        with contextlib.ExitStack() as stack:
            recorder = None
            if timeline:
                from ..telemetry import record

                recorder = stack.enter_context(record(pool=serving.pool, nvml=False))
            s.activations.start()
            config = s.cb_config(scheduler_type="ellm_slo") if slo_aware else s.cb_config()
            run_ = s.replay(label, config, _elastic_kv_mapped,
                            on_processor=lambda processor: seen.update(_resolved(processor)),
                            on_step=None if recorder is None else lambda: recorder.sample("step"))
        chunk = serving.pool.stats()["chunk_bytes"]
        # Each KV group's peak from the pool's ledger: it also sees chunks
        # mapped and unmapped again within a step, which a reading between
        # steps misses. Their sum is the exact peak for one group, an upper
        # bound for several (their peaks need not coincide).
        by_group = {o["name"]: o["peak_chunks"] * chunk for o in serving.pool.owners() if o["name"] != "arena"}
        r = s.summarize(run_)
        scheduler = "SLO-aware scheduler (ellm_slo)" if slo_aware else "FIFO scheduler"
        r.update(
            engine=f"transformers ContinuousBatchingManager, ellm_alloc ElasticPagedAttentionCache, {scheduler}",
            configuration={**seen, "pool_budget_bytes": s.budget, "chunk_bytes": chunk,
                           "host_tier_bytes": cpu_budget,
                           "cpu_offload": ("preempted requests swapped to the pool's host tier when cheaper than "
                                           "recomputing" if slo_aware else "none: preempted requests are recomputed"),
                           "attn_implementation": s.model.config._attn_implementation},
            peak_kv_bytes=max(sum(by_group.values()), run_["observer"].peak_kv_bytes),
            peak_kv_bytes_exact=len(by_group) == 1,
            peak_kv_bytes_in_use=run_["observer"].peak_kv_bytes,
            peak_kv_bytes_by_group=by_group,
            kv_maps=serving.usage().get("maps"), kv_unmaps=serving.usage().get("unmaps"),
            peak_activation_bytes=s.activations.peak(),
        )
        if slo_aware:  # its own preemptions: the engine's offloading manager never runs
            d = serving.decisions()
            r.update(decisions=d, preemptions=d.get("preempted_swap", 0) + d.get("preempted_recompute", 0),
                     offloaded_to_cpu=d.get("preempted_swap", 0), recomputed_tokens=d.get("recomputed_tokens", 0),
                     swapped_out_bytes=d.get("swapped_out_bytes", 0))
        if recorder is not None:
            from ..plot import plot_timeline

            plot_timeline(recorder, timeline, x="time", title=f"bench serve, {label}: {s.title}")
            r["timeline"] = {"path": str(timeline), "samples": len(recorder.samples),
                             "series": recorder.owner_names() + ["free chunks"],
                             "activations": "in the arena series only when torch allocates from the pool "
                                            "(enable()); on CPU they are not in the pool"}
    finally:
        serving.close()
        if not serving.own_pool:
            serving.pool.close()
    return r, run_["tokens"]


#: The engines compared, in the order they run: (a) stock, (b) elastic with
#: transformers' FIFO scheduler, (c) elastic with the SLO-aware scheduler.
MODES: dict[str, Callable[[Setting], tuple[dict, dict]]] = {
    "stock": stock_mode, "elastic": elastic_mode, "elastic+slo": elastic_slo_mode}
ELASTIC_MODES = ("elastic", "elastic+slo")
RATIO_KEYS = ("output_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "slo_attainment",
              "peak_kv_bytes", "peak_kv_bytes_in_use", "preemptions")


def _ratios(b: dict, a: dict) -> dict:
    """Mode b over mode a, figure by figure."""
    pick = {"output_tokens_per_s": lambda x: x["output_tokens_per_s"],
            "ttft_p50": lambda x: x["ttft_ms"]["p50"], "ttft_p99": lambda x: x["ttft_ms"]["p99"],
            "tpot_p50": lambda x: x["tpot_ms"]["p50"], "tpot_p99": lambda x: x["tpot_ms"]["p99"],
            "slo_attainment": lambda x: x["slo_attainment"], "peak_kv_bytes": lambda x: x["peak_kv_bytes"],
            "peak_kv_bytes_in_use": lambda x: x["peak_kv_bytes_in_use"], "preemptions": lambda x: x["preemptions"]}
    return {k: _ratio(pick[k](b), pick[k](a)) for k in RATIO_KEYS}


def run(preset: str, trace_path: str, *, budget: int | None = None, max_requests: int | None = None,
        modes: tuple[str, ...] = tuple(MODES), page_size: int = DEFAULT_PAGE_SIZE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, ttft_ms: float = DEFAULT_TTFT_MS,
        tpot_ms: float = DEFAULT_TPOT_MS, time_scale: float = 1.0, layers: int | None = None,
        dtype: str | None = None, timeline: str | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    from ..kv.hf_config import from_hf_config
    from ..serving._patches import check_transformers

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes: unknown {unknown or 'empty list'}; choose from {', '.join(MODES)}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"--max-requests must be >= 1, got {max_requests}")
    if page_size < 4:
        raise ValueError(f"--page-size must be >= 4, got {page_size}")
    if max_batch_tokens < 1 or not time_scale > 0 or not ttft_ms > 0 or not tpot_ms > 0:
        raise ValueError("--max-batch-tokens, --time-scale, --ttft-ms and --tpot-ms must be positive")
    if timeline and not set(ELASTIC_MODES) & set(modes):
        raise ValueError(f"--timeline draws an elastic mode's pool: include one of {', '.join(ELASTIC_MODES)}")
    check_transformers()
    say = progress or (lambda msg: None)
    cfg = gen.scaled_config(preset, layers)  # refuses unknown presets and layer kinds CB cannot serve
    structure = gen.check_kv_structure(preset, cfg)
    trace = load_trace(trace_path, max_requests)
    requests = trace["requests"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    chunk = 2 << 20
    if budget is None:
        budget = default_budget(from_hf_config(cfg, dtype=tdtype), requests, page_size, chunk)
    if budget < chunk:
        raise ValueError(f"--budget {budget} B is less than one {human(chunk)} chunk")
    budget -= budget % chunk  # the elastic pool's budget is whole chunks; the stock tensor gets the same
    if "stock" in modes:  # refused before the model is built
        num_blocks = stock_num_blocks(stock_geometry(cfg, tdtype, page_size), budget)
        longest = max(requests, key=lambda r: r.prompt + r.output)
        if num_blocks * page_size < longest.prompt + longest.output:
            raise ValueError(f"--budget {human(budget)}: the stock cache would hold {num_blocks} blocks of "
                             f"{page_size} tokens, fewer than request {longest.id!r} "
                             f"({longest.prompt + longest.output} tokens) needs alone")

    say(f"bench serve: {preset} scaled to {structure}; trace {trace['name']} ({len(requests)} requests); "
        f"KV budget {human(budget)}")
    model = gen.build_model(cfg, device, tdtype)
    setting = Setting(model=model, requests=requests, prompts=prompt_ids(requests, cfg.vocab_size), budget=budget,
                      page_size=page_size, max_batch_tokens=max_batch_tokens, ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                      time_scale=time_scale, activations=_ActivationReading(model),
                      title=f"{preset} (scaled), {trace['name']}, budget {human(budget)}", timeline=timeline,
                      progress=progress)

    # Untimed: CPU kernels pay a one-off cost per new shape; whichever mode ran
    # first would pay it. A few requests of the trace, arriving together, on
    # the stock engine with room of their own (not measured).
    warm = [TraceRequest(r.id, 0.0, r.prompt, min(r.output, 4)) for r in requests[:4]]
    say("  warm-up (untimed, stock engine)")
    replay(model, warm, setting.prompts,
           setting.cb_config(num_blocks=sum(ceil((r.prompt + r.output) / page_size) for r in warm) + 1),
           "warm-up", _stock_kv_in_use)

    results: dict[str, dict] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    for mode in modes:
        say(f"  {mode}: {MODES[mode].__doc__.splitlines()[0]}")
        results[mode], tokens[mode] = MODES[mode](setting)
        r = results[mode]
        say(f"  {mode}: {r['output_tokens_per_s']} output tok/s, TTFT p50 {r['ttft_ms']['p50']} ms, "
            f"TPOT p50 {r['tpot_ms']['p50']} ms, SLO {r['slo_attainment']:.2f}, {r['preemptions']} preemptions")

    out: dict[str, Any] = {
        **gen.model_record(preset, structure, cfg, device, tdtype),
        "trace": {"path": str(trace_path), "name": trace["name"], "description": trace["description"],
                  "requests": len(requests), "prompt_tokens": sum(r.prompt for r in requests),
                  "output_tokens": sum(r.output for r in requests),
                  "last_arrival_s": round(requests[-1].arrival * time_scale, 3)},
        "time_scale": time_scale,
        "budget_bytes": budget,
        "page_size": page_size,
        "max_batch_tokens": max_batch_tokens,
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "modes_run": list(modes),
        "results": results,
        "measurement": {
            "timing": "per-token timestamps streamed by transformers; TTFT from the trace arrival time",
            "peak_kv_bytes": "stock: its cache tensor's bytes (allocated once, held throughout); elastic: the "
                             "pool ledger's peak chunks of each KV group, summed (exact for one group, an upper "
                             "bound for several: peak_kv_bytes_exact)",
            "peak_kv_bytes_in_use": "read after each batch is scheduled (its blocks allocated): stock, the bytes "
                                    "of the sectors its allocators hold; elastic, the KV manager's mapped chunk "
                                    "bytes",
            "peak_activation_bytes": setting.activations.method,
            "preemptions": "requests evicted by transformers' offloading manager (active before, waiting after)",
        },
        "timeline": results.get("elastic", {}).pop("timeline", {"path": None}),
        "timeline_slo": results.get("elastic+slo", {}).pop("timeline", {"path": None}),
    }
    if "stock" in results:
        for mode, key in (("elastic", "elastic_over_stock"), ("elastic+slo", "slo_over_stock")):
            if mode in results:
                out[key] = _ratios(results[mode], results["stock"])
    if len(results) > 1:  # greedy decoding: every mode must give every request the same tokens
        first, *others = list(tokens)
        same = sum(all(tokens[m][r.id] == tokens[first][r.id] for m in others) for r in requests)
        out["identical_tokens"] = {"requests": len(requests), "identical": same, "modes": list(tokens)}
    return out


def find_max_batch(preset: str, *, prompt_len: int = DEFAULT_MAX_BATCH_PROMPT, output: int = DEFAULT_MAX_BATCH_OUTPUT,
                   requests: int | None = None, budget: int | None = None, modes: tuple[str, ...] = tuple(MODES),
                   layers: int | None = None, dtype: str | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                   progress: Callable[[str], None] | None = None, **kw: Any) -> dict:
    """eLLM's batch experiment: `requests` prompts of prompt_len tokens, all
    arriving at once, each generating `output` tokens; per mode, the most
    requests that decode together at the budget (peak_concurrent_decoding).
    Default budget: room for four such requests alone (whole chunks);
    default requests: twice what the budget holds, plus two, so that every
    mode is limited by memory, not by the queue."""
    import tempfile

    from ..kv.hf_config import from_hf_config

    if prompt_len < 1 or output < 1:
        raise ValueError(f"--prompt-len and --max-batch-output must be >= 1, got {prompt_len}, {output}")
    cfg = gen.scaled_config(preset, layers)
    tdtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    chunk = 2 << 20
    spec = from_hf_config(cfg, dtype=tdtype)
    per_request = request_kv_bytes(spec, prompt_len + output, page_size, chunk)
    if budget is None:
        budget = -(-4 * per_request // chunk) * chunk
    if requests is None:
        requests = 2 * max(1, budget // per_request) + 2
    if requests < 1:
        raise ValueError(f"--requests must be >= 1, got {requests}")
    doc = {"name": f"max-batch-{prompt_len}", "arrival_unit": "s",
           "description": f"{requests} requests of {prompt_len} prompt tokens and {output} output tokens, all at 0",
           "requests": [{"arrival": 0, "prompt": prompt_len, "output": output}] * requests}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "max_batch.json"
        path.write_text(json.dumps(doc))
        r = run(preset, str(path), budget=budget, modes=modes, layers=layers, dtype=dtype, page_size=page_size,
                progress=progress, **kw)
    r["trace"]["path"] = None  # synthetic: described above, not a file
    r["max_batch"] = {m: x["peak_concurrent_decoding"] for m, x in r["results"].items()}
    if "stock" in r["max_batch"]:
        a = r["max_batch"]["stock"]
        r["max_batch_over_stock"] = {m: _ratio(n, a) for m, n in r["max_batch"].items() if m != "stock"}
    return r


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return round(b / a, 4)


def print_report(r: dict) -> None:
    t = r["trace"]
    print(f"bench serve: {r['preset']} scaled to {r['model']}; {r['device']}, {r['dtype']}, "
          f"{r['torch_threads']} threads")
    print(f"  trace {t['name']}: {t['requests']} requests, {t['prompt_tokens']} prompt + {t['output_tokens']} "
          f"output tokens, last arrival {t['last_arrival_s']} s; KV budget {human(r['budget_bytes'])}, "
          f"page {r['page_size']} tokens; SLO TTFT <= {r['slo']['ttft_ms']:g} ms, TPOT <= {r['slo']['tpot_ms']:g} ms")
    print(f"  {'mode':<12}{'out tok/s':>10}{'TTFT p50/p99 ms':>20}{'TPOT p50/p99 ms':>18}{'SLO':>7}"
          f"{'preempt':>9}{'recomp tok':>11}{'peak KV':>12}{'KV in use':>12}")
    for mode, x in r["results"].items():
        print(f"  {mode:<12}{x['output_tokens_per_s']:>10}"
              f"{x['ttft_ms']['p50']:>11.0f} / {x['ttft_ms']['p99']:<6.0f}"
              f"{_fmt(x['tpot_ms']['p50']):>9} / {_fmt(x['tpot_ms']['p99']):<6}"
              f"{x['slo_attainment']:>7.2f}{x['preemptions']:>9}{x['recomputed_tokens']:>11}"
              f"{human(x['peak_kv_bytes']):>12}{human(x['peak_kv_bytes_in_use']):>12}")
    for key, label in (("elastic_over_stock", "elastic / stock"), ("slo_over_stock", "elastic+slo / stock")):
        if key in r:
            print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in r[key].items()))
    if "elastic+slo" in r["results"]:
        print("  elastic+slo decisions: " + ", ".join(f"{k} {v}" for k, v in
                                                       sorted(r["results"]["elastic+slo"]["decisions"].items())))
    if "max_batch" in r:
        print("  most requests decoding together: " + ", ".join(f"{m} {n}" for m, n in r["max_batch"].items())
              + ("; over stock: " + ", ".join(f"{m} {v}" for m, v in r["max_batch_over_stock"].items())
                 if "max_batch_over_stock" in r else ""))
    if "identical_tokens" in r:
        same = r["identical_tokens"]
        print(f"  identical greedy tokens in {', '.join(same['modes'])}: {same['identical']} of "
              f"{same['requests']} requests")
    print(f"  activations: {r['measurement']['peak_activation_bytes']}")
    for key in ("timeline", "timeline_slo"):
        if r[key].get("path"):
            print(f"  timeline: {r[key]['path']} ({r[key]['samples']} samples)")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def parse_modes(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def budget_arg(text: str | None) -> int | None:
    return parse_size(text, "budget") if text else None
