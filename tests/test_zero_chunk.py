"""The pool's shared read-only zero chunk and KV zero fill (csrc/zero_chunk.h,
csrc/kv_space.h), on the host backend: zero pages read zeros, a write to one
faults and never lands in anyone's memory, map/unmap swap a page between its
own chunk and the zero chunk, and the ledger stays balanced throughout."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ellm_alloc import _native as N
from ellm_alloc.errors import OutOfMemoryError
from ellm_alloc.kv.space import PINNED, RECLAIMABLE, UNMAPPED, ZERO, PageSpace

CHUNK = 2 << 20  # the host backend's chunk

_libc = ctypes.CDLL(None, use_errno=True)
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t


def writable(addr: int) -> bool:
    """Whether one byte at `addr` can be written, without faulting: read(2)
    into it from a pipe fails with EFAULT when the page is not writable. The
    byte read is the one already there, so a writable page keeps its data."""
    byte = ctypes.string_at(addr, 1)
    r, w = os.pipe()
    try:
        os.write(w, byte)
        return _libc.read(r, addr, 1) == 1
    finally:
        os.close(r)
        os.close(w)


def zero_owner_chunks(pool) -> int:
    return sum(o["held_chunks"] for o in pool.owners() if o["name"] == "zero")


def all_zero(addr: int, n: int = CHUNK) -> bool:
    return ctypes.string_at(addr, n).count(0) == n


def test_zero_pages_read_zeros_even_from_a_recycled_chunk(pool, mem):
    space = PageSpace(pool, "kv", 4)
    # Dirty a chunk and give it back: the pool hands recycled chunks out again,
    # so the zero chunk must be filled, never assumed fresh.
    space.map(0)
    mem.fill(space.page_addr(0), CHUNK, tag=7)
    ctypes.memset(space.page_addr(0), 0xAB, CHUNK)
    space.unmap(0)
    space.set_zero_fill(True)
    assert [space.state(p) for p in range(4)] == [ZERO] * 4
    assert space.zero_pages == 4
    for p in range(4):
        assert all_zero(space.page_addr(p))
        assert not writable(space.page_addr(p))
    assert zero_owner_chunks(pool) == 1
    assert pool.zero_chunk()["users"] == 1 and pool.zero_chunk()["mapped_pages"] == 4
    pool.validate()
    space.close()
    assert zero_owner_chunks(pool) == 0 and pool.zero_chunk() == {
        "owner": pool.zero_chunk()["owner"], "users": 0, "mapped_pages": 0}


def test_map_replaces_the_zero_mapping_and_unmap_puts_it_back(pool, mem):
    space = PageSpace(pool, "kv", 3)
    space.set_zero_fill(True)
    space.map(1)
    assert [space.state(p) for p in range(3)] == [ZERO, PINNED, ZERO]
    addr = space.page_addr(1)
    assert writable(addr)
    mem.fill(addr, CHUNK, tag=3)
    assert mem.intact(addr, CHUNK, tag=3)
    # The page's own data never shows through the zero pages beside it.
    assert all_zero(space.page_addr(0)) and all_zero(space.page_addr(2))
    assert space.unmap(1)
    assert space.state(1) == ZERO and all_zero(addr) and not writable(addr)
    assert space.zero_pages == 3 and space.stats()["mapped_pages"] == 0
    pool.validate()
    space.close()


def test_zero_page_is_not_mapped_for_unmap_pin_or_reclaim(pool):
    space = PageSpace(pool, "kv", 2)
    space.set_zero_fill(True)
    with pytest.raises(ValueError, match="not mapped"):
        space.unmap(0)  # a zero page holds no chunk: unmapping it twice would free nothing
    with pytest.raises(ValueError, match="not mapped"):
        space.set_reclaimable(0, priority=0)
    assert space.pin(0) is False and space.state(0) == ZERO
    pool.validate()
    space.close()


def test_reclaimed_page_goes_back_to_zero(pool):
    space = PageSpace(pool, "kv", 2)
    space.set_zero_fill(True)
    space.map(0, 2)
    assert space.set_reclaimable(1, priority=0)
    assert space.state(1) == RECLAIMABLE
    assert space.reclaim(1) == 1
    assert space.take_reclaimed() == [1]
    assert space.state(1) == ZERO and all_zero(space.page_addr(1))
    pool.validate()
    space.close()


def test_zero_fill_off_takes_the_zero_mappings_away(pool, mem):
    space = PageSpace(pool, "kv", 2)
    space.set_zero_fill(True)
    space.map(0)
    space.set_zero_fill(False)
    assert [space.state(p) for p in range(2)] == [PINNED, UNMAPPED]
    assert not mem.readable(space.page_addr(1))
    assert zero_owner_chunks(pool) == 0
    space.unmap(0)  # with zero fill off, an unmapped page stays unmapped
    assert space.state(0) == UNMAPPED and not mem.readable(space.page_addr(0))
    pool.validate()
    space.close()


def test_one_zero_chunk_per_pool_shared_by_spaces(pool):
    spaces = [PageSpace(pool, f"kv{i}", 2) for i in range(3)]
    for s in spaces:
        s.set_zero_fill(True)
    assert zero_owner_chunks(pool) == 1
    assert pool.zero_chunk()["users"] == 3 and pool.zero_chunk()["mapped_pages"] == 6
    spaces[0].close()
    spaces[1].set_zero_fill(False)
    assert zero_owner_chunks(pool) == 1 and pool.zero_chunk()["users"] == 1
    pool.validate()
    spaces[2].close()
    assert zero_owner_chunks(pool) == 0
    # The zero owner stays registered (holding nothing): owner ids do not grow
    # with each fixed-shape cache.
    owner = pool.zero_chunk()["owner"]
    again = PageSpace(pool, "kv", 1)
    again.set_zero_fill(True)
    assert pool.zero_chunk()["owner"] == owner
    again.close()
    spaces[1].close()
    pool.validate()


def test_failed_map_over_zero_pages_leaves_them_zero(pool):
    space = PageSpace(pool, "kv", 3)
    space.set_zero_fill(True)
    N.lib.ellm_host_inject_fault(pool.handle, 1, 2)  # the second map of the run fails
    with pytest.raises(OutOfMemoryError):
        space.map(0, 3)
    assert [space.state(p) for p in range(3)] == [ZERO] * 3
    assert all(all_zero(space.page_addr(p)) for p in range(3))
    assert space.stats()["mapped_pages"] == 0 and space.zero_pages == 3
    pool.validate()
    space.map(0, 3)  # and the pages map fine afterwards
    assert space.zero_pages == 0
    space.close()
    pool.validate()


def test_zero_chunk_needs_a_chunk_of_the_budget(make_pool):
    pool = make_pool("2MiB")  # one chunk in all
    space = PageSpace(pool, "kv", 2)
    space.map(0)
    with pytest.raises(OutOfMemoryError, match="zero chunk"):
        space.set_zero_fill(True)
    assert space.state(1) == UNMAPPED and zero_owner_chunks(pool) == 0
    pool.validate()
    space.close()


def test_bad_input(pool):
    space = PageSpace(pool, "kv", 1)
    with pytest.raises(TypeError):
        space.set_zero_fill(1)
    with pytest.raises(ValueError, match="off"):
        space.set_zero_fill(False)
    space.set_zero_fill(True)
    with pytest.raises(ValueError, match="already"):
        space.set_zero_fill(True)
    assert N.lib.ellm_kv_set_zero_fill(space.handle, 2) == N.INVALID_ARGUMENT
    assert "0 or 1" in N.last_error()
    assert N.lib.ellm_kv_set_zero_fill(None, 1) == N.INVALID_ARGUMENT
    assert N.lib.ellm_pool_zero_chunk(None, None, None, None) == N.INVALID_ARGUMENT
    space.close()
    with pytest.raises(ValueError, match="closed"):
        space.set_zero_fill(True)
    pool.validate()


# A random walk over map / unmap / reclaim of a zero-filled space: after every
# step each page is its own chunk (holding its pattern) or the zero chunk
# (reading zeros, not writable), never both and never unbacked, and the ledger
# balances.
OPS = st.lists(st.tuples(st.sampled_from(["map", "unmap", "reclaim"]), st.integers(0, 5), st.integers(1, 3)),
               max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_walk_keeps_pages_backed_or_zero(make_pool, mem, ops):
    pool = make_pool("32MiB")
    space = PageSpace(pool, "kv", 6)
    space.set_zero_fill(True)
    tags: dict[int, int] = {}  # page -> pattern written there while it is its own
    for step, (op, page, count) in enumerate(ops):
        count = min(count, 6 - page)
        if op == "map":
            if any(space.state(p) != ZERO for p in range(page, page + count)):
                with pytest.raises(ValueError):
                    space.map(page, count)
                continue
            space.map(page, count)
            for p in range(page, page + count):
                tags[p] = step
                mem.fill(space.page_addr(p), CHUNK, tag=step)
        elif op == "unmap":
            if space.state(page) == ZERO:
                with pytest.raises(ValueError):
                    space.unmap(page)
                continue
            assert space.unmap(page)
            del tags[page]
        else:  # let the pool take one page back, as it would for another owner
            if space.state(page) != PINNED:
                continue
            assert space.set_reclaimable(page, priority=0)
            assert space.reclaim(1) == 1
            assert space.take_reclaimed() == [page]
            del tags[page]
        for p in range(6):
            addr = space.page_addr(p)
            if p in tags:
                assert space.state(p) == PINNED and mem.intact(addr, CHUNK, tags[p])
            else:
                assert space.state(p) == ZERO and all_zero(addr) and not writable(addr)
        assert space.zero_pages == 6 - len(tags)
        assert space.stats()["mapped_pages"] == len(tags)
        pool.validate()
    space.close()
    assert zero_owner_chunks(pool) == 0


_CHILD_WRITES_TO_ZERO_PAGE = textwrap.dedent("""
    import ctypes, sys
    from ellm_alloc import Pool
    from ellm_alloc.kv.space import PageSpace
    pool = Pool("cpu", budget="64MiB")
    a = PageSpace(pool, "seq_a", 2)   # one sequence, its page 0 backed
    b = PageSpace(pool, "seq_b", 2)   # another, holding data
    for s in (a, b):
        s.set_zero_fill(True)
    a.map(0)
    b.map(0, 2)
    ctypes.memset(b.page_addr(0), 0x5A, 2 << 20)
    ctypes.memset(b.page_addr(1), 0x5A, 2 << 20)
    print("ready", flush=True)
    ctypes.memset(a.page_addr(1), 0x77, 16)   # a's unbacked page: must fault here
    # Not reached when the write faults; else say where the bytes went.
    seen = ctypes.string_at(b.page_addr(0), 16) + ctypes.string_at(b.page_addr(1), 16)
    print("wrote; b shows", seen.hex(), flush=True)
