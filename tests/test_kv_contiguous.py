"""ContiguousKV: per-sequence contiguous K/V mapped chunk by chunk."""
from __future__ import annotations

import pytest
import torch

from ellm_alloc import OutOfMemoryError
from ellm_alloc.kv import FullAttentionSpec, ModelKVSpec, SlidingWindowSpec
from ellm_alloc.kv.contiguous import ContiguousKV

MiB = 1 << 20
CHUNK = 2 * MiB
# 8 heads x 128 x fp32 = 4 KiB per token per plane: 512 tokens per chunk.
FULL = FullAttentionSpec(8, 128, "float32")
SLIDE = SlidingWindowSpec(8, 128, "float32", window=600)
MODEL = ModelKVSpec("c", (FULL, SLIDE, FULL))
MAX_LEN = 2048  # 4 chunks per (layer, K/V, sequence); everything up front would be 48 chunks


def expected_chunks(n: int) -> int:
    full = -(-n // 512)
    start = max(0, n - 600) // 512
    slide = -(-n // 512) - start if n else 0
    return 4 * full + 2 * slide


def kv_held(pool, ckv) -> int:
    return pool.owners()[ckv.space.owner]["held_chunks"]


def pattern(seq: int, lo: int, hi: int, layer: int, kv: int) -> torch.Tensor:
    pos = torch.arange(lo, hi, dtype=torch.float32)
    base = pos * 16 + seq * 100000 + layer * 4 + kv + 1
    return base[:, None, None] + torch.arange(8, dtype=torch.float32)[None, :, None] * 0.5 \
        + torch.arange(128, dtype=torch.float32)[None, None, :] * 0.25 % 1


@pytest.mark.parametrize("n,chunks", [(0, 0), (1, 6), (512, 6), (513, 12), (1200, 16), (2048, 20)])
def test_mapped_bytes_table(pool, n, chunks):
    assert expected_chunks(n) == chunks
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    assert ckv.mapped_bytes() == 0 and kv_held(pool, ckv) == 0
    ckv.ensure(0, n)
    assert ckv.mapped_bytes() == chunks * CHUNK
    assert kv_held(pool, ckv) == chunks
    assert ckv.needed_bytes() == sum(s.tokens_kept(n) for s in MODEL.layers) * 2 * 4096
    ckv.close()
    assert kv_held(pool, ckv) == 0


def test_grows_chunk_by_chunk_and_data_stays(pool, mem):
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    k0 = ckv.key(0)
    addr0 = k0[0, 0].data_ptr()
    prev = 0
    for n in range(0, MAX_LEN + 1, 128):
        ckv.ensure(0, n)
        held = kv_held(pool, ckv)
        assert held == expected_chunks(n) and ckv.mapped_bytes() == held * CHUNK
        assert held >= prev - 2  # only sliding-window chunks ever go
        prev = held
        lo = max(0, n - 128)
        for layer in (0, 2):
            ckv.key(layer)[0, lo:n] = pattern(0, lo, n, layer, 0)
            ckv.value(layer)[0, lo:n] = pattern(0, lo, n, layer, 1)
        assert ckv.key(0)[0, 0].data_ptr() == addr0  # addresses never move
    assert ckv.mapped_bytes() < 48 * CHUNK
    for layer in (0, 2):
        assert torch.equal(ckv.key(layer)[0, :MAX_LEN], pattern(0, 0, MAX_LEN, layer, 0))
        assert torch.equal(ckv.value(layer)[0, :MAX_LEN], pattern(0, 0, MAX_LEN, layer, 1))
    # The sliding layer's first chunks left the window: unmapped.
    assert not mem.readable(ckv.key(1)[0, 0].data_ptr())
    assert mem.readable(ckv.key(1)[0, MAX_LEN - 1].data_ptr())
    ckv.close()


def test_two_views_share_memory(pool):
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    bs = 16
    ckv.ensure(0, 300)
    ckv.ensure(1, 700)
    for seq, n in ((0, 300), (1, 700)):
        for layer in range(3):
            lo = MODEL.layers[layer].first_needed_token(n)
            ckv.key(layer)[seq, lo:n] = pattern(seq, lo, n, layer, 0)
            ckv.value(layer)[seq, lo:n] = pattern(seq, lo, n, layer, 1)
    for seq, n in ((0, 300), (1, 700)):
        for layer in range(3):
            k, v = ckv.paged_tensors(layer, bs)
            bt = ckv.block_table(seq, layer, bs)
            assert len(bt) == -(-n // bs)
            first = MODEL.layers[layer].first_needed_token(n)
            assert all((b is None) == (i < first // bs) for i, b in enumerate(bt))
            for i, b in enumerate(bt):
                if b is None:
                    continue
                lo, hi = max(i * bs, first), min((i + 1) * bs, n)
                assert torch.equal(k[b, lo - i * bs:hi - i * bs], pattern(seq, lo, hi, layer, 0))
                assert torch.equal(v[b, lo - i * bs:hi - i * bs], pattern(seq, lo, hi, layer, 1))
    # And back: a write through the paged view shows in the contiguous one.
    k, _ = ckv.paged_tensors(0, bs)
    b = ckv.block_table(1, 0, bs)[5]
    k[b, 3] = -7.0
    assert torch.all(ckv.key(0)[1, 5 * bs + 3] == -7.0)
    assert k[b, 3].data_ptr() == ckv.key(0)[1, 5 * bs + 3].data_ptr()
    ckv.close()


def test_crop_and_release_unmap(pool, mem):
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    ckv.ensure(0, 1500)
    ckv.key(0)[0, :100] = pattern(0, 0, 100, 0, 0)
    far = ckv.key(0)[0, 1400].data_ptr()
    assert mem.readable(far)
    ckv.crop(0, 100)
    assert ckv.mapped_bytes() == expected_chunks(100) * CHUNK == kv_held(pool, ckv) * CHUNK
    assert not mem.readable(far)
    assert torch.equal(ckv.key(0)[0, :100], pattern(0, 0, 100, 0, 0))
    with pytest.raises(ValueError, match="crop to 200 tokens, but sequence 0 has 100"):
        ckv.crop(0, 200)
    ckv.release(0)
    assert ckv.mapped_bytes() == 0 and kv_held(pool, ckv) == 0
    assert not mem.readable(ckv.key(0)[0, 0].data_ptr())
    ckv.close()


def test_out_of_memory_is_all_or_nothing(make_pool):
    pool = make_pool("16MiB")  # 8 chunks
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    ckv.ensure(0, 512)  # 6 chunks
    with pytest.raises(OutOfMemoryError):
        ckv.ensure(1, 10)  # 6 more
    assert ckv.lengths[1] == 0 and ckv.mapped_bytes() == 6 * CHUNK == kv_held(pool, ckv) * CHUNK
    with pytest.raises(OutOfMemoryError):
        ckv.ensure(0, 600)  # 6 more
    assert ckv.lengths[0] == 512 and kv_held(pool, ckv) == 6
    ckv.release(0)
    ckv.ensure(1, 10)
    assert kv_held(pool, ckv) == 6
    ckv.close()


def test_bad_arguments(pool):
    with pytest.raises(ValueError, match="positive"):
        ContiguousKV(MODEL, pool, max_batch=0, max_seq_len=16)
    ckv = ContiguousKV(MODEL, pool, max_batch=2, max_seq_len=MAX_LEN)
    with pytest.raises(ValueError, match="max_seq_len=2048"):
        ckv.ensure(0, MAX_LEN + 1)
    with pytest.raises(IndexError, match=r"sequence 2 out of range \[0, 2\)"):
        ckv.ensure(2, 1)
    with pytest.raises(ValueError, match="does not divide"):
        ckv.paged_tensors(0, 48)
    assert ckv.mapped_bytes() == 0
    ckv.close()
