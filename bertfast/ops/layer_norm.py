"""LayerNorm over the last dim, with an optional dropout on the input and a residual add.

    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias,   s = dropout(x, p) + residual

This is the "dense -> dropout -> add residual -> LayerNorm" tail of every BERT sub-layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("layer_norm")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual) over the last dim.

    Args:
        x: (..., N) input (the branch output when ``residual`` is given).
        weight, bias: (N,) affine parameters, or None for no scale / no shift.
        eps: added to the variance.
        residual: (..., N) added after dropout, same shape/dtype/device as ``x``; or None.
        dropout_p: dropout on ``x`` before the add (pass 0.0 in eval mode).
        backend: force a backend; see ``bertfast.ops.dispatch``.

    Returns:
        (..., N) in the dtype of ``x``.
    """
    name = OP.name
    checks.tensor(name, "x", x, kind="float")
    if x.dim() == 0:
        raise ValueError(f"{name}: `x` must have at least one dim, got a scalar")
    n = x.shape[-1]
    checks.nonempty(name, "x", x, (-1,), "the normalized (last) dim")
    for arg, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            checks.tensor(name, arg, p, ndim=1, kind="float")
            checks.shape(name, arg, p, (n,), "(x.shape[-1],)")
            checks.same_device(name, arg, p, "x", x)
    if weight is not None and bias is not None:
        checks.same_dtype(name, "bias", bias, "weight", weight)
    if residual is not None:
        checks.tensor(name, "residual", residual, kind="float")
        checks.shape(name, "residual", residual, tuple(x.shape), "the shape of x")
        checks.same_dtype(name, "residual", residual, "x", x)
        checks.same_device(name, "residual", residual, "x", x)
    checks.probability(name, "dropout_p", dropout_p)
    if not float(eps) > 0:
        raise ValueError(f"{name}: `eps` must be positive, got {eps}")

    facts = {"device": x.device.type, "dtype": x.dtype, "hidden": n, "residual": residual is not None}
    impl = OP.select(backend, facts).impl
    return impl(x, weight, bias, float(eps), residual, float(dropout_p))


@OP.register("torch")
def layer_norm_torch(x, weight, bias, eps, residual, dropout_p):
    """Reference: the same calls as transformers' BertSelfOutput / BertOutput tail."""
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    if residual is not None:
        x = x + residual
    # Half inputs with float32 parameters (autocast-style mixes) normalize in the parameters' dtype.
    dtype = x.dtype
    param = weight if weight is not None else bias
    if param is not None and param.dtype != dtype:
        x = x.to(param.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)
