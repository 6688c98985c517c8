"""Stream-ordered reuse on the host backend: deterministic cases of the stream rule.

hold_stream(S) plays "GPU work queued on S has not finished". A block freed
on S may be reused at once on S, but on another stream only after the events
recorded for it complete, and its chunks must stay mapped until then. The
arena may wait for those events only on the way to out-of-memory.
"""
from __future__ import annotations

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 2 * MiB
S, T, U = 1, 2, 3


def overlaps(a: int, asize: int, b: int, bsize: int) -> bool:
    return a < b + bsize and b < a + asize


def test_block_freed_on_held_stream_is_reused_at_once_on_that_stream(pool):
    """Same-stream reuse needs no fence: the exact-size cache hands the block back on S."""
    pool.hold_stream(S)
    a = pool.malloc(MiB, S)
    pool.free(a, S)
    b = pool.malloc(MiB, S)
    assert b == a
    assert pool.stats()["fast_allocs"] >= 1
    pool.free(b, S)
    pool.release_stream(S)


def test_cached_block_of_held_stream_is_not_given_to_another_stream(pool):
    """A block freed on held S stays off-limits to T even when T's malloc flushes the caches."""
    pool.hold_stream(S)
    a = pool.malloc(8 * KiB + 512, S)
    pool.free(a, S)  # cached on S
    b = pool.malloc(CHUNK - 512, T)  # needs a fresh chunk: the arena flushes caches before growing
    assert not overlaps(a, 8 * KiB + 512, b, CHUNK - 512), (
        "T was given bytes S's in-flight work may still use: with the whole budget free, the arena "
        "waited for S's fence instead of placing T's block elsewhere"
    )
    pool.free(b, T)
    pool.release_stream(S)


def test_flushed_block_of_held_stream_is_not_given_to_another_stream(pool):
    """After empty_cache, a range freed on held S is fenced; T gets other VA (and nobody waits)."""
    pool.hold_stream(S)
    a = pool.malloc(MiB, S)
    pool.free(a, S)
    pool.empty_cache()
    b = pool.malloc(MiB, T)
    assert not overlaps(a, MiB, b, MiB), "T reused S's in-flight bytes without memory pressure"
    pool.free(b, T)
    pool.release_stream(S)


def test_record_stream_fences_reuse_on_the_allocating_stream(pool):
    """A block used on held U (record_stream) is not reused on its own stream S until U completes."""
    a = pool.malloc(MiB, S)
    pool.record_stream(a, U)
    pool.hold_stream(U)
    pool.free(a, S)
    b = pool.malloc(MiB, S)
    assert not overlaps(a, MiB, b, MiB), "S reused a block that held stream U may still read"
    pool.free(b, S)
    pool.release_stream(U)


def test_record_stream_fences_small_object_reuse(pool):
    """A small object used on held U is not handed out again on S while U is held."""
    a = pool.malloc(KiB, S)
    pool.record_stream(a, U)
    pool.hold_stream(U)
    pool.free(a, S)
    others = [pool.malloc(KiB, S) for _ in range(70)]  # more than a slab's worth
    assert a not in others
    pool.release_stream(U)
    for p in others:
        pool.free(p, S)


def test_chunk_under_in_flight_bytes_is_not_unmapped_by_same_stream_growth(pool, mem):
    """Growth on S must not move (unmap) an idle chunk whose fence on S is still pending."""
    a = pool.malloc(CHUNK, S)  # exactly one VA chunk
    b = pool.malloc(CHUNK, T)  # keeps a's hole from merging with the rest of the VA
    pool.hold_stream(S)
    pool.free(a, S)
    pool.empty_cache()  # a's range goes to the free index, fenced by an event on held S
    assert mem.readable(a)
    c = pool.malloc(2 * CHUNK, S)  # does not fit in a's hole: needs two chunks elsewhere
    assert mem.readable(a), (
        "the chunk under a, freed while S's work is in flight, was unmapped (moved to serve a new "
        "block) before S's fence completed"
    )
    pool.release_stream(S)
    pool.free(b, T)
    pool.free(c, S)


def test_empty_cache_keeps_chunks_of_held_stream_until_released(pool, mem):
    """empty_cache() does not unmap a chunk whose fence is pending, and does after release_stream."""
    pool.hold_stream(S)
    a = pool.malloc(CHUNK, S)
    pool.free(a, S)
    pool.empty_cache()
    assert mem.readable(a)
    assert pool.stats()["reserved_bytes"] == CHUNK
    pool.release_stream(S)
    assert pool.empty_cache() == 1
    assert pool.stats()["reserved_bytes"] == 0
    assert not mem.readable(a)


def test_released_stream_memory_is_reused_without_growth(pool):
    """Once S's fence completes, T reuses S's freed chunks instead of growing the arena."""
    pool.hold_stream(S)
    a = pool.malloc(8 * MiB, S)
    pool.free(a, S)
    pool.release_stream(S)
    reserved = pool.stats()["reserved_bytes"]
    b = pool.malloc(8 * MiB, T)
    assert pool.stats()["reserved_bytes"] == reserved
    pool.free(b, T)


def test_memory_pressure_waits_for_held_stream_instead_of_failing(make_pool):
    """When only fenced memory is left, malloc waits for the fences (a host wait) rather than OOM."""
    pool = make_pool("32MiB")
    pool.hold_stream(S)
    blocks = [pool.malloc(4 * MiB, S) for _ in range(8)]
    for p in blocks:
        pool.free(p, S)
    big = pool.malloc(30 * MiB, T)  # needs nearly every chunk, all fenced by held S
    pool.free(big, T)
    pool.release_stream(S)
