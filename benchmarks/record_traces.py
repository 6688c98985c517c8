#!/usr/bin/env python3
"""Record GPU-memory allocation traces of LLM inference for ellm_alloc's replay benchmarks.

The traces are what a PyTorch caching allocator would be asked for while a
HuggingFace ``transformers`` model generates text: one allocation per tensor
storage, freed when the last tensor (or view) using that storage dies.

How a trace is recorded
-----------------------
The real ``transformers`` modeling code runs on PyTorch's ``meta`` device:
tensors have real shapes, dtypes and strides but no data and no compute, so an
8B-parameter model "runs" on a laptop in seconds.  A ``TorchDispatchMode``
(``StorageRecorder``) sees every aten op and its outputs:

* an output whose storage has not been seen before is an allocation
  (``a ID NBYTES``); views and in-place ops return an already-known storage and
  record nothing;
* a storage is freed when PyTorch's own storage refcount reaches zero.  This is
  observed with ``StorageWeakRef.expired()``.  To put frees in the order Python
  drops them, a weakref callback on every output tensor queues its storage for
  an expiry check; any storage that dies without such a tensor dying is caught
  by a sweep over all live storages.  Both run just before the next op, which
  is where the freed memory becomes reusable for that op's outputs.

Weights (every parameter and buffer storage) are allocated at the start of a
trace, in module order, as a loader would put them on the GPU.

Where the meta device would take a different path than a GPU run, the recorder
steers it to the GPU path (each spot is marked "GPU path" below):

* ``scaled_dot_product_attention`` on meta would choose the math backend and
  materialise the full attention matrix; on an H100/H200 with bf16, head_dim
  128 and no mask PyTorch picks FlashAttention, which allocates only the output
  and a float32 log-sum-exp.  The recorder calls the flash op directly (its
  meta kernel gives CUDA's output layout).  Flash also returns its RNG
  seed/offset, which live on the host, so they are not recorded.
* The few data-dependent checks (``tensor.item()``/``bool(tensor)``), which
  cannot run on meta, are replaced by the answer a real run with unpadded
  prompts gives (mask is all ones, no sequence has finished early).  The ops
  that compute them still run, so their small allocations are recorded.

``generate()`` itself contains such checks, so ``generate_like`` drives the
model the way ``GenerationMixin._sample`` does (greedy, ``DynamicCache``),
using transformers' own input-preparation helpers and repeating its per-step
tensor ops (logits copy to float32, argmax, ``input_ids`` growth, stopping
criteria).

Trace format (read by ellm_alloc's replayer)
--------------------------------------------
Text, one event per line: ``a ID BYTES [STREAM]`` allocates, ``f ID`` frees,
``#`` starts a comment.  IDs are never reused within a trace.  Every
allocation, weights included, is freed by the end of the trace.

Usage
-----
    python benchmarks/record_traces.py --out benchmarks/traces          # all traces
    python benchmarks/record_traces.py --out benchmarks/traces --only moe_mix
    python benchmarks/record_traces.py --check benchmarks/traces         # validate
    python benchmarks/record_traces.py --self-test                       # recorder sanity checks

Recording needs ``torch`` and ``transformers`` (versions used are written in
each trace header); ``--check`` and the random trace need only the standard
library.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import sys
import time
import weakref
from pathlib import Path

# --------------------------------------------------------------------------
# Trace container (standard library only)
# --------------------------------------------------------------------------


class Trace:
    """Accumulates events and keeps the statistics the README reports."""

    def __init__(self, name: str):
        self.name = name
        self.header: list[str] = []
        self.lines: list[str] = []
        self.next_id = 0
        self.live: dict[int, int] = {}  # id -> bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self.n_alloc = 0
        self.n_free = 0

    def comment(self, text: str) -> None:
        """A comment between events (e.g. marking where a generate call starts)."""
        self.lines.append("# " + text)

    def alloc(self, nbytes: int, stream: int = 0) -> int:
        assert nbytes > 0
        aid = self.next_id
        self.next_id += 1
        self.live[aid] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.n_alloc += 1
        self.lines.append(f"a {aid} {nbytes}" if stream == 0 else f"a {aid} {nbytes} {stream}")
        return aid

    def free(self, aid: int) -> None:
        self.live_bytes -= self.live.pop(aid)
        self.n_free += 1
        self.lines.append(f"f {aid}")

    @property
    def n_events(self) -> int:
        return self.n_alloc + self.n_free

    def write(self, path: Path) -> None:
        assert not self.live, f"{self.name}: {len(self.live)} allocations never freed"
        stats = [
            f"events: {self.n_events} ({self.n_alloc} allocs, {self.n_free} frees)",
            f"peak live bytes: {self.peak_bytes} ({self.peak_bytes / 2**30:.3f} GiB)",
        ]
        with open(path, "w") as fh:
            for line in self.header + stats:
                fh.write(("# " + line).rstrip() + "\n")
            fh.write("\n".join(self.lines))
            fh.write("\n")


# --------------------------------------------------------------------------
# Recording on the meta device
# --------------------------------------------------------------------------


def _torch_imports():
    """Import torch lazily so --check and --random work without it."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    return torch, StorageWeakRef, TorchDispatchMode, TorchFunctionMode, tree_leaves


