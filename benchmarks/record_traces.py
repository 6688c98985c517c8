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

* ``scaled_dot_product_attention`` on meta would take the math backend and
  materialise the full attention matrix.  On a GPU, bf16 with head_dim 128 and
  no mask goes to a fused kernel: cuDNN attention on H100/H200 with recent
  PyTorch (the default here), FlashAttention elsewhere (``--attention flash``).
  The recorder calls that op directly; its meta kernel gives CUDA's output
  layout.  Only the outputs that live in device memory are recorded (the
  output; flash's float32 log-sum-exp; not the host-side RNG seed/offset).
* The few values ``generate()`` reads back from the device
  (``tensor.item()``/``bool(tensor)``), which cannot be read on meta, get the
  answer a real run with unpadded prompts gives (the mask is all ones, no
  sequence stops early).  The ops computing them still run, so their small
  allocations are recorded.  The model's forward itself reads none.

Not modelled: memory a CUDA kernel takes for itself inside one op (cuBLAS and
cuDNN workspaces, sort/grouped-GEMM scratch), and the caching allocator's own
rounding and segments, which are the allocator under test's business.
``torch.tensor(data, device=...)`` bypasses dispatch modes; such a tensor is
recorded when an op first uses it.

Because of those reads ``generate()`` cannot run on meta as is, so
``generate_like`` drives the model the way ``GenerationMixin._sample`` does
(greedy, ``DynamicCache``), using transformers' own input-preparation helpers
and repeating its per-step tensor ops (logits copy to float32, argmax,
``input_ids`` growth, stopping criteria).

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
    python benchmarks/record_traces.py --compare-cuda OUT_DIR            # on a GPU: meta vs real run

Recording needs ``torch`` and ``transformers`` (versions used are written in
each trace header); ``--check`` and the random trace need only the standard
library.
"""

from __future__ import annotations

import argparse
from functools import partial
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
            fh.writelines(("# " + line).rstrip() + "\n" for line in self.header + stats)
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

    __slots__ = ("aid", "freed", "nbytes", "ref")

    def __init__(self, ref, aid: int, nbytes: int):
        self.ref = ref
        self.aid = aid
        self.nbytes = nbytes
        self.freed = False


def make_recorder_class():
    torch, StorageWeakRef, TorchDispatchMode, _, tree_leaves = _torch_imports()
    aten = torch.ops.aten

    # Outputs that a GPU run really puts in device memory, for ops whose meta
    # kernel returns more (GPU path).  The fused attention ops return (out,
    # logsumexp, cum_q, cum_k, max_q, max_k, philox_seed, philox_offset,
    # debug_mask): seed/offset are host tensors outside CUDA-graph capture,
    # debug_mask is empty, and cuDNN is asked for no log-sum-exp (inference).
    device_outputs = {
        aten._scaled_dot_product_flash_attention.default: (0, 1),
        aten._scaled_dot_product_cudnn_attention.default: (0,),
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


def make_gpu_attention_mode(backend: str = "cudnn"):
    """TorchFunctionMode routing SDPA on meta to the kernel a GPU would run (GPU path).

    ``backend`` is the fused kernel PyTorch's CUDA dispatcher picks for bf16,
    head_dim 128, no mask: "cudnn" on H100/H200 (sm90) with torch >= 2.10 and a
    bundled cuDNN newer than 9.15 (torch 2.11+ wheels), which in inference
    allocates only the output; "flash" on other GPUs/builds, which also
    allocates a float32 log-sum-exp of (batch, heads, q_len).  Both take GQA
    natively (k/v keep their kv-head count) and give the output the query's
    (batch, seq, heads, dim) memory layout, so transformers' later
    ``transpose(1, 2).contiguous()`` copies nothing.
    """
    torch, _, _, TorchFunctionMode, _ = _torch_imports()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    aten = torch.ops.aten

    class GpuAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not sdpa or args[0].device.type != "meta":
                return func(*args, **kwargs)
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            scale = kwargs.get("scale")
            # Unpadded batches never build a mask (masking_utils skips it for SDPA).
            assert mask is None, "padded batches (attention masks) are not modelled"
            # cuDNN rejects a key length of 1; PyTorch then falls back to flash.
            if backend == "cudnn" and k.shape[2] > 1:
                out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False, scale=scale)
            else:
                out = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return out[0]

    return GpuAttention


# --------------------------------------------------------------------------
# Models (published dimensions; fewer layers where stated)
# --------------------------------------------------------------------------


# Meta-Llama-3-8B (config.json of the published checkpoint). It was published
# with max_position_embeddings 8192; 131072 (Llama-3.1's) keeps the 32k prompt
# of long_prefill_decode in range. No tensor depends on it.
_LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)

# Published dimensions of each family; num_hidden_layers is set per trace.
CONFIG_DIMS = {
    "llama3-8b": ("LlamaConfig", _LLAMA3_8B),
    # Mixtral-8x7B-v0.1 (8 experts, top-2).
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    # Llama-3.2-1B: Llama-3's vocabulary, heads and RoPE; narrower, with tied embeddings.
    "llama3.2-1b": ("LlamaConfig", {**_LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192,
                                    "tie_word_embeddings": True}),
    # Qwen2.5-0.5B (2 KV heads of 64, tied embeddings).
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)),
}


def make_config(family: str, num_layers: int):
    """The transformers config of `family` with `num_layers` decoder layers."""
    import transformers

    cls, dims = CONFIG_DIMS[family]
    return getattr(transformers, cls)(num_hidden_layers=num_layers, **dims)


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


def _read_on_host(value) -> None:
    """Where generate() calls bool()/.item() on a device tensor.

    Meta tensors have no value; the caller hard-codes the outcome of an
    unpadded run instead.  Taking the tensor as an argument keeps its lifetime
    that of a temporary, as in generate().
    """


def generate_like(model, input_ids, attention_mask, max_new_tokens: int, mark=None):
    """``model.generate(input_ids=..., attention_mask=..., max_new_tokens=...)``, greedy.

    Mirrors transformers' ``generate``/``_sample`` for greedy decoding with a
    ``DynamicCache`` and unpadded prompts: the device tensors it creates are
    created here by the same calls (transformers' own helpers where they are
    data-independent), held by the same variables, and so dropped when
    ``_sample`` drops them.  ``mark(text)`` is called at each step (trace
    comments).  Returns the generated sequences, like ``generate``.
    """
    torch = _torch_imports()[0]
    from transformers import DynamicCache
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        StoppingCriteriaList,
    )

    mark = mark or (lambda text: None)
    dev = input_ids.device
    cfg = model.config
    batch, prompt_len = input_ids.shape
    max_length = prompt_len + max_new_tokens

    # _prepare_special_tokens(): bos/eos as device tensors; pad falls back to
    # eos[0].  (torch.tensor(..., device=meta) bypasses dispatch modes, so the
    # host-then-copy form is used; on a GPU both are one small allocation.)
    bos = torch.tensor(cfg.bos_token_id, dtype=torch.long).to(dev)  # noqa: F841 (held like generate holds it)
    eos = torch.tensor([cfg.eos_token_id], dtype=torch.long).to(dev)
    pad = eos[0]
    model_kwargs = {"attention_mask": attention_mask, "use_cache": True}
    model_kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, model_kwargs)
    # generate() drops an all-ones mask so SDPA can use is_causal:
    # `(mask == 1).all()` is True for unpadded prompts.
    _read_on_host((model_kwargs["attention_mask"] == 1).all())
    mask_length = model_kwargs["attention_mask"].shape[1]
    model_kwargs["attention_mask"] = None
    model_kwargs["logits_to_keep"] = 1  # only the last position's logits
    model_kwargs["past_key_values"] = DynamicCache(config=cfg.get_text_config(decoder=True))
    stopping = StoppingCriteriaList([MaxLengthCriteria(max_length, cfg.max_position_embeddings), EosTokenCriteria(eos)])

    # _sample()
    unfinished = torch.ones(batch, dtype=torch.long, device=dev)
    # _prefill(): empty cache and mask_length == prompt_len, so the whole prompt.
    assert mask_length == prompt_len
    mark(f"prefill batch={batch} tokens={prompt_len}")
    model_inputs = model.prepare_inputs_for_generation(
        input_ids,
        next_sequence_length=prompt_len - model_kwargs["past_key_values"].get_seq_length(),
        is_first_iteration=True,
        **model_kwargs,
    )
    outputs = model(**model_inputs, return_dict=True)
    del model_inputs  # local to _prefill

    prefill_consumed = False
    while True:
        if prefill_consumed:
            mark(f"decode step {input_ids.shape[1] - prompt_len} batch={batch} kv_len={input_ids.shape[1]}")
            model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        prefill_consumed = True
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=dev)
        next_token_scores = next_token_logits  # greedy: empty LogitsProcessorList returns its input
        next_tokens = torch.argmax(next_token_scores, dim=-1)
        next_tokens = next_tokens * unfinished + pad * (1 - unfinished)  # has an eos criterion
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping(input_ids, None)
        # StopCheck: `bool(unfinished.max() == 0)`, False until max_length
        # (no sequence hits eos early in this model of the run).
        _read_on_host(unfinished.max() == 0)
        del outputs
        if input_ids.shape[1] >= max_length:
            break
    return input_ids


def serve_request(model, batch: int, prompt_len: int, new_tokens: int, device: str = "meta", mark=None) -> None:
    """A caller's generate round: tokenised inputs to the GPU, generate, drop everything."""
    torch = _torch_imports()[0]
    dev = torch.device(device)
    # The tokenizer's output moved to the GPU; the caller holds it during generate.
    inputs = {
        "input_ids": torch.zeros(batch, prompt_len, dtype=torch.long).to(dev),
        "attention_mask": torch.ones(batch, prompt_len, dtype=torch.long).to(dev),
    }
    sequences = generate_like(model, inputs["input_ids"], inputs["attention_mask"], new_tokens, mark)
    del sequences, inputs  # the caller decodes the text and lets go


# --------------------------------------------------------------------------
# The recorded traces
# --------------------------------------------------------------------------

# name -> (model family, decoder layers, [(batch, prompt_tokens, new_tokens), ...], description)
RECORDED = {
    "hf_generate_dynamic": (
        "llama3-8b",
        32,
        [(1, 512, 64)],
        "One greedy generate call: batch 1, prompt 512, 64 new tokens; the DynamicCache grows by torch.cat each step.",
    ),
    "mixed_batches": (
        "llama3-8b",
        32,
        [(1, 128, 32), (4, 1024, 32), (8, 300, 24), (2, 2048, 16)],
        "Generate calls with mixed batch sizes and prompt lengths, one after another; weights stay loaded.",
    ),
    "long_prefill_decode": (
        "llama3-8b",
        32,
        [(1, 32768, 32)],
        "One long-context request: batch 1, prompt 32768, then 32 decode steps.",
    ),
    "moe_mix": (
        "mixtral-8x7b",
        8,
        [(1, 256, 16), (8, 512, 16), (2, 2048, 8), (32, 128, 8)],
        "Mixture-of-experts generate calls with mixed batch/prompt sizes (grouped_mm experts, top-2 of 8).",
    ),
    # Small models: a few GB live, so a partly used 2 MiB chunk weighs more.
    "small_llama_mixed": (
        "llama3.2-1b",
        16,
        [(1, 37, 64), (3, 511, 48), (8, 100, 32), (2, 2000, 16)],
        "A 1B model: generate calls with odd prompt lengths and mixed batches, one after another.",
    ),
    "small_qwen_chat": (
        "qwen2.5-0.5b",
        24,
        [(1, 13, 80), (4, 257, 40), (16, 64, 24), (1, 4096, 8)],
        "A 0.5B model with 2 KV heads: short chats, a batch of 16, then one 4K-token prompt.",
    ),
}

# Small workloads for --compare-cuda (fit any 80 GB GPU with random weights).
COMPARE_WORKLOADS = [
    ("llama3-8b", 2, [(1, 512, 8), (4, 300, 4)]),
    ("mixtral-8x7b", 2, [(2, 256, 4)]),
]

PUBLISHED_LAYERS = {"llama3-8b": 32, "mixtral-8x7b": 32, "llama3.2-1b": 16, "qwen2.5-0.5b": 24}

MODELS = {
    "llama3-8b": (
        partial(make_config, "llama3-8b"),
        (
            "Meta-Llama-3-8B dims: hidden 4096, 32 heads (head_dim 128), 8 KV heads, "
            "intermediate 14336, vocab 128256, rope_theta 5e5"
        ),
    ),
    "mixtral-8x7b": (
        partial(make_config, "mixtral-8x7b"),
        (
            "Mixtral-8x7B dims: hidden 4096, 32 heads (head_dim 128), 8 KV heads, "
            "8 experts top-2, expert intermediate 14336, vocab 32000"
        ),
    ),
    "llama3.2-1b": (
        partial(make_config, "llama3.2-1b"),
        "Llama-3.2-1B dims: hidden 2048, 32 heads (head_dim 64), 8 KV heads, intermediate 8192, vocab 128256, tied",
    ),
    "qwen2.5-0.5b": (
        partial(make_config, "qwen2.5-0.5b"),
        "Qwen2.5-0.5B dims: hidden 896, 14 heads (head_dim 64), 2 KV heads, intermediate 4864, vocab 151936, tied",
    ),
}


def record(name: str, family: str, layers: int, runs, description: str, attention: str = "cudnn") -> Trace:
    """Record generate calls ``runs`` = [(batch, prompt, new_tokens), ...] on one model."""
    torch = _torch_imports()[0]
    import transformers

    config_for, dims = MODELS[family]
    trace = Trace(name)
    trace.header = [
        f"ellm_alloc allocation trace: {name}",
        description,
        f"model: {dims}; {layers} of the published {PUBLISHED_LAYERS[family]} decoder layers; dtype bfloat16",
        "runs (batch, prompt_tokens, new_tokens): " + ", ".join(f"({b},{p},{n})" for b, p, n in runs),
        "recorded by benchmarks/record_traces.py: transformers modeling code on the meta device,",
        "one allocation per tensor storage, freed when PyTorch's storage refcount hits zero;",
        f"SDPA as the {attention} kernel (see --attention); greedy decoding as GenerationMixin._sample.",
        f"torch {torch.__version__}, transformers {transformers.__version__}; stream 0 only.",
        "weights are the first allocations and the last frees.",
    ]

    model = build_model(config_for(layers))
    recorder = make_recorder_class()(trace)
    # no_grad, as generate() runs under it.
    with torch.no_grad(), make_gpu_attention_mode(attention)(), recorder:

        def mark(text):
            recorder.flush()  # so the comment follows the frees that precede it
            trace.comment(text)

        trace.comment("weights")
        weight_bytes = load_weights(recorder, model)
        trace.comment(f"weights loaded: {weight_bytes} bytes")
        for b, p, n in runs:
            trace.comment(f"generate batch={b} prompt={p} new_tokens={n}")
            serve_request(model, b, p, n, mark=mark)
            recorder.collect()
        trace.comment("unload model")
        del model
        recorder.collect()
    return trace


def cuda_block_bytes(nbytes: int) -> int:
    """Size the CUDA caching allocator reserves for a request (multiple of 512 B)."""
    return 512 * max(1, -(-nbytes // 512))


def compare_event_streams(meta_ev, cuda_ev, cuda_where=None) -> dict:
    """Compare two event lists [("a", id, bytes) | ("f", id, 0)], e.g. meta recording vs GPU history.

    Allocation sizes are aligned as sequences (difflib); an aligned pair "has
    the same lifetime" when both were freed after the same number of later
    allocations.  ``cuda_where`` (id -> call site) names the GPU allocations
    the recording has no counterpart for.
    """
    import difflib
    from collections import Counter

    def stats(ev):
        live = peak = n_alloc = 0
        sizes, born, lifetime = {}, {}, {}
        for kind, aid, nbytes in ev:
            if kind == "a":
                sizes[aid], born[aid] = nbytes, n_alloc
                n_alloc += 1
                live += nbytes
                peak = max(peak, live)
            else:
                live -= sizes[aid]
                lifetime[aid] = n_alloc - born[aid]
        return peak, sizes, lifetime, [aid for kind, aid, _ in ev if kind == "a"]

    m_peak, m_sizes, m_life, m_ids = stats(meta_ev)
    c_peak, c_sizes, c_life, c_ids = stats(cuda_ev)
    sm = difflib.SequenceMatcher(None, [m_sizes[i] for i in m_ids], [c_sizes[i] for i in c_ids], autojunk=False)
    pairs = [(m_ids[b.a + j], c_ids[b.b + j]) for b in sm.get_matching_blocks() for j in range(b.size)]
    matched_c = {ci for _, ci in pairs}
    where = Counter(f"{c_sizes[ci]} B @ {(cuda_where or {}).get(ci, '?')}" for ci in c_ids if ci not in matched_c)
    return {
        "meta_allocs": len(m_ids),
        "cuda_allocs": len(c_ids),
        "meta_peak_bytes": m_peak,
        "cuda_peak_bytes": c_peak,
        "alloc_sequence_similarity": round(sm.ratio(), 4),
        "matched_allocs": len(pairs),
        "matched_with_same_lifetime": sum(m_life.get(mi) == c_life.get(ci) for mi, ci in pairs),
        "sizes_only_in_meta": (Counter(m_sizes.values()) - Counter(c_sizes.values())).most_common(15),
        "sizes_only_in_cuda": (Counter(c_sizes.values()) - Counter(m_sizes.values())).most_common(15),
        "unmatched_cuda_allocs_by_site": where.most_common(25),
    }


def compare_with_cuda(out_dir: Path, family: str, layers: int, runs, attention: str) -> dict:
    """Record a workload on meta and run it on the real GPU; compare (needs CUDA).

    The GPU side reads the caching allocator's own history
    (``torch.cuda.memory._record_memory_history``: 'alloc' and 'free_requested'
    entries).  Weights and a warm-up request (cuBLAS workspace, lazy init) are
    left out on both sides, and sizes are compared as the 512-byte-rounded
    blocks the allocator hands out.  Not yet run: no GPU was available when
    the traces were recorded.
    """
    import json

    torch = _torch_imports()[0]
    config_for, _ = MODELS[family]

    # Meta side, activations only: drop the weight events before the first request.
    meta = record("compare_meta", family, layers, runs, f"compare {family} {layers} layers", attention)
    meta_ev, weight_ids, in_weights = [], set(), True
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

    # GPU side: same model code, real tensors (random weights; only shapes matter).
    model = build_model(config_for(layers)).to_empty(device="cuda")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
        serve_request(model, 1, 16, 2, device="cuda")  # warm-up
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
        for batch, prompt, new in runs:
            serve_request(model, batch, prompt, new, device="cuda")
            gc.collect()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    cuda_ev, cuda_where, addr_to_id = [], {}, {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            aid = len(cuda_where)
            addr_to_id[e["addr"]] = aid
            frames = [f for f in e.get("frames", []) if "/torch/" not in f["filename"]][:3]
            cuda_where[aid] = " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames)
            cuda_ev.append(("a", aid, cuda_block_bytes(e["size"])))
        elif e["action"] == "free_requested" and e["addr"] in addr_to_id:
            cuda_ev.append(("f", addr_to_id.pop(e["addr"]), 0))

    result = {
        "family": family,
        "layers": layers,
        "runs": runs,
        "attention_modelled": attention,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
    }
    result.update(compare_event_streams(meta_ev, cuda_ev, cuda_where))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{family}_{layers}l"
    (out_dir / f"compare_{tag}.json").write_text(json.dumps(result, indent=1))
    for label, ev in (("meta", meta_ev), ("cuda", cuda_ev)):
        (out_dir / f"compare_{tag}_{label}.txt").write_text(
            "\n".join(f"{k} {aid} {n}" if k == "a" else f"{k} {aid}" for k, aid, n in ev) + "\n"
        )
    return result


# --------------------------------------------------------------------------
# Synthetic trace: random sizes and lifetimes on two streams
# --------------------------------------------------------------------------


def random_two_stream(seed: int = 20240611, n_events: int = 50_000, mean_live: int = 3 * 2**30) -> Trace:
    """Seeded random trace: log-uniform sizes 512 B..256 MiB, random lifetimes, streams 0/1.

    Each step allocates (on stream 0 or 1 at random) or frees a uniformly
    chosen live allocation.  P(alloc) = 1 - live / (2 * mean_live), clamped to
    [0.05, 0.95], so live bytes hover around ``mean_live``.  Whatever is live
    after ``n_events`` steps is freed, in random order.
    """
    rng = random.Random(seed)
    trace = Trace("random_two_stream")
    trace.header = [
        "ellm_alloc allocation trace: random_two_stream (synthetic, not recorded)",
        f"generated by benchmarks/record_traces.py random_two_stream(seed={seed}, n_events={n_events}, mean_live={mean_live})",
        "sizes log-uniform in [512 B, 256 MiB]; each step allocates or frees a uniformly random live id;",
        "P(alloc) = clamp(1 - live / (2 * mean_live), 0.05, 0.95); stream 0 or 1 at random; all freed at the end.",
    ]
    lo, hi = math.log(512), math.log(256 * 2**20)
    live_ids: list[int] = []
    while trace.n_events < n_events:
        p_alloc = min(0.95, max(0.05, 1.0 - trace.live_bytes / (2 * mean_live)))
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
    expect = [
        "a 0 4096",
        "a 1 4096",
        "a 2 4096",
        "f 0",
        "a 3 4096",
        "a 4 512",
        "a 5 2048",
        "f 4",
        "f 3",
        "f 2",
        "f 1",
        "f 5",
    ]
    got = [ln for ln in trace.lines if not ln.startswith("#")]
    assert got == expect, f"recorder self-test failed:\n got    {got}\n expect {expect}"
    print("lifetimes ok:", " | ".join(got))

    # Attention routing: a GQA call (32 query heads, 8 kv heads, 10 tokens,
    # head_dim 128, bf16) allocates the output, plus the float32 log-sum-exp
    # for flash; the output keeps the query's (batch, seq, heads, dim) layout.
    for backend, expect in (("cudnn", ["a 0 81920"]), ("flash", ["a 0 81920", "a 1 1280"])):
        trace = Trace("attention")
        q = torch.empty(1, 10, 32, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
        k = torch.empty(1, 8, 10, 128, dtype=torch.bfloat16, device="meta")
        with make_gpu_attention_mode(backend)(), make_recorder_class()(trace):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        got = [ln for ln in trace.lines if not ln.startswith("#")]
        assert got == expect, f"{backend} attention: got {got}, expect {expect}"
        assert out.transpose(1, 2).is_contiguous(), f"{backend} attention output layout"
    print("attention routing ok")

    # Writing, checking and comparing traces.
    import tempfile

    trace = random_two_stream(seed=1, n_events=2000, mean_live=2**28)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.trace"
        trace.write(path)
        stats = check_trace(path)
    assert (stats["events"], stats["peak_live_bytes"], stats["left_live"]) == (trace.n_events, trace.peak_bytes, 0), (
        stats
    )
    events = [
        (ln.split()[0], int(ln.split()[1]), int(ln.split()[2]) if ln[0] == "a" else 0)
        for ln in trace.lines
        if not ln.startswith("#")
    ]
    same = compare_event_streams(events, events)
    assert same["alloc_sequence_similarity"] == 1.0 and same["matched_with_same_lifetime"] == trace.n_alloc
    extra = [("a", -1, 12345)] + events + [("f", -1, 0)]
    diff = compare_event_streams(events, extra, {-1: "site"})
    assert diff["unmatched_cuda_allocs_by_site"] == [("12345 B @ site", 1)], diff
    print("trace write/check/compare ok")


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="directory to write <name>.trace files to")
    ap.add_argument("--only", nargs="*", help="trace names to produce (default: all)")
    ap.add_argument("--random", action="store_true", help="write only the synthetic random_two_stream trace")
    ap.add_argument(
        "--check", nargs="*", type=Path, metavar="PATH", help="validate traces (files or directories; default: --out)"
    )
    ap.add_argument("--self-test", action="store_true", help="run the recorder sanity check")
    ap.add_argument(
        "--attention",
        choices=["cudnn", "flash"],
        default="cudnn",
        help="fused SDPA kernel to model: cudnn (H100/H200, torch>=2.11) or flash (other GPUs)",
    )
    ap.add_argument(
        "--compare-cuda",
        type=Path,
        metavar="DIR",
        help="on a CUDA machine: record small workloads on meta and on the GPU, write comparisons to DIR",
    )
    args = ap.parse_args(argv)

    if args.self_test:
        self_test()
        return 0

    if args.compare_cuda is not None:
        for family, layers, runs in COMPARE_WORKLOADS:
            r = compare_with_cuda(args.compare_cuda, family, layers, runs, args.attention)
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
            print(
                f"{f.name}: {s['events']} events ({s['allocs']} a / {s['frees']} f), "
                f"peak live {s['peak_live_bytes']} B ({s['peak_live_bytes'] / 2**30:.3f} GiB), "
                f"streams {s['streams']}, still live at end {s['left_live']}"
            )
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
            trace = record(name, family, layers, runs, description, args.attention)
        else:
            ap.error(f"unknown trace {name!r}")
        trace.write(args.out / f"{name}.trace")
        print(
            f"{name}: {trace.n_events} events, peak live {trace.peak_bytes} B "
            f"({trace.peak_bytes / 2**30:.3f} GiB), {time.time() - t0:.1f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
