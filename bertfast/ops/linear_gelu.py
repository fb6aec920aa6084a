"""The feed-forward up-projection with its activation: a linear layer followed by GELU.

    z = x @ weight^T + bias        y = gelu(z)        (approximate "none" = erf, or "tanh")

Two ways to compute it, one per backend:
- torch: ``bias_gelu(F.linear(x, weight), bias)`` -- the GEMM by torch (cuBLAS on a GPU), then the
  ``bias_gelu`` op, which dispatches on its own (its Triton kernel on a GPU). Always available.
- triton: one Triton GEMM whose epilogue adds the bias and applies GELU (kernels/linear_gelu.py),
  through the custom op ``bertfast::linear_gelu_forward``; its backward computes dz = dy * gelu'(z)
  with the bias_gelu backward kernel and dx = dz @ W, dW = dz^T x with torch's GEMMs.

Which one is faster depends on the card and the shape, and cuBLAS is hard to beat, so the fused
backend only runs where a GPU benchmark measured it faster (``MEASURED_FASTER``, filled from
benchmarks/RESULTS.md), or when ``BERTFAST_FUSED_GEMM=1`` asks for it (benchmarks, experiments).
Everywhere else it refuses, saying so, and dispatch takes the torch backend.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bertfast.ops import checks, triton_support
from bertfast.ops.bias_gelu import bias_gelu, bias_gelu_backward
from bertfast.ops.dispatch import Op

OP = Op("linear_gelu")

FUSED_ENV = "BERTFAST_FUSED_GEMM"

# Shapes where the fused GEMM measured faster than cuBLAS + the bias_gelu kernel, forward and
# backward together: (arch "sm_90", dtype, in_features, out_features, rows bucket) with the rows
# (the product of x's leading dims) rounded up to a power of two, capped at 16384 (``rows_bucket``).
# Empty: no GPU has measured it yet. Fill it from the linear_gelu table of benchmarks/RESULTS.md.
MEASURED_FASTER: frozenset[tuple[str, torch.dtype, int, int, int]] = frozenset()


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """gelu(x @ weight^T + bias), as ``F.gelu(F.linear(x, weight, bias), approximate=approximate)``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features), x's dtype (float32 with half x inside ``torch.autocast``).
        bias: (out_features,) in weight's dtype, or None.
        approximate: "none" (erf form, transformers' "gelu") or "tanh" ("gelu_new").
        backend: force a backend; see ``bertfast.ops.dispatch``. The choice also applies to the
            ``bias_gelu`` op the torch backend calls.

    Returns:
        (..., out_features) in x's dtype (the autocast dtype inside ``torch.autocast``).
    """
    name = OP.name
    checks.tensor(name, "x", x, kind="float")
    if x.dim() == 0:
        raise ValueError(f"{name}: `x` must have at least one dim (..., in_features), got a scalar")
    checks.tensor(name, "weight", weight, ndim=2, kind="float")
    checks.shape(name, "weight", weight, (None, x.shape[-1]), "(out_features, in_features = x.shape[-1])")
    checks.same_device(name, "weight", weight, "x", x)
    checks.same_dtype_unless_autocast(name, "weight", weight, "x", x)
    checks.nonempty(name, "x", x, (-1,), "in_features (the last dim)")
    checks.nonempty(name, "weight", weight, (0,), "out_features (dim 0)")
    if bias is not None:
        checks.tensor(name, "bias", bias, ndim=1, kind="float")
        checks.shape(name, "bias", bias, (weight.shape[0],), "(out_features = weight.shape[0],)")
        checks.same_device(name, "bias", bias, "x", x)
        checks.same_dtype_unless_autocast(name, "bias", bias, "weight", weight)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{name}: `approximate` must be 'none' or 'tanh', got {approximate!r}")

    device = x.device.type
    dtype = _compute_dtype(x)
    facts = {"device": device, "dtype": dtype, "bias_dtype": None if bias is None else bias.dtype,
             "arch": _arch(x), "in_features": x.shape[-1], "out_features": weight.shape[0],
             "rows": x.numel() // x.shape[-1], "approximate": approximate}
    chosen = OP.select(backend, facts).name
    if chosen == "torch":
        return OP.backends["torch"].impl(x, weight, bias, approximate, backend)
    # The kernel reads (rows, in_features) with unit last strides, in the dtype autocast would use.
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight.to(dtype)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    save_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    y, _ = linear_gelu_forward(x2, weight, bias, approximate, save_z, chosen)
    return y.view(*x.shape[:-1], weight.shape[0])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype where ``torch.autocast`` would cast F.linear's inputs."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _arch(x: torch.Tensor) -> str | None:
    if not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return f"sm_{major}{minor}"


def rows_bucket(rows: int) -> int:
    """The rows key of ``MEASURED_FASTER``: rounded up to a power of two, capped at 16384."""
    bucket = 1
    while bucket < rows and bucket < 16384:
        bucket *= 2
    return bucket


# ------------------------------------------------------------------------------------------------
# The custom op of the fused backends: the backend name travels as an argument.


@torch.library.custom_op("bertfast::linear_gelu_forward", mutates_args=())
def linear_gelu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                        save_z: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K) -> (y (M, N); z = x @ weight^T + bias (M, N) in x's dtype, the
    pre-activation the backward differentiates, or (0, N) when not ``save_z``)."""
    return _FORWARD[backend](x, weight, bias, approximate, save_z)


@linear_gelu_forward.register_fake
def _(x, weight, bias, approximate, save_z, backend):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M if save_z else 0, N))


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, _, backend = inputs
    _, z = output
    ctx.save_for_backward(x, weight, z)
    ctx.args = (approximate, backend, None if bias is None else bias.dtype)


