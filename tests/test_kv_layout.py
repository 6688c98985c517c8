"""plan_layout: grouping of layers by spec, small / large page sizes, padding, limits."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ellm_alloc.kv import (
    ChunkedLocalSpec, FullAttentionSpec, MambaSpec, MLASpec, ModelKVSpec, SlidingWindowSpec, plan_layout,
)
from ellm_alloc.kv.layout import _pad_to_fit

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 2 * MiB

FULL = FullAttentionSpec(2, 64, "bfloat16")  # 512 B/token
SLIDE = SlidingWindowSpec(2, 64, "bfloat16", window=128)
CHUNKED = ChunkedLocalSpec(4, 32, "float32", chunk_size=64)  # 1024 B/token
MAMBA = MambaSpec(dtype="float32", conv_shape=(4, 8), ssm_shape=(8, 16))  # (32 + 128) * 4 = 640 B
MLA = MLASpec(kv_lora_rank=512, rope_dim=64)


def test_layers_of_one_spec_form_one_group_in_first_appearance_order():
    model = ModelKVSpec("m", (FULL, SLIDE, FULL, MAMBA, SLIDE, FullAttentionSpec(2, 64, "bf16"), CHUNKED))
    lay = plan_layout(model, 16, CHUNK)
    assert [g.spec for g in lay.groups] == [FULL, SLIDE, MAMBA, CHUNKED]
    assert [g.layers for g in lay.groups] == [(0, 2, 5), (1, 4), (3,), (6,)]
    assert [g.group_id for g in lay.groups] == [0, 1, 2, 3]
    # A different window is a different spec, hence a different group.
    lay2 = plan_layout(ModelKVSpec("m", (SLIDE, SlidingWindowSpec(2, 64, "bfloat16", window=64))), 16, CHUNK)
    assert len(lay2.groups) == 2


# (spec, layers, block_size, small page bytes): block_size x bytes/token x layers, or the state x layers.
SMALL_ROWS = [
    (FULL, 1, 16, 16 * 512),
    (FULL, 3, 16, 3 * 16 * 512),
    (SLIDE, 2, 32, 2 * 32 * 512),
    (CHUNKED, 1, 8, 8 * 1024),
    (MAMBA, 1, 16, 640),
    (MAMBA, 3, 64, 3 * 640),  # independent of block_size
    (MLA, 2, 16, 2 * 16 * 576 * 2 * MLA.bytes_per_token() // (576 * 2)),
]


@pytest.mark.parametrize("spec,n,bs,small", SMALL_ROWS)
def test_small_page_bytes(spec, n, bs, small):
    lay = plan_layout(ModelKVSpec("m", (spec,) * n), bs, CHUNK)
    (g,) = lay.groups
    assert g.small_page_bytes == small
    assert g.padded_small_bytes == small  # all of these fit without padding
    assert g.large_page_bytes == math.lcm(CHUNK, small)
    assert g.ratio == g.large_page_bytes // small
    assert lay.notes == ()


# (spec, layers, block_size, limit, padded small page, large page)
PAD_ROWS = [
    # 24 KiB = 3 * 8 KiB: lcm with 2 MiB is 6 MiB; fits a 32 MiB limit, not a 4 MiB one.
    (FULL, 3, 16, 32 * MiB, 24 * KiB, 6 * MiB),
    (FULL, 3, 16, 4 * MiB, 32 * KiB, 2 * MiB),
    # 640 B = 5 * 128 B: lcm is 10 MiB.
    (MAMBA, 1, 16, 16 * MiB, 640, 10 * MiB),
    (MAMBA, 1, 16, 8 * MiB, 768, 6 * MiB),  # 768 = 3 * 256: lcm 6 MiB
    # 3 * 640 = 1920 = 15 * 128: lcm 30 MiB.
    (MAMBA, 3, 16, 16 * MiB, 2 * KiB, 2 * MiB),
    # A small page larger than the chunk: 3 MiB -> lcm 6 MiB.
    (FullAttentionSpec(8, 128, "float32"), 3, 128, 8 * MiB, 3 * MiB, 6 * MiB),
]


@pytest.mark.parametrize("spec,n,bs,limit,padded,large", PAD_ROWS)
def test_padding_only_when_the_lcm_exceeds_the_limit(spec, n, bs, limit, padded, large):
    lay = plan_layout(ModelKVSpec("m", (spec,) * n), bs, CHUNK, max_large_page_bytes=limit)
    (g,) = lay.groups
    assert (g.padded_small_bytes, g.large_page_bytes) == (padded, large)
    assert g.large_page_bytes <= limit and g.large_page_bytes % CHUNK == 0
    if padded != g.small_page_bytes:
        assert g.padding_bytes == padded - g.small_page_bytes
        assert len(lay.notes) == 1 and "group 0" in lay.notes[0] and str(limit) in lay.notes[0]
        assert lay.padding_fraction[0] == pytest.approx(g.padding_bytes / padded)
    else:
        assert lay.notes == () and g.padding_bytes == 0


GEMMA3_4B_SLIDING = SlidingWindowSpec(4, 256, "bfloat16", window=1024)  # 64 KiB per layer and block
JAMBA_MAMBA = MambaSpec(dtype="bfloat16", conv_shape=(8192, 4), ssm_shape=(8192, 16))  # 320 KiB state

# (spec, layers, block_size, limit, [(layers, padded small page, large page) per group])
SPLIT_ROWS = [
    # 29 x 64 KiB = 1.81 MiB: one group would pad to 1.875 MiB in 30 MiB pages;
    # 28 + 1 layers need no padding, in 14 + 2 MiB pages.
    (GEMMA3_4B_SLIDING, 29, 16, 32 * MiB, [(28, 28 * 64 * KiB, 14 * MiB), (1, 64 * KiB, 2 * MiB)]),
    # 3 MiB with a 4 MiB limit: padded to one 4 MiB block per page, or 2 + 1 layers in 2 MiB pages.
    (FullAttentionSpec(8, 128, "float32"), 3, 128, 4 * MiB, [(2, 2 * MiB, 2 * MiB), (1, MiB, 2 * MiB)]),
    # 28 Mamba states: 24 + 4 layers would need 30 + 10 MiB pages against one padded
    # 18 MiB page (2 states of 8.75 + 0.25 MiB): no split.
    (JAMBA_MAMBA, 28, 16, 32 * MiB, [(28, 9 * MiB, 18 * MiB)]),
    # 10 x 320 KiB = 25 x 128 KiB: lcm 50 MiB. Padded to 13 x 256 KiB it needs 26 MiB
    # pages; 8 + 2 layers fit 10 + 10 MiB pages exactly: split.
    (JAMBA_MAMBA, 10, 16, 32 * MiB, [(8, 8 * 320 * KiB, 10 * MiB), (2, 2 * 320 * KiB, 10 * MiB)]),
    # A whole-spec state above the limit (150 x 320 KiB = 46.9 MiB): as few equal groups
    # as fit (102 states at most per 32 MiB), each then padded (23.4 MiB to 24 MiB).
    (JAMBA_MAMBA, 150, 16, 32 * MiB, [(75, 24 * MiB, 24 * MiB)] * 2),
]


@pytest.mark.parametrize("spec,n,bs,limit,expected", SPLIT_ROWS)
def test_split_into_groups_only_when_it_removes_padding_without_larger_pages(spec, n, bs, limit, expected):
    lay = plan_layout(ModelKVSpec("m", (spec,) * n), bs, CHUNK, max_large_page_bytes=limit)
    got = [(len(g.layers), g.padded_small_bytes, g.large_page_bytes) for g in lay.groups]
    assert len(got) == len(expected)
    for (layers, padded, large), g in zip(expected, lay.groups):
        assert len(g.layers) == layers
        assert (g.padded_small_bytes, g.large_page_bytes) == (padded, large)
        assert g.large_page_bytes <= limit and g.large_page_bytes % g.padded_small_bytes == 0
    # Every layer in exactly one group, in order; the groups share the spec.
    assert [i for g in lay.groups for i in g.layers] == list(range(n))
    assert {g.spec for g in lay.groups} == {spec}
    if len(got) > 1:
        assert any("split into groups" in note for note in lay.notes)


def test_split_groups_serve_requests_like_one(make_pool):
    """A split spec still holds every layer of every request: data round-trips
    through each layer's paged tensor."""
    from ellm_alloc.kv import KVCacheManager

    pool = make_pool("256MiB")
    spec = FullAttentionSpec(8, 128, "float32")  # 4 KiB/token/plane: 1 MiB blocks of 128 tokens per layer
    mgr = KVCacheManager(ModelKVSpec("m", (spec,) * 3), pool, block_size=128, max_large_page_bytes=4 * MiB)
    assert [len(g.layers) for g in mgr.layout.groups] == [2, 1]
    mgr.add_request("r", list(range(300)))
    assert mgr.allocate_slots("r", 300)
    for layer in range(3):
        k, v = mgr.layer_tensors(layer)
        for b in mgr.block_table("r", layer):
            k[b].fill_(layer + 1)
            v[b].fill_(-(layer + 1))
    for layer in range(3):
        k, v = mgr.layer_tensors(layer)
        assert all(bool((k[b] == layer + 1).all() and (v[b] == -(layer + 1)).all())
                   for b in mgr.block_table("r", layer))
    mgr.check()
    mgr.free("r")
    mgr.close()


