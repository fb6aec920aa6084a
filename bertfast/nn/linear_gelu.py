"""Drop-in for ``nn.Linear`` followed by GELU: the feed-forward up-projection."""

from __future__ import annotations

import torch
from torch import nn

from bertfast.ops.linear_gelu import linear_gelu


class LinearGELU(nn.Linear):
    """``gelu(x @ weight^T + bias)``; parameters and state_dict of the ``nn.Linear`` it replaces.

    approximate: "none" (erf; transformers' "gelu") or "tanh" ("gelu_new", "gelu_pytorch_tanh").
    Runs the ``linear_gelu`` op: cuBLAS + the bias_gelu kernel, or one fused Triton GEMM where that
    measured faster (see ``bertfast.ops.linear_gelu``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 approximate: str = "none"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"
