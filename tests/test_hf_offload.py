"""ElasticCache.offload / restore: whole sequences' K/V to the pool's host tier
and back at the same addresses (PageSpace swap), on tiny random-weight
transformers models built offline, on host pools with a cpu budget.

Checked here: greedy tokens after offload + restore are those of a run
without offload (full, sliding and DSA layers, hybrid and Mamba models), the
bytes come back bit-exact at the same addresses, the device chunks really go
to the host tier and back, both ledgers balance (pool.validate(), the host
tier's created == free + held) after reset / close / batch_select_indices
on an offloaded cache, bad input and a pool without host tier give clear
errors, and failures (a copy, the host budget, the device pool) leave the
sequences as they were.

The file also runs on the CUDA backend over the fake driver
(ELLM_TEST_BACKEND=fakecuda, tests/conftest.py), like tests/test_swap_space.py:
copy and pinned-slab faults are then the fake's failing driver calls, and
the check that a copy waits for a held caller stream runs on the host
backend only (the fake runs copies at once).
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig  # noqa: E402

from ellm_alloc import OutOfMemoryError, Pool  # noqa: E402
from ellm_alloc.errors import AllocatorError  # noqa: E402
from ellm_alloc.hf import ElasticCache  # noqa: E402
from ellm_alloc.hf.compat import cache_kwarg_of  # noqa: E402
from ellm_alloc.hf.families import tiny_config  # noqa: E402
from ellm_alloc.hf.linear import ElasticLinearLayer  # noqa: E402
from ellm_alloc.kv.space import PINNED, SWAPPED, SWAPPING_IN, SWAPPING_OUT, PageSpace  # noqa: E402

FAKE = os.environ.get("ELLM_TEST_BACKEND") == "fakecuda"
MiB = 1 << 20
CHUNK = 2 * MiB
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "gemma3": lambda: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}
GEN = dict(do_sample=False, pad_token_id=0)

_MODELS: dict[str, torch.nn.Module] = {}


def model_of(name: str):
    if name not in _MODELS:
        torch.manual_seed(0)
        cfg = CONFIGS[name]() if name in CONFIGS else tiny_config(name)
        _MODELS[name] = AutoModelForCausalLM.from_config(cfg).eval()
    return _MODELS[name]


def new_pool(budget: str = "256MiB", cpu_budget: str | int = "64MiB") -> Pool:
    return Pool("cpu", budget=budget, cpu_budget=cpu_budget)


def batch(b: int = 2, prompt: int = 12, seed: int = 1, vocab: int = 128):
    """Left-padded prompts: sequence 0 has 4 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, prompt), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def forward(model, cache, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg_of(model): cache})
    return out.logits[:, -1]


def decode(model, cache, ids, mask, steps: int):
    """Greedy steps on a filled cache (ids ends with the token to feed next)."""
    logits = []
    for _ in range(steps):
        out = forward(model, cache, ids[:, -1:], mask)
        logits.append(out)
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(logits), ids, mask