def test_large_pages_are_per_group():
    model = ModelKVSpec("m", (FULL, FULL, FULL, MAMBA))
    lay = plan_layout(model, 16, CHUNK)
    full, mamba = lay.groups
    assert full.large_page_bytes == 6 * MiB and mamba.large_page_bytes == 10 * MiB
    assert lay.large_page_bytes == 10 * MiB


@given(kv_heads=st.integers(1, 8), head_dim=st.sampled_from([8, 24, 40, 64, 80, 96, 128, 192]),
       layers=st.integers(1, 6), bs=st.sampled_from([1, 4, 16, 48, 64]),
       limit_chunks=st.integers(1, 16))
@settings(max_examples=150, deadline=None)
def test_padding_properties(kv_heads, head_dim, layers, bs, limit_chunks):
    spec = FullAttentionSpec(kv_heads, head_dim, "bfloat16")
    limit = limit_chunks * CHUNK
    per_layer = bs * spec.bytes_per_token()
    small = per_layer * layers
    model = ModelKVSpec("m", (spec,) * layers)
    if per_layer > limit:
        with pytest.raises(ValueError, match=str(limit)):
            plan_layout(model, bs, CHUNK, max_large_page_bytes=limit)
        return
    groups = plan_layout(model, bs, CHUNK, max_large_page_bytes=limit).groups
    assert [i for g in groups for i in g.layers] == list(range(layers))
    for g in groups:
        assert g.small_page_bytes == per_layer * len(g.layers)
        assert g.large_page_bytes == math.lcm(CHUNK, g.padded_small_bytes) <= limit
        assert g.large_page_bytes % g.padded_small_bytes == 0
        if g.padded_small_bytes != g.small_page_bytes:
            # Padded to a multiple of a power of two, less than double.
            assert g.small_page_bytes < g.padded_small_bytes < 2 * g.small_page_bytes
            q = g.padded_small_bytes & -g.padded_small_bytes
            assert g.padded_small_bytes == -(-g.small_page_bytes // q) * q
    if math.lcm(CHUNK, small) <= limit:
        assert len(groups) == 1 and groups[0].padded_small_bytes == small
    elif len(groups) > 1 and small <= limit:
        # A split removes all padding and its pages together are no larger than the padded one.
        assert all(g.padding_bytes == 0 for g in groups)
        assert sum(g.large_page_bytes for g in groups) <= math.lcm(CHUNK, _pad_to_fit(small, CHUNK, limit))


def test_block_larger_than_any_large_page_names_the_limit():
    model = ModelKVSpec("m", (FullAttentionSpec(8, 128, "float32"),) * 2)  # 8 KiB/token per layer
    with pytest.raises(ValueError, match=r"33554432 B.*block_size \(now 8192\)"):
        plan_layout(model, 8192, CHUNK)  # 64 MiB per layer's block, default limit 16 chunks
    with pytest.raises(ValueError, match="4194304"):
        plan_layout(model, 1024, CHUNK, max_large_page_bytes=4 * MiB)  # 8 MiB per layer's block
    # A block of both layers above the limit, but not one layer's: one group per layer.
    lay = plan_layout(model, 512, CHUNK, max_large_page_bytes=4 * MiB)
    assert [(g.layers, g.large_page_bytes) for g in lay.groups] == [((0,), 4 * MiB), ((1,), 4 * MiB)]


def test_no_padding_fits_names_the_limit():
    # With a 3 MiB chunk and a 5 MiB limit only divisors of 3 MiB fit; rounding
    # 1.5 MiB + 1 KiB up to a power-of-two multiple never gives one (2 or 4 MiB at best).
    model = ModelKVSpec("m", (FullAttentionSpec(1, 8, "float32"),))  # 64 B/token
    with pytest.raises(ValueError, match=f"at most {5 * MiB} B"):
        plan_layout(model, (3 * MiB // 2 + 1024) // 64, 3 * MiB, max_large_page_bytes=5 * MiB)
    # 1 MiB + 1 KiB does fit: padded to 1.5 MiB = 3 * 512 KiB, a divisor of the chunk.
    (g,) = plan_layout(model, (MiB + 1024) // 64, 3 * MiB, max_large_page_bytes=5 * MiB).groups
    assert (g.padded_small_bytes, g.large_page_bytes) == (3 * MiB // 2, 3 * MiB)


def test_limit_below_a_chunk_and_bad_sizes():
    model = ModelKVSpec("m", (FULL,))
    with pytest.raises(ValueError, match="smaller than one chunk"):
        plan_layout(model, 16, CHUNK, max_large_page_bytes=MiB)
    with pytest.raises(ValueError, match="block_size"):
        plan_layout(model, 0, CHUNK)
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_layout(model, 16, 0)


def test_uniform_pages_pad_every_group_to_the_largest():
    model = ModelKVSpec("m", (FULL, FULL, MAMBA, SLIDE))
    lay = plan_layout(model, 16, CHUNK, uniform_pages=True)
    biggest = 2 * 16 * 512
    assert [g.small_page_bytes for g in lay.groups] == [biggest, 640, 16 * 512]
    assert all(g.padded_small_bytes == biggest for g in lay.groups)
    assert all(g.large_page_bytes == math.lcm(CHUNK, biggest) for g in lay.groups)
    assert lay.groups[1].padding_bytes == biggest - 640
    assert lay.notes
    # When the uniform page's lcm would exceed the limit, it is padded like any other page.
    odd = plan_layout(ModelKVSpec("m", (FULL,) * 3), 16, CHUNK, max_large_page_bytes=4 * MiB, uniform_pages=True)
    (g,) = odd.groups
    assert g.small_page_bytes == 3 * 16 * 512 and math.lcm(CHUNK, g.small_page_bytes) > 4 * MiB
    assert g.padded_small_bytes > g.small_page_bytes and g.large_page_bytes <= 4 * MiB
    assert g.large_page_bytes % g.padded_small_bytes == 0
