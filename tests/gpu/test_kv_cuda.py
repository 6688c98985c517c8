"""The KV side on a real GPU: both views over CUDA pool memory, ballooning
against the arena, and ElasticCache in generate() on the enabled pool.

Each test runs in a fresh interpreter (enable() must precede the first CUDA
allocation). The same checks run on host pools in tests/test_kv_*.py and
tests/test_hf_cache.py; these prove the CUDA backend behaves the same way.
"""
import json


def test_paged_and_contiguous_views_are_cuda_tensors_over_pool_memory(py):
    r = py("""
        import json, torch, ellm_alloc
        from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, SlidingWindowSpec, KVCacheManager
        from ellm_alloc.kv.contiguous import ContiguousKV
        ellm_alloc.enable(budget="4GiB")
        pool = ellm_alloc.device_pool()
        model = ModelKVSpec("m", (FullAttentionSpec(8, 128, "bfloat16"),
                                  SlidingWindowSpec(8, 128, "bfloat16", window=64)))
        out = {}

        # Contiguous view: grows chunk by chunk; data written on the GPU stays.
        ckv = ContiguousKV(model, pool, max_batch=2, max_seq_len=4096)
        k = ckv.key(0)
        out["contig_device"] = str(k.device)
        addr = k[0, 0].data_ptr()
        ref = torch.randn(3000, 8, 128, device="cuda", dtype=torch.bfloat16)
        for n in range(0, 3001, 250):
            ckv.ensure(0, n)
            lo = max(0, n - 250)
            ckv.key(0)[0, lo:n] = ref[lo:n]
        torch.cuda.synchronize()
        out["contig_intact"] = bool(torch.equal(ckv.key(0)[0, :3000], ref))
        out["contig_addr_fixed"] = ckv.key(0)[0, 0].data_ptr() == addr
        out["contig_mapped"] = ckv.mapped_bytes()
        out["contig_needed"] = ckv.needed_bytes()
        ckv.ensure(0, 100)  # crop: chunks past token 100 go back to the pool
        out["contig_after_crop"] = ckv.mapped_bytes()
        ckv.close()

        # Paged view: block tables over per-layer tensors, gather for plain attention.
        kv = KVCacheManager(model, pool, block_size=16)
        prompt = list(range(1, 200))
        kv.add_request("r", prompt)
        kv.allocate_slots("r", len(prompt))
        k0, v0 = kv.layer_tensors(0)
        out["paged_device"] = str(k0.device)
        table = kv.block_table("r", 0)
        src = torch.randn(len(table), *k0.shape[1:], device="cuda", dtype=k0.dtype)
        k0[torch.tensor(table, device="cuda")] = src
        torch.cuda.synchronize()
        out["paged_intact"] = bool(torch.equal(k0[torch.tensor(table, device="cuda")], src))
        kv.free("r")
        kv.close()
        out["kv_chunks_after_close"] = sum(o["held_chunks"] for o in pool.owners() if o["name"] != "arena")
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["contig_device"] == "cuda:0" and out["paged_device"] == "cuda:0"
    assert out["contig_intact"] and out["contig_addr_fixed"] and out["paged_intact"]
    chunk = 2 << 20
    # Held: the tokens' need plus at most one partly used chunk per (layer, K/V).
    assert out["contig_needed"] <= out["contig_mapped"] <= out["contig_needed"] + 4 * chunk
    assert out["contig_after_crop"] <= 4 * chunk
    assert out["kv_chunks_after_close"] == 0


def test_blocks_straddling_chunks_on_cuda(py):
    """2.5 MiB blocks on 2 MiB chunks: each block's bytes lie on two chunks,
    mapped one by one and shared with the neighbour; a GPU write across the
    boundary reads back, and a lone block holds two chunks, not the page's five."""
    r = py("""
        import json, torch, ellm_alloc
        from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, KVCacheManager
        ellm_alloc.enable(budget="1GiB")
        pool = ellm_alloc.device_pool()
        kv = KVCacheManager(ModelKVSpec("m", (FullAttentionSpec(20, 1024, "float32"),)), pool,
                            block_size=16, enable_prefix_caching=False)
        out = {"chunks": []}
        srcs = {}
        for rid in ("a", "b", "c"):
            kv.add_request(rid, [1] * 16)
            kv.allocate_slots(rid, 16)
            out["chunks"].append(kv.usage()["groups"][0]["mapped_chunks"])
            k, v = kv.layer_tensors(0)
            (b,) = kv.block_table(rid, 0)
            srcs[rid] = (b, torch.randn(*k.shape[1:], device="cuda"))
            k[b] = srcs[rid][1]
            v[b] = -srcs[rid][1]
        torch.cuda.synchronize()
        k, v = kv.layer_tensors(0)
        out["intact"] = all(bool(torch.equal(k[b], x) and torch.equal(v[b], -x)) for b, x in srcs.values())
        kv.free("b")
        kv.free("a")
        out["after_free"] = kv.usage()["groups"][0]["mapped_chunks"]
        b, x = srcs["c"]
        out["c_intact"] = bool(torch.equal(k[b], x))
        kv.close()
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["chunks"] == [2, 3, 4] and out["intact"]
    assert out["after_free"] == 2 and out["c_intact"]


def test_arena_reclaims_free_kv_pages_and_kv_grows_back(py):
    r = py("""
        import json, torch, ellm_alloc
        from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, KVCacheManager
        ellm_alloc.enable(budget="1GiB")
        pool = ellm_alloc.device_pool()
        kv = KVCacheManager(ModelKVSpec("m", (FullAttentionSpec(8, 128, "bfloat16"),) * 4), pool,
                            block_size=16, max_cached_fraction=float("inf"))
        prompt = list(range(1, 8001))
        kv.add_request("a", prompt)
        kv.allocate_slots("a", len(prompt))
        kv.free("a")                 # blocks stay as cached prefix: reclaimable, no live data
        before = ellm_alloc.memory_stats()
        x = torch.empty(1000 << 20, dtype=torch.uint8, device="cuda")  # needs the KV chunks
        x.fill_(1)
        mid = ellm_alloc.memory_stats()
        del x
        torch.cuda.synchronize()
        ellm_alloc.empty_cache()
        kv.add_request("b", list(range(9000, 17000)))
        kv.allocate_slots("b", 8000)
        after = ellm_alloc.memory_stats()
        print(json.dumps({k: [before[k], mid[k], after[k]] for k in
                          ("ellm.balloon.kv_to_arena_chunks", "ellm.balloon.arena_to_kv_chunks")}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    to_arena = out["ellm.balloon.kv_to_arena_chunks"]
    to_kv = out["ellm.balloon.arena_to_kv_chunks"]
    assert to_arena[1] > to_arena[0]  # the arena took KV chunks
    assert to_kv[2] > to_kv[1]        # and the KV cache took them back


def test_elastic_cache_generate_on_cuda_matches_dynamic_cache(py):
    r = py("""
        import json, torch, ellm_alloc
        ellm_alloc.enable(budget="8GiB")
        from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig
        from ellm_alloc.hf import ElasticCache
        tiny = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128)
        configs = {
            "llama": LlamaConfig(**tiny),
            "gemma3": Gemma3TextConfig(**tiny, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
        }
        out = {}
        for name, cfg in configs.items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).to("cuda").eval()
            ids = torch.randint(1, 128, (2, 12), device="cuda")
            mask = torch.ones_like(ids)
            mask[0, :4] = 0
            gen = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
            ref = model.generate(ids, past_key_values=DynamicCache(config=cfg), **gen)
            cache = ElasticCache(cfg, max_batch_size=2, max_cache_len=64)
            got = model.generate(ids, past_key_values=cache, **gen)
            held = cache.mapped_bytes()
            cache.reset()
            out[name] = {"equal": ref.tolist() == got.tolist(), "held": held,
                         "after_reset": cache.mapped_bytes()}
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    for name, o in out.items():
        assert o["equal"], name
        assert o["held"] > 0 and o["after_reset"] == 0, (name, o)