def prefill(model, cache, ids, mask):
    out = forward(model, cache, ids, mask)
    return torch.cat([ids, out.argmax(-1, keepdim=True)], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def held(pool: Pool, prefix: str = "hf.") -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"].startswith(prefix))


def host_held(pool: Pool, prefix: str = "hf.") -> int:
    return sum(o["held_chunks"] for o in pool.host_tier()["owners"] if o["name"].startswith(prefix))


def check_ledgers(pool: Pool) -> None:
    """Both tiers balance: created == free + sum(held), within their budgets."""
    pool.validate()
    st = pool.stats()
    assert st["created_chunks"] == st["free_chunks"] + sum(o["held_chunks"] for o in pool.owners())
    host = pool.host_tier()
    assert host["created_chunks"] == host["free_chunks"] + sum(o["held_chunks"] for o in host["owners"]), host
    assert host["created_chunks"] * host["chunk_bytes"] <= host["budget_bytes"], host


def kv_snapshot(cache, rows) -> list[torch.Tensor]:
    """Copies of what each attention layer keeps of `rows` (its kept token range)."""
    out = []
    for store in cache._backing.token_stores():
        for view in store.views():
            out.append(view[rows, :, store.start:store.end].clone())  # [rows, heads, tokens, dim]
    return out


def kv_ptrs(cache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (getattr(layer, "keys", None),
                                                              getattr(layer, "values", None)) if t is not None]


def inject(pool: Pool, kind: str, nth: int) -> None:
    """pool.inject_fault(kind, nth) (nth 0 disarms); on the fake driver, the
    failure of the driver call behind it (a copy out, a pinned allocation)."""
    if FAKE and kind in ("copy", "host_alloc"):
        import fakecuda

        name = {"host_alloc": "cuMemHostAlloc", "copy": "cuMemcpyDtoHAsync"}[kind]
        fakecuda.load().fail_call(name, nth, fakecuda.CUDA_ERROR_OUT_OF_MEMORY)
    else:
        pool.inject_fault(kind, nth)


def states_of(store, rows):
    return {store.space.state(p) for p in store.row_pages(rows)}


# ---- round trips through generate() -----------------------------------------------------


@pytest.mark.parametrize("name,rows", [("llama", [1]), ("llama", None), ("gemma3", [0]), ("gemma3", [1, 0])])
def test_offload_restore_continues_generation_exactly(name, rows):
    """generate 10 tokens, offload, restore, generate 10 more: the tokens are
    those of one 20-token generate without offload, the K/V bytes come back
    bit-exact at the same addresses, and while offloaded the device chunks
    were in the host tier."""
    model = model_of(name)
    ids, mask = batch()
    pool = new_pool()
    try:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, **GEN)
            cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
            first = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN,
                                   **{cache_kwarg_of(model): cache})
        want = [0, 1] if rows is None else rows
        before = kv_snapshot(cache, [0, 1])
        ptrs = kv_ptrs(cache)
        held_before, mapped_before = held(pool), cache.mapped_bytes()
        per_row = sum(len(st.row_pages([0])) for st in cache._backing.token_stores())
        assert per_row > 0 and host_held(pool) == 0

        moved = cache.offload(rows)
        assert moved == len(want) * per_row * CHUNK == cache.offloaded_bytes()
        assert cache.offloaded == sorted(want)
        assert cache.mapped_bytes() == mapped_before - moved
        assert host_held(pool) == len(want) * per_row  # host chunks are taken at once
        cache.wait_swaps()
        assert cache.offload_ready() and cache.offload_ready(want)
        assert held(pool) == held_before - len(want) * per_row  # device chunks back in the pool
        for st in cache._backing.token_stores():
            assert states_of(st, want) == {SWAPPED}
            assert states_of(st, [r for r in (0, 1) if r not in want]) <= {PINNED}
        check_ledgers(pool)

        more_mask = torch.cat([mask, torch.ones_like(first[:, ids.shape[1]:])], 1)
        with pytest.raises(RuntimeError, match=r"offloaded to the host tier \(call cache.restore\(\) first\)"):
            with torch.no_grad():
                model.generate(first, attention_mask=more_mask, max_new_tokens=10, **GEN,
                               **{cache_kwarg_of(model): cache})

        cache.restore()
        assert cache.offloaded == [] and cache.offloaded_bytes() == 0
        assert held(pool) == held_before and host_held(pool) == 0  # host chunks back once the copies are done
        assert cache.mapped_bytes() == mapped_before
        assert kv_ptrs(cache) == ptrs
        for a, b in zip(before, kv_snapshot(cache, [0, 1])):
            assert torch.equal(a, b)  # bit-exact
        check_ledgers(pool)
        with torch.no_grad():
            out = model.generate(first, attention_mask=more_mask, max_new_tokens=10, **GEN,
                                 **{cache_kwarg_of(model): cache})
        assert torch.equal(out, ref)
        cache.close()
        assert held(pool) == 0 and host_held(pool) == 0
        check_ledgers(pool)
    finally:
        pool.close()


