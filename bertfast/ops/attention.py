"""Bidirectional multi-head attention with a key padding mask.

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h] | mask[b, j]) * dropout * v[b, j, h]

Keys where ``key_padding_mask`` is False get zero weight; a row whose keys are all padding gives
a zero output and zero gradients; NaN/Inf stored at padded keys or values never reaches anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("attention")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over (batch, seq, heads, head_dim) tensors.

    Args:
        q: (B, Tq, H, D) queries.
        k, v: (B, Tk, H, D) keys and values; same dtype and device as ``q``.
        key_padding_mask: (B, Tk) bool, True = attend to this key; None = no padding.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval mode).
        scale: softmax scale, default ``D ** -0.5``.
        backend: force a backend ("torch", "triton", "cuda"); see ``bertfast.ops.dispatch``.

    Returns:
        (B, Tq, H, D) in the dtype of ``q``.
    """
    name = OP.name
    for arg, t in (("q", q), ("k", k), ("v", v)):
        checks.tensor(name, arg, t, ndim=4, kind="float")
    for arg, t in (("k", k), ("v", v)):
        checks.same_dtype(name, arg, t, "q", q)
        checks.same_device(name, arg, t, "q", q)
    B, Tq, H, D = q.shape
    checks.shape(name, "k", k, (B, None, H, D), "(batch, seq_len, heads, head_dim) matching q")
    checks.shape(name, "v", v, tuple(k.shape), "the shape of k")
    checks.nonempty(name, "q", q, (0,), "the batch dim")
    checks.nonempty(name, "q", q, (1,), "the sequence dim")
    checks.nonempty(name, "k", k, (1,), "the sequence dim")
    checks.nonempty(name, "q", q, (3,), "head_dim")
    if key_padding_mask is not None:
        checks.tensor(name, "key_padding_mask", key_padding_mask, kind="bool")
        checks.shape(name, "key_padding_mask", key_padding_mask, (B, k.shape[1]), "(batch, key_seq_len)")
        checks.same_device(name, "key_padding_mask", key_padding_mask, "q", q)
    checks.probability(name, "dropout_p", dropout_p)
    if scale is None:
        scale = D**-0.5
    elif not float(scale) > 0:
        raise ValueError(f"{name}: `scale` must be a positive number, got {scale}")

    facts = {"device": q.device.type, "dtype": q.dtype, "head_dim": D, "dropout": dropout_p > 0}
    impl = OP.select(backend, facts).impl
    return impl(q, k, v, key_padding_mask, float(dropout_p), float(scale))


@OP.register("torch")
def attention_torch(q, k, v, key_padding_mask, dropout_p, scale):
    """Reference: the math of transformers' eager attention, in any dtype on any device."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
        # Zero padded keys/values so NaN/Inf stored there reaches neither outputs nor gradients.
        k = k.masked_fill(~keep, 0.0)
        v = v.masked_fill(~keep, 0.0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    # Softmax in float32 for half inputs; float32/float64 stay as they are.
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = scores.to(compute)
    if key_padding_mask is not None:
        # A finite fill (as transformers uses) keeps all-padding rows finite: their weights are
        # uniform over zeroed values, so their output and gradients are exactly zero.
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous()  # (B, Tq, H, D)
