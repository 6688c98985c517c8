"""One pool for a real model: weights, activations and KV share its chunks,
and chunks move between the KV cache and the torch arena inside one generate().

The story, on a budget too small for a long prefill plus everything the KV
side holds:
  1. an engine's KV manager keeps finished requests' prefix blocks cached
     (mapped, holding no live tokens, reclaimable by the pool in C++);
  2. generate()'s long prefill needs more than the free chunks: the arena
     reclaims the cached KV pages (kv -> arena);
  3. during decode the ElasticCache crosses a chunk boundary on every plane
     and takes the arena's idle activation chunks (arena -> kv);
  4. afterwards the KV manager admits requests again and grows (arena -> kv).
Counters: ellm.balloon.* of memory_stats(), the owners' reclaimed counts,
and the telemetry timeline.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ellm_alloc
from ellm_alloc.hf import ElasticCache
from ellm_alloc.kv import FullAttentionSpec, KVCacheManager, ModelKVSpec
from ellm_alloc.telemetry import record

MiB = 1 << 20
# 4 KV heads x 64 x fp32 = 1 KiB per token per (layer, K/V, sequence): a 2 MiB
# chunk holds 2048 tokens, so a 2000-token prompt crosses into a second chunk
# of every plane during decode.
CONFIG = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=4096)
BATCH, PROMPT, NEW = 2, 2000, 80
ENGINE_MODEL = ModelKVSpec("engine", (FullAttentionSpec(8, 128, "float32"),) * 4)


def generate(model, cache, rec=None):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, CONFIG["vocab_size"], (BATCH, PROMPT), generator=g)
    kw = {"logits_processor": [rec.logits_processor()]} if rec is not None else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, past_key_values=cache, **kw)
    return out[:, PROMPT:].tolist()


def owner(pool, prefix):
    return [o for o in pool.owners() if o["active"] and o["name"].startswith(prefix)]


def test_chunks_move_from_kv_to_the_arena_and_back_within_one_generate(routed_pool, tmp_path):
    pool = routed_pool
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()
    chunk = pool.stats()["chunk_bytes"]

    # Calibration run on the roomy budget: the prefill's activation peak and the KV the cache reaches.
    pool.empty_cache()
    pool.reset_peaks()
    resident = pool.stats()["reserved_bytes"]
    cache = ElasticCache(model.config, max_batch_size=BATCH, max_cache_len=PROMPT + NEW)
    reference = generate(model, cache)
    act_peak = pool.stats()["reserved_peak"] - resident
    kv_end = cache.mapped_bytes()
    cache.close()
    pool.empty_cache()
    assert act_peak >= 8 * chunk and kv_end >= 2 * 2 * 2 * BATCH * chunk

    # 1. The engine's finished requests leave cached prefix blocks behind.
    engine = KVCacheManager(ENGINE_MODEL, pool, block_size=16, max_cached_fraction=float("inf"), name="engine")
    i = 0
    while engine.mapped_bytes() < act_peak:
        rid = f"done{i}"
        engine.add_request(rid, list(range(i * 1000, i * 1000 + 512)))
        assert engine.allocate_slots(rid, 512)
        engine.free(rid)
        i += 1
    cached = engine.mapped_bytes()

    # A budget that holds what is held now (weights, cached prefix pages), the
    # final KV and a quarter of the prefill's activations: the rest must come
    # from the KV side. empty_cache() first gives idle chunks back to the device.
    ellm_alloc.empty_cache()
    s = pool.stats()
    budget = (s["created_chunks"] * chunk + kv_end + act_peak // 4) // chunk * chunk
    pool.set_budget(budget)
    assert s["free_chunks"] == 0 and budget < s["reserved_bytes"] + cached + act_peak + kv_end

    before = ellm_alloc.memory_stats()
    engine_reclaimed = sum(o["reclaimed"] for o in owner(pool, "engine"))
    cache = ElasticCache(model.config, max_batch_size=BATCH, max_cache_len=PROMPT + NEW)
    with record(pool=pool, nvml=False) as rec:
        tokens = generate(model, cache, rec)
    after = ellm_alloc.memory_stats()
    assert tokens == reference  # nothing lost on the way

    kv_to_arena = after["ellm.balloon.kv_to_arena_chunks"] - before["ellm.balloon.kv_to_arena_chunks"]
    arena_to_kv = after["ellm.balloon.arena_to_kv_chunks"] - before["ellm.balloon.arena_to_kv_chunks"]
    assert kv_to_arena > 0, "the prefill did not take chunks from the KV side"
    assert arena_to_kv > 0, "the growing KV cache did not take the arena's idle chunks"
    assert sum(o["reclaimed"] for o in owner(pool, "engine")) > engine_reclaimed  # taken back in C++
    assert after["ellm.budget_bytes"] == budget and after["ellm.created_chunks"] * chunk <= budget

    # The ledger names every owner: the arena (weights, activations), the
    # engine's KV groups and the ElasticCache's spaces.
    names = {o["name"] for o in pool.owners() if o["active"]}
    assert "arena" in names and any(n.startswith("engine.") for n in names) and "hf.full" in names
    steps = [smp for smp in rec.samples if smp["step"] is not None]
    assert len(steps) >= NEW // 2
    assert steps[-1]["owners"]["hf.full"] > steps[0]["owners"]["hf.full"]  # KV grew during decode
    png = ellm_alloc.plot_timeline(rec, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 10_000 and png is not None

    # 4. Afterwards the KV side grows again, from the arena's idle chunks.
    cache.close()
    engine.sync()
    given = ellm_alloc.memory_stats()["ellm.balloon.arena_to_kv_chunks"]
    engine.add_request("next", list(range(10**6, 10**6 + 1024)))
    assert engine.allocate_slots("next", 1024)
    assert ellm_alloc.memory_stats()["ellm.balloon.arena_to_kv_chunks"] >= given
    engine.check()
    engine.close()
    pool.set_budget(4 << 30)