def test_multi_page_rows_round_trip_bit_exact_through_direct_updates():
    """2 KiB tokens (1024 a chunk): each row spans several pages per plane; a
    sliding layer (window 1500) swaps only the pages under its window. After
    restore the views read the same bytes, and updates go on as before."""
    heads, dim, window = 4, 128, 1500
    cfg = Gemma3TextConfig(**{**TINY, "num_key_value_heads": heads}, head_dim=dim, sliding_window=window,
                           layer_types=["sliding_attention", "full_attention"])
    pool = new_pool(budget="256MiB", cpu_budget="128MiB")
    try:
        cache = ElasticCache(cfg, max_batch_size=3, max_cache_len=8192, pool=pool)
        g = torch.Generator().manual_seed(0)
        total = 5000
        keys = torch.randn(3, heads, total, dim, generator=g)
        vals = torch.randn(3, heads, total, dim, generator=g)
        pos = 0
        for step in (3000, 1):
            for layer in (0, 1):
                cache.update(keys[:, :, pos:pos + step], vals[:, :, pos:pos + step], layer)
            pos += step
        sliding, full = (cache.layers[i]._store for i in (0, 1))
        # K and V: tokens [1501, 3001) of the window on pages 1-2, the full layer's 3001 tokens on 0-2
        assert len(sliding.row_pages([0])) == 2 * 2 and len(full.row_pages([0])) == 2 * 3
        assert sliding.rel[0][0] > 0  # the window's pages only
        held_before = held(pool)
        cache.offload(torch.tensor([2, 0]))
        assert cache.offloaded == [0, 2]
        for st in (sliding, full):
            assert states_of(st, [0, 2]) <= {SWAPPING_OUT, SWAPPED}
            assert states_of(st, [1]) == {PINNED}
        cache.wait_swaps()
        assert held(pool) == held_before - 2 * 10 and host_held(pool) == 2 * 10
        cache.restore([0])
        assert cache.offloaded == [2]
        assert states_of(full, [0]) <= {PINNED, SWAPPING_IN} and states_of(full, [2]) == {SWAPPED}
        cache.restore(2)
        check_ledgers(pool)
        for i, start in ((0, pos - window), (1, 0)):
            layer = cache.layers[i]
            assert torch.equal(layer.keys[:3, :, start:pos], keys[:, :, start:pos])
            assert torch.equal(layer.values[:3, :, start:pos], vals[:, :, start:pos])
        for step in (1, 700, 1):  # the layers go on writing and reading, windows sliding
            for i in (0, 1):
                k, v = cache.update(keys[:, :, pos:pos + step], vals[:, :, pos:pos + step], i)
                lo = max(pos - window + 1, 0) if i == 0 else 0
                assert torch.equal(k, keys[:, :, lo:pos + step]) and torch.equal(v, vals[:, :, lo:pos + step])
            pos += step
        cache.close()
        check_ledgers(pool)
        assert held(pool) == 0 and host_held(pool) == 0
    finally:
        pool.close()


HELD = 0x5157  # a caller stream number the test holds back (pool.hold_stream)


@pytest.mark.skipif(FAKE, reason="the fake driver runs copies at once, unordered by other streams")
def test_offload_is_queued_behind_the_callers_stream_and_polled():
    """offload(stream=s) copies after s's work: while s is held (a kernel
    still writing), nothing is copied, offload_ready() stays False and the
    device chunks stay held; once released, the swap ends; a restore right
    after an offload (copies maybe under way) gets the bytes back too."""
    model = model_of("llama")
    ids, mask = batch()
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        prefill(model, cache, ids, mask)
        before = kv_snapshot(cache, [0, 1])
        held_before = held(pool)
        pool.hold_stream(HELD)
        try:
            cache.offload([0], stream=HELD)
            for _ in range(10):
                assert not cache.offload_ready() and not cache.offload_ready([0])
            for st in cache._backing.token_stores():
                assert states_of(st, [0]) == {SWAPPING_OUT}
            assert held(pool) == held_before
        finally:
            pool.release_stream(HELD)
        cache.wait_swaps()
        assert cache.offload_ready() and held(pool) == held_before - 4
        cache.restore()
        cache.offload([0, 1])  # and straight back
        cache.restore([1, 0])
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        assert held(pool) == held_before and host_held(pool) == 0
        check_ledgers(pool)
        cache.close()
    finally:
        pool.close()