class _Storage:
    """One live storage: its weak reference, trace id and size."""

    __slots__ = ("ref", "aid", "nbytes", "freed")

    def __init__(self, ref, aid: int, nbytes: int):
        self.ref = ref
        self.aid = aid
        self.nbytes = nbytes
        self.freed = False


def make_recorder_class():
    torch, StorageWeakRef, TorchDispatchMode, _, tree_leaves = _torch_imports()
    aten = torch.ops.aten

    # Outputs that a GPU run does not put in device memory, per op (GPU path):
    # FlashAttention returns (out, logsumexp, cum_q, cum_k, max_q, max_k,
    # philox_seed, philox_offset, debug_mask); seed/offset are host tensors
    # outside CUDA-graph capture and debug_mask is empty.
    device_outputs = {
        aten._scaled_dot_product_flash_attention.default: (0, 1),
        aten._scaled_dot_product_efficient_attention.default: (0, 1),
    }

    class StorageRecorder(TorchDispatchMode):
        """Turns meta-device storage lifetimes into trace events."""

        def __init__(self, trace: Trace):
            super().__init__()
            self.trace = trace
            # Keyed by the StorageImpl address.  An address can be reused once
            # the storage died, so a hit is checked with expired() first.
            self.live: dict[int, _Storage] = {}
            self.pending: list[_Storage] = []  # storages whose tensor died, in death order
            self._wrefs: dict[int, weakref.ref] = {}

        # -- frees ---------------------------------------------------------
        def _free(self, rec: _Storage) -> None:
            rec.freed = True
            del self.live[rec.ref.cdata]
            self.trace.free(rec.aid)

        def flush(self) -> None:
            """Emit frees for every storage that died since the last op."""
            pending, self.pending = self.pending, []
            for rec in pending:
                if not rec.freed and rec.ref.expired():
                    self._free(rec)
            for rec in [r for r in self.live.values() if r.ref.expired()]:
                self._free(rec)

        def collect(self) -> None:
            """Drop unreachable cycles (e.g. model output objects), then flush."""
            gc.collect()
            self.flush()

        def _watch(self, tensor, rec: _Storage) -> None:
            def on_death(w, rec=rec):
                self._wrefs.pop(id(w), None)
                self.pending.append(rec)

            w = weakref.ref(tensor, on_death)
            self._wrefs[id(w)] = w

        # -- allocations ---------------------------------------------------
        def track(self, tensor) -> None:
            """Record tensor's storage if new; weights are passed in directly."""
            if tensor.device.type != "meta":
                return  # host tensors are not GPU memory
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            rec = self.live.get(ref.cdata)
            if rec is not None and rec.ref.expired():
                self._free(rec)  # address reused by a new storage
                rec = None
            nbytes = storage.nbytes()
            if rec is None:
                if nbytes == 0:
                    return  # the CUDA caching allocator does not see empty tensors
                rec = _Storage(ref, self.trace.alloc(nbytes), nbytes)
                self.live[ref.cdata] = rec
            elif nbytes != rec.nbytes:
                # resize_ of an existing storage: CUDA allocates the new block
                # and copies before releasing the old one.
                old = rec.aid
                rec.aid, rec.nbytes = self.trace.alloc(nbytes), nbytes
                self.trace.free(old)
            self._watch(tensor, rec)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.flush()
            out = func(*args, **(kwargs or {}))
            keep = device_outputs.get(func)
            if keep is not None:
                leaves = [out[i] for i in keep]
            else:
                leaves = tree_leaves(out)
            for t in leaves:
                if isinstance(t, torch.Tensor):
                    self.track(t)
            return out

    return StorageRecorder


