"""Test-session settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The test tensors are tiny: one intra-op thread is fastest, and immune to OpenMP spin-waits
    when the machine is busy (measured: tiny matmuls ~250x slower with two threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
