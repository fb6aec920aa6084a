"""Drop-in for ``torch.nn.LayerNorm`` whose forward can also add a residual and apply dropout."""

from __future__ import annotations

import torch
from torch import nn

from bertfast import ops


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same arguments, parameters and state_dict) on ``bertfast.ops.layer_norm``.

    ``forward(x, residual=None, dropout_p=0.0)`` computes LayerNorm(dropout(x) + residual): the
    tail of every BERT sub-layer in one op. With the defaults it equals ``nn.LayerNorm(x)``.
    Only the last dim is normalized (what every BERT-family model uses).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape: bertfast.nn.LayerNorm normalizes the last dim only, "
                             f"got {tuple(self.normalized_shape)}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"x: expected last dim {self.normalized_shape[0]}, got shape {tuple(x.shape)}")
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=dropout_p)