def make_gpu_attention_mode():
    """TorchFunctionMode routing SDPA on meta to the kernel a GPU would run (GPU path)."""
    torch, _, _, TorchFunctionMode, _ = _torch_imports()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    class GpuAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not sdpa:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            if q.device.type != "meta":
                return func(*args, **kwargs)
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", False)
            scale = kwargs.get("scale")
            if mask is None:
                # FlashAttention (native GQA: k/v keep their kv-head count).
                out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            else:
                # A mask rules flash out; CUDA then takes memory-efficient attention.
                if k.shape[1] != q.shape[1]:
                    rep = q.shape[1] // k.shape[1]
                    k = k.repeat_interleave(rep, dim=1)
                    v = v.repeat_interleave(rep, dim=1)
                out = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), True, 0.0, causal, scale=scale
                )
            return out[0]

    return GpuAttention


@contextlib.contextmanager
def gpu_data_checks():
    """Answer transformers' data-dependent mask check as an unpadded GPU batch would (GPU path).

    ``masking_utils.fast_all`` reads a value from the device (``sum() == numel``);
    with an all-ones mask the answer is True.  The reduction still runs so its
    allocations are recorded.
    """
    import transformers.masking_utils as mu

    original = mu.fast_all

    def fast_all(tensor):
        result = original(tensor)
        return True if tensor.device.type == "meta" else result

    mu.fast_all = fast_all
    try:
        yield
    finally:
        mu.fast_all = original


# --------------------------------------------------------------------------
# Models (published dimensions; fewer layers where stated)
# --------------------------------------------------------------------------


def llama3_8b_config(num_layers: int):
    """Meta-Llama-3-8B dimensions (config.json of the published checkpoint)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192 * 4,  # long_prefill_decode goes past 8192
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
    )


def mixtral_8x7b_config(num_layers: int):
    """Mixtral-8x7B-v0.1 dimensions (8 experts, top-2)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_model(config):
    """Model on meta in bf16, with the attention/expert kernels a GPU run selects."""
    torch = _torch_imports()[0]
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if getattr(config, "num_local_experts", None):
        kwargs["experts_implementation"] = "grouped_mm"  # transformers' default when grouped_mm is available
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def load_weights(recorder, model) -> int:
    """Allocate every parameter/buffer storage, in module order, as loading onto a GPU would."""
    before = recorder.trace.live_bytes
    for t in list(model.parameters()) + list(model.buffers()):
        recorder.track(t)  # a storage shared by two names (tied weights) is recorded once
    return recorder.trace.live_bytes - before


# --------------------------------------------------------------------------
# Greedy generation, as GenerationMixin._sample does it
# --------------------------------------------------------------------------


def generate_like(model, batch: int, prompt_len: int, new_tokens: int, device: str = "meta") -> None:
    """One ``model.generate(input_ids, attention_mask=..., max_new_tokens=new_tokens)`` call.

    Mirrors transformers' ``generate``/``_sample`` for greedy decoding with a
    ``DynamicCache`` and unpadded prompts; every tensor it creates on the GPU
    is created here the same way, and dropped when ``_sample`` drops it.
    """
    torch = _torch_imports()[0]
    from transformers import DynamicCache
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        StoppingCriteriaList,
    )

    dev = torch.device(device)
    cfg = model.config
    # What the caller passes: the tokenizer's output moved to the GPU.
    input_ids = torch.zeros(batch, prompt_len, dtype=torch.long).to(dev)
    attention_mask = torch.ones(batch, prompt_len, dtype=torch.long).to(dev)

    # generate(): special tokens as device tensors (pad falls back to eos).
    eos = torch.tensor([cfg.eos_token_id], dtype=torch.long, device=dev)
    pad = eos[0]
    model_kwargs = {"attention_mask": attention_mask, "use_cache": True}
    del attention_mask
    model_kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, model_kwargs)
    # generate() drops an all-ones mask (`(mask == 1).all()`; True here) so
    # SDPA can use is_causal; `_mask_length` keeps its length for prefill.
    _ = (model_kwargs["attention_mask"] == 1).all()
    mask_length = model_kwargs["attention_mask"].shape[1]
    model_kwargs["attention_mask"] = None
    model_kwargs["logits_to_keep"] = 1
    model_kwargs["past_key_values"] = DynamicCache(config=cfg.get_text_config(decoder=True))
    stopping = StoppingCriteriaList(
        [MaxLengthCriteria(prompt_len + new_tokens, cfg.max_position_embeddings), EosTokenCriteria(eos)]
    )
    unfinished = torch.ones(batch, dtype=torch.long, device=dev)

    # _prefill(): the cache is empty, mask_length == prompt_len.
    assert mask_length == input_ids.shape[1]
    prefill_inputs = model.prepare_inputs_for_generation(
        input_ids,
        next_sequence_length=input_ids.shape[1] - model_kwargs["past_key_values"].get_seq_length(),
        is_first_iteration=True,
        **model_kwargs,
    )
    outputs = model(**prefill_inputs, return_dict=True)
    del prefill_inputs

    first = True
    while True:
        if not first:
            model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        first = False
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=dev)
        next_token_scores = next_token_logits  # greedy: no logits processors
        next_tokens = torch.argmax(next_token_scores, dim=-1)
        next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping(input_ids, None)
        # StopCheck: bool(unfinished.max() == 0) is False (nothing finished early);
        # the loop ends when MaxLengthCriteria fires, at max_length.
        _ = unfinished.max() == 0
        del outputs
        if input_ids.shape[1] >= prompt_len + new_tokens:
            break
    # generate() returns input_ids to the caller, who keeps it briefly and
    # then drops everything; the cache goes with model_kwargs.