def test_indexer_keys_are_offloaded_too():
    """A DSA model: its indexer keys (owner hf.indexer) go to the host tier with K/V."""
    model = model_of("deepseek_v32")
    ids, mask = batch(vocab=200)
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ref_cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ids, mask = prefill(model, cache, ids, mask)
        prefill(model, ref_cache, ids[:, :-1], mask[:, :-1])
        indexer = held(pool, "hf.indexer")
        assert indexer > 0
        cache.offload()
        cache.wait_swaps()
        assert host_held(pool, "hf.indexer") == indexer // 2  # the other cache's stay
        cache.restore()
        got, _, _ = decode(model, cache, ids, mask, 4)
        ref, _, _ = decode(model, ref_cache, ids, mask, 4)
        assert torch.equal(got, ref)
        cache.close()
        ref_cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


# ---- linear-attention / Mamba states stay resident ------------------------------------------


@pytest.mark.parametrize("family", ["jamba", "falcon_h1", "mamba"])
def test_hybrid_and_mamba_states_stay_resident(family):
    """Jamba (Mamba layers beside attention layers), Falcon-H1 (both in one
    layer), Mamba (states only): offload moves the attention layers' K/V and
    leaves the packed states where they are; updates of either kind are
    refused until restore; the tokens then match a run without offload."""
    model = model_of(family)
    ids, mask = batch(vocab=200)
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ref = DynamicCache(config=model.config)
        ids, mask = prefill(model, cache, ids, mask)
        prefill(model, ref, ids[:, :-1], mask[:, :-1])
        _, ids, mask = decode(model, cache, ids, mask, 2)
        decode(model, ref, ids[:, :-2], mask[:, :-2], 2)
        states = cache._backing.states
        assert states is not None and any(isinstance(layer, ElasticLinearLayer) for layer in cache.layers)
        states_held = held(pool, "hf.states")
        kv_held = held(pool, "hf.full") + held(pool, "hf.sliding")
        state_ptrs = [t.data_ptr() for layer in cache.layers if isinstance(layer, ElasticLinearLayer)
                      for t in layer.recurrent_states.values() if t is not None]
        snap = [r.view(2).clone() for r in states.regions]

        moved = cache.offload([1])
        cache.wait_swaps()
        assert cache.offloaded == [1]
        assert held(pool, "hf.states") == states_held and host_held(pool, "hf.states") == 0
        if family == "mamba":
            assert moved == 0 and kv_held == 0  # nothing per token to move; the row is still held back
        else:
            assert moved > 0 and host_held(pool) * CHUNK == moved
            assert held(pool, "hf.full") + held(pool, "hf.sliding") == kv_held - moved // CHUNK
        with pytest.raises(RuntimeError, match="offloaded"):
            forward(model, cache, ids[:, -1:], mask)
        for r, s in zip(states.regions, snap):  # the refused step advanced no state
            assert torch.equal(r.view(2), s)
        cache.restore()
        assert [t.data_ptr() for layer in cache.layers if isinstance(layer, ElasticLinearLayer)
                for t in layer.recurrent_states.values() if t is not None] == state_ptrs
        got, _, _ = decode(model, cache, ids, mask, 4)
        want, _, _ = decode(model, ref, ids, mask, 4)
        torch.testing.assert_close(got, want)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        cache.offload()  # then reset: both tiers empty
        cache.reset()
        assert held(pool) == 0 and host_held(pool) == 0
        check_ledgers(pool)
        cache.close()
    finally:
        pool.close()


# ---- batch edits, reset and close on an offloaded cache -------------------------------------


