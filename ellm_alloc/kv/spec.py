"""Typed per-layer KV-cache specs, and a model's list of them.

One frozen dataclass per kind of layer. Each says how many bytes a layer needs
per cached token and per request, and which tokens must still be cached after
`n` tokens have been seen. Identical specs are equal and hash alike, so layers
can be grouped by using their specs as dict keys.

=============  ==================================  =========================================
kind           class                               cached per layer
=============  ==================================  =========================================
``full``       FullAttentionSpec                   K and V of every token
``sliding``    SlidingWindowSpec(window=W)         K and V of the last W tokens
``chunked``    ChunkedLocalSpec(chunk_size=C)      K and V of the current chunk of C tokens
``mamba``      MambaSpec(conv_shape, ssm_shape)    a fixed recurrent state per request
``cross``      CrossAttentionSpec(max_tokens=M)    K and V of M encoder tokens, fixed per request
``mla``        MLASpec(kv_lora_rank, rope_dim)     one latent vector (plus RoPE key) per token
=============  ==================================  =========================================

Token accounting, for a sequence of ``n`` tokens (indices ``0 .. n-1``), as seen
when the next token ``n`` is about to be computed:

* ``first_needed_token(n)``: the index of the oldest token whose KV must stay.
* ``tokens_kept(n)``: how many tokens are kept (``n - first_needed_token(n)``
  for every kind that caches per token; fixed ``M`` for cross-attention; 0 for
  Mamba).
* ``live_bytes(n) = tokens_kept(n) * bytes_per_token() + state_bytes()``.

Sliding window ``W``: a query attends to itself and the ``W - 1`` tokens before
it (the convention of Mistral, Gemma and transformers' masks). Strictly only
``W - 1`` old tokens are needed for the next query, but we keep ``W``: one
token of slack, so the cache also covers the query that produced the last
token (recomputation, speculative rollback) and never evicts a token one step
early. ``first_needed_token(n) = max(0, n - W)``, ``tokens_kept(n) = min(n, W)``.

Chunked local attention ``C`` (Llama-4): token ``i`` attends only to tokens of
its own chunk ``[C*(i//C), i]``. We keep the chunk of the last seen token:
``first_needed_token(n) = C * ((n - 1) // C)`` for ``n > 0`` (0 for ``n = 0``),
so ``tokens_kept(n)`` runs 1..C and is C exactly at a chunk boundary.

JSON schema (``ModelKVSpec.to_json`` / ``from_json``)::

    {
      "name": "llama3-8b",
      "layers": [
        {"type": "full", "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "repeat": 32}
      ]
    }

``layers`` is an ordered list; entry ``i`` describes the next layer(s) in model
order. ``"type"`` is the kind; the other keys are that class's fields:

* every type: ``kv_heads``, ``head_dim``, ``dtype`` (optional, default
  ``"bfloat16"``; a torch dtype name such as ``"float16"`` or
  ``"float8_e4m3fn"``);
* ``sliding``: ``window``; ``chunked``: ``chunk_size``; ``cross``:
  ``max_tokens``; ``mla``: ``kv_lora_rank``, ``rope_dim`` (``kv_heads``
  and ``head_dim`` optional, they must be 1 and ``kv_lora_rank + rope_dim``);
  ``mamba``: ``conv_shape``, ``ssm_shape`` (lists of positive ints: one
  request's conv and SSM state tensors; ``kv_heads``/``head_dim`` optional,
  default 0).

An optional ``"repeat": N`` (N >= 1) expands an entry into N consecutive
identical layers. ``to_json`` writes runs of identical layers that way, one
entry per line, and leaves out the implied fields (MLA's ``kv_heads`` and
``head_dim``; Mamba's when 0).
Unknown types, unknown keys, missing fields and bad values raise ValueError.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Iterable, Mapping

__all__ = [
    "DTYPE_ITEMSIZE",
    "SPEC_TYPES",
    "ChunkedLocalSpec",
    "CrossAttentionSpec",
    "FullAttentionSpec",
    "LayerSpec",
    "MLASpec",
    "MambaSpec",
    "ModelKVSpec",
    "SlidingWindowSpec",
    "canonical_dtype",
    "spec_from_dict",
    "spec_to_dict",
]

# Canonical torch dtype names a KV cache can be held in, with their sizes.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "int8": 1,
    "uint8": 1,
}
_DTYPE_ALIASES = {
    "double": "float64",
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
}


def canonical_dtype(dtype: Any) -> str:
    """The canonical name ("bfloat16", ...) of a dtype given as a name, an alias,
    "torch.<name>" or a torch.dtype. Raises ValueError for anything else."""
    if isinstance(dtype, str):
        name = dtype.strip()
    elif type(dtype).__name__ == "dtype" and type(dtype).__module__ == "torch":
        name = str(dtype)
    else:
        raise ValueError(f"dtype must be a torch dtype name or torch.dtype, got {dtype!r}")
    name = name.removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(
            f"dtype {dtype!r} is not a supported KV-cache dtype; expected one of {sorted(DTYPE_ITEMSIZE)}"
        )
    return name


MAX_LAYERS = 4096  # far above any published model; a spec beyond it is a typo, not a model


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{owner}.{name} must be {what}, got {value}")
    return value


@dataclass(frozen=True)
class LayerSpec:
    """What one layer caches. Subclasses set `kind` and the token accounting."""

    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    kind: ClassVar[str] = ""
    #: True when the layer caches per-token KV (everything but Mamba).
    token_based: ClassVar[bool] = True
    #: Minimum accepted kv_heads / head_dim (Mamba allows 0).
    _min_heads: ClassVar[int] = 1

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if type(self) is LayerSpec:
            raise TypeError("LayerSpec is abstract; use FullAttentionSpec, SlidingWindowSpec, ...")
        object.__setattr__(self, "kv_heads", _check_int(cls, "kv_heads", self.kv_heads, self._min_heads))
        object.__setattr__(self, "head_dim", _check_int(cls, "head_dim", self.head_dim, self._min_heads))
        try:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        except ValueError as e:
            raise ValueError(f"{cls}.dtype: {e}") from None

    # --- dtype helpers -----------------------------------------------------
    @property
    def itemsize(self) -> int:
        """Bytes per element of `dtype`."""
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def torch_dtype(self):
        """`dtype` as a torch.dtype (imports torch)."""
        import torch

        return getattr(torch, self.dtype)

    # --- sizes -------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """Bytes one layer needs per cached token: K and V."""
        return 2 * self.kv_heads * self.head_dim * self.itemsize

    def state_bytes(self) -> int:
        """Fixed bytes per request, independent of its length (0 unless Mamba)."""
        return 0

    # --- token accounting ---------------------------------------------------
    def first_needed_token(self, num_tokens: int) -> int:
        """Index of the oldest token whose KV must still be cached after num_tokens."""
        _check_tokens(num_tokens)
        return 0

    def tokens_kept(self, num_tokens: int) -> int:
        """How many tokens' KV must be cached after num_tokens tokens."""
        return num_tokens - self.first_needed_token(num_tokens)

    def live_bytes(self, num_tokens: int) -> int:
        """Bytes this layer needs for a request of num_tokens tokens."""
        return self.tokens_kept(num_tokens) * self.bytes_per_token() + self.state_bytes()

    def short(self) -> str:
        """A compact one-line description."""
        extra = "".join(f", {f.name}={getattr(self, f.name)}" for f in fields(self)[3:])
        return f"{self.kind}(kv_heads={self.kv_heads}, head_dim={self.head_dim}, {self.dtype}{extra})"


