"""ElasticCache's linear-attention and Mamba layers: conv and recurrent states
in pool slots (PackedStates), against transformers' DynamicCache on tiny
hybrid and Mamba models built offline."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.hf import ElasticCache  # noqa: E402
from ellm_alloc.hf.cache import ElasticHybridLayer  # noqa: E402
from ellm_alloc.hf.compat import CACHE_KWARG, cache_kwarg_of  # noqa: E402
from ellm_alloc.hf.families import tiny_config  # noqa: E402
from ellm_alloc.hf.linear import ElasticLinearLayer  # noqa: E402
from ellm_alloc.hf.storage import PackedStates  # noqa: E402

CHUNK = 2 << 20
# One family per kind of state layer: Mamba-only (cache_params), Mamba +
# attention, gated-delta linear attention + attention, Mamba and attention in
# one layer ("hybrid"), short convolutions only.
FAMILIES = ["mamba", "jamba", "qwen3_next", "falcon_h1", "lfm2"]
# LFM2's default config has attention layers only; its checkpoints mix in
# short-convolution layers.
OVERRIDES = {"lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"])}


@pytest.fixture(scope="module")
def pool():
    with Pool("cpu", budget="512MiB") as p:
        yield p


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(family: str):
    if family not in _MODELS:
        cfg = tiny_config(family)
        for k, v in OVERRIDES.get(family, {}).items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        _MODELS[family] = AutoModelForCausalLM.from_config(cfg).eval()
    return _MODELS[family]


def batch(b: int = 2, prompt: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (b, prompt), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def forward(model, cache, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg_of(model): cache})
    return out.logits[:, -1]


def decode(model, cache, ids, mask, steps: int):
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


def state_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, ElasticLinearLayer)]


def state_tensors(cache):
    for layer in state_layers(cache):
        for i in range(layer.number_of_states):
            for t in (layer.conv_states[i], layer.recurrent_states[i]):
                if t is not None:
                    yield t


def held(pool: Pool, prefix: str) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"].startswith(prefix))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_dynamic_cache_with_states_in_pool(family, pool):
    model = model_of(family)
    ids, mask = batch()
    gen = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    name = cache_kwarg_of(model)
    with torch.no_grad():
        ref = model.generate(ids, **{name: DynamicCache(config=model.config)}, **gen)
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        out = model.generate(ids, **{name: cache}, **gen)
    assert torch.equal(out, ref)
    assert state_layers(cache), "the family has state layers"
    store = cache._backing.states
    spans = [(s.base, s.base + s.n_pages * s.page_bytes) for s in store.spaces]
    tensors = list(state_tensors(cache))
    assert tensors
    for t in tensors:  # every state is a view of the cache's pool slots
        assert any(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for lo, hi in spans)
    # Packed: the chunks held are the states' bytes rounded up once per segment.
    need = store.needed_bytes()
    assert need == sum(t.numel() * t.element_size() for t in tensors)
    assert store.mapped_bytes() <= (math.ceil(need / CHUNK) + len(store.spaces)) * CHUNK
    assert held(pool, "hf.states") * CHUNK == store.mapped_bytes()
    cache.close()
    assert held(pool, "hf.") == 0


def test_states_share_chunks_across_layers(pool):
    """Eleven Mamba layers' small states fit in one chunk, not 22."""
    cfg = type(tiny_config("jamba")).from_dict({**tiny_config("jamba").to_dict(), "num_hidden_layers": 12,
                                                "attn_layer_period": 12, "attn_layer_offset": 11})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    ids, mask = batch()
    prefill(model, cache, ids, mask)
    assert len(state_layers(cache)) == 11
    assert len(list(state_tensors(cache))) == 22
    assert cache._backing.states.needed_bytes() < CHUNK
    assert held(pool, "hf.states") == 1
    cache.close()


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_decode_updates_states_in_place(family, pool):
    """A decode step writes the same slots: no map, no unmap, same addresses."""
    model = model_of(family)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    ids, mask = prefill(model, cache, *batch())
    spaces = cache._backing.states.spaces
    before = [(s.stats()["maps"], s.stats()["unmaps"]) for s in spaces]
    ptrs = [t.data_ptr() for t in state_tensors(cache)]
    decode(model, cache, ids, mask, 5)
    assert [(s.stats()["maps"], s.stats()["unmaps"]) for s in spaces] == before
    assert [t.data_ptr() for t in state_tensors(cache)] == ptrs
    cache.close()


