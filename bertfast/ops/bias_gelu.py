"""Bias add followed by GELU: the activation of every BERT feed-forward up-projection.

    y = gelu(x + bias)
    gelu(z) = z * Phi(z)                                              approximate="none" (erf)
    gelu(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))          approximate="tanh"

The torch backend runs plain PyTorch ops under autograd. The GPU backends run through the
``torch.library`` custom ops ``bertfast::bias_gelu_forward`` / ``bertfast::bias_gelu_backward``
(fake implementations included, so ``torch.compile`` traces through them); the backward op also
returns dx summed over the rows in float32 (the bias gradient), which ``linear_gelu`` reuses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bertfast.ops import checks, triton_support
from bertfast.ops.dispatch import Op

OP = Op("bias_gelu")

# transformers' activation names -> torch's `approximate` argument. These are the activations
# the BERT family uses; anything else is refused by the model configs, naming `hidden_act`.
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def approximate_of(activation: str, arg: str = "hidden_act") -> str:
    """The ``approximate`` mode of a transformers activation name; clear error if unsupported."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"`{arg}` must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def bias_gelu(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """gelu(x + bias) over the last dim.

    Args:
        x: (..., N) pre-activation without its bias (e.g. ``F.linear(h, W)``).
        bias: (N,) or None.
        approximate: "none" (erf form, transformers' "gelu") or "tanh" ("gelu_new").
        backend: force a backend; see ``bertfast.ops.dispatch``.

    Returns:
        (..., N) in the dtype of ``x``.
    """
    name = OP.name
    checks.tensor(name, "x", x, kind="float")
    if x.dim() == 0:
        raise ValueError(f"{name}: `x` must have at least one dim, got a scalar")
    if bias is not None:
        checks.tensor(name, "bias", bias, ndim=1, kind="float")
        checks.shape(name, "bias", bias, (x.shape[-1],), "(x.shape[-1],)")
        checks.same_device(name, "bias", bias, "x", x)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{name}: `approximate` must be 'none' or 'tanh', got {approximate!r}")

    facts = {"device": x.device.type, "dtype": x.dtype, "approximate": approximate,
             "bias_dtype": None if bias is None else bias.dtype}
    chosen = OP.select(backend, facts).name
    if chosen == "torch":
        # Plain PyTorch ops under autograd (torch.compile traces them directly); the custom op
        # below serves the kernels.
        return OP.backends["torch"].impl(x, bias, approximate)
    return bias_gelu_forward(x, bias, approximate, chosen)


# ------------------------------------------------------------------------------------------------
# The custom ops: the backend name travels as an argument, chosen before tracing reaches them.


@torch.library.custom_op("bertfast::bias_gelu_forward", mutates_args=())
def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str, backend: str) -> torch.Tensor:
    """gelu(x + bias), contiguous, in x's shape and dtype."""
    return OP.backends[backend].impl(x, bias, approximate).contiguous()


@bias_gelu_forward.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("bertfast::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                       sum_rows: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx = dy * gelu'(x + bias) like x, contiguous; dx summed over every dim but the last, in
    float32 (float64 for float64) when ``sum_rows``, else an empty (0,) tensor)."""
    dx, dsum = _BACKWARD[backend](dy, x, bias, approximate, sum_rows)
    return dx.contiguous(), dsum if sum_rows else x.new_empty((0,), dtype=_sum_dtype(x))


@bias_gelu_backward.register_fake
def _(dy, x, bias, approximate, sum_rows, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[-1] if sum_rows else 0,), dtype=_sum_dtype(x))


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (approximate, backend)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    approximate, backend = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[1]
    dx, dsum = bias_gelu_backward(dy, x, bias, approximate, bias_grad, backend)
    return dx, (dsum.to(bias.dtype) if bias_grad else None), None, None


bias_gelu_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# torch backend: the reference, any dtype (float64 too) on any device


@OP.register("torch")
def bias_gelu_torch(x, bias, approximate):
    if bias is not None:
        x = x + bias.to(x.dtype)
    return F.gelu(x, approximate=approximate)


def gelu_grad_torch(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """d gelu(z) / dz, in float32 for half z (float64 stays float64)."""
    z = z.to(_sum_dtype(z))
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)
    return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def bias_gelu_torch_backward(dy, x, bias, approximate, sum_rows):
    """The backward written out (for the custom op with backend "torch"): (dx, dsum or None)."""
    z = x if bias is None else x + bias.to(x.dtype)
    dx = dy.to(_sum_dtype(x)) * gelu_grad_torch(z, approximate)
    dsum = dx.reshape(-1, x.shape[-1]).sum(0) if sum_rows else None
    return dx.to(x.dtype), dsum


# ------------------------------------------------------------------------------------------------
# triton backend




def _triton_refusal(facts) -> str | None:
    reason = triton_support.refusal(facts)
    if reason is not None:
        return reason
    bias_dtype = facts.get("bias_dtype")
    if bias_dtype is not None and bias_dtype not in (facts["dtype"], torch.float32):
        return f"bias must have x's dtype or float32 (got {bias_dtype} with x {facts['dtype']})"
    return None


@OP.register("triton", refuse=_triton_refusal)
def bias_gelu_triton(x, bias, approximate):
    from bertfast.kernels.bias_gelu import bias_gelu_fwd

    return bias_gelu_fwd(x, bias, approximate)


def bias_gelu_triton_backward(dy, x, bias, approximate, sum_rows):
    from bertfast.kernels.bias_gelu import bias_gelu_bwd

    return bias_gelu_bwd(dy, x, bias, approximate, sum_rows)


# Each backend's backward, beside its forward registered in OP.
_BACKWARD = {"torch": bias_gelu_torch_backward, "triton": bias_gelu_triton_backward}
