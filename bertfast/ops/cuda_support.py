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


# compiled.load imports through importlib, which Dynamo does not trace: while torch.compile traces
# an op, the answer is taken as a constant (it cannot change within a process).
@torch.compiler.assume_constant_result
def _unavailable() -> str:
    """Why bertfast._cuda cannot be used ("" when it can)."""
    return compiled.load("_cuda")[1] or ""


def refusal(facts: Mapping[str, object], dtypes: tuple[torch.dtype, ...] | None = KERNEL_DTYPES) -> str | None:
    """Why no CUDA kernel can run a call with these facts ("device", "dtype"), or None.
    ``dtypes=None``: the op takes integer tensors and has checked their dtype itself."""
    if facts["device"] != "cuda":
        return f"needs CUDA tensors (got {facts['device']})"
    why = _unavailable()
    if why:
        return why
    if dtypes is not None and facts["dtype"] not in dtypes:
        return f"float16, bfloat16 or float32 only (got {facts['dtype']})"
    return None


def on_cuda(t: torch.Tensor) -> bool:
    """Whether ``t`` is on a CUDA device (tests/test_cuda_emulated.py points this at CPU tensors to run
    the kernels under its CUDA emulation)."""
    return t.device.type == "cuda"


def stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as the integer handle the kernels launch on."""
    return torch.cuda.current_stream(device).cuda_stream
