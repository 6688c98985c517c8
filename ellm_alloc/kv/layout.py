"""Grouping and two-level page sizes (Jenga's LCM pages, made elastic).

Layers with the same spec form a group. A group's small page holds one block
of `block_size` tokens for every layer of the group (or one request's state,
for Mamba). A large page is carved into small pages of one group:
lcm(chunk, the group's small page), a run of whole chunks at contiguous VA.
It is the unit of placement; the block pool maps only the chunks under its
used small pages (a small page may straddle two chunks).

Why per group and not one lcm over all groups, as in Jenga: Jenga needs one
large-page size so that pages can move between groups inside a static pool.
Here groups exchange memory through the chunk pool itself, so each group's
large page only has to be a multiple of the chunk. Taking the lcm over every
group only makes some groups' pages larger than they need to be (Gemma-3's
1 MiB global blocks would sit in 10 MiB pages), and a larger page runs into
the size limit, and so into padding, sooner. When a group's lcm is still too large,
its layers are split into a few groups whose pages need no padding, if their
pages together are no larger than the padded one would be (_split_sizes);
otherwise its small page is padded up (to a multiple of the smallest power of
two that brings the lcm within the limit). Both are reported in the notes.

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
    large_page_bytes: int  # lcm(chunk, padded_small_bytes)

    @property
    def ratio(self) -> int:
        """Small pages per large page."""
        return self.large_page_bytes // self.padded_small_bytes

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
    max_large_page_bytes: int
    notes: tuple[str, ...] = field(default=())

    def ratio(self, group: KVGroup) -> int:
        """Small pages per large page of this group."""
        return group.ratio

    @property
    def large_page_bytes(self) -> int:
        """The largest large page of any group."""
        return max(g.large_page_bytes for g in self.groups)

    @property
    def padding_fraction(self) -> dict[int, float]:
        return {g.group_id: g.padding_bytes / g.padded_small_bytes for g in self.groups}

    def describe(self) -> str:
        lines = [f"{len(self.groups)} groups, chunk {self.chunk_bytes} B"]
        for g in self.groups:
            pad = f", padded +{g.padding_bytes} B" if g.padding_bytes else ""
            lines.append(
                f"  group {g.group_id}: {g.kind} x{len(g.layers)} layers, small page {g.small_page_bytes} B"
                f"{pad}, large page {g.large_page_bytes} B ({g.ratio} small pages)"
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


def _split_sizes(per_layer: int, n: int, chunk: int, limit: int, max_parts: int = 3) -> list[int]:
    """How many layers each group of one spec gets.

    One group when its large page needs no padding. Otherwise the fewest
    groups (at most max_parts, largest first) whose pages need none, taken
    only if their large pages together are no larger than the padded group's
    one: padding goes and the memory a partly used page can strand does not
    grow. 29 Gemma-3-4B sliding layers of 64 KiB blocks would pad 1.81 MiB to
    1.875 MiB in 30 MiB pages; 28 + 1 layers fit 14 MiB and 2 MiB pages
    exactly. Jamba's 28 Mamba states would need 30 + 10 MiB pages against one
    padded 18 MiB page, so they stay one padded group. When even one layer's
    blocks of the whole spec exceed the limit (a large Mamba state), as few
    equal groups as keep every block within it."""
    def page(k: int) -> int:
        return math.lcm(chunk, k * per_layer)

    if page(n) <= limit:
        return [n]
    if n * per_layer > limit:
        per_group = limit // per_layer  # >= 1: the caller checked per_layer <= limit
        groups = -(-n // per_group)
        return [n // groups + (i < n % groups) for i in range(groups)]
    padded_page = math.lcm(chunk, _pad_to_fit(n * per_layer, chunk, limit))
    parts, rest = [], n
    while rest and len(parts) < max_parts:
        k = next((k for k in range(rest, 0, -1) if page(k) <= limit), 0)
        if not k:
            break
        parts.append(k)
        rest -= k
    if rest == 0 and sum(page(k) for k in parts) <= padded_page:
        return parts
    return [n]


def plan_layout(model: ModelKVSpec, block_size: int, chunk_bytes: int,
                max_large_page_bytes: int | None = None, uniform_pages: bool = False) -> PageLayout:
    """Groups the model's layers and sizes the pages. Raises ValueError when a
    small page cannot fit in any large page within the limit.

    uniform_pages pads every group's page to the largest one: the single
    page size of engines without two-level pages (a benchmark baseline)."""
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
    notes = []
    for spec, layers in by_spec.items():
        per_layer = small_page_bytes(spec, 1, block_size)
        if per_layer <= 0:
            raise ValueError(f"layers {layers} ({spec.kind}) need 0 bytes per block")
        splittable = per_layer <= limit and not uniform_pages
        parts = _split_sizes(per_layer, len(layers), chunk_bytes, limit) if splittable else [len(layers)]
        if len(parts) > 1:
            why = (f"so that every block fits a {limit} B page" if per_layer * len(layers) > limit
                   else "so that their pages need no padding")
            notes.append(f"{len(layers)} {spec.kind} layers split into groups of {parts} layers {why}")
        start = 0
        for k in parts:
            part, small = tuple(layers[start:start + k]), per_layer * k
            start += k
            if small > limit:
                raise ValueError(
                    f"a {spec.kind} block of layers {part[:4]}{'...' if len(part) > 4 else ''} needs "
                    f"{small} B, more than the largest feasible large page ({limit} B); lower block_size "
                    f"(now {block_size}) or raise max_large_page_bytes"
                )
            raw.append((spec, part, small))
    if uniform_pages:
        biggest = _pad_to_fit(max(small for _, _, small in raw), chunk_bytes, limit)
        large = math.lcm(chunk_bytes, biggest)
        groups = tuple(KVGroup(gid, spec, layers, block_size, small, biggest, large)
                       for gid, (spec, layers, small) in enumerate(raw))
        return PageLayout(groups, chunk_bytes, limit, (f"every page padded to the largest, {biggest} B",))
    groups = []
    for gid, (spec, layers, small) in enumerate(raw):
        padded = _pad_to_fit(small, chunk_bytes, limit)
        if padded != small:
            notes.append(f"group {gid}: small page {small} B padded to {padded} B to keep its large page "
                         f"within {limit} B")
        groups.append(KVGroup(gid, spec, tuple(layers), block_size, small, padded,
                              math.lcm(chunk_bytes, padded)))
    return PageLayout(tuple(groups), chunk_bytes, limit, tuple(notes))
