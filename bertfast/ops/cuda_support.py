"""What every op's cuda backend checks first: ``bertfast._cuda`` built and importable, CUDA
tensors, a dtype the kernels take. The module is loaded on the first check, never at import.

The kernels take raw pointers (``tensor.data_ptr()``) and the current stream's handle; each op
validates shapes, strides and bounds before calling in, since a kernel cannot raise.
"""

from __future__ import annotations

from typing import Mapping

import torch

from bertfast.ops import compiled

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The codes the kernels' launchers take for a dtype (see csrc/cuda/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def module():
    """The loaded ``bertfast._cuda`` (call only after ``refusal`` said None)."""
    return compiled.load("_cuda")[0]


def refusal(facts: Mapping[str, object]) -> str | None:
    """Why no CUDA kernel can run a call with these facts ("device", "dtype"), or None."""
    if facts["device"] != "cuda":
        return f"needs CUDA tensors (got {facts['device']})"
    mod, why = compiled.load("_cuda")
    if mod is None:
        return why
    if facts["dtype"] not in KERNEL_DTYPES:
        return f"float16, bfloat16 or float32 only (got {facts['dtype']})"
    return None


def stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as the integer handle the kernels launch on."""
    return torch.cuda.current_stream(device).cuda_stream
