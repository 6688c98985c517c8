"""GPU tier: runs only where torch sees a CUDA device. Each test that enables the
allocator does it in a fresh subprocess, because enable() must precede the
first CUDA allocation of a process."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


def run_py(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; returns the completed process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def py():
    return run_py
