"""The torch shim that turns our out-of-memory into torch.OutOfMemoryError.

torch converts a c10::OutOfMemoryError thrown by an allocator into
torch.OutOfMemoryError. The shim is compiled against the installed torch (the
CPU build here has the same c10 headers) and probed through the core library.
"""
import ctypes
import shutil

import pytest
import torch

from ellm_alloc import _native as N
from ellm_alloc.integrations.torch_allocator import build_torch_shim


@pytest.fixture
def restore_thrower():
    yield
    N.lib.ellm_set_oom_thrower(None)  # back to "return NULL", which ctypes callers need


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_shim_throws_c10_out_of_memory_error(tmp_path, restore_thrower):
    """The built shim throws c10::OutOfMemoryError carrying our message."""
    so = build_torch_shim(torch, cache_dir=tmp_path)
    lib = ctypes.CDLL(str(so))
    N.lib.ellm_set_oom_thrower(ctypes.cast(lib.ellm_torch_throw_oom, ctypes.c_void_p))
    buf = ctypes.create_string_buffer(512)
    assert N.lib.ellm_probe_thrower(b"CUDA out of memory: probe", buf, len(buf)) == 1
    text = buf.value.decode()
    assert "OutOfMemoryError" in text and "CUDA out of memory: probe" in text
    assert build_torch_shim(torch, cache_dir=tmp_path) == so  # cached, not rebuilt


def test_default_thrower_raises_runtime_error_saying_out_of_memory(restore_thrower):
    """Without the shim, the fallback exception is a std::runtime_error with the message."""
    N.lib.ellm_set_default_thrower()
    buf = ctypes.create_string_buffer(512)
    assert N.lib.ellm_probe_thrower(b"CUDA out of memory: x", buf, len(buf)) == 1
    assert "runtime_error" in buf.value.decode() and "out of memory" in buf.value.decode()


def test_no_thrower_means_probe_reports_nothing_thrown():
    """With no thrower installed (the state ctypes callers rely on) nothing is thrown."""
    N.lib.ellm_set_oom_thrower(None)
    buf = ctypes.create_string_buffer(64)
    assert N.lib.ellm_probe_thrower(b"x", buf, len(buf)) == 0
