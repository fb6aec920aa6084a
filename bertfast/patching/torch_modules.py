"""Patched forwards of ``torch.nn.TransformerEncoderLayer`` (batch_first or not, norm_first or
not), ``torch.nn.TransformerEncoder`` and ``torch.nn.LayerNorm``.

The layer: one in-projection GEMM, the fused attention op on strided views of it (key padding
from ``src_key_padding_mask``), the out-projection; post-norm layers fuse dropout + residual +
LayerNorm into one op; a GELU feed-forward runs ``linear_gelu``. Calls with an attention mask
(``src_mask`` / ``mask``), ``is_causal`` or nested tensors run torch's own forward.

Differences from torch, by design: a sequence whose keys are all padding gets zeros where torch's
attention gives NaN; torch's nested-tensor fast path (eval, no grad) leaves zeros at padded
positions, the patched encoder computes them like the training path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bertfast import ops
from bertfast.ops.linear_gelu import linear_gelu
from bertfast.patching.core import original_forward, plan_of
from bertfast.patching.hf_structure import Refused


@dataclass(frozen=True)
class LayerPlan:
    activation: str  # "gelu" (erf: fused linear_gelu), "relu", or "other" (the layer's own callable)


def layer_plan(layer: nn.TransformerEncoderLayer) -> LayerPlan:
    attn = layer.self_attn
    if not isinstance(attn, nn.MultiheadAttention) or type(attn).forward is not nn.MultiheadAttention.forward:
        raise Refused("self_attn is not a plain nn.MultiheadAttention")
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise Refused("self_attn has separate q/k/v projections of different sizes (kdim/vdim)")
    if attn.in_proj_bias is None or attn.out_proj.bias is None:
        raise Refused("self_attn without biases (bias=False)")
    if attn.bias_k is not None or attn.add_zero_attn:
        raise Refused("self_attn with add_bias_kv or add_zero_attn")
    for name in ("norm1", "norm2"):
        norm = getattr(layer, name)
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise Refused(f"{name} is not a 1-D nn.LayerNorm")
    act = layer.activation
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return LayerPlan("gelu")
    if act is F.relu or isinstance(act, nn.ReLU):
        return LayerPlan("relu")
    return LayerPlan("other")


def _key_padding(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """torch's src_key_padding_mask (True = padding) -> the op's (B, T) mask (True = real token)."""
    if mask is None:
        return None
    if mask.shape != (batch, length):
        raise ValueError(f"src_key_padding_mask: expected shape ({batch}, {length}), got {tuple(mask.shape)}")
    return ~mask


def _feed_forward(layer: nn.TransformerEncoderLayer, plan: LayerPlan, x: torch.Tensor) -> torch.Tensor:
    if plan.activation == "gelu":
        h = linear_gelu(x, layer.linear1.weight, layer.linear1.bias, "none")
    elif plan.activation == "relu":
        h = F.relu(layer.linear1(x))
    else:
        h = layer.activation(layer.linear1(x))
    return layer.linear2(layer.dropout(h))


def _attend(layer: nn.TransformerEncoderLayer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    attn = layer.self_attn
    B, T, E = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(B, T, 3, heads, E // heads).unbind(2)
    context = ops.attention(q, k, v, key_padding_mask=keep, dropout_p=attn.dropout if layer.training else 0.0)
    return F.linear(context.reshape(B, T, E), attn.out_proj.weight, attn.out_proj.bias)


def encoder_layer_forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    plan = plan_of(self)
    reason = None
    if plan is None:
        reason = "no patch plan"
    elif src_mask is not None or is_causal:
        reason = "an attention mask (src_mask) or is_causal"
    elif src.is_nested or src.dim() != 3:
        reason = "a nested or unbatched src"
    elif src_key_padding_mask is not None and src_key_padding_mask.dtype != torch.bool:
        reason = f"a {src_key_padding_mask.dtype} src_key_padding_mask"
    if reason:
        return original_forward(self, reason, src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                                is_causal=is_causal)
    x = src if self.self_attn.batch_first else src.transpose(0, 1)  # (B, T, E): the op takes strided views
    keep = _key_padding(src_key_padding_mask, x.shape[0], x.shape[1])
    p = self.dropout1.p if self.training else 0.0
    p2 = self.dropout2.p if self.training else 0.0
    n1, n2 = self.norm1, self.norm2
    if self.norm_first:
        x = x + F.dropout(_attend(self, ops.layer_norm(x, n1.weight, n1.bias, n1.eps), keep), p, self.training)
        x = x + F.dropout(_feed_forward(self, plan, ops.layer_norm(x, n2.weight, n2.bias, n2.eps)), p2, self.training)
    else:
        x = ops.layer_norm(_attend(self, x, keep), n1.weight, n1.bias, n1.eps, residual=x, dropout_p=p)
        x = ops.layer_norm(_feed_forward(self, plan, x), n2.weight, n2.bias, n2.eps, residual=x, dropout_p=p2)
    return x if self.self_attn.batch_first else x.transpose(0, 1)


def encoder_forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if plan_of(self) is None or mask is not None or is_causal:
        return original_forward(self, "an attention mask or is_causal" if plan_of(self) is not None else "no patch plan",
                                src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
    out = src
    for layer in self.layers:
        out = layer(out, src_key_padding_mask=src_key_padding_mask)
    return self.norm(out) if self.norm is not None else out


def layer_norm_forward(self, x):
    if plan_of(self) is None or x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
        return original_forward(self, "an input whose last dim is not normalized_shape" if plan_of(self) else
                                "no patch plan", x)
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def layer_norm_ok(norm: nn.LayerNorm) -> None:
    if len(norm.normalized_shape) != 1:
        raise Refused(f"normalizes over {tuple(norm.normalized_shape)}: bertfast normalizes the last dim only")
