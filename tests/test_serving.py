"""ellm_alloc.serving: transformers' continuous batching (generate_batch) on an
elastic paged cache, against the stock engine, on tiny random-weight models
built from configs (no downloads) and host pools."""
from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    ContinuousBatchingConfig,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    Llama4TextConfig,
)

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.serving import SLO, ElasticServing, RequestTooLargeError, _patches, elastic  # noqa: E402
from ellm_alloc.serving.paged_cache import ElasticPagedAttentionCache  # noqa: E402

MiB = 1 << 20
# Wide enough per token (8 KiB a layer pair) that a 2-chunk budget (4 MiB) holds a few hundred tokens:
# eight requests of up to 84 tokens then compete for it.
TINY = dict(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=8, intermediate_size=256, head_dim=64)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    # Sliding and full layers; a window of 8 with 4-token blocks drops blocks
    # every few tokens.
    "gemma3": lambda: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}
GEN = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=-1, pad_token_id=0)
PROMPT_LENS = (5, 21, 40, 3, 33, 60, 17, 50)


def cb_config() -> ContinuousBatchingConfig:
    # 32 batch tokens: the longer prompts are prefilled in several steps.
    return ContinuousBatchingConfig(num_blocks=256, max_batch_tokens=32, page_size=16)


def prompts(lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_and_reference(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    stock = model.generate_batch(prompts(), generation_config=GEN, continuous_batching_config=cb_config())
    assert all(r.error is None for r in stock.values())
    return model, {rid: r.generated_tokens for rid, r in stock.items()}


def held(pool: Pool) -> dict[str, int]:
    return {o["name"]: o["held_chunks"] for o in pool.owners() if o["name"] != "arena"}


def assert_balanced(pool: Pool) -> None:
    pool.validate()
    assert all(n == 0 for n in held(pool).values()), held(pool)


def generate(model, inputs=None, **kw):
    return model.generate_batch(prompts() if inputs is None else inputs, generation_config=GEN,
                                continuous_batching_config=cb_config(), **kw)


@pytest.mark.parametrize("tight, block_size", [(False, None), (True, 4)])
def test_greedy_tokens_match_stock_engine(model_and_reference, tight, block_size, monkeypatch):
    """Same requests, same greedy tokens. With 8 chunks everything fits; with
    one chunk per layer group, requests wait, are preempted and recomputed,
    and sliding layers keep few blocks, yet every token is the stock
    engine's."""
    model, reference = model_and_reference
    budget_chunks = len(set(getattr(model.config, "layer_types", None) or ["full"])) if tight else 8
    seen = {"refused": 0, "lookbacks": 0}
    can_store = ElasticPagedAttentionCache.can_store_request_tokens

    def spy(self, state, request_len, dry_run=False):
        stored = can_store(self, state, request_len, dry_run)
        seen["refused"] += not stored
        seen["lookbacks"] += len(self._lookbacks)
        return stored

    monkeypatch.setattr(ElasticPagedAttentionCache, "can_store_request_tokens", spy)
    pool = Pool("cpu", budget=f"{2 * budget_chunks}MiB")
    try:
        with elastic(model, pool=pool, block_size=block_size) as serving:
            out = generate(model)
            assert {rid: r.error for rid, r in out.items() if r.error} == {}
            assert {rid: r.generated_tokens for rid, r in out.items()} == reference
            usage = serving.usage()
            assert usage["maps"] > 0 and usage["unmaps"] == usage["maps"]  # grew, then gave everything back
            peaks = {o["name"]: o["peak_chunks"] for o in pool.owners() if o["name"] != "arena"}
            assert peaks and sum(peaks.values()) <= budget_chunks
            if tight:
                assert sum(peaks.values()) == budget_chunks  # the budget, not a preset size, was the limit
                assert seen["refused"] > 0  # so requests waited or were preempted
            if "sliding_attention" in serving.cache.cache_allocators:
                assert seen["lookbacks"] > 0  # split prefills read through a lookback hold
            assert_balanced(pool)  # finished requests hold nothing
        assert_balanced(pool)
        assert not _patches.is_patched()
        assert "generate_batch" not in model.__dict__
    finally:
        pool.close()


def test_stock_engine_untouched_after_close(model_and_reference):
    model, reference = model_and_reference
    with elastic(model, budget="16MiB"):
        pass
    out = generate(model)
    assert {rid: r.generated_tokens for rid, r in out.items()} == reference


def test_continuous_batching_manager_api(model_and_reference):
    model, reference = model_and_reference
    pool = Pool("cpu", budget="16MiB")
    try:
        with elastic(model, pool=pool) as serving:
            with model.continuous_batching_context_manager(generation_config=GEN,
                                                           continuous_batching_config=cb_config()) as manager:
                rid = manager.add_request(prompts()[2], request_id="r2", max_new_tokens=24)
                result = manager.get_result(request_id=rid, timeout=60)
            assert result is not None and result.error is None
            assert result.generated_tokens == reference["req_2"]
            assert serving.kv is not None and serving.usage()["requests"] == 0
            assert_balanced(pool)
        assert_balanced(pool)
    finally:
        pool.close()


def test_request_too_large_is_refused_and_nothing_leaks(model_and_reference):
    model, reference = model_and_reference
    pool = Pool("cpu", budget="4MiB")
    try:
        with elastic(model, pool=pool) as serving:
            too_long = prompts((5, 3000))  # 3000 tokens of KV cannot fit in 2 chunks
            with pytest.raises(RequestTooLargeError, match=r"inputs\[1\].*even alone.*budget is 4194304"):
                generate(model, too_long)
            assert_balanced(pool)
            # Inside the generation thread (the manager API, no up-front check) the
            # cache refuses it on first sight, and the run ends with that error.
            out = type(model).generate_batch(model, too_long, generation_config=GEN,
                                             continuous_batching_config=cb_config())
            errors = [r.error for r in out.values() if r.error]
            assert errors and any("even alone" in e for e in errors)
            assert_balanced(pool)
            # The model still serves requests that fit.
            out = generate(model)
            assert {rid: r.generated_tokens for rid, r in out.items()} == reference
            assert serving.usage()["requests"] == 0
        assert_balanced(pool)
    finally:
        pool.close()


class _FakeModel:
    """Enough of a model for elastic()'s argument checks."""

    def __init__(self, config):
        self.config = config
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def generate_batch(self, *args, **kwargs):
        raise AssertionError("not called")


def test_bad_arguments_raise_clear_errors():
    model = _FakeModel(CONFIGS["llama"]())
    pool = Pool("cpu", budget="4MiB")
    try:
        with pytest.raises(ValueError, match="pool= or budget=, not both"):
            elastic(model, pool=pool, budget="4MiB")
        with pytest.raises(ValueError, match="needs budget="):
            elastic(model)
        with pytest.raises(TypeError, match="ellm_alloc Pool"):
            elastic(model, pool="4MiB")
        for bad in (2, 0, "16", 16.0, True):
            with pytest.raises(ValueError, match="block_size"):
                elastic(model, pool=pool, block_size=bad)
        with pytest.raises(TypeError, match="transformers model"):
            elastic(object(), pool=pool)
        chunked = Llama4TextConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, intermediate_size_mlp=128,
                                   head_dim=16, attention_chunk_size=8)
        with pytest.raises(ValueError, match="chunked_attention"):
            elastic(_FakeModel(chunked), pool=pool)
        with elastic(model, pool=pool):
            with pytest.raises(ValueError, match="already elastic"):
                elastic(model, pool=pool)
            assert _patches.is_patched()
        assert not _patches.is_patched() and "generate_batch" not in model.__dict__
        assert_balanced(pool)
    finally:
        pool.close()


def test_close_is_idempotent_and_closes_its_own_pool():
    model = _FakeModel(CONFIGS["llama"]())
    serving = elastic(model, budget="4MiB")
    assert isinstance(serving, ElasticServing) and serving.own_pool and serving.kv is None
    serving.close()
    serving.close()
    assert "closed" in repr(serving.pool)


@pytest.mark.parametrize("version", ["5.16.2", "5.25.0", "6.0.0"])
def test_unknown_transformers_version_is_refused(monkeypatch, version):
    # transformers swaps its module object in sys.modules once models are
    # loaded: patch the one an import finds now.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(RuntimeError, match=f"transformers {version} is installed"):
        _patches.check_transformers()
    with pytest.raises(RuntimeError, match=version):
        elastic(_FakeModel(CONFIGS["llama"]()), budget="4MiB")


def test_cancelling_a_request_mid_prefill_frees_everything(model_and_reference, monkeypatch):
    """A request cancelled while its prompt is half prefilled (split over
    steps by the 32-token batch budget) gives back every block, lookback
    holds included; the other requests still get the stock engine's tokens,
    and the pool holds nothing afterwards."""
    model, reference = model_and_reference
    long_prompt = prompts((90,), seed=7)[0]  # three prefill steps of at most 32 tokens
    cancelled = {}
    can_store = ElasticPagedAttentionCache.can_store_request_tokens

    def cancel_when_half_prefilled(self, state, request_len, dry_run=False):
        stored = can_store(self, state, request_len, dry_run)
        if state.request_id == "victim" and state.current_len() > 0 and "at" not in cancelled:
            cancelled["at"] = state.current_len()  # tokens already prefilled
            cancelled["manager"].cancel_request("victim")
        return stored

    monkeypatch.setattr(ElasticPagedAttentionCache, "can_store_request_tokens", cancel_when_half_prefilled)
    pool = Pool("cpu", budget="16MiB")
    try:
        with elastic(model, pool=pool) as serving:
            with model.continuous_batching_context_manager(generation_config=GEN,
                                                           continuous_batching_config=cb_config()) as manager:
                cancelled["manager"] = manager
                manager.add_request(long_prompt, request_id="victim", max_new_tokens=24)
                rid = manager.add_request(prompts()[2], request_id="r2", max_new_tokens=24)
                result = None
                for _ in range(50):  # the victim's cancellation may be reported first
                    result = manager.get_result(request_id=rid, timeout=10)
                    if result is not None:
                        break
            assert 0 < cancelled.get("at", 0) < len(long_prompt), cancelled
            assert result is not None and result.error is None and result.generated_tokens == reference["req_2"]
            assert "victim" not in serving.kv.requests and serving.usage()["requests"] == 0
            assert not serving.cache._lookbacks
            assert_balanced(pool)
        assert_balanced(pool)
    finally:
        pool.close()


# ---- randomised runs ---------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_RUN = st.fixed_dictionaries({
    "lens": st.lists(st.integers(1, 80), min_size=1, max_size=6),
    "new_tokens": st.lists(st.integers(1, 12), min_size=6, max_size=6),
    # Request i is cancelled once it holds at least this many tokens (None: never).
    "cancel_at": st.lists(st.one_of(st.none(), st.integers(1, 90)), min_size=6, max_size=6),
    "budget_chunks": st.integers(2, 8),
    # The SLO-aware scheduler (with a host tier to swap to) or the stock FIFO.
    "scheduler": st.sampled_from(["fifo", "ellm_slo"]),
    # At this many room requests the pool's budget grows by this many chunks (None: never).
    "grow_at": st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 4))),
})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=_RUN)
def test_the_ledger_balances_at_every_step_of_a_randomised_run(model_and_reference, run):
    """Arrivals of random lengths, cancellations at random points (mid-prefill
    or mid-decode), budgets from two to eight chunks that may grow mid-run,
    and either scheduler (the SLO-aware one swapping to a host tier): each
    time the engine asks the cache for room, the pool's ledger balances and
    the KV manager's invariants hold; every request not cancelled finishes
    with all its tokens; nothing is held at the end, on the device or in
    the host tier."""
    model, _ = model_and_reference
    slo = run["scheduler"] == "ellm_slo"
    pool = Pool("cpu", budget=f"{2 * run['budget_chunks']}MiB", cpu_budget="16MiB" if slo else 0)
    n = len(run["lens"])
    ids = [f"q{i}" for i in range(n)]
    cancel_at = {rid: c for rid, c in zip(ids, run["cancel_at"]) if c is not None}
    triggered: set[str] = set()
    manager_of = {}
    checks = {"n": 0}
    can_store = ElasticPagedAttentionCache.can_store_request_tokens

    def checked(self, state, request_len, dry_run=False):
        checks["n"] += 1
        pool.validate()
        self.kv.check()
        if run["grow_at"] is not None and checks["n"] == run["grow_at"][0]:
            pool.set_budget(f"{2 * (run['budget_chunks'] + run['grow_at'][1])}MiB")
        rid = state.request_id
        if rid in cancel_at and rid not in triggered and state.current_len() >= cancel_at[rid]:
            triggered.add(rid)
            manager_of["m"].cancel_request(rid)
        return can_store(self, state, request_len, dry_run)

    try:
        with pytest.MonkeyPatch.context() as mp, elastic(
                model, pool=pool, slo=SLO(ttft_ms=1000, tpot_ms=100) if slo else None) as serving:
            mp.setattr(ElasticPagedAttentionCache, "can_store_request_tokens", checked)  # this example only
            config = cb_config()
            config.scheduler_type = run["scheduler"]
            with model.continuous_batching_context_manager(generation_config=GEN,
                                                           continuous_batching_config=config) as manager:
                manager_of["m"] = manager
                for rid, prompt, new in zip(ids, prompts(tuple(run["lens"]), seed=3), run["new_tokens"]):
                    manager.add_request(prompt, request_id=rid, max_new_tokens=new)
                results = {}
                for _ in range(200):
                    if set(ids) - triggered <= set(results):
                        break
                    r = manager.get_result(timeout=5)
                    if r is not None:
                        results[r.request_id] = r
            for rid, new in zip(ids, run["new_tokens"]):
                if rid in triggered:
                    continue  # cancelled (or finished first): either way it must hold nothing, checked below
                r = results.get(rid)
                assert r is not None and r.error is None, (rid, r)
                assert len(r.generated_tokens) == new, (rid, r.generated_tokens)
            assert serving.usage()["requests"] == 0 and not serving.cache._lookbacks
            assert_balanced(pool)
        assert_balanced(pool)
        assert all(o["held_chunks"] == 0 for o in pool.host_tier()["owners"])
        assert checks["n"] > 0
    finally:
        pool.close()
