"""The SLO-aware scheduler: transformers' continuous batching, steered by
latency targets and by the pool's state.

Selected with `ContinuousBatchingConfig(scheduler_type="ellm_slo")` on a
model made elastic with `elastic(model, ..., slo=SLO(ttft_ms, tpot_ms))`
(the name is registered in transformers' SCHEDULER_MAPPING while a model is
elastic; see _patches.py). Every step it decides, from measurements:

  * the token budget. A step's time is fitted as fixed + per_token x query
    tokens over the latest steps (StepCostModel, timed between consecutive
    schedule calls, which is what a decoding request's TPOT sees). TPOT is
    an average over a request's output, so a decoding request can spare
    some time: what its target allows beyond the decode steps it still
    needs. While requests decode, the budget is the most tokens a step can
    take in half the least time any of them can spare (at least tpot_ms):
    a long prompt is prefilled in large chunks while decoding requests have
    time to spare and in small ones once they have none, instead of
    stalling them; with nothing decoding, or before any step was timed, it
    is the engine's. One exception, for TTFT: when requests
    prefilling or waiting (in order: each waits for the prompts before it)
    can meet ttft_ms only with larger chunks, the budget grows to the
    smallest chunk that meets every target still within reach; a request
    whose target is out of reach anyway does not cost decoding requests
    their TPOT.
  * admission. Waiting requests are taken in order while their first chunk
    fits in the chunks the pool can still give, after the next token of
    every decoding request and after the headroom kept for the step's
    activations when they come from the same pool (ActivationHeadroom).
  * preemption, swap or recompute. When the decoding requests' next tokens
    do not fit, the latest arrivals are preempted until they do. A
    preempted request is swapped to the pool's host tier when it has room
    and moving its KV out and back is predicted to take less time than
    prefilling its tokens again; otherwise its KV is dropped and it is
    requeued to recompute. A swapped request keeps its block ids and its
    place in the sequence: it comes back, earliest arrival first, before
    new requests are admitted, once its chunks fit with a margin of one
    per decoding request.

Every decision is counted in `decisions` (also ElasticServing.decisions()).
The engine's own preemption (its offloading manager's soft reset) never
runs: this scheduler reports no starved request and preempts first.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from typing import Any, Callable

from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import Scheduler

from ..errors import OutOfMemoryError
from .slo import SLO

#: The name transformers' ContinuousBatchingConfig(scheduler_type=...) selects.
SCHEDULER_NAME = "ellm_slo"
#: The fraction of tpot_ms a decoding request's average is steered to.
TPOT_AIM = 0.9


class StepCostModel:
    """Seconds per step as fixed + per_token x query tokens, least squares
    over the latest `window` steps (old steps age out, so it follows the
    KV read length growing and the machine's load)."""

    def __init__(self, window: int = 64):
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds >= 0:
            self.steps.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token); None before the first step.
        While every step seen had the same size (or noise tilts the line
        down), all of a step's time is charged to its tokens (no fixed part):
        that overestimates a token's cost, so a budget drawn from it errs on
        the side of the target."""
        n = len(self.steps)
        if n == 0:
            return None
        mt = sum(t for t, _ in self.steps) / n
        ms = sum(s for _, s in self.steps) / n
        var = sum((t - mt) ** 2 for t, _ in self.steps)
        if var == 0:
            return 0.0, max(ms / mt, 1e-9)
        slope = sum((t - mt) * (s - ms) for t, s in self.steps) / var
        if slope <= 0:  # noise hides the per-token cost: charge it all to tokens, as above
            return 0.0, max(ms / mt, 1e-9)
        return max(0.0, ms - slope * mt), slope

    def predict(self, tokens: int) -> float | None:
        """Seconds a step of `tokens` takes. While one step size was seen, a
        smaller step is given that size's time: a step never costs less for
        having more tokens, and the fixed part is unknown."""
        f = self.fit()
        if f is None:
            return None
        sizes = {t for t, _ in self.steps}
        if len(sizes) == 1 and tokens <= next(iter(sizes)):
            return sum(sec for _, sec in self.steps) / len(self.steps)
        return f[0] + f[1] * tokens

    def tokens_within(self, seconds: float) -> int | None:
        """The most query tokens a step can take within `seconds` (at least 1)."""
        f = self.fit()
        if f is None:
            return None
        return max(1, int((seconds - f[0]) / f[1]))


class ActivationHeadroom:
    """Chunks kept free for the coming step's activations. Only when torch
    allocates the model's tensors from the KV pool itself (ellm_alloc.enable()
    on the model's device): then, per step, the arena's peak allocated bytes
    above the step's starting level, per query token, and the largest seen
    so far is kept; until one is seen, a shape estimate (itemsize x (4 hidden
    + 3 intermediate) per token). The arena's peak is not reset (others read
    it): a peak older than the step can only make the reading larger, which
    keeps more headroom, never less. When activations come from elsewhere,
    KV does not compete with them for chunks and the headroom is 0."""

    def __init__(self, cache: Any):
        from ..integrations.torch_allocator import device_pool, enabled_device

        pool = cache.ellm_pool
        shared = enabled_device() == cache.device.type and device_pool(cache.device) is pool
        self.arena = pool if shared else None
        self.chunk = cache.kv.layout.chunk_bytes
        cfg = cache.config
        hidden = getattr(cfg, "hidden_size", 0) or 0
        inter = getattr(cfg, "intermediate_size", 0) or 4 * hidden
        itemsize = cache.dtype.itemsize if hasattr(cache.dtype, "itemsize") else 2
        self.bytes_per_token = itemsize * (4 * hidden + 3 * inter)
        self.measured = False
        self._start: int | None = None
        self._tokens = 0

    def step_started(self, tokens: int) -> None:
        if self.arena is None:
            return
        self._start = self.arena.stats()["allocated_bytes"]
        self._tokens = tokens

    def step_ended(self) -> None:
        if self.arena is None or self._start is None or self._tokens <= 0:
            return
        used = self.arena.stats()["allocated_peak"] - self._start
        per_token = max(0, used) / self._tokens
        self.bytes_per_token = per_token if not self.measured else max(self.bytes_per_token, per_token)
        self.measured = True
        self._start = None

    def chunks(self, tokens: int) -> int:
        if self.arena is None:
            return 0
        return -(-int(self.bytes_per_token * tokens) // self.chunk)


class SLOAwareScheduler(Scheduler):
    """See the module docstring. Built by transformers' batch processor with
    (cache, safety_margin, max_requests_per_batch); the targets, the clock
    and the host tier come from the elastic cache's ElasticServing."""

    def __init__(self, cache: Any, safety_margin: float | None, max_requests_per_batch: int):
        from .paged_cache import ElasticPagedAttentionCache

        if not isinstance(cache, ElasticPagedAttentionCache):
            raise TypeError(f"scheduler_type={SCHEDULER_NAME!r} runs on the elastic paged cache: make the model "
                            "elastic first, ellm_alloc.serving.elastic(model, ..., slo=SLO(ttft_ms, tpot_ms))")
        slo = cache.serving.slo
        if slo is None:
            raise ValueError(f"scheduler_type={SCHEDULER_NAME!r} needs latency targets: "
                             "elastic(model, ..., slo=SLO(ttft_ms=..., tpot_ms=...))")
        self.slo: SLO = slo
        self.clock: Callable[[], float] = cache.serving.clock or time.perf_counter
        self.cost = StepCostModel()
        self.headroom = ActivationHeadroom(cache)
        self.decisions: Counter = Counter()
        # Measured swap speed (bytes per second, out and back in); until one
        # swap was timed, a swap is preferred to recomputing.
        self._swap_bytes = 0
        self._swap_seconds = 0.0
        # The admission check replaces the stock safety margin.
        super().__init__(cache, 0.0 if safety_margin is None else safety_margin, max_requests_per_batch)
        cache.serving._adopt_scheduler(self)

    def reset(self) -> None:
        super().reset()
        self.swapped: dict[str, Any] = {}  # request id -> RequestState, swapped out to the host tier
        self._arrival: dict[str, int] = {}  # request id -> arrival number (preempt the latest first)
        self._arrived_at: dict[str, float] = {}  # request id -> clock when it arrived (its TTFT starts)
        self._first_token_at: dict[str, float] = {}  # request id -> clock at its first token (its TPOT starts)
        self._arrivals = 0
        self._last_step: tuple[int, float] | None = None  # (query tokens, start) of the step in flight

    # -- bookkeeping the engine calls ------------------------------------------------------

    def add_waiting_request(self, state: Any) -> None:
        if state.request_id not in self._arrival:
            self._arrival[state.request_id] = self._arrivals
            self._arrived_at[state.request_id] = self.clock()
            self._arrivals += 1
        super().add_waiting_request(state)

    def has_pending_requests(self) -> bool:
        pending = super().has_pending_requests() or bool(self.swapped)
        if not pending:
            self._last_step = None  # the engine idles now: the next gap is not a step
        return pending

    def finish_request(self, request_id: str) -> None:
        super().finish_request(request_id)
        if request_id not in self.waiting_requests:  # (a requeued one keeps its place)
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        for times in (self._arrival, self._arrived_at, self._first_token_at):
            times.pop(request_id, None)

    def request_is_cancelled(self, request_id: str) -> bool:
        if request_id in self.swapped and request_id not in self._requests_to_cancel:
            return False
        return super().request_is_cancelled(request_id)

    def clear_cancelled_requests(self) -> list[Any]:
        with self._cancellation_lock:
            gone = [self.swapped.pop(rid) for rid in self._requests_to_cancel if rid in self.swapped]
            for state in gone:  # its host chunks go back with its request
                self.cache.free_blocks(state.request_id)
                self._requests_to_cancel.discard(state.request_id)
                self._forget(state.request_id)
        return gone + super().clear_cancelled_requests()

    # -- the step -------------------------------------------------------------------------------

    def schedule_batch(self, token_budget: int, cache_budget: int) -> tuple[list[Any] | None, bool, int, int]:
        now = self.clock()
        if self._last_step is not None:
            tokens, start = self._last_step
            self.cost.observe(tokens, now - start)
            self.headroom.step_ended()
        self._last_step = None
        self.decisions["steps"] += 1

        self._swap_back_in()
        decoding = [s for s in self.active_requests.values() if s.status == RequestStatus.DECODING]
        self._make_room(decoding)
        decoding = [s for s in decoding if s.request_id in self.active_requests]
        prefilling = [s for s in self.active_requests.values() if s.status == RequestStatus.PREFILLING]

        for state in decoding:  # their first token came with the step that just ended
            self._first_token_at.setdefault(state.request_id, now)
        budget = self._token_budget(token_budget, decoding, prefilling, now)
        candidates = decoding + prefilling
        if not self.block_new_requests and not self.swapped:
            candidates += self._admissible(decoding, prefilling, budget)
        removed: set[str] = set()
        scheduled, _, fast_path, num_q, max_kv = self._process_candidates(candidates, budget, cache_budget, removed)
        self.decisions["admitted"] += len(removed)
        self._cleanup_waiting_queue(removed)
        # A request that did not get its blocks waits for the next step, where
        # _make_room preempts for it; the engine's soft reset never runs.
        self.starved_requests = []
        if scheduled:
            self._last_step = (num_q, now)
            self.headroom.step_started(num_q)
        return scheduled, fast_path, num_q, max_kv

    def _token_budget(self, engine_budget: int, decoding: list[Any], prefilling: list[Any], now: float) -> int:
        """The engine's budget, cut to the tokens a step can take in the time
        the decoding requests can spare (never below one token each, plus
        one), raised again as far as the prefills in line need to meet
        ttft_ms."""
        if not decoding:
            return engine_budget
        seconds = self._step_time_to_spare(decoding, now)
        within = None if seconds is None else self.cost.tokens_within(seconds)
        if within is None:
            return engine_budget
        budget = max(len(decoding) + 1, within)
        for_ttft = len(decoding) + self._chunk_for_ttft(len(decoding), prefilling, now)
        if for_ttft > budget:
            self.decisions["token_budget_raised_for_ttft"] += 1
            budget = for_ttft
        if budget < engine_budget:
            self.decisions["token_budget_capped"] += 1
            return budget
        return engine_budget

    def _step_time_to_spare(self, decoding: list[Any], now: float) -> float | None:
        """How long this step may take with every decoding request still able
        to meet tpot_ms on average over its output. Steps are held to `aim`
        (TPOT_AIM x tpot_ms, below the target: the cost model errs) or to a
        decode step if that costs more; a request that has been faster than
        that so far has time banked, and this step may take half of the least
        bank on top; one that is behind gets a shorter step, as long as a
        decode step fits (request i, first token at t_i, r_i of its n_i
        tokens to go, spares aim x (n_i - 1) - (now - t_i) - (r_i - 1) x
        step for this step). A decode step is costed as one carrying every
        request running or waiting now (they may all decode together later).
        Requests whose first token was not seen, or without a token limit, or
        whose target is out of reach anyway, bank nothing and hold nothing
        back; with none left, a step of tpot_ms. None before any step was
        timed."""
        decode_step = self.cost.predict(len(self.active_requests) + len(self.waiting_requests))
        if decode_step is None:
            return None
        tpot = self.slo.tpot_ms / 1000
        step = max(TPOT_AIM * tpot, decode_step)
        allowed = []
        for state in decoding:
            first = self._first_token_at.get(state.request_id)
            limit = state.max_new_tokens
            if first is None or limit is None:
                continue
            to_go = limit - state.generated_len()
            spare = TPOT_AIM * tpot * (limit - 1) - (now - first) - max(0, to_go - 1) * step
            if spare >= step:  # a full step, and half of what is banked beyond it
                allowed.append(step + (spare - step) / 2)
            elif spare >= decode_step:  # behind: this step gets what is left
                allowed.append(spare)
        if not allowed:  # nothing known yet, or every target out of reach
            return tpot
        return min(allowed)

    def _chunk_for_ttft(self, num_decoding: int, prefilling: list[Any], now: float) -> int:
        """The smallest prefill chunk per step with which every request still
        prefilling or waiting, in order, whose ttft_ms is still within reach
        gets its first token in time: request i's first token waits for the
        prompt tokens of i and of every request before it. 0 when none waits;
        requests whose target is out of reach are not waited for."""
        fit = self.cost.fit()
        if fit is None:
            return 0
        fixed, per_token = fit
        queue = sorted(prefilling, key=self._arrival_of)
        if not self.block_new_requests:
            queue += [self.waiting_requests[rid] for rid in self.waiting_requests_order]
        chunk, ahead = 0, 0
        for state in queue:
            ahead += len(state.remaining_prefill_tokens)
            left = self.slo.ttft_ms / 1000 - (now - self._arrived_at.get(state.request_id, now))
            # n = ahead / c steps, each fixed + per_token x (decoding + c):
            # n x (fixed + per_token x decoding) + per_token x ahead <= left.
            spare = left - per_token * ahead
            if ahead and spare > 0:
                chunk = max(chunk, math.ceil(ahead * (fixed + per_token * num_decoding) / spare))
        return chunk

    # -- memory ------------------------------------------------------------------------------------

    def _free_chunks(self) -> int:
        self.cache.release_lookbacks()
        return self.cache.free_chunks()

    def _decode_need(self, decoding: list[Any]) -> int:
        return self.cache.chunks_to_grow([(s.request_id, s.current_len() + 1) for s in decoding])

    def _make_room(self, decoding: list[Any]) -> None:
        """Preempts the latest arrivals (not yet decoding first) until every
        decoding request's next token fits; the earliest one always stays."""
        while True:
            active = sorted(self.active_requests.values(), key=self._arrival_of)
            live = [s for s in decoding if s.request_id in self.active_requests]
            if len(active) <= 1 or self._decode_need(live) <= self._free_chunks():
                return
            self._preempt(active[-1])

    def _admissible(self, decoding: list[Any], prefilling: list[Any], budget: int) -> list[Any]:
        """Waiting requests, in order, while each one's first chunk fits after
        the decoding requests' next tokens and the activation headroom."""
        room = self._free_chunks() - self._decode_need(decoding) - self.headroom.chunks(budget)
        tokens_left = budget - len(decoding) - sum(len(s.remaining_prefill_tokens) for s in prefilling)
        out = []
        for rid in self.waiting_requests_order:
            state = self.waiting_requests[rid]
            first = max(1, min(len(state.remaining_prefill_tokens), max(tokens_left, 1)))
            need = self.cache.chunks_to_grow([(rid, first)])
            nothing_runs = not self.active_requests and not out
            if need > room and not nothing_runs:
                self.decisions["admission_deferred_for_memory"] += 1
                break  # in order: no request overtakes the one at the head
            out.append(state)
            room -= need
            tokens_left -= first
            if tokens_left <= 0:
                break
        return out

    # -- preemption: swap or recompute ------------------------------------------------------------

    def _arrival_of(self, state: Any) -> int:
        return self._arrival.get(state.request_id, -1)

    def _swap_is_cheaper(self, state: Any, nbytes: int) -> bool:
        fit = self.cost.fit()
        if fit is None or self._swap_seconds <= 0:
            return True
        swap_s = 2 * nbytes * self._swap_seconds / max(self._swap_bytes, 1)
        return swap_s < fit[1] * state.current_len()

    def _preempt(self, state: Any) -> None:
        rid = state.request_id
        # A swap must free device chunks (chunks shared with other requests'
        # blocks stay), and only a decoding request resumes where it was.
        nbytes = self.cache.kv.swap_out_bytes(rid)
        swappable = (state.status == RequestStatus.DECODING and nbytes > 0 and self.cache.ellm_pool.cpu_budget() > 0
                     and self._swap_is_cheaper(state, nbytes))
        if swappable:
            t0 = self.clock()
            try:
                moved = self.cache.swap_out(rid)
            except OutOfMemoryError:
                self.decisions["swap_refused_host_full"] += 1
            else:
                self._swap_bytes += moved
                self._swap_seconds += self.clock() - t0
                del self.active_requests[rid]
                self.swapped[rid] = state
                self.decisions["preempted_swap"] += 1
                self.decisions["swapped_out_bytes"] += moved
                return
        # Recompute: drop its KV and requeue it at the front, as a request
        # whose prompt is everything it has so far.
        self.decisions["preempted_recompute"] += 1
        self.decisions["recomputed_tokens"] += state.current_len()
        self.cache.free_blocks(rid)
        del self.active_requests[rid]
        fresh = state.create_equivalent_initial_request()
        state._status = RequestStatus.FINISHED
        self.waiting_requests[rid] = fresh
        self.waiting_requests_order.appendleft(rid)

    def _swap_back_in(self) -> None:
        """Swapped requests return by arrival while they fit with a margin of
        a chunk per decoding request (none when nothing else runs)."""
        for rid in sorted(self.swapped, key=lambda r: self._arrival_of(self.swapped[r])):
            running = sum(1 for s in self.active_requests.values() if s.status == RequestStatus.DECODING)
            if not self.cache.kv.can_swap_in(rid, margin_chunks=running + 1 if self.active_requests else 0):
                if self.active_requests:
                    break
            t0 = self.clock()
            try:
                self.cache.swap_in(rid)
            except OutOfMemoryError:
                break
            self._swap_seconds += self.clock() - t0
            self.active_requests[rid] = self.swapped.pop(rid)
            self.decisions["swapped_in"] += 1
