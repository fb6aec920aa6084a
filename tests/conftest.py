"""Test-session settings."""

import os

import pytest
import torch

# The Triton kernel tests need compiled kernels (a GPU) or the interpreter, which must be switched
# on before triton is imported: a plain CPU run leaves them to tests/test_triton_interpreted.py.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
collect_ignore = [] if _INTERPRETED or torch.cuda.is_available() else ["triton_kernels"]


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The test tensors are tiny: one intra-op thread is fastest, and immune to OpenMP spin-waits
    when the machine is busy (measured: tiny matmuls ~250x slower with two threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
