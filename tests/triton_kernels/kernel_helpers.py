"""Shared by the kernel tests: the device they run on and the error rule of DESIGN.md."""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Under the interpreter kernels run on CPU tensors; otherwise on the GPU.
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
# bfloat16 tl.dot is broken in the interpreter (triton issue 11584): bfloat16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([] if DEVICE == "cpu" else [torch.bfloat16])


def max_error(t: torch.Tensor, ref: torch.Tensor) -> float:
    """max |t - ref| in float64 on the CPU (a GPU result against a CPU float64 reference)."""
    return (t.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def within_rule(kernel: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, what: str,
                ulps: float = 4.0, floor: float = 0.0) -> None:
    """|kernel - ref64| <= 2 |torch backend in the same dtype - ref64| + atol (max norms), finite;
    atol = a few units in the last place of the largest reference value, in the kernel's dtype.
    ``floor``: the scale of the surrounding quantities, for a result that is zero in exact
    arithmetic (dq with a single key), where both sides are pure round-off."""
    assert kernel.shape == ref64.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(kernel).all(), f"{what}: non-finite values"
    atol = ulps * torch.finfo(kernel.dtype).eps * max(ref64.abs().max().item(), floor)
    err, budget = max_error(kernel, ref64), 2 * max_error(torch_same_dtype, ref64) + atol
    assert err <= budget, f"{what}: kernel error {err:.3e} > 2 x torch error + atol = {budget:.3e}"


def within_rule_all(names, kernel, torch_same_dtype, ref64) -> None:
    """``within_rule`` for each named output (e.g. y and the gradients); None (a gradient not
    computed, e.g. of a missing bias) on the reference side must be None on the kernel's too."""
    for name, k, t, r in zip(names, kernel, torch_same_dtype, ref64, strict=True):
        if r is None:
            assert k is None, f"{name}: a gradient where the reference has none"
            continue
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != {t.dtype}"
        within_rule(k, t, r, name)
