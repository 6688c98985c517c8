"""ElasticCache(fixed_shapes=True) (ellm_alloc/hf/fixed.py) against
transformers' StaticCache on tiny random-weight models built from configs, on
host pools: the same tokens eagerly and under torch.compile (one graph, no
recompilation, chunks mapped while compiled code runs), StaticCache's shapes
and masks, memory held only under written tokens, and clear errors."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    StaticCache,
)

from ellm_alloc import Pool  # noqa: E402
from ellm_alloc.hf import ElasticCache  # noqa: E402
from ellm_alloc.kv.space import ZERO, PageSpace  # noqa: E402

# Tiny models for generate(): full attention, sliding windows, and a mix.
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=8),
    "gemma3": lambda: Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}
GEN = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)


def make_model(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def batch(prompt: int = 12, seed: int = 1):
    """Two prompts, the first left-padded by 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask

CHUNK = 2 << 20
# 4 KV heads x 64 dims x 4 bytes: 1 KiB a token, so a 2 MiB chunk holds 2048
# tokens and a sequence's range of MAX_LEN tokens is three chunks.
WIDE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=64, intermediate_size=128)
TOKENS_PER_CHUNK = 2048
MAX_LEN = 4608
PROMPT = 2040  # decoding from here crosses into a sequence's second chunk
STEPS = 16


@pytest.fixture(scope="module")
def pool():
    with Pool("cpu", budget="1GiB") as p:
        yield p
        p.validate()


def wide_model(cls=LlamaConfig, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**WIDE, **extra)).eval()


def long_batch(prompt: int = PROMPT, seed: int = 3):
    """Two prompts, the first left-padded by 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask


def decode(model, cache, forward, ids, mask, steps: int = STEPS, after_step=None):
    """Greedy decoding as generate() runs it for a static cache: an eager
    prefill, then one `forward` call per token with a 2-D mask padded to the
    cache's length and explicit positions (left padding shifts them)."""
    batch_size, prompt = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.zeros(batch_size, MAX_LEN, dtype=mask.dtype)
    full_mask[:, :prompt] = mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        position = positions[:, -1:]
        for step in range(steps - 1):
            position = position + 1
            full_mask[:, prompt + step] = 1
            out = forward(input_ids=token, attention_mask=full_mask, position_ids=position, past_key_values=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            if after_step is not None:
                after_step(step)
    return torch.cat(tokens, dim=1)


def held_by_cache(pool: Pool) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"].startswith("hf."))


def test_compiled_decoding_matches_static_cache_without_recompiling(pool):
    """torch.compile(model.forward, fullgraph=True) decodes with a fixed-shape
    ElasticCache: tokens equal StaticCache's; after the first compiled step
    nothing recompiles, not when a chunk is mapped mid-decode and not for a
    second cache of the same shapes."""
    from torch._dynamo.utils import counters

    model = wide_model()
    ids, mask = long_batch()
    reference = decode(model, StaticCache(model.config, max_cache_len=MAX_LEN), model.forward, ids, mask)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward, fullgraph=True)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
    assert cache.is_compileable
    mapped_after: list[int] = []
    graphs_after: list[int] = []

    def watch(step):
        mapped_after.append(cache.mapped_bytes())
        graphs_after.append(counters["stats"]["unique_graphs"])
        if step == 0:  # warm-up done: from here on a recompilation is an error
            torch._dynamo.config.error_on_recompile = True

    try:
        tokens = decode(model, cache, compiled, ids, mask, after_step=watch)
        assert torch.equal(tokens, reference)
        assert graphs_after == [1] * (STEPS - 1)
        # A chunk was mapped while compiled code ran (the decode crossed 2048 tokens).
        assert mapped_after[-1] > mapped_after[0]
        # A second cache of the same shapes reuses the compiled graph.
        cache.close()
        second = ElasticCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
        assert torch.equal(decode(model, second, compiled, ids, mask), reference)
        assert counters["stats"]["unique_graphs"] == 1
        second.close()
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert held_by_cache(pool) == 0
    pool.validate()


