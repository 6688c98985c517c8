"""ContiguousKV: per-sequence contiguous K/V tensors (vAttention-style).

Every attention layer gets one K and one V virtual tensor of shape
[max_batch, max_seq_len, kv_heads, head_dim]. Each (layer, K/V, sequence)
owns a chunk-aligned slice of VA, so one sequence's tokens are contiguous and
unmodified attention kernels (HF generate() included) read them as ordinary
tensors. Chunks are mapped as a sequence grows and unmapped when it is
cropped, released, or when its tokens leave a sliding window; so the memory
held is the tokens' need plus at most one partly used chunk per
(layer, K/V, sequence). Addresses never move while mapped.

The same memory also has a paged view: block b of a layer is tokens
[(b % blocks_per_seq) * block_size, ...) of sequence b // blocks_per_seq, so
paged kernels can use `block_table()` over `paged_tensors()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pool import Pool
from .space import PageSpace
from .spec import ModelKVSpec


@dataclass(frozen=True)
class _Plane:
    layer: int
    kv: int  # 0 = K, 1 = V
    token_bytes: int
    region_bytes: int  # per sequence, chunk aligned
    first_page: int  # page index of sequence 0's region


class ContiguousKV:
    def __init__(self, model: ModelKVSpec, pool: Pool, max_batch: int, max_seq_len: int,
                 name: str = "kv.contig", layers: list[int] | None = None):
        if max_batch <= 0 or max_seq_len <= 0:
            raise ValueError(f"max_batch and max_seq_len must be positive, got {max_batch}, {max_seq_len}")
        self.pool = pool
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.chunk = pool.stats()["chunk_bytes"]
        wanted = range(model.num_layers) if layers is None else layers
        self.planes: dict[tuple[int, int], _Plane] = {}
        page = 0
        for layer in wanted:
            spec = model.layers[layer]
            if spec.kind not in ("full", "sliding", "chunked"):
                raise ValueError(
                    f"layer {layer} is {spec.kind}: the contiguous view holds K/V attention layers "
                    "(full, sliding, chunked); use KVCacheManager for the others"
                )
            token_bytes = spec.kv_heads * spec.head_dim * spec.itemsize
            region = -(-max_seq_len * token_bytes // self.chunk) * self.chunk
            for kv in range(2):
                self.planes[(layer, kv)] = _Plane(layer, kv, token_bytes, region, page)
                page += max_batch * region // self.chunk
        if not self.planes:
            raise ValueError("no layers to hold")
        self.space = PageSpace(pool, name, page)
        self.seq_pages: list[set[int]] = [set() for _ in range(max_batch)]  # mapped pages per sequence
        self.lengths = [0] * max_batch  # tokens with KV slots, per sequence
        self._tensors: dict[tuple[int, int], torch.Tensor] = {}

    # ---- geometry -----------------------------------------------------------------

    def _pages(self, plane: _Plane, seq: int, lo_byte: int, hi_byte: int) -> range:
        base = plane.first_page + seq * plane.region_bytes // self.chunk
        return range(base + lo_byte // self.chunk, base + -(-hi_byte // self.chunk))

    def _window_start(self, layer: int, num_tokens: int) -> int:
        return self.model.layers[layer].first_needed_token(num_tokens)

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.max_batch:
            raise IndexError(f"sequence {seq} out of range [0, {self.max_batch})")

    # ---- growth and shrinkage -----------------------------------------------------

    def ensure(self, seq: int, num_tokens: int, stream: int = 0) -> None:
        """Maps what sequence `seq` needs for num_tokens tokens (and unmaps
        what left a sliding window). All or nothing: on OutOfMemoryError the
        sequence is as it was."""
        self._check_seq(seq)
        if not 0 <= num_tokens <= self.max_seq_len:
            raise ValueError(f"num_tokens {num_tokens} outside [0, max_seq_len={self.max_seq_len}]")
        want: set[int] = set()
        for plane in self.planes.values():
            start = self._window_start(plane.layer, num_tokens)
            want.update(self._pages(plane, seq, start * plane.token_bytes, num_tokens * plane.token_bytes))
        have = self.seq_pages[seq]
        new = sorted(want - have)
        done = []
        try:
            for p in new:
                self.space.map(p)
                done.append(p)
        except BaseException:
            for p in done:
                self.space.unmap(p, stream)
            raise
        for p in have - want:
            self.space.unmap(p, stream)
        self.seq_pages[seq] = want
        self.lengths[seq] = num_tokens

    def crop(self, seq: int, num_tokens: int, stream: int = 0) -> None:
        """Keeps the first num_tokens tokens of `seq` and unmaps the rest."""
        if num_tokens > self.lengths[seq]:
            raise ValueError(f"crop to {num_tokens} tokens, but sequence {seq} has {self.lengths[seq]}")
        self.ensure(seq, num_tokens, stream)

    def release(self, seq: int, stream: int = 0) -> None:
        """Unmaps everything of sequence `seq`; its chunks go back to the pool."""
        self.ensure(seq, 0, stream)

    # ---- views --------------------------------------------------------------------

    def tensor(self, layer: int, kv: int) -> torch.Tensor:
        """[max_batch, max_seq_len, kv_heads, head_dim] over the sequences'
        regions (read only the mapped token range of each sequence)."""
        key = (layer, kv)
        if key not in self._tensors:
            plane = self.planes[key]
            spec = self.model.layers[layer]
            item = spec.itemsize
            h, d = spec.kv_heads, spec.head_dim
            self._tensors[key] = self.space.view(
                spec.torch_dtype, plane.first_page * self.chunk, (self.max_batch, self.max_seq_len, h, d),
                (plane.region_bytes // item, h * d, d, 1),
            )
        return self._tensors[key]

    def key(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, 0)

    def value(self, layer: int) -> torch.Tensor:
        return self.tensor(layer, 1)

    def blocks_per_seq(self, layer: int, block_size: int) -> int:
        plane = self.planes[(layer, 0)]
        block_bytes = block_size * plane.token_bytes
        if plane.region_bytes % block_bytes:
            raise ValueError(f"a block of {block_size} tokens ({block_bytes} B) does not divide the "
                             f"per-sequence region ({plane.region_bytes} B) of layer {layer}")
        return plane.region_bytes // block_bytes

    def paged_tensors(self, layer: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) as [max_batch * blocks_per_seq, block_size, heads, dim] over the same memory."""
        per = self.blocks_per_seq(layer, block_size)
        out = []
        for kv in range(2):
            t = self.tensor(layer, kv)
            b, s, h, d = t.shape
            out.append(t.as_strided((b * per, block_size, h, d), (block_size * h * d, h * d, d, 1),
                                    t.storage_offset()))
        return out[0], out[1]

    def block_table(self, seq: int, layer: int, block_size: int) -> list[int | None]:
        """Block ids of `seq` in the paged view (None: unmapped, out of window)."""
        per = self.blocks_per_seq(layer, block_size)
        n = self.lengths[seq]
        start = self._window_start(layer, n) // block_size
        return [None if i < start else seq * per + i for i in range(-(-n // block_size))]

    # ---- figures --------------------------------------------------------------------

    def mapped_bytes(self) -> int:
        return sum(len(p) for p in self.seq_pages) * self.chunk

    def needed_bytes(self) -> int:
        """Bytes the kept tokens of every sequence need (no chunk rounding)."""
        total = 0
        for plane in self.planes.values():
            for n in self.lengths:
                total += (n - self._window_start(plane.layer, n)) * plane.token_bytes
        return total

    def close(self) -> None:
        self._tensors.clear()
        self.seq_pages = [set() for _ in range(self.max_batch)]
        self.space.close()
