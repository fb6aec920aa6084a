"""Bias add followed by GELU: the activation of every BERT feed-forward up-projection.

    y = gelu(x + bias)
    gelu(z) = z * Phi(z)                                              approximate="none" (erf)
    gelu(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))          approximate="tanh"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
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

    facts = {"device": x.device.type, "dtype": x.dtype, "approximate": approximate}
    impl = OP.select(backend, facts).impl
    return impl(x, bias, approximate)


@OP.register("torch")
def bias_gelu_torch(x, bias, approximate):
    if bias is not None:
        x = x + bias.to(x.dtype)
    return F.gelu(x, approximate=approximate)