# --------------------------------------------------------------------------
# The recorded traces
# --------------------------------------------------------------------------

# name -> (model family, decoder layers, [(batch, prompt_tokens, new_tokens), ...], description)
RECORDED = {
    "hf_generate_dynamic": (
        "llama3-8b",
        32,
        [(1, 512, 64)],
        "One greedy generate call, batch 1, prompt 512, 64 new tokens; the DynamicCache grows by torch.cat every step.",
    ),
    "mixed_batches": (
        "llama3-8b",
        8,
        [(1, 128, 32), (4, 1024, 32), (8, 300, 24), (2, 2048, 16), (16, 64, 16), (1, 4000, 8)],
        "Generate calls with mixed batch sizes and prompt lengths, one after another, weights staying loaded.",
    ),
    "long_prefill_decode": (
        "llama3-8b",
        8,
        [(1, 32768, 32)],
        "One long-context request: batch 1, prompt 32768, then 32 decode steps.",
    ),
    "moe_mix": (
        "mixtral-8x7b",
        4,
        [(1, 256, 16), (8, 512, 16), (2, 2048, 8), (32, 128, 8)],
        "Mixture-of-experts generate calls with mixed batch/prompt sizes (grouped_mm experts).",
    ),
}

# Small workloads for --compare-cuda (fit any 80 GB GPU with random weights).
COMPARE_WORKLOADS = [
    ("llama3-8b", 2, [(1, 512, 8), (4, 300, 4)]),
    ("mixtral-8x7b", 2, [(2, 256, 4)]),
]

PUBLISHED_LAYERS = {"llama3-8b": 32, "mixtral-8x7b": 32}

MODELS = {
    "llama3-8b": (llama3_8b_config, "Meta-Llama-3-8B dims: hidden 4096, 32 heads (head_dim 128), 8 KV heads, "
                  "intermediate 14336, vocab 128256, rope_theta 5e5"),
    "mixtral-8x7b": (mixtral_8x7b_config, "Mixtral-8x7B dims: hidden 4096, 32 heads (head_dim 128), 8 KV heads, "
                     "8 experts top-2, expert intermediate 14336, vocab 32000"),
}


def record(name: str, family: str, layers: int, runs, description: str) -> Trace:
    """Record generate calls ``runs`` = [(batch, prompt, new_tokens), ...] on one model."""
    torch = _torch_imports()[0]
    import transformers

    make_config, dims = MODELS[family]
    trace = Trace(name)
    trace.header = [
        f"ellm_alloc allocation trace: {name}",
        description,
        f"model: {dims}; {layers} of the published {PUBLISHED_LAYERS[family]} decoder layers; dtype bfloat16",
        "runs (batch, prompt_tokens, new_tokens): " + ", ".join(f"({b},{p},{n})" for b, p, n in runs),
        "recorded by benchmarks/record_traces.py: transformers modeling code on the meta device,",
        "one allocation per tensor storage, freed when PyTorch's storage refcount hits zero;",
        "SDPA routed to FlashAttention as on an H100/H200; greedy decoding as GenerationMixin._sample.",
        f"torch {torch.__version__}, transformers {transformers.__version__}; stream 0 only.",
        "weights are the first allocations and the last frees.",
    ]

    model = build_model(make_config(layers))
    recorder = make_recorder_class()(trace)
    # no_grad, as generate() runs under it.
    with torch.no_grad(), gpu_data_checks(), make_gpu_attention_mode()(), recorder:
        trace.comment("weights")
        weight_bytes = load_weights(recorder, model)
        trace.comment(f"weights loaded: {weight_bytes} bytes")
        for b, p, n in runs:
            trace.comment(f"generate batch={b} prompt={p} new_tokens={n}")
            generate_like(model, b, p, n)
            recorder.collect()
        trace.comment("unload model")
        del model
        recorder.collect()
    return trace


