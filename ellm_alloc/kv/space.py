"""PageSpace: a KV space's VA range of pages of one pool chunk each.

The Python face of csrc/kv_space.h. Pages are mapped and unmapped here; the
pool may reclaim pages marked reclaimable without calling Python, and
`take_reclaimed()` says which ones it took. Tensors over the range are
zero-copy DLPack views (`Pool.byte_tensor`), CPU tensors on a host pool and
CUDA tensors on a CUDA pool, built the same way on both. Their addresses never
move while mapped.
"""
from __future__ import annotations

import ctypes

import torch

from .. import _native as N
from ..pool import Pool, SpaceHandle, raise_for_status

# ZERO: the page maps the pool's shared read-only zero chunk (zero fill, for
# fixed-shape caches): it reads as zeros, a write faults, it holds no chunk.
# SWAPPING_OUT, SWAPPED, SWAPPING_IN: its bytes move to a host-tier chunk and
# back (csrc/kv_space.h, "Swap"); touching a SWAPPED page faults.
UNMAPPED, PINNED, RECLAIMABLE, ZERO, SWAPPING_OUT, SWAPPED, SWAPPING_IN = range(7)


class PageSpace:
    """`n_pages` pages of one chunk each, at contiguous VA."""

    def __init__(self, pool: Pool, name: str, n_pages: int):
        handle = N.lib.ellm_kv_create(pool.handle, name.encode(), n_pages)
        if not handle:
            raise_for_status(N.last_status() or N.INVALID_ARGUMENT)
        self._handle = SpaceHandle(handle)
        self.pool = pool  # the pool must outlive the space
        pool._spaces.add(self._handle)  # ... and destroys it first when it closes
        self.name = name
        self.page_bytes = pool.stats()["chunk_bytes"]
        self.n_pages = n_pages
        self.base = N.lib.ellm_kv_base(handle)
        self.owner = N.lib.ellm_kv_owner(handle)
        self._bytes_view: torch.Tensor | None = None
        self._reclaimed_buf = (ctypes.c_uint32 * 256)()  # reused: the manager asks before every step

    @property
    def handle(self) -> int:
        if not self._handle.value:
            raise ValueError(f"KV space {self.name} is closed")
        return self._handle.value

    def page_addr(self, page: int) -> int:
        return self.base + page * self.page_bytes

    def map(self, page: int, count: int = 1) -> None:
        """Maps a chunk under each of pages [page, page + count), all or none;
        raises OutOfMemoryError when the pool cannot give them."""
        raise_for_status(N.lib.ellm_kv_map(self.handle, page, count))

    def unmap(self, page: int, stream: int = 0) -> bool:
        """Unmaps `page` once `stream`'s work so far is done. False if the pool
        had reclaimed it already (take_reclaimed() will not list it then)."""
        return self._checked(N.lib.ellm_kv_unmap(self.handle, page, stream))

    def set_reclaimable(self, page: int, priority: int, stream: int = 0) -> bool:
        """Lets the pool take `page` (lower priority first). False if it had
        reclaimed it already."""
        return self._checked(N.lib.ellm_kv_set_reclaimable(self.handle, page, priority, stream))

    def pin(self, page: int) -> bool:
        """True if the page is still mapped (now pinned); False if it was reclaimed."""
        return self._checked(N.lib.ellm_kv_pin(self.handle, page))

    @staticmethod
    def _checked(r: int) -> bool:
        """1 / 0 from the C side as True / False; a negative status raises."""
        if r < 0:
            raise_for_status(-r)
        return bool(r)

    def set_zero_fill(self, on: bool) -> None:
        """Zero fill on: every page without a chunk of its own maps the pool's
        one zero chunk read-only (state ZERO), now and whenever a page is
        unmapped or reclaimed later, so the whole range is readable (zeros
        where nothing is mapped) and a write to such a page faults. map()
        replaces a page's zero mapping with its own chunk. Off: the zero
        mappings go (those pages fault on any touch again). ValueError when
        it is in that state already."""
        if not isinstance(on, bool):
            raise TypeError(f"set_zero_fill takes a bool, got {on!r}")
        raise_for_status(N.lib.ellm_kv_set_zero_fill(self.handle, int(on)))

    @property
    def zero_pages(self) -> int:
        """Pages that now map the zero chunk."""
        return N.lib.ellm_kv_zero_pages(self.handle)

    # ---- swap to the pool's host tier ----

    @staticmethod
    def _page_array(pages) -> tuple:
        pages = list(pages)
        return (ctypes.c_uint32 * max(len(pages), 1))(*pages), len(pages)

    def swap_out(self, pages, stream: int = 0) -> None:
        """Queues the copy of `pages` (pinned or reclaimable) to host chunks,
        after `stream`'s work so far; they are SWAPPING_OUT, then SWAPPED
        once finish_swaps() sees the copy done. All or nothing:
        OutOfMemoryError when the host tier is full, ValueError for a page
        with no data or listed twice."""
        arr, n = self._page_array(pages)
        raise_for_status(N.lib.ellm_kv_swap_out(self.handle, arr, n, stream))

    def swap_in(self, pages, stream: int = 0) -> None:
        """Maps fresh chunks under swapped `pages` at the same addresses and
        queues the copy back (SWAPPING_IN until finished). All or nothing:
        OutOfMemoryError when the pool cannot give the chunks."""
        arr, n = self._page_array(pages)
        raise_for_status(N.lib.ellm_kv_swap_in(self.handle, arr, n, stream))

    def finish_swaps(self, wait: bool = False) -> int:
        """Ends the swaps whose copies are done (all of them if `wait`);
        returns how many pages changed state."""
        return N.lib.ellm_kv_finish_swaps(self.handle, int(wait))

    def swap_wait(self, pages, stream: int = 0) -> None:
        """Work queued on `stream` from now sees `pages` swapped in (on the
        host backend this call waits for their copies)."""
        arr, n = self._page_array(pages)
        raise_for_status(N.lib.ellm_kv_swap_wait(self.handle, arr, n, stream))

    @property
    def host_owner(self) -> int:
        return N.lib.ellm_kv_host_owner(self.handle)

    def state(self, page: int) -> int:
        """0 unmapped, 1 pinned, 2 reclaimable, 3 zero, 4 swapping out, 5
        swapped, 6 swapping in; ValueError for a page out of range."""
        r = N.lib.ellm_kv_state(self.handle, page)
        if r < 0:
            raise_for_status(-r)
        return r

    def take_reclaimed(self) -> list[int]:
        """The pages the pool reclaimed since the last call."""
        out: list[int] = []
        buf = self._reclaimed_buf
        while True:
            n = N.lib.ellm_kv_take_reclaimed(self.handle, buf, 256)
            out.extend(buf[:n])
            if n < 256:
                return out

    def reclaim(self, want_chunks: int) -> int:
        return N.lib.ellm_kv_reclaim(self.handle, want_chunks)

    def stats(self) -> dict[str, int]:
        s = N.KvStats()
        N.lib.ellm_kv_get_stats(self.handle, ctypes.byref(s))
        return {name: getattr(s, name) for name, _ in s._fields_}

    def bytes_view(self) -> torch.Tensor:
        """A uint8 tensor over the whole VA range (touching unmapped pages faults)."""
        if self._bytes_view is None:
            self._bytes_view = self.pool.byte_tensor(self.base, self.page_bytes * self.n_pages)
        return self._bytes_view

    def view(self, dtype: torch.dtype, offset_bytes: int, size: tuple, stride: tuple) -> torch.Tensor:
        """A strided tensor of `dtype` over the range, starting `offset_bytes` in."""
        item = torch.empty((), dtype=dtype).element_size()
        if offset_bytes % item:
            raise ValueError(f"offset {offset_bytes} is not a multiple of {dtype}'s size {item}")
        flat = self.bytes_view().view(dtype)
        return flat.as_strided(size, stride, offset_bytes // item)

    def close(self) -> int:
        """Unmaps everything and releases the VA; returns pages that were still mapped."""
        self._bytes_view = None
        return self._handle.destroy(self.pool)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
