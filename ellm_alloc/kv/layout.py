"""Grouping and two-level page sizes (Jenga's LCM pages, made elastic).

Layers with the same spec form a group. A group's small page holds one block
of `block_size` tokens for every layer of the group (or one request's state,
for Mamba). The large page is lcm(chunk, every group's small page): the unit
mapped from the pool, carved into small pages of one group. When that lcm is
too large, the odd small pages are padded up (to a multiple of a power of two
large enough to bring the lcm within the limit) and the padding is reported.

Inside a small page the bytes are laid out [layer][K, V][token][head][dim], so
one layer's K for one block is dense (kernels read it in one sweep) and every
per-layer tensor is a strided view over the group's range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .spec import LayerSpec, ModelKVSpec


@dataclass(frozen=True)
class KVGroup:
    """Layers sharing one spec, and the page geometry derived from it."""

    group_id: int
    spec: LayerSpec
    layers: tuple[int, ...]
    block_size: int  # tokens per block (1 "block" = one request's state for Mamba)
    small_page_bytes: int  # what the block needs
    padded_small_bytes: int  # what it occupies (>= small_page_bytes)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def is_state(self) -> bool:
        return self.spec.kind == "mamba"

    @property
    def padding_bytes(self) -> int:
        return self.padded_small_bytes - self.small_page_bytes

    @property
    def kv_planes(self) -> int:
        """Separate tensors per layer: K and V, or one latent (MLA)."""
        return 1 if self.spec.kind == "mla" else 2

    def plane_bytes(self) -> int:
        """Bytes of one layer's K (or V) for one block."""
        if self.is_state:
            return self.small_page_bytes // len(self.layers)
        return self.small_page_bytes // (len(self.layers) * self.kv_planes)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a request of num_tokens needs in this group, counting from token 0."""
        if self.is_state:
            return 1
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class PageLayout:
    groups: tuple[KVGroup, ...]
    chunk_bytes: int
    large_page_bytes: int
    max_large_page_bytes: int
    notes: tuple[str, ...] = field(default=())

    def ratio(self, group: KVGroup) -> int:
        """Small pages per large page of this group."""
        return self.large_page_bytes // group.padded_small_bytes

    @property
    def padding_fraction(self) -> dict[int, float]:
        return {g.group_id: g.padding_bytes / g.padded_small_bytes for g in self.groups}

    def describe(self) -> str:
        lines = [f"large page {self.large_page_bytes} B ({self.large_page_bytes // self.chunk_bytes} chunks)"]
        for g in self.groups:
            pad = f", padded +{g.padding_bytes} B" if g.padding_bytes else ""
            lines.append(
                f"  group {g.group_id}: {g.kind} x{len(g.layers)} layers, small page {g.small_page_bytes} B"
                f"{pad}, {self.ratio(g)} per large page"
            )
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def small_page_bytes(spec: LayerSpec, n_layers: int, block_size: int) -> int:
    if spec.kind == "mamba":
        return spec.state_bytes() * n_layers
    return block_size * spec.bytes_per_token() * n_layers


def _pad_to_fit(small: int, chunk: int, limit: int) -> int:
    """Smallest padding of `small` whose lcm with `chunk` stays within `limit`:
    round up to a multiple of 2^k for the smallest k that works."""
    q = 1
    while q <= limit:
        padded = -(-small // q) * q
        if math.lcm(chunk, padded) <= limit:
            return padded
        q <<= 1
    raise ValueError(f"no padding of a {small} B small page fits a large page of at most {limit} B")


def plan_layout(model: ModelKVSpec, block_size: int, chunk_bytes: int,
                max_large_page_bytes: int | None = None) -> PageLayout:
    """Groups the model's layers and sizes the pages. Raises ValueError when a
    small page cannot fit in any large page within the limit."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    limit = max_large_page_bytes or 16 * chunk_bytes
    if limit < chunk_bytes:
        raise ValueError(f"max_large_page_bytes {limit} is smaller than one chunk ({chunk_bytes})")
    by_spec: dict[LayerSpec, list[int]] = {}
    for i, spec in enumerate(model.layers):
        by_spec.setdefault(spec, []).append(i)
    if not by_spec:
        raise ValueError("the model has no layers")
    raw = []
    for spec, layers in by_spec.items():
        small = small_page_bytes(spec, len(layers), block_size)
        if small <= 0:
            raise ValueError(f"layers {layers} ({spec.kind}) need 0 bytes per block")
        if small > limit:
            raise ValueError(
                f"a {spec.kind} block of layers {layers[:4]}{'...' if len(layers) > 4 else ''} needs "
                f"{small} B, more than the largest feasible large page ({limit} B); lower block_size "
                f"(now {block_size}) or raise max_large_page_bytes"
            )
        raw.append((spec, tuple(layers), small))
    notes = []
    padded = {small: small for _, _, small in raw}
    large = chunk_bytes
    for small in sorted(padded):
        large = math.lcm(large, small)
    if large > limit:
        # Pad the odd ones out, largest first, until the common lcm fits.
        large = chunk_bytes
        for small in sorted(padded, reverse=True):
            p = _pad_to_fit(small, large, limit)
            padded[small] = p
            large = math.lcm(large, p)
        notes.append(f"lcm of the small pages exceeded {limit} B; odd small pages padded")
    groups = tuple(
        KVGroup(gid, spec, layers, block_size, small, padded[small])
        for gid, (spec, layers, small) in enumerate(raw)
    )
    return PageLayout(groups, chunk_bytes, large, limit, tuple(notes))