""")


def test_write_to_zero_page_faults_in_a_child_process():
    """The write must kill the writer with SIGSEGV: if it landed anywhere
    (the zero chunk, another sequence's chunk) the child would go on and say so."""
    proc = subprocess.run([sys.executable, "-c", _CHILD_WRITES_TO_ZERO_PAGE], capture_output=True, text=True,
                          timeout=120)
    assert "ready" in proc.stdout, proc.stderr
    assert "wrote" not in proc.stdout
    assert faulted(proc), (proc.returncode, proc.stdout, proc.stderr)


def faulted(proc: subprocess.CompletedProcess) -> bool:
    """Killed by SIGSEGV; under `make test-sanitize` (the child inherits the
    sanitizer), AddressSanitizer catches the SEGV, reports it and aborts."""
    if proc.returncode == -signal.SIGSEGV:
        return True
    return (os.environ.get("ELLM_ALLOC_LIB") is not None and proc.returncode == -signal.SIGABRT
            and "AddressSanitizer: SEGV" in proc.stderr)


def test_fork_child_reads_zeros_and_cannot_write_them(pool):
    """The fork handler remaps a child's view of pool memory: zero pages stay
    readable zeros there, and still fault on a write."""
    space = PageSpace(pool, "kv", 2)
    space.set_zero_fill(True)
    space.map(0)
    addr = space.page_addr(1)
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        try:
            ok = all_zero(addr) and not writable(addr)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    space.close()
