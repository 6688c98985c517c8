"""The SLO-aware scheduler (ellm_alloc.serving.scheduler): its step-cost
model, that it keeps latency targets FIFO misses (on a virtual clock: the
step costs are given, so nothing here is timed), that preempted requests
swapped to the host tier come back bit-exact, that cancelling one while it
is swapped out frees everything, and its bad inputs."""
from __future__ import annotations

import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
import transformers.generation.continuous_batching.requests as cb_requests  # noqa: E402
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig, LlamaConfig  # noqa: E402

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.serving import SLO, elastic  # noqa: E402
from ellm_alloc.serving.scheduler import SLOAwareScheduler, StepCostModel  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_serving import GEN, TINY, assert_balanced, prompts  # noqa: E402

# ---- the step-cost model, table-driven -------------------------------------------------

COST_CASES = [
    # (steps observed as (tokens, seconds), expected fit, tokens within 10 ms)
    ([], None, None),
    ([(10, 0.002)], (0.0, 0.0002), 50),  # one size: all of it charged to tokens
    ([(10, 0.002), (10, 0.002)], (0.0, 0.0002), 50),
    ([(10, 0.002), (110, 0.012)], (0.001, 0.0001), 90),  # 1 ms fixed + 0.1 ms a token
    ([(5, 0.0015), (20, 0.003), (60, 0.007)], (0.001, 0.0001), 90),
    ([(10, 0.005), (100, 0.004)], (0.0, 0.0045 / 55), 122),  # noise tilting down: all charged to tokens
    ([(100, 0.5)], (0.0, 0.005), 2),
    ([(100, 5.0)], (0.0, 0.05), 1),  # never below one token
]


@pytest.mark.parametrize("steps, fit, within", COST_CASES)
def test_step_cost_model(steps, fit, within):
    m = StepCostModel()
    for tokens, seconds in steps:
        m.observe(tokens, seconds)
    got = m.fit()
    if fit is None:
        assert got is None and m.tokens_within(0.01) is None and m.predict(1) is None
        return
    assert got == pytest.approx(fit, rel=1e-6, abs=1e-12)
    assert m.tokens_within(0.01) == pytest.approx(within, rel=1e-3)


def test_step_cost_model_forgets_old_steps():
    m = StepCostModel(window=4)
    for t in (10, 20, 30, 40):
        m.observe(t, 0.001 * t)  # 1 ms a token
    for t in (10, 20, 30, 40):
        m.observe(t, 0.002 * t)  # the machine got twice as slow
    assert m.fit() == pytest.approx((0.0, 0.002))


def test_step_cost_model_ignores_empty_steps():
    m = StepCostModel()
    m.observe(0, 1.0)
    m.observe(5, -1.0)
    assert m.fit() is None


# ---- the token budget, table-driven --------------------------------------------------------

def _budgeting_scheduler(fixed_s, per_token_s, ttft_ms, tpot_ms, prompt_tokens, waited_s):
    """A scheduler whose cost model is fixed_s + per_token_s x tokens and whose
    earliest prefill has prompt_tokens left after waiting waited_s (no engine)."""
    sched = object.__new__(SLOAwareScheduler)
    sched.slo = SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms)
    sched.cost = StepCostModel()
    for t in (10, 100):
        sched.cost.observe(t, fixed_s + per_token_s * t)
    from collections import Counter, deque

    sched.decisions = Counter()
    sched.block_new_requests = False
    sched.active_requests = {}
    head = types.SimpleNamespace(request_id="head", remaining_prefill_tokens=[0] * prompt_tokens)
    sched.waiting_requests, sched.waiting_requests_order = {"head": head}, deque(["head"])
    sched._arrival, sched._arrived_at, sched._first_token_at = {"head": 0}, {"head": 0.0}, {}
    return sched, waited_s


def _decoding(n, first_token_at=None, limit=41, generated=1):
    """n decoding requests, their first token at first_token_at (None: not seen)."""
    states = [types.SimpleNamespace(request_id=f"d{i}", max_new_tokens=limit, generated_len=lambda: generated)
              for i in range(n)]
    return states, ({} if first_token_at is None else {s.request_id: first_token_at for s in states})


