"""Runs the Triton kernel tests (tests/triton_kernels) under the Triton interpreter on CPU tensors.

The interpreter reads TRITON_INTERPRET when a kernel is decorated, so the kernel tests run in a
process of their own (DESIGN.md). On a GPU machine run them directly instead:
``python -m pytest tests/triton_kernels`` (compiled kernels, bfloat16 included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent / "triton_kernels"


def test_kernel_suite_passes_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                            cwd=KERNEL_TESTS, env=env, capture_output=True, text=True, timeout=1800)
    tail = (result.stdout + result.stderr)[-12000:]
    assert result.returncode == 0, f"kernel tests failed under the interpreter:\n{tail}"
    print(tail.strip().splitlines()[-1])