def test_generate_compiles_its_decode_steps_and_matches_static_cache(pool):
    """generate() itself compiles the decode steps for a compileable cache
    (on CPU when the compile config allows all devices): StaticCache's tokens,
    one graph, no graph break (fullgraph)."""
    from transformers import CompileConfig
    from torch._dynamo.utils import counters

    model = wide_model()
    ids, mask = batch()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, past_key_values=StaticCache(model.config, max_cache_len=512),
                                 **kw)
            cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=512, pool=pool, fixed_shapes=True)
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, compile_config=config, **kw)
        assert counters["stats"]["unique_graphs"] == 1  # the decode step was compiled, once
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, ref)
    cache.close()
    pool.validate()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_matches_static_cache(name, pool):
    """Eager generate() with full and sliding layers (Mistral, Gemma-3):
    StaticCache's tokens; is_compileable as StaticCache's."""
    model = make_model(name)
    ids, mask = batch()
    with torch.no_grad():
        static = StaticCache(model.config, max_cache_len=64)
        ref = model.generate(ids, attention_mask=mask, past_key_values=static, **GEN)
        cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=64, pool=pool, fixed_shapes=True)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert torch.equal(out, ref)
    assert cache.is_compileable and not ElasticCache(model.config, 1, 8, pool=pool).is_compileable
    for layer_idx in range(len(cache.layers)):
        assert cache.get_mask_sizes(1, layer_idx) == (64, 0)
    cache.reset()  # the cache serves a second batch after reset()
    assert cache.mapped_bytes() == 0
    with torch.no_grad():
        again = model.generate(ids, attention_mask=mask, past_key_values=cache, **GEN)
    assert torch.equal(again, ref)
    cache.close()
    pool.validate()