BUDGET_CASES = [
    # fixed s, s/token, ttft ms, tpot ms, prompt left, waited s, decoding -> budget, raised for TTFT
    # (decoding requests whose first token was not seen spare nothing: a step of at most tpot_ms)
    (0.001, 0.0001, 1000, 4, 600, 0.0, 10, 30, False),    # TTFT easy: the TPOT cap (3 ms of tokens) rules
    (0.001, 0.0001, 70, 4, 600, 0.0, 1, 67, True),        # 600 x 1.1 ms / (70 - 60 ms) = 66 prefill tokens a step
    (0.001, 0.0001, 70, 4, 600, 0.02, 1, 30, False),      # 20 ms already waited: out of reach, TPOT kept
    (0.001, 0.0001, 50, 4, 600, 0.0, 1, 30, False),       # 60 ms of prefill alone > 50 ms: out of reach
    (0.001, 0.0001, 1000, 4, 600, 0.0, 0, 256, False),    # nothing decoding: the engine's budget
    (0.001, 0.0001, 1e6, 4, 600, 0.0, 40, 41, False),     # never below a token per decoding request, plus one
    (0.001, 0.0001, 1000, 100, 600, 0.0, 4, 256, False),  # the TPOT cap above the engine's: the engine's
]


@pytest.mark.parametrize("fixed, per_token, ttft, tpot, left, waited, decoding, budget, raised", BUDGET_CASES)
def test_token_budget(fixed, per_token, ttft, tpot, left, waited, decoding, budget, raised):
    sched, now = _budgeting_scheduler(fixed, per_token, ttft, tpot, left, waited)
    states, _ = _decoding(decoding)
    assert sched._token_budget(256, states, [], now) == budget
    assert bool(sched.decisions["token_budget_raised_for_ttft"]) == raised


SPARE_CASES = [
    # first token at s, tokens generated of 41, now s -> step budget (1 ms + 0.1 ms a token, a decode
    # step 1.1 ms; TPOT 4 ms, steps held to aim = 0.9 x 4 = 3.6 ms, 0.1 ms a token beyond 1 ms)
    (0.0, 1, 0.0, 26),     # on schedule, nothing banked: a step of aim
    (0.0, 21, 0.06, 86),   # 20 tokens in 60 ms: 144 - 60 - 19 x 3.6 = 15.6 ms spare, 3.6 + 12 / 2 = 9.6 ms
    (0.0, 40, 0.05, 478),  # the last token to go: 94 ms spare, 3.6 + 90.4 / 2 = 48.8 ms
    (0.0, 21, 0.0735, 11),  # behind: 2.1 ms spare, more than a decode step: a step of 2.1 ms
    (0.0, 21, 0.08, 30),   # -4.4 ms spare: out of reach, a plain tpot_ms step
    (0.0, 21, 0.15, 30),   # far out of reach, the same
]


@pytest.mark.parametrize("first, generated, now, budget", SPARE_CASES)
def test_token_budget_spends_half_of_what_decoding_requests_can_spare(first, generated, now, budget):
    sched, _ = _budgeting_scheduler(0.001, 0.0001, 1e6, 4, 0, 0.0)
    states, sched._first_token_at = _decoding(1, first_token_at=first, generated=generated)
    assert sched._token_budget(1000, states, [], now) == pytest.approx(budget, abs=1)


# ---- engine runs on a virtual clock ----------------------------------------------------------


class VirtualClock:
    """Seconds that advance only by the step costs a test charges."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    perf_counter = __call__


def charge_steps(monkeypatch, model, clock, fixed_s: float, per_token_s: float):
    """Every forward of the model advances the clock by fixed + per_token x
    its (packed) query tokens; transformers' token timestamps read the clock."""
    monkeypatch.setattr(cb_requests, "time", types.SimpleNamespace(perf_counter=clock))
    forward = model.forward

    def timed_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        clock.t += fixed_s + per_token_s * ids.shape[-1]
        return out

    monkeypatch.setattr(model, "forward", timed_forward)


def attainment(results, slo: SLO) -> float:
    met = 0
    for r in results.values():
        ts = r.timestamps
        ttft, tpot = ts[0], (ts[-1] - ts[0]) / (len(ts) - 1)
        met += ttft * 1000 <= slo.ttft_ms and tpot * 1000 <= slo.tpot_ms
    return met / len(results)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).eval()


