"""enable() on a real GPU: install, stats, idempotence, errors, OOM, streams, HF generate."""
import json


def test_enable_in_fresh_process_routes_allocations_and_stats(py):
    """After enable(), CUDA tensors come from the pool and torch.cuda.memory_* answer from it."""
    r = py("""
        import ellm_alloc, torch, json
        ellm_alloc.enable(budget="4GiB")
        x = torch.randn(1024, 1024, device="cuda")
        y = x @ x
        torch.cuda.synchronize()
        base = ellm_alloc.device_pool().arena_base
        s = ellm_alloc.memory_stats()
        print(json.dumps({
            "in_arena": base <= x.data_ptr() < base + s["ellm.va_bytes"],
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "peak": torch.cuda.max_memory_allocated(),
            "arena_chunks": s["ellm.chunks.arena"],
        }))
        ellm_alloc.enable(budget="4GiB")  # same settings: no-op
        try:
            ellm_alloc.enable(budget="2GiB")
        except ellm_alloc.EnableError as e:
            print("second-enable-refused")
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[0])
    assert out["in_arena"]
    assert out["allocated"] >= 2 * 4 * 1024 * 1024
    assert out["reserved"] >= out["allocated"]
    assert out["arena_chunks"] > 0
    assert "second-enable-refused" in r.stdout


def test_enable_after_native_cuda_allocation_is_refused(py):
    """enable() after the native allocator served a tensor raises a clear EnableError."""
    r = py("""
        import torch, ellm_alloc
        x = torch.zeros(10, device="cuda")
        try:
            ellm_alloc.enable()
        except ellm_alloc.EnableError as e:
            print("refused:", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "before the first CUDA tensor" in r.stdout


def test_over_budget_allocation_raises_torch_oom_and_recovers(py):
    """An allocation above the budget raises torch.OutOfMemoryError; the process stays usable."""
    r = py("""
        import torch, ellm_alloc
        ellm_alloc.enable(budget="1GiB")
        try:
            torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError as e:
            print("oom:", str(e).splitlines()[0][:200])
        y = torch.ones(1 << 20, device="cuda")
        print("after:", float(y.sum()))
    """)
    assert r.returncode == 0, r.stderr
    assert "oom:" in r.stdout and "out of memory" in r.stdout
    assert "after: 1048576.0" in r.stdout


def test_record_stream_keeps_memory_until_other_stream_is_done(py):
    """A block used on a second stream is not reused before that stream's work completes."""
    r = py("""
        import torch, ellm_alloc
        ellm_alloc.enable(budget="8GiB")
        s2 = torch.cuda.Stream()
        errors = 0
        for trial in range(20):
            a = torch.full((4096, 4096), 1.0, device="cuda")
            torch.cuda.current_stream().synchronize()
            with torch.cuda.stream(s2):
                torch.cuda._sleep(20_000_000)      # keep s2 busy
                c = a * 1                           # reads `a` late on s2
            a.record_stream(s2)
            del a                                   # freed while s2 still needs it
            b = torch.full((4096, 4096), 7.0, device="cuda")  # must not land on `a`
            s2.synchronize()
            errors += int(not bool((c == 1.0).all()))
            del b, c
        print("errors", errors)
    """)
    assert r.returncode == 0, r.stderr
    assert "errors 0" in r.stdout


def test_generate_matches_native_allocator(py):
    """A tiny random-weight Llama generates the same greedy tokens with and without enable()."""
    code = """
        import sys, json, torch
        if sys.argv[-1] == "ellm":
            import ellm_alloc; ellm_alloc.enable(budget="8GiB")
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
        model = LlamaForCausalLM(cfg).to("cuda").eval()
        ids = torch.randint(0, 1000, (3, 17), device="cuda")
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        print(json.dumps(out.tolist()))
    """
    import subprocess, sys, textwrap
    outs = []
    for mode in ("native", "ellm"):
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), mode], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]