def _backward(ctx, dy, dz_unused):
    x, weight, z = ctx.saved_tensors
    approximate, backend, bias_dtype = ctx.args
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    # z already holds the bias: the elementwise backward runs without one, and its row sums are db.
    dz, dsum = bias_gelu_backward(dy, z, None, approximate, bias_dtype is not None and need_db, backend)
    dx = torch.matmul(dz, weight) if need_dx else None  # (M, N) @ (N, K)
    dw = torch.matmul(dz.t(), x) if need_dw else None  # (N, M) @ (M, K)
    db = dsum.to(bias_dtype) if bias_dtype is not None and need_db else None
    return dx, dw, db, None, None, None


linear_gelu_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# torch backend: cuBLAS (or the CPU GEMM) + the bias_gelu op


@OP.register("torch")
def linear_gelu_torch(x, weight, bias, approximate, backend=None):
    return bias_gelu(F.linear(x, weight), bias, approximate, backend=backend)


def linear_gelu_torch_fused(x, weight, bias, approximate, save_z):
    """The custom op's forward in PyTorch (backend "torch" of the custom op: tests, any dtype)."""
    z = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return F.gelu(z, approximate=approximate), (z if save_z else z.new_empty((0, z.shape[1])))


# ------------------------------------------------------------------------------------------------
# triton backend: the fused GEMM, where measured faster




def _triton_refusal(facts) -> str | None:
    reason = triton_support.refusal(facts)
    if reason is not None:
        return reason
    dtype = facts["dtype"]
    bias_dtype = facts.get("bias_dtype")
    if bias_dtype not in (None, dtype, torch.float32):
        return f"bias must have x's dtype or float32 (got {bias_dtype} with x {dtype})"
    if os.environ.get(FUSED_ENV, "0") == "1":
        return None
    # .get: `bertfast info` asks with the facts of a typical call of every op, which may lack these.
    arch, k, n, rows = (facts.get(f) for f in ("arch", "in_features", "out_features", "rows"))
    bucket = None if rows is None else rows_bucket(rows)
    if (arch, dtype, k, n, bucket) in MEASURED_FASTER:
        return None
    return (f"the fused GEMM + bias + GELU is not measured faster than cuBLAS + the bias_gelu kernel for this "
            f"shape (arch {arch}, {dtype}, in_features {k}, out_features {n}, rows {rows} -> bucket {bucket}): "
            f"MEASURED_FASTER in bertfast/ops/linear_gelu.py lists the shapes benchmarks/RESULTS.md measured "
            f"faster; set {FUSED_ENV}=1 to run it anyway")


@OP.register("triton", refuse=_triton_refusal)
def linear_gelu_triton(x, weight, bias, approximate, save_z):
    from bertfast.kernels.linear_gelu import linear_gelu_fwd

    return linear_gelu_fwd(x, weight, bias, approximate, store_z=save_z)


# Each backend's forward inside the custom op (its backward is the bias_gelu backward op of the
# same backend, then torch GEMMs).
_FORWARD = {"torch": linear_gelu_torch_fused, "triton": linear_gelu_triton}