def cuda_block_bytes(nbytes: int) -> int:
    """Size the CUDA caching allocator reserves for a request (multiple of 512 B)."""
    return 512 * max(1, -(-nbytes // 512))


def compare_with_cuda(out_dir: Path, family: str, layers: int, runs) -> dict:
    """Run the same workload on meta (recorder) and on a real GPU (allocator history); compare.

    The GPU side uses torch.cuda.memory._record_memory_history, whose 'alloc' and
    'free_requested' entries are the caching allocator's view of the same
    tensors.  Weights and a warm-up call (cuBLAS workspaces, lazy kernels) are
    excluded on both sides; sizes are compared as the 512-byte-rounded blocks
    the allocator hands out.
    """
    import difflib
    import json
    from collections import Counter

    torch = _torch_imports()[0]
    make_config, _ = MODELS[family]
    desc = f"compare {family} layers={layers}"

    # Meta side: activations only (drop weight events).
    meta = record("compare_meta", family, layers, runs, desc)
    weight_ids = set()
    meta_ev = []
    in_weights = True
    for ln in meta.lines:
        if ln.startswith("# generate"):
            in_weights = False
        if ln.startswith("#"):
            continue
        kind, aid, *rest = ln.split()
        if in_weights:
            weight_ids.add(int(aid))
        elif int(aid) not in weight_ids:
            meta_ev.append((kind, int(aid), cuda_block_bytes(int(rest[0])) if rest else 0))

    # GPU side.
    model = build_model(make_config(layers)).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        generate_like(model, 1, 16, 2, device="cuda")  # warm-up
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=2_000_000)
        for b, p, n in runs:
            generate_like(model, b, p, n, device="cuda")
            gc.collect()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    cuda_ev = []
    cuda_where = {}
    addr_to_id: dict[int, int] = {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            aid = len(addr_to_id) + len(cuda_where)
            addr_to_id[e["addr"]] = aid
            frames = [f for f in e.get("frames", []) if "torch/" not in f["filename"]][:3]
            cuda_where[aid] = " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames)
            cuda_ev.append(("a", aid, cuda_block_bytes(e["size"])))
        elif e["action"] == "free_requested" and e["addr"] in addr_to_id:
            cuda_ev.append(("f", addr_to_id.pop(e["addr"]), 0))

    def stats(ev):
        live = peak = 0
        sizes, born, lifetimes = {}, {}, {}
        n_alloc = 0
        for kind, aid, nbytes in ev:
            if kind == "a":
                sizes[aid] = nbytes
                born[aid] = n_alloc
                n_alloc += 1
                live += nbytes
                peak = max(peak, live)
            else:
                live -= sizes[aid]
                lifetimes[aid] = n_alloc - born[aid]  # allocations made while it lived
        return peak, sizes, lifetimes

    m_peak, m_sizes, m_life = stats(meta_ev)
    c_peak, c_sizes, c_life = stats(cuda_ev)
    m_ids = [aid for k, aid, _ in meta_ev if k == "a"]
    c_ids = [aid for k, aid, _ in cuda_ev if k == "a"]
    sm = difflib.SequenceMatcher(None, [m_sizes[i] for i in m_ids], [c_sizes[i] for i in c_ids], autojunk=False)
    matched = same_life = 0
    for blk in sm.get_matching_blocks():
        for j in range(blk.size):
            mi, ci = m_ids[blk.a + j], c_ids[blk.b + j]
            matched += 1
            same_life += m_life.get(mi) == c_life.get(ci)
    only_meta = Counter(m_sizes[i] for i in m_ids) - Counter(c_sizes[i] for i in c_ids)
    only_cuda = Counter(c_sizes[i] for i in c_ids) - Counter(m_sizes[i] for i in m_ids)
    unmatched_where = Counter()
    matched_c = {c_ids[blk.b + j] for blk in sm.get_matching_blocks() for j in range(blk.size)}
    for ci in c_ids:
        if ci not in matched_c:
            unmatched_where[f"{c_sizes[ci]} B @ {cuda_where[ci]}"] += 1
    result = {
        "family": family, "layers": layers, "runs": runs,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
        "meta_allocs": len(m_ids), "cuda_allocs": len(c_ids),
        "meta_peak_activation_bytes": m_peak, "cuda_peak_activation_bytes": c_peak,
        "alloc_sequence_similarity": round(sm.ratio(), 4),
        "matched_allocs": matched, "matched_with_same_lifetime": same_life,
        "sizes_only_in_meta": only_meta.most_common(15), "sizes_only_in_cuda": only_cuda.most_common(15),
        "unmatched_cuda_allocs_by_site": unmatched_where.most_common(25),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{family}_{layers}l"
    (out_dir / f"compare_{tag}.json").write_text(json.dumps(result, indent=1))
    for label, ev in (("meta", meta_ev), ("cuda", cuda_ev)):
        (out_dir / f"compare_{tag}_{label}.txt").write_text(
            "\n".join(f"{k} {aid} {n}" if k == "a" else f"{k} {aid}" for k, aid, n in ev) + "\n")
    return result


# --------------------------------------------------------------------------
# Synthetic trace: random sizes and lifetimes on two streams
# --------------------------------------------------------------------------


def random_two_stream(seed: int = 20240611, n_events: int = 50_000, target_live: int = 3 * 2**30) -> Trace:
    """Seeded random trace: log-uniform sizes 512 B..256 MiB, random lifetimes, streams 0/1.

    Each step allocates, or frees a uniformly chosen live allocation; the
    allocation probability falls as live bytes approach ``target_live`` so the
    live set hovers around a few GiB.  Whatever is live at the end is freed.
    """
    rng = random.Random(seed)
    trace = Trace("random_two_stream")
    trace.header = [
        "ellm_alloc allocation trace: random_two_stream (synthetic, not recorded)",
        f"generated by benchmarks/record_traces.py random_two_stream(seed={seed}, n_events={n_events}, "
        f"target_live={target_live})",
        "sizes log-uniform in [512 B, 256 MiB]; each step allocates or frees a uniformly random live id;",
        "P(alloc) = clamp(1 - live/target_live, 0.05, 0.95); streams 0/1 at random; all freed at the end.",
    ]
    lo, hi = math.log(512), math.log(256 * 2**20)
    live_ids: list[int] = []
    while trace.n_events < n_events:
        p_alloc = min(0.95, max(0.05, 1.0 - trace.live_bytes / target_live))
        if not live_ids or rng.random() < p_alloc:
            nbytes = int(math.exp(rng.uniform(lo, hi)))
            live_ids.append(trace.alloc(nbytes, stream=rng.randrange(2)))
        else:
            i = rng.randrange(len(live_ids))
            live_ids[i], live_ids[-1] = live_ids[-1], live_ids[i]
            trace.free(live_ids.pop())
    trace.comment("end: free everything still live")
    rng.shuffle(live_ids)
    for aid in live_ids:
        trace.free(aid)
    return trace


# --------------------------------------------------------------------------
# Checking traces
# --------------------------------------------------------------------------


def check_trace(path: Path) -> dict:
    """Parse a trace; verify ids/frees; return event count and peak live bytes."""
    live: dict[int, int] = {}
    live_bytes = peak = n_alloc = n_free = 0
    streams = set()
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{path}:{lineno}"
            if parts[0] == "a" and len(parts) in (3, 4):
                aid, nbytes = int(parts[1]), int(parts[2])
                stream = int(parts[3]) if len(parts) == 4 else 0
                if nbytes <= 0:
                    raise ValueError(f"{where}: non-positive size")
                if aid in live:
                    raise ValueError(f"{where}: id {aid} allocated while live")
                live[aid] = nbytes
                live_bytes += nbytes
                peak = max(peak, live_bytes)
                n_alloc += 1
                streams.add(stream)
            elif parts[0] == "f" and len(parts) == 2:
                aid = int(parts[1])
                if aid not in live:
                    raise ValueError(f"{where}: free of id {aid}, which is not live")
                live_bytes -= live.pop(aid)
                n_free += 1
            else:
                raise ValueError(f"{where}: bad line {line!r}")
    return {
        "events": n_alloc + n_free,
        "allocs": n_alloc,
        "frees": n_free,
        "peak_live_bytes": peak,
        "left_live": len(live),
        "streams": sorted(streams),
    }


# --------------------------------------------------------------------------
# Recorder self-test on hand-written ops
# --------------------------------------------------------------------------


def self_test() -> None:
    """Check lifetimes on a tiny op sequence: views keep storage alive, in-place ops allocate nothing."""
    torch = _torch_imports()[0]
    trace = Trace("self_test")
    with make_recorder_class()(trace) as rec:
        a = torch.empty(1024, device="meta")  # alloc 0 (4096 B)
        v = a.view(32, 32)  # view: no event
        b = a + 1  # alloc 1
        b.add_(a)  # in-place: no event
        b.mul_(2).t_()  # in-place chain: no event
        del a  # v still holds storage 0
        c = v.t().contiguous()  # alloc 2 (a non-contiguous copy)
        del v  # storage 0 dies now...
        d = c * 2  # ...and its free is emitted before alloc 3
        e = torch.empty(0, device="meta")  # empty: no event
        h = torch.empty(256, dtype=torch.bfloat16, device="meta")  # alloc 4 (512 B)
        h.resize_(1024)  # grow in place: alloc 5 (2048 B), free 4
        del d, c, b  # freed in this order
        rec.flush()
        x = torch.zeros(8, device="cpu")  # host tensor: no event
        del e, h, x
        rec.flush()
    expect = ["a 0 4096", "a 1 4096", "a 2 4096", "f 0", "a 3 4096", "a 4 512", "a 5 2048", "f 4",
              "f 3", "f 2", "f 1", "f 5"]
    got = [ln for ln in trace.lines if not ln.startswith("#")]
    assert got == expect, f"recorder self-test failed:\n got    {got}\n expect {expect}"
    print("self-test ok:", " | ".join(got))


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="directory to write <name>.trace files to")
    ap.add_argument("--only", nargs="*", help="trace names to produce (default: all)")
    ap.add_argument("--random", action="store_true", help="write only the synthetic random_two_stream trace")
    ap.add_argument("--check", nargs="*", type=Path, metavar="PATH",
                    help="validate traces (files or directories; default: --out)")
    ap.add_argument("--self-test", action="store_true", help="run the recorder sanity check")
    ap.add_argument("--compare-cuda", type=Path, metavar="DIR",
                    help="on a CUDA machine: record small workloads on meta and on the GPU, write comparisons to DIR")
    args = ap.parse_args(argv)

    if args.self_test:
        self_test()
        return 0

    if args.compare_cuda is not None:
        for family, layers, runs in COMPARE_WORKLOADS:
            r = compare_with_cuda(args.compare_cuda, family, layers, runs)
            print({k: v for k, v in r.items() if not isinstance(v, list) or k == "runs"}, flush=True)
        return 0

    if args.check is not None:
        paths = args.check or ([args.out] if args.out else [])
        files = []
        for p in paths:
            files += sorted(p.glob("*.trace")) if p.is_dir() else [p]
        ok = True
        for f in files:
            try:
                s = check_trace(f)
            except ValueError as exc:
                print(f"FAIL {exc}")
                ok = False
                continue
            print(f"{f.name}: {s['events']} events ({s['allocs']} a / {s['frees']} f), "
                  f"peak live {s['peak_live_bytes']} B ({s['peak_live_bytes'] / 2**30:.3f} GiB), "
                  f"streams {s['streams']}, still live at end {s['left_live']}")
        return 0 if ok else 1

    if args.out is None:
        ap.error("--out is required to write traces")
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["random_two_stream"] if args.random else (args.only or list(RECORDED) + ["random_two_stream"])
    for name in names:
        t0 = time.time()
        if name == "random_two_stream":
            trace = random_two_stream()
        elif name in RECORDED:
            family, layers, runs, description = RECORDED[name]
            trace = record(name, family, layers, runs, description)
        else:
            ap.error(f"unknown trace {name!r}")
        trace.write(args.out / f"{name}.trace")
        print(f"{name}: {trace.n_events} events, peak live {trace.peak_bytes} B "
              f"({trace.peak_bytes / 2**30:.3f} GiB), {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