@pytest.mark.parametrize("wait", [False, True])
def test_reset_and_close_while_offloaded_leave_both_ledgers_balanced(wait):
    model = model_of("gemma3")
    ids, mask = batch()
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ids, mask = prefill(model, cache, ids, mask)
        cache.offload([0])
        if wait:
            cache.wait_swaps()
        cache.reset()
        assert cache.offloaded == [] and cache.offloaded_bytes() == 0
        assert held(pool) == 0 and host_held(pool) == 0
        check_ledgers(pool)
        host = pool.host_tier()
        assert host["created_chunks"] == host["free_chunks"] > 0
        # The reset cache serves a new batch.
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN,
                                 **{cache_kwarg_of(model): cache})
        assert torch.equal(out, ref)
        cache.offload()
        cache.close()
        assert held(pool) == 0 and host_held(pool) == 0
        check_ledgers(pool)
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        prefill(model, cache, ids, mask)
        cache.offload()
        del cache  # garbage collection closes it
        gc.collect()
        assert held(pool) == 0 and host_held(pool) == 0
        check_ledgers(pool)
    finally:
        pool.close()


def test_batch_select_drops_offloaded_sequences_and_refuses_to_keep_them():
    model = model_of("gemma3")
    ids, mask = batch(b=3)
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=3, max_cache_len=64, pool=pool)
        ref = DynamicCache(config=model.config)
        ids, mask = prefill(model, cache, ids, mask)
        prefill(model, ref, ids[:, :-1], mask[:, :-1])
        cache.offload([0])
        snapshot = (cache.offloaded, held(pool), host_held(pool))
        with pytest.raises(RuntimeError, match=r"keeps sequences \[0\].*offloaded.*restore\(\)"):
            cache.batch_select_indices(torch.tensor([0, 2]))
        assert (cache.offloaded, held(pool), host_held(pool)) == snapshot
        # Dropping it: sequence 2 moves into row 0, whose pages were in the host tier.
        for c in (cache, ref):
            c.batch_select_indices(torch.tensor([2, 1]))
        ids, mask = ids[[2, 1]], mask[[2, 1]]
        assert cache.offloaded == [] and host_held(pool) == 0
        per_row = sum(len(st.row_pages([0])) for st in cache._backing.token_stores())
        assert held(pool) == 2 * per_row
        check_ledgers(pool)
        got, _, _ = decode(model, cache, ids, mask, 4)
        want, _, _ = decode(model, ref, ids, mask, 4)
        torch.testing.assert_close(got, want)
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


def test_batch_select_out_of_memory_after_dropping_is_retried():
    """Dropping offloaded row 0 and moving row 1 into it needs fresh chunks
    under row 0; with the pool taken by someone else that fails: the row is
    then 'dropped' (refused by forward steps and restore), the rest as it was,
    and the same batch_select_indices works once memory is free."""
    model = model_of("llama")
    ids, mask = batch()
    pool = new_pool(budget="16MiB")
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ref = DynamicCache(config=model.config)
        ids, mask = prefill(model, cache, ids, mask)
        prefill(model, ref, ids[:, :-1], mask[:, :-1])
        cache.offload([0])
        cache.wait_swaps()
        hog = PageSpace(pool, "hog", 8)
        free = pool.stats()["budget_bytes"] // CHUNK - held(pool) - held(pool, "arena")
        hog.map(0, free)
        with pytest.raises(OutOfMemoryError, match=r"sequences \[0\] were offloaded and are dropped now"):
            cache.batch_select_indices([1])
        assert host_held(pool) == 0 and cache.offloaded == []
        check_ledgers(pool)
        with pytest.raises(RuntimeError, match=r"sequences \[0\] were dropped by a batch_select_indices"):
            forward(model, cache, ids[:, -1:], mask)
        with pytest.raises(ValueError, match="sequence 0 was dropped"):
            cache.restore([0])
        for p in range(free):
            hog.unmap(p)
        hog.close()
        for c in (cache, ref):
            c.batch_select_indices([1])
        ids, mask = ids[[1]], mask[[1]]
        got, _, _ = decode(model, cache, ids, mask, 3)
        want, _, _ = decode(model, ref, ids, mask, 3)
        torch.testing.assert_close(got, want)
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