def test_reset_gives_chunks_back_and_generates_again(pool):
    model = model_of("falcon_h1")
    ids, mask = batch()
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    assert all(isinstance(layer, ElasticHybridLayer) for layer in cache.layers)
    with torch.no_grad():
        first = model.generate(ids, **{CACHE_KWARG: cache}, **gen)
        assert held(pool, "hf.states") > 0
        cache.reset()
        assert held(pool, "hf.") == 0
        assert not cache.has_previous_state()
        again = model.generate(ids, **{CACHE_KWARG: cache}, **gen)
    assert torch.equal(first, again)
    cache.close()


@pytest.mark.parametrize("family", ["jamba", "falcon_h1"])
def test_beam_search_matches_dynamic_cache(family, pool):
    """num_beams=2 reorders states and K/V every step (reorder_cache)."""
    model = model_of(family)
    ids, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=2,
              num_return_sequences=2)
    with torch.no_grad():
        ref = model.generate(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}, **kw)
        cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
        out = model.generate(ids, **{CACHE_KWARG: cache}, **kw)
    assert torch.equal(out, ref)
    cache.close()


def test_batch_select_and_repeat_interleave_move_states(pool):
    """transformers' linear layers have no batch_select_indices; the reference
    is a fresh cache prefilled with the selected sequences."""
    model = model_of("jamba")
    ids, mask = batch(b=3)
    cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
    ids, mask = prefill(model, cache, ids, mask)
    three = held(pool, "hf.states")
    cache.batch_select_indices(torch.tensor([2, 0]))
    ids, mask = ids[[2, 0]], mask[[2, 0]]
    assert cache.batch_size == 2 and cache._backing.states.batch == 2
    assert held(pool, "hf.states") <= three
    ref_cache = ElasticCache(model.config, max_batch_size=4, max_cache_len=64, pool=pool)
    forward(model, ref_cache, ids[:, :-1], mask[:, :-1])
    ref, rids, rmask = decode(model, ref_cache, ids, mask, 3)
    got, _, _ = decode(model, cache, ids, mask, 3)
    torch.testing.assert_close(got, ref)
    cache.batch_repeat_interleave(2)
    ref_cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    got, _, _ = decode(model, cache, rids.repeat_interleave(2, 0), rmask.repeat_interleave(2, 0), 2)
    dyn = DynamicCache(config=model.config)  # the reference: the 4 sequences from scratch
    r4, m4 = rids.repeat_interleave(2, 0), rmask.repeat_interleave(2, 0)
    forward(model, dyn, r4[:, :-1], m4[:, :-1])
    ref, _, _ = decode(model, dyn, r4, m4, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.batch_repeat_interleave(2)  # 8 > 4
    cache.close()
    ref_cache.close()


def test_crop_while_recording_past_matches_dynamic_cache(pool):
    """Assisted decoding's protocol: record the past, run candidate tokens,
    crop the rejected ones, go on. Same logits as DynamicCache doing the same."""
    model = model_of("qwen3_next")
    ids, mask = batch()
    caches = [DynamicCache(config=model.config),
              ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)]
    outs = []
    for c in caches:
        i, m = prefill(model, c, ids, mask)
        c.activate_past_recording()
        cand = torch.cat([i, torch.full((2, 3), 7)], 1)
        cm = torch.cat([m, torch.ones(2, 3, dtype=m.dtype)], 1)
        with torch.no_grad():
            model(input_ids=cand[:, -4:], attention_mask=cm, use_cache=True, **{CACHE_KWARG: c})
        c.crop(-2)
        i, m = cand[:, :-2], cm[:, :-2]
        logits, _, _ = decode(model, c, i, m, 3)
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0])
    caches[1].close()


def test_bad_batches(pool):
    model = model_of("jamba")
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        prefill(model, cache, *batch(b=3))
    assert held(pool, "hf.") == 0  # nothing stays mapped after the refusal
    cache.reset()
    ids, mask = prefill(model, cache, *batch(b=2))
    first = cache.is_linear.index(True)
    conv = cache.layers[first].conv_states[0]
    with pytest.raises(ValueError, match="batch changed from 2 to 1"):
        cache.update_conv_state(torch.zeros_like(conv[:1]), first)
    with pytest.raises(IndexError, match="out of range"):
        cache.batch_select_indices(torch.tensor([5]))
    cache.close()


def test_is_linear_and_sizes(pool):
    model = model_of("jamba")
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert cache.is_linear == [k == "ElasticLinearLayer" for k in kinds]
    assert cache.batch_size == -1
    ids, mask = prefill(model, cache, *batch())
    assert cache.batch_size == 2
    assert cache.get_seq_length() == ids.shape[1] - 1
    first_linear = cache.is_linear.index(True)
    assert cache.mapped_bytes(first_linear) > 0
    cache.close()