def test_policy_keeps_the_slo_where_fifo_misses_it(tiny_llama, monkeypatch):
    """Four short chats decode while ten 120-token prompts arrive with them.
    A step costs 1 ms + 0.1 ms a query token (virtual clock). FIFO fills
    each step with 256 tokens of prefill, so the chats' tokens come 27 ms
    apart at first and half the requests miss a 4 ms TPOT. The SLO-aware
    scheduler learns the cost from the steps it sees and prefills in chunks
    that keep a step under 4 ms: every request meets both targets, with the
    same greedy tokens."""
    model = tiny_llama
    clock = VirtualClock()
    charge_steps(monkeypatch, model, clock, fixed_s=0.001, per_token_s=0.0001)
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = prompts([8, 8, 8, 8] + [120] * 10, seed=3)
    slo = SLO(ttft_ms=1000, tpot_ms=4)

    def run(scheduler_type):
        clock.t = 0.0
        cb = ContinuousBatchingConfig(num_blocks=512, max_batch_tokens=256, page_size=16,
                                      scheduler_type=scheduler_type)
        out = model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                   record_timestamps=True)
        assert all(r.error is None for r in out.values())
        return out

    with elastic(model, budget="64MiB", slo=slo, clock=clock) as serving:
        fifo = run("fifo")
        aware = run("ellm_slo")
        decisions = serving.decisions()
        assert_balanced(serving.pool)
    assert attainment(fifo, slo) <= 0.6
    assert attainment(aware, slo) == 1.0
    assert {k: r.generated_tokens for k, r in aware.items()} == {k: r.generated_tokens for k, r in fifo.items()}
    assert decisions["token_budget_capped"] > 0 and decisions["admitted"] == len(inputs)


# ---- swaps to the host tier ---------------------------------------------------------------------

# 32 KiB of KV a token: a 2 MiB chunk holds 64 tokens, about one request, so
# preempting one frees a chunk and a swap has something to move.
WIDE = {**TINY, "num_hidden_layers": 4, "num_key_value_heads": 16, "num_attention_heads": 16, "head_dim": 64}


@pytest.fixture(scope="module")
def wide_llama_and_reference():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDE)).eval()
    stock = model.generate_batch(prompts(), generation_config=GEN, continuous_batching_config=_cb())
    return model, {rid: r.generated_tokens for rid, r in stock.items()}


def _cb(**kw) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(num_blocks=256, max_batch_tokens=32, page_size=16, **kw)


@pytest.mark.parametrize("cpu_budget", ["32MiB", None])
def test_preempted_requests_swap_or_recompute_and_match_the_stock_engine(wide_llama_and_reference, cpu_budget):
    """Eight requests on three chunks: requests are preempted. With a host
    tier some are swapped out and back (their KV returns bit-exact: the
    tokens are the stock engine's); without one they are recomputed. The
    pool and its host tier hold nothing at the end."""
    model, reference = wide_llama_and_reference
    with elastic(model, budget="6MiB", cpu_budget=cpu_budget, slo=SLO(ttft_ms=1000, tpot_ms=50)) as serving:
        out = model.generate_batch(prompts(), generation_config=GEN,
                                   continuous_batching_config=_cb(scheduler_type="ellm_slo"))
        d = serving.decisions()
        assert all(r.error is None for r in out.values())
        assert {k: r.generated_tokens for k, r in out.items()} == reference
        if cpu_budget:
            assert d["preempted_swap"] >= 1 and d["swapped_in"] == d["preempted_swap"]
            assert d["swapped_out_bytes"] >= d["preempted_swap"] * serving.pool.stats()["chunk_bytes"]
        else:
            assert d.get("preempted_swap", 0) == 0
        assert d["preempted_recompute"] + d.get("preempted_swap", 0) >= 1
        assert_balanced(serving.pool)
        assert all(o["held_chunks"] == 0 for o in serving.pool.host_tier()["owners"])


def test_cancelling_a_swapped_out_request_frees_everything(wide_llama_and_reference, monkeypatch):
    """The first request swapped out is cancelled while it sits in the host
    tier: its host chunks and blocks go back, the others finish with the
    stock engine's tokens, and nothing is held afterwards."""
    model, reference = wide_llama_and_reference
    preempt = SLOAwareScheduler._preempt
    victims = []

    def preempt_then_cancel(self, state):
        preempt(self, state)
        if not victims and state.request_id in self.swapped:
            victims.append(state.request_id)
            self.set_request_cancellation(state.request_id)

    monkeypatch.setattr(SLOAwareScheduler, "_preempt", preempt_then_cancel)
    ids = [f"req_{i}" for i in range(len(prompts()))]
    with elastic(model, budget="6MiB", cpu_budget="32MiB", slo=SLO(ttft_ms=1000, tpot_ms=50)) as serving:
        with model.continuous_batching_context_manager(
                generation_config=GEN, continuous_batching_config=_cb(scheduler_type="ellm_slo")) as manager:
            for rid, prompt in zip(ids, prompts()):
                manager.add_request(prompt, request_id=rid, max_new_tokens=GEN.max_new_tokens)
            results = {}
            for _ in range(200):  # a cancelled request delivers nothing
                if victims and set(ids) - {victims[0]} <= set(results):
                    break
                r = manager.get_result(timeout=5)
                if r is not None:
                    results[r.request_id] = r
        assert victims, "no request was swapped out"
        assert victims[0] not in serving.kv.requests and victims[0] not in results
        for rid in set(ids) - {victims[0]}:
            assert results[rid].error is None and results[rid].generated_tokens == reference[rid], rid
        assert_balanced(serving.pool)
        assert all(o["held_chunks"] == 0 for o in serving.pool.host_tier()["owners"])