def test_update_returns_static_shapes_over_zero_pages(pool):
    # Leave NaN bytes in free chunks of the pool first: the cache must not
    # show a recycled chunk's old bytes past the written tokens.
    dirty = PageSpace(pool, "dirty", 16)
    dirty.map(0, 16)
    dirty.bytes_view().fill_(0xFF)
    dirty.close()
    model = wide_model()
    cache = ElasticCache(model.config, max_batch_size=3, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
    k = torch.randn(3, 4, 5, 64)
    K, V = cache.update(k, k + 1, 0)
    assert K.shape == V.shape == (3, 4, MAX_LEN, 64)
    assert torch.equal(K[:, :, :5], k) and torch.equal(V[:, :, :5], k + 1)
    assert not K[:, :, 5:].any() and not V[:, :, 5:].any()  # unwritten: zeros, read through the zero chunk
    K2, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert K2.data_ptr() == K.data_ptr()  # fixed addresses
    assert torch.equal(K[:, :, 5], k[:, :, 0])
    assert int(cache.get_seq_length(0)) == 6 and int(cache.get_seq_length(1)) == 0
    store = cache.stores[0]
    # Each sequence's region: page 0 backed, pages 1-2 zero.
    states = [store.space.state(p) for p in range(store.space.n_pages)]
    assert states.count(ZERO) == 3 * 2 * 2 and store.space.zero_pages == 12
    cache.close()
    pool.validate()


def test_held_memory_is_the_need_plus_at_most_a_chunk_per_layer_plane_sequence(pool):
    """After decoding past a chunk boundary, and with a third sequence slot
    unused: the cache holds exactly the chunks under written tokens, which is
    the tokens' need plus less than one chunk per (layer, K/V, sequence);
    everything else of the range (the unused slot too) is zero pages, and the
    whole pool holds one zero chunk."""
    model = wide_model()
    ids, mask = long_batch()
    cache = ElasticCache(model.config, max_batch_size=3, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
    decode(model, cache, model.forward, ids, mask)
    length = PROMPT + STEPS - 1
    layers, planes, sequences = 2, 2, 2
    chunks_per_region = -(-length // TOKENS_PER_CHUNK)  # 2
    assert cache.mapped_bytes() == layers * planes * sequences * chunks_per_region * CHUNK
    assert held_by_cache(pool) * CHUNK == cache.mapped_bytes()
    need = cache.needed_bytes()
    assert need == layers * planes * sequences * length * 1024
    assert need <= cache.mapped_bytes() < need + layers * planes * sequences * CHUNK
    regions = layers * planes * 3
    assert sum(st.space.zero_pages for st in cache.stores) == regions * 3 - layers * planes * sequences * 2
    zero = [o for o in pool.owners() if o["name"] == "zero"]
    assert len(zero) == 1 and zero[0]["held_chunks"] == 1
    cache.close()
    assert held_by_cache(pool) == 0 and zero_held(pool) == 0
    pool.validate()


def zero_held(pool: Pool) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"] == "zero")


def test_sliding_layer_gives_chunks_that_left_the_window_back_to_zero(pool):
    """A sliding window of 512 tokens over a 2600-token prompt: the first
    chunk of every sequence holds no windowed token and reads zeros again,
    and the tokens are still StaticCache's (StaticSlidingWindowLayer)."""
    model = wide_model(MistralConfig, sliding_window=512)
    ids, mask = long_batch(prompt=2600)
    reference = decode(model, StaticCache(model.config, max_cache_len=MAX_LEN), model.forward, ids, mask, steps=4)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
    assert torch.equal(decode(model, cache, model.forward, ids, mask, steps=4), reference)
    for store in cache.stores:
        region = store.region_pages[0]
        for seq in range(2):
            assert store.space.state(seq * region) == ZERO  # tokens 0-2047: out of the window
            assert store.space.state(seq * region + 1) != ZERO  # the window's tokens
    assert cache.mapped_bytes() == 2 * 2 * 2 * CHUNK
    with pytest.raises(RuntimeError, match="left the window"):
        cache.crop(1000)  # needs tokens from 489 on: their chunk is gone
    cache.crop(-2)  # needs tokens from 2090 on: still in the mapped second chunk
    assert int(cache.get_seq_length()) == 2600 + 3 - 2
    cache.close()
    pool.validate()


def test_crop_returns_chunks_to_zero(pool):
    model = wide_model()
    cache = ElasticCache(model.config, max_batch_size=1, max_cache_len=MAX_LEN, pool=pool, fixed_shapes=True)
    k = torch.ones(1, 4, TOKENS_PER_CHUNK + 10, 64)
    K, _ = cache.update(k, k, 0)
    assert cache.mapped_bytes(0) == 2 * 2 * CHUNK
    cache.crop(100)
    assert cache.mapped_bytes(0) == 2 * CHUNK and int(cache.get_seq_length()) == 100
    assert not K[:, :, TOKENS_PER_CHUNK:].any()  # the dropped chunk reads zeros again
    cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert int(cache.get_seq_length()) == 101
    cache.close()
    pool.validate()


def test_bad_input(pool):
    model = wide_model()
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="fixed_shapes"):
            ElasticCache(model.config, max_batch_size=1, max_cache_len=8, pool=pool, fixed_shapes=bad)
    cache = ElasticCache(model.config, max_batch_size=2, max_cache_len=8, pool=pool, fixed_shapes=True)
    k = torch.zeros(2, 4, 6, 64)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="max_cache_len=8"):
        cache.update(k[:, :, :3], k[:, :, :3], 0)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        cache.update(torch.zeros(3, 4, 1, 64), torch.zeros(3, 4, 1, 64), 0)
    with pytest.raises(ValueError, match="batch changed"):
        cache.update(k[:1, :, :1], k[:1, :, :1], 0)
    with pytest.raises(ValueError, match="expected key states"):
        cache.update(torch.zeros(2, 3, 1, 64), torch.zeros(2, 3, 1, 64), 0)
    with pytest.raises(ValueError, match="float64"):
        cache.update(k[:, :, :1].double(), k[:, :, :1].double(), 0)
    assert int(cache.get_seq_length()) == 6  # the refused updates changed nothing
    pool.validate()
    cache.close()
    assert held_by_cache(pool) == 0 and zero_held(pool) == 0
    pool.validate()
    with pytest.raises(RuntimeError, match="closed"):
        cache.layers[0]._advance(2, 1)


_CHILD_WRITES_PAST_THE_WRITTEN_TOKENS = textwrap.dedent("""
    import torch
    from transformers import LlamaConfig
    from ellm_alloc import Pool
    from ellm_alloc.hf import ElasticCache
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=64, intermediate_size=128)
    pool = Pool("cpu", budget="256MiB")
    cache = ElasticCache(cfg, max_batch_size=2, max_cache_len=4608, pool=pool, fixed_shapes=True)
    k = torch.full((2, 4, 10, 64), 5.0)
    K, V = cache.update(k, k, 0)
    print("ready", flush=True)
    K[1, :, 3000] = 7.0  # sequence 1's unbacked chunk: must fault
    print("wrote", float(K[0].abs().sum()), float(V.abs().sum()), flush=True)
""")


def test_write_to_an_unbacked_chunk_of_the_view_faults_in_a_child():
    proc = subprocess.run([sys.executable, "-c", _CHILD_WRITES_PAST_THE_WRITTEN_TOKENS], capture_output=True,
                          text=True, timeout=300)
    assert "ready" in proc.stdout, proc.stderr
    assert "wrote" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-2000:])