def test_row_edits_are_refused_while_offloaded():
    model = model_of("gemma3")
    ids, mask = batch()
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
        ids, mask = prefill(model, cache, ids, mask)
        before = kv_snapshot(cache, [0, 1])
        cache.offload([1])
        for call, what in [(lambda: cache.crop(-1), "crop"),
                           (lambda: cache.reorder_cache(torch.tensor([1, 0])), "reorder_cache"),
                           (lambda: cache.batch_repeat_interleave(2), "batch_repeat_interleave")]:
            with pytest.raises(RuntimeError, match=f"cannot {what}: sequences \\[1\\] are offloaded"):
                call()
        assert cache.offloaded == [1] and cache.get_seq_length() == ids.shape[1] - 1
        cache.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        cache.close()
    finally:
        pool.close()


# ---- errors ----------------------------------------------------------------------------------


def test_bad_indices_and_calls_are_refused_and_change_nothing():
    model = model_of("llama")
    ids, mask = batch()
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
        with pytest.raises(ValueError, match="holds no sequences"):
            cache.offload([0])
        prefill(model, cache, ids, mask)
        state = lambda: (cache.offloaded, held(pool), host_held(pool))  # noqa: E731
        before = state()
        for bad, err, msg in [
            ([2], IndexError, r"sequence 2 is out of range for a batch of 2 \(0 to 1\)"),
            ([-1], IndexError, "sequence -1 is out of range"),
            (torch.tensor([0, 5]), IndexError, "sequence 5 is out of range"),
            ([0, 1, 0], ValueError, "sequence 0 is listed twice"),
            ([0.0], TypeError, "must be ints or a 1-D integer tensor"),
            (["0"], TypeError, "must be ints"),
            ("0", TypeError, "must be ints"),
            ([True], TypeError, "must be ints"),
            (torch.tensor([True, False]), TypeError, "torch.bool"),
            (torch.tensor([0.0]), TypeError, "torch.float32"),
            (torch.zeros(1, 1, dtype=torch.long), TypeError, "2-D"),
            ({0}, TypeError, "must be ints"),
        ]:
            with pytest.raises(err, match=msg):
                cache.offload(bad)
            assert state() == before, bad
        assert cache.offload([]) == 0 and state() == before
        with pytest.raises(ValueError, match="sequence 1 is not offloaded"):
            cache.restore([1])
        with pytest.raises(ValueError, match="sequence 0 is not offloaded"):
            cache.offload_ready([0])
        with pytest.raises(TypeError, match="stream"):
            cache.offload([0], stream="s")
        with pytest.raises(TypeError):
            cache.offload(0, True)  # transformers' Cache.offload(layer_idx, only_non_sliding): not this API
        cache.offload(torch.tensor(1))  # a 0-d tensor, and an int, are one index
        with pytest.raises(ValueError, match="sequence 1 is offloaded already"):
            cache.offload(1)
        assert cache.offload() > 0 and cache.offloaded == [0, 1]  # None: the rest
        cache.restore([1, 0])
        assert state() == before
        # transformers' per-layer offloading is never on.
        assert cache.offloading is False
        with pytest.raises(ValueError, match=r"use cache.offload\(batch_indices\)"):
            cache.offloading = True
        with pytest.raises(ValueError, match="per-layer offloading"):
            ElasticCache(model.config, max_batch_size=1, max_cache_len=64, pool=pool, offloading=True)
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


def test_no_host_tier_names_cpu_budget():
    model = model_of("llama")
    ids, mask = batch()
    pool = new_pool(cpu_budget=0)
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        ids, mask = prefill(model, cache, ids, mask)
        with pytest.raises(RuntimeError, match=r"no host tier .*cpu_budget is 0.*set_cpu_budget"):
            cache.offload([0])
        assert cache.offloaded == [] and host_held(pool) == 0
        forward(model, cache, ids[:, -1:], mask)  # still usable
        pool.set_cpu_budget("16MiB")  # and offloads once the pool has a host tier
        cache.offload([0])
        cache.restore()
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


