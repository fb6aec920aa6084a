"""Fixtures every benchmark file uses (pytest finds them here; no import needed)."""

from __future__ import annotations

import gc

import pytest
import torch
from flops import DTYPE, copy_gbs, environment, matmul_tflops


@pytest.fixture(scope="session", name="device")
def device_fixture() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", name="env_info")
def env_info_fixture(device, one_cpu_thread) -> dict:
    """The card and versions, the card's measured bfloat16 matmul rate and copy bandwidth (GPU only)."""
    info = environment(device)
    info["matmul_tflops"] = info["copy_gbs"] = None
    if device.type == "cuda":
        info["matmul_tflops"] = round(matmul_tflops(device, DTYPE["cuda"]), 1)
        info["copy_gbs"] = round(copy_gbs(device), 1)
    return info


@pytest.fixture(scope="session", autouse=True, name="one_cpu_thread")
def one_cpu_thread_fixture(device):
    """On a CPU, one intra-op thread (as the tests use): on a small, shared machine two threads
    spin-wait on each other and the times say more about the neighbours than about the code."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, name="release_memory")
def release_memory_fixture(device):
    yield
    if device.type == "cuda":  # a large case's blocks must not crowd the next case out
        gc.collect()
        torch.cuda.empty_cache()
