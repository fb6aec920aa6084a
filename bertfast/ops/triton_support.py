"""What every op's triton backend checks first: triton installed, CUDA tensors (or CPU tensors under
the Triton interpreter), a dtype the kernels take.

Read once at import, as Triton itself reads TRITON_INTERPRET when its kernels are decorated (and so
that tracing under torch.compile does not run import machinery). Importing this never imports
triton: ``import bertfast`` must work without it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import torch

TRITON_FOUND = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def refusal(facts: Mapping[str, object]) -> str | None:
    """Why no Triton kernel can run a call with these facts ("device", "dtype"), or None."""
    if not TRITON_FOUND:
        return "triton is not installed"
    if facts["device"] != "cuda" and not (facts["device"] == "cpu" and INTERPRETING):
        return f"needs CUDA tensors (got {facts['device']}; CPU tensors only under TRITON_INTERPRET=1)"
    if facts["dtype"] not in KERNEL_DTYPES:
        return f"float16, bfloat16 or float32 only (got {facts['dtype']})"
    return None