def test_fixed_shapes_cache_refuses_offload():
    model = model_of("llama")
    ids, mask = batch()
    pool = new_pool()
    try:
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool, fixed_shapes=True)
        prefill(model, cache, ids, mask)
        with pytest.raises(ValueError, match="fixed_shapes cache cannot offload"):
            cache.offload([0])
        cache.close()
    finally:
        pool.close()


# ---- failures leave the sequences as they were ----------------------------------------------


def _filled(name="llama", **pool_kw):
    model = model_of(name)
    ids, mask = batch()
    pool = new_pool(**pool_kw)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    prefill(model, cache, ids, mask)
    return model, pool, cache


@pytest.mark.parametrize("nth", [1, 3, 5, 7])
def test_a_failed_copy_leaves_every_sequence_resident(nth):
    """Each layer's range is one swap_out; a copy failing in the second layer
    (nth 5, 7) brings the first layer's rows back too."""
    _, pool, cache = _filled()
    try:
        before = kv_snapshot(cache, [0, 1])
        held_before = held(pool)
        inject(pool, "copy", nth)
        with pytest.raises((AllocatorError, OutOfMemoryError), match="copying page .* to the host failed"):
            cache.offload([0, 1])
        inject(pool, "copy", 0)
        assert cache.offloaded == [] and cache.offloaded_bytes() == 0
        for st in cache._backing.token_stores():
            assert states_of(st, [0, 1]) == {PINNED}
        assert held(pool) == held_before and host_held(pool) == 0
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        check_ledgers(pool)
        cache.offload([0, 1])  # and works once the fault is gone
        cache.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()


def test_a_failed_host_slab_allocation_is_absorbed_and_a_full_host_tier_refused():
    """A pinned-slab allocation that fails once (inject_fault('host_alloc', 1))
    is retried by the host tier's growth, as at the PageSpace level: the
    offload goes through. A host tier too small for the sequences is refused
    up front with OutOfMemoryError naming cpu_budget, the sequences resident."""
    _, pool, cache = _filled()
    try:
        before = kv_snapshot(cache, [0, 1])
        inject(pool, "host_alloc", 1)
        cache.offload([0])
        inject(pool, "host_alloc", 0)
        cache.wait_swaps()
        check_ledgers(pool)
        cache.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        pool.set_cpu_budget(str(3 * CHUNK))  # 4 chunks per sequence (2 layers x K/V)
        held_before = held(pool)
        with pytest.raises(OutOfMemoryError, match=r"room for 3 chunks.*need 4.*cpu_budget"):
            cache.offload([1])
        assert cache.offloaded == [] and held(pool) == held_before and host_held(pool) == 0
        for st in cache._backing.token_stores():
            assert states_of(st, [0, 1]) == {PINNED}
        check_ledgers(pool)
        cache.close()
    finally:
        pool.close()


def test_restore_without_device_memory_keeps_the_sequences_offloaded():
    model, pool, cache = _filled(budget="16MiB")
    try:
        before = kv_snapshot(cache, [0, 1])
        cache.offload([0, 1])
        cache.wait_swaps()
        hog = PageSpace(pool, "hog", 8)
        free = pool.stats()["budget_bytes"] // CHUNK - held(pool) - held(pool, "arena")
        hog.map(0, free - 6)  # room for 6 of the 8 chunks: the second layer's swap-in fails
        with pytest.raises(OutOfMemoryError):
            cache.restore()
        assert cache.offloaded == [0, 1]
        for st in cache._backing.token_stores():
            assert states_of(st, [0, 1]) <= {SWAPPED, SWAPPING_OUT}
        cache.wait_swaps()
        assert held(pool, "hf.") == 0 and host_held(pool) == 8
        check_ledgers(pool)
        for p in range(free - 6):
            hog.unmap(p)
        hog.close()
        cache.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, kv_snapshot(cache, [0, 1])))
        cache.close()
        check_ledgers(pool)
    finally:
        pool.close()