# ---- PackedStates on its own: a state machine ------------------------------------------

class PackedStatesMachine(RuleBasedStateMachine):
    """Regions of random shapes added and batches fitted up and down, with
    data written into the live slots. Invariants: exactly the pages under
    live slots are mapped (pool ledger included); live slots keep their data;
    slots that come back read as zeros."""

    MAX_BATCH = 5

    @initialize()
    def setup(self):
        self.pool = Pool("cpu", budget="128MiB")
        self.store = PackedStates(self.pool, "t.states", self.MAX_BATCH)
        self.store.SEGMENT_PAGES = 3
        self.model: list[torch.Tensor] = []  # per region: [max_batch, elems] expected contents
        self.seed = 0

    @rule(elems=st.sampled_from([1, 7, 100, 4096, 200_000, 700_000]),
          dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]))
    def add_region(self, elems, dtype):
        if len(self.model) >= 12:
            return
        region = self.store.add((elems,), dtype)
        self.model.append(torch.zeros((self.MAX_BATCH, elems), dtype=dtype))
        assert region.view(self.store.batch).abs().sum() == 0

    @rule(batch=st.integers(0, MAX_BATCH))
    def fit(self, batch):
        old = self.store.batch
        self.store.fit(batch)
        for m in self.model:
            m[min(old, batch):].zero_()  # dropped slots are gone; new ones start at zero

    @precondition(lambda self: self.store.batch > 0 and self.model)
    @rule(data=st.data())
    def write(self, data):
        i = data.draw(st.integers(0, len(self.model) - 1))
        row = data.draw(st.integers(0, self.store.batch - 1))
        self.seed += 1
        value = torch.randint(-100, 100, (self.model[i].shape[1],),
                              generator=torch.Generator().manual_seed(self.seed)).to(self.model[i].dtype)
        self.store.regions[i].view(self.store.batch)[row].copy_(value)
        self.model[i][row] = value

    @precondition(lambda self: self.store.batch > 0 and self.model)
    @rule(data=st.data())
    def move_rows(self, data):
        rows = data.draw(st.lists(st.integers(0, self.store.batch - 1), min_size=1, max_size=self.store.batch))
        src = torch.tensor(rows)
        for region, m in zip(self.store.regions, self.model):
            region.move_rows(src)
            m[:len(rows)] = m[src].clone()

    @invariant()
    def mapped_pages_are_the_live_slots(self):
        chunk = self.store.chunk
        want = [set() for _ in self.store.spaces]
        for r in self.store.regions:
            if self.store.batch:
                want[r.segment].update(range(r.offset // chunk, -(-(r.offset + self.store.batch * r.slot_bytes)
                                                                    // chunk)))
        assert self.store.mapped == want
        for space, pages in zip(self.store.spaces, want):
            assert space.stats()["mapped_pages"] == len(pages)
        assert sum(o["held_chunks"] for o in self.pool.owners() if o["name"].startswith("t.states")) == \
            sum(len(p) for p in want)

    @invariant()
    def live_slots_keep_their_data(self):
        for r, m in zip(self.store.regions, self.model):
            assert torch.equal(r.view(self.store.batch), m[:self.store.batch])

    def teardown(self):
        if not hasattr(self, "store"):
            return
        self.store.close()
        assert all(o["held_chunks"] == 0 for o in self.pool.owners() if o["name"].startswith("t.states"))
        self.pool.validate()
        self.pool.close()


TestPackedStates = PackedStatesMachine.TestCase
TestPackedStates.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)


def test_packed_states_bad_input(pool):
    store = PackedStates(pool, "t.bad", 2)
    with pytest.raises(ValueError, match="holds no bytes"):
        store.add((0, 4), torch.float32)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        store.fit(3)
    store.close()


def test_minimax_gets_its_own_cache_class_on_the_pool(pool):
    """MiniMax accepts only MiniMaxCache: ElasticCache becomes a subclass of
    both, with the lightning-attention state in pool slots."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    model = model_of("minimax")
    ids, mask = batch()
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **gen)  # the model's own MiniMaxCache
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool)
        assert isinstance(cache, MiniMaxCache) and isinstance(cache, ElasticCache)
        out = model.generate(ids, **{CACHE_KWARG: cache}, **gen)
    assert torch.equal(out, ref)
    first = cache.is_linear.index(True)
    state = cache.get_linear_cache(first)
    space = cache._backing.states.spaces[0]
    assert space.base <= state.data_ptr() < space.base + space.n_pages * space.page_bytes
    with pytest.raises(RuntimeError, match="cannot crop"):
        cache.crop(-1)
    cache.close()
    assert held(pool, "hf.") == 0