# ---- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(ttft_ms=0, tpot_ms=10), "ttft_ms must be a positive"),
    (dict(ttft_ms=100, tpot_ms=-1), "tpot_ms must be a positive"),
    (dict(ttft_ms=float("nan"), tpot_ms=10), "ttft_ms"),
    (dict(ttft_ms=float("inf"), tpot_ms=10), "ttft_ms"),
    (dict(ttft_ms="100", tpot_ms=10), "ttft_ms"),
    (dict(ttft_ms=True, tpot_ms=10), "ttft_ms"),
])
def test_bad_slo_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SLO(**kw)


def test_bad_serving_arguments_for_the_scheduler(tiny_llama):
    with pytest.raises(TypeError, match="slo must be"):
        elastic(tiny_llama, budget="8MiB", slo=(100, 10))
    with pytest.raises(ValueError, match="cpu_budget"):
        elastic(tiny_llama, pool=Pool("cpu", budget="8MiB"), cpu_budget="8MiB")
    with pytest.raises(TypeError, match="clock"):
        elastic(tiny_llama, budget="8MiB", clock=3)


def test_scheduler_without_targets_or_elastic_cache_is_refused(tiny_llama):
    with elastic(tiny_llama, budget="8MiB") as serving:  # no slo=
        with pytest.raises(ValueError, match="needs latency targets"):
            SLOAwareScheduler(serving_cache(tiny_llama, serving), None, 8)
    with pytest.raises(TypeError, match="runs on the elastic paged cache"):
        SLOAwareScheduler(object(), None, 8)


def serving_cache(model, serving):
    """Builds the elastic cache transformers would build for this model."""
    from transformers.generation.continuous_batching import continuous_api

    cfg = _cb(scheduler_type="ellm_slo")
    return continuous_api.PagedAttentionCache(model.config, cfg, model.device, None, dtype=model.dtype)


def test_scheduler_name_is_registered_only_while_a_model_is_elastic(tiny_llama):
    from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING

    assert "ellm_slo" not in SCHEDULER_MAPPING
    with elastic(tiny_llama, budget="8MiB", slo=SLO(ttft_ms=100, tpot_ms=10)):
        assert SCHEDULER_MAPPING["ellm_slo"] is SLOAwareScheduler
    assert "ellm_slo" not in SCHEDULER_MAPPING


# ---- activation headroom ------------------------------------------------------------------------


class _FakeArena:
    """stats() as a pool's: allocated bytes now and their peak."""

    def __init__(self):
        self.allocated = self.peak = 0

    def stats(self):
        return {"allocated_bytes": self.allocated, "allocated_peak": self.peak}


def test_activation_headroom_keeps_the_largest_per_token_peak():
    from ellm_alloc.serving.scheduler import ActivationHeadroom

    h = object.__new__(ActivationHeadroom)
    h.arena, h.chunk, h.bytes_per_token, h.measured, h._start, h._tokens = _FakeArena(), 2 << 20, 1000, False, None, 0
    assert h.chunks(100) == 1  # the shape estimate before any step: 100 KB, one chunk
    steps = [(100, 10 << 20, 12 << 20), (50, 10 << 20, 40 << 20), (200, 10 << 20, 11 << 20)]
    for tokens, start, peak in steps:
        h.arena.allocated = start
        h.step_started(tokens)
        h.arena.peak = max(h.arena.peak, peak)
        h.step_ended()
    # Step 2 used 30 MiB for 50 tokens; step 3 read the older peak (30 MiB / 200 tokens): the largest stays.
    assert h.bytes_per_token == (30 << 20) / 50
    assert h.chunks(50) == 15 and h.chunks(0) == 0
    h.arena = None  # activations not in the KV pool: no headroom
    assert h.chunks(10_000) == 0