def _check_tokens(num_tokens: int) -> None:
    if type(num_tokens) is int and num_tokens >= 0:  # the usual case, decided before the slower checks
        return
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")


@dataclass(frozen=True)
class FullAttentionSpec(LayerSpec):
    """Causal self-attention over every previous token."""

    kind: ClassVar[str] = "full"


@dataclass(frozen=True)
class SlidingWindowSpec(LayerSpec):
    """Self-attention over the last `window` tokens (the query included).

    Keeps min(n, window) tokens: one more than the next query strictly needs
    (see the module docstring)."""

    window: int = field(kw_only=True)
    kind: ClassVar[str] = "sliding"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "window", _check_int(type(self).__name__, "window", self.window, 1))

    def first_needed_token(self, num_tokens: int) -> int:
        _check_tokens(num_tokens)
        return max(0, num_tokens - self.window)


@dataclass(frozen=True)
class ChunkedLocalSpec(LayerSpec):
    """Attention within fixed chunks of `chunk_size` tokens (Llama-4 local layers).

    Keeps the chunk of the last seen token: C*((n-1)//C) .. n-1."""

    chunk_size: int = field(kw_only=True)
    kind: ClassVar[str] = "chunked"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(
            self, "chunk_size", _check_int(type(self).__name__, "chunk_size", self.chunk_size, 1)
        )

    def first_needed_token(self, num_tokens: int) -> int:
        _check_tokens(num_tokens)
        if num_tokens == 0:
            return 0
        return self.chunk_size * ((num_tokens - 1) // self.chunk_size)


@dataclass(frozen=True)
class MambaSpec(LayerSpec):
    """A recurrent (Mamba / linear-attention) layer: a fixed state per request.

    `conv_shape` and `ssm_shape` are the shapes of one request's conv and SSM
    state tensors, both held in `dtype`. No per-token cache: tokens_kept is 0
    and first_needed_token(n) is n. kv_heads and head_dim default to 0."""

    kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "bfloat16"
    conv_shape: tuple[int, ...] = field(kw_only=True)
    ssm_shape: tuple[int, ...] = field(kw_only=True)
    kind: ClassVar[str] = "mamba"
    token_based: ClassVar[bool] = False
    _min_heads: ClassVar[int] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        for name in ("conv_shape", "ssm_shape"):
            shape = getattr(self, name)
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
                raise ValueError(f"{cls}.{name} must be a sequence of positive ints, got {shape!r}")
            shape = tuple(_check_int(cls, f"{name}[{i}]", d, 1) for i, d in enumerate(shape))
            if not shape:
                raise ValueError(f"{cls}.{name} must not be empty")
            object.__setattr__(self, name, shape)

    def bytes_per_token(self) -> int:
        return 0

    def state_bytes(self) -> int:
        return (math.prod(self.conv_shape) + math.prod(self.ssm_shape)) * self.itemsize

    def first_needed_token(self, num_tokens: int) -> int:
        _check_tokens(num_tokens)
        return num_tokens


@dataclass(frozen=True)
class CrossAttentionSpec(LayerSpec):
    """Cross-attention to `max_tokens` encoder tokens (e.g. vision tokens).

    Their K and V are computed once per request and do not depend on how many
    text tokens there are: tokens_kept(n) == max_tokens for every n, even 0
    (the request reserves its encoder cache up front)."""

    max_tokens: int = field(kw_only=True)
    kind: ClassVar[str] = "cross"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(
            self, "max_tokens", _check_int(type(self).__name__, "max_tokens", self.max_tokens, 1)
        )

    def tokens_kept(self, num_tokens: int) -> int:
        _check_tokens(num_tokens)
        return self.max_tokens


@dataclass(frozen=True)
class MLASpec(LayerSpec):
    """Multi-head latent attention (DeepSeek-V2/V3), cached vLLM-style: per
    token one compressed latent of kv_lora_rank plus the shared RoPE key of
    rope_dim, no separate V. kv_heads is 1 and head_dim kv_lora_rank + rope_dim
    (filled in when omitted)."""

    kv_heads: int = 1
    head_dim: int = 0
    dtype: str = "bfloat16"
    kv_lora_rank: int = field(kw_only=True)
    rope_dim: int = field(kw_only=True)
    kind: ClassVar[str] = "mla"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        rank = _check_int(cls, "kv_lora_rank", self.kv_lora_rank, 1)
        rope = _check_int(cls, "rope_dim", self.rope_dim, 1)
        object.__setattr__(self, "kv_lora_rank", rank)
        object.__setattr__(self, "rope_dim", rope)
        if isinstance(self.head_dim, numbers.Integral) and not isinstance(self.head_dim, bool) \
                and self.head_dim == 0:
            object.__setattr__(self, "head_dim", rank + rope)
        super().__post_init__()
        if self.kv_heads != 1:
            raise ValueError(f"{cls}.kv_heads must be 1 (one latent per token), got {self.kv_heads}")
        if self.head_dim != rank + rope:
            raise ValueError(
                f"{cls}.head_dim must be kv_lora_rank + rope_dim = {rank + rope}, got {self.head_dim}"
            )

    def bytes_per_token(self) -> int:
        return (self.kv_lora_rank + self.rope_dim) * self.itemsize


SPEC_TYPES: dict[str, type[LayerSpec]] = {
    cls.kind: cls
    for cls in (FullAttentionSpec, SlidingWindowSpec, ChunkedLocalSpec, MambaSpec, CrossAttentionSpec, MLASpec)
}


def spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    """A JSON-ready dict: {"type": kind, <fields>} (shapes as lists). The
    fields that are implied leave out: MLA's kv_heads/head_dim (1 and
    kv_lora_rank + rope_dim) and Mamba's when they are 0."""
    if not isinstance(spec, LayerSpec):
        raise ValueError(f"not a LayerSpec: {spec!r}")
    out: dict[str, Any] = {"type": spec.kind}
    for f in fields(spec):
        v = getattr(spec, f.name)
        if f.name in ("kv_heads", "head_dim") and (
                isinstance(spec, MLASpec) or (isinstance(spec, MambaSpec) and v == 0)):
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def spec_from_dict(d: Mapping[str, Any]) -> LayerSpec:
    """Inverse of spec_to_dict. Raises ValueError naming an unknown type, a
    missing or unknown field, or a bad value."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a layer spec must be a JSON object, got {type(d).__name__}: {d!r}")
    if "type" not in d:
        raise ValueError(f"layer spec {dict(d)!r} has no 'type'; expected one of {sorted(SPEC_TYPES)}")
    kind = d["type"]
    cls = SPEC_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown layer type {kind!r}; expected one of {sorted(SPEC_TYPES)}")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"layer type {kind!r} has no field(s) {unknown}; its fields are {sorted(known)}")
    missing = [n for n, f in known.items() if n not in kwargs and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"layer type {kind!r} is missing required field(s) {missing}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a list where an int belongs, caught by nothing else
        raise ValueError(f"layer type {kind!r}: {e}") from None


@dataclass(frozen=True)
class ModelKVSpec:
    """A model's layers, in order: layers[i] is layer i's spec."""

    name: str
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelKVSpec.name must be a non-empty string, got {self.name!r}")
        layers = tuple(self.layers)
        if not layers:
            raise ValueError(f"ModelKVSpec {self.name!r} has no layers")
        for i, s in enumerate(layers):
            if not isinstance(s, LayerSpec):
                raise ValueError(f"ModelKVSpec {self.name!r}: layer {i} is not a LayerSpec: {s!r}")
        object.__setattr__(self, "layers", layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def groups(self) -> dict[LayerSpec, tuple[int, ...]]:
        """Identical specs -> the layer indices that have them, in order of first appearance."""
        out: dict[LayerSpec, list[int]] = {}
        for i, s in enumerate(self.layers):
            out.setdefault(s, []).append(i)
        return {s: tuple(ix) for s, ix in out.items()}

    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.layers)

    def bytes_per_token_all_layers(self) -> int:
        """Sum of bytes_per_token over the layers (Mamba layers count 0): what
        one token costs when every token-based layer (full, sliding, chunked,
        cross, MLA) caches it."""
        return sum(s.bytes_per_token() for s in self.layers)

    def state_bytes_all_layers(self) -> int:
        """Fixed bytes per request (Mamba states)."""
        return sum(s.state_bytes() for s in self.layers)

    def live_bytes(self, num_tokens: int) -> int:
        """Bytes one request of num_tokens needs over all layers."""
        return sum(s.live_bytes(num_tokens) for s in self.layers)

    def describe(self) -> str:
        """A header line, then one line per group of identical specs."""
        lines = [
            f"{self.name}: {self.num_layers} layers, {self.bytes_per_token_all_layers()} B/token, "
            f"{self.state_bytes_all_layers()} B/request state"
        ]
        for spec, ix in self.groups().items():
            per = f"{spec.bytes_per_token()} B/token" if spec.token_based else f"{spec.state_bytes()} B/request"
            lines.append(f"  {len(ix):>3} x {spec.short()}: {per} per layer; layers {_ranges(ix)}")
        return "\n".join(lines)

    # --- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of the module docstring; runs of identical layers use "repeat"."""
        entries: list[dict[str, Any]] = []
        prev: LayerSpec | None = None
        for s in self.layers:
            if s == prev:
                entries[-1]["repeat"] += 1
            else:
                entries.append({**spec_to_dict(s), "repeat": 1})
                prev = s
        for e in entries:
            if e["repeat"] == 1:
                del e["repeat"]
        return {"name": self.name, "layers": entries}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelKVSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"a model KV spec must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"name", "layers"})
        if unknown:
            raise ValueError(f"model KV spec has unknown key(s) {unknown}; expected 'name' and 'layers'")
        for key in ("name", "layers"):
            if key not in d:
                raise ValueError(f"model KV spec is missing {key!r}")
        if not isinstance(d["layers"], list):
            raise ValueError(f"model KV spec 'layers' must be a list, got {type(d['layers']).__name__}")
        layers: list[LayerSpec] = []
        for i, entry in enumerate(d["layers"]):
            where = f"layers[{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be a JSON object, got {entry!r}")
            entry = dict(entry)
            repeat = entry.pop("repeat", 1)
            try:
                repeat = _check_int("entry", "repeat", repeat, 1)
                spec = spec_from_dict(entry)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if len(layers) + repeat > MAX_LAYERS:
                raise ValueError(f"{where}: repeat {repeat} makes more than {MAX_LAYERS} layers")
            layers.extend([spec] * repeat)
        return cls(d["name"], tuple(layers))

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_str())

    def to_json_str(self) -> str:
        """The JSON text to_json writes: one line per layer entry."""
        d = self.to_dict()
        entries = ",\n".join(f"    {json.dumps(e)}" for e in d["layers"])
        return f'{{\n  "name": {json.dumps(d["name"])},\n  "layers": [\n{entries}\n  ]\n}}\n'

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> ModelKVSpec:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None


def _ranges(ix: Iterable[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    out: list[str] = []
    ix = list(ix)
    start = prev = ix[0]
    for i in ix[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)
