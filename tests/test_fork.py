"""A fork child must not touch the parent's chunks: free is a no-op there and
malloc fails with a clear error, while the parent's pool is unaffected."""
from __future__ import annotations

import os

import pytest

from ellm_alloc import _native as N


def _in_child(fn) -> int:
    """Runs fn() in a forked child; returns its exit code (0 = every check held)."""
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only, never through pytest
        try:
            os._exit(0 if fn() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_free_in_fork_child_is_a_no_op(pool, mem, bind):
    dev = bind(pool)
    p = dev.malloc(3 << 20)
    mem.fill(p, 3 << 20, tag=7)

    def child():
        before = pool.stats()
        dev.free(p, 3 << 20)
        pool.free(p)
        after = pool.stats()
        return after["num_frees"] == before["num_frees"] and after["live_blocks"] == 1

    assert _in_child(child) == 0
    assert mem.intact(p, 3 << 20, tag=7)
    assert pool.stats()["live_blocks"] == 1
    dev.free(p, 3 << 20)  # the parent still owns it
    assert pool.stats()["live_blocks"] == 0


def test_malloc_in_fork_child_fails_clearly(pool, bind):
    dev = bind(pool)

    def child():
        ptr = dev.malloc(1 << 20)
        return ptr == 0 and N.last_status() == N.FORKED_CHILD and "fork" in N.last_error()

    assert _in_child(child) == 0
    p = dev.malloc(1 << 20)  # the parent is unaffected
    assert p
    dev.free(p, 1 << 20)


def test_pool_api_malloc_in_fork_child_raises(pool):
    def child():
        try:
            pool.malloc(4096)
        except Exception as e:  # noqa: BLE001 - the child only reports whether it raised clearly
            return "fork" in str(e)
        return False

    assert _in_child(child) == 0
