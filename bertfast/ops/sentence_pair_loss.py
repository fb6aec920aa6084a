"""Sentence-pair classification head and loss: BERT's NSP and ALBERT's SOP.

    logits = pooled @ W^T + b                  (B, 2)
    loss   = cross_entropy(logits, labels)     labels: 0 = in order / is next, 1 = swapped / random
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("sentence_pair_loss")


def sentence_pair_loss(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NSP/SOP logits and mean loss.

    Args:
        pooled: (B, H) pooled output (BERT: tanh pooler; ALBERT: pooler after dropout).
        weight: (C, H), bias: (C,) classifier (C = 2 for NSP/SOP).
        labels: (B,) ints in [0, C), or None for logits only.

    Returns:
        (logits (B, C), loss scalar or None); the loss is float32 for half inputs.
    """
    name = OP.name
    checks.tensor(name, "pooled", pooled, ndim=2, kind="float")
    checks.nonempty(name, "pooled", pooled, (0,), "the batch dim")
    checks.tensor(name, "weight", weight, ndim=2, kind="float")
    checks.shape(name, "weight", weight, (None, pooled.shape[1]), f"(classes, hidden={pooled.shape[1]})")
    checks.same_device(name, "weight", weight, "pooled", pooled)
    checks.same_dtype_unless_autocast(name, "weight", weight, "pooled", pooled)
    C = weight.shape[0]
    if bias is not None:
        checks.tensor(name, "bias", bias, ndim=1, kind="float")
        checks.shape(name, "bias", bias, (C,), f"(classes={C},)")
        checks.same_device(name, "bias", bias, "pooled", pooled)
        checks.same_dtype_unless_autocast(name, "bias", bias, "pooled", pooled)
    if labels is not None:
        checks.tensor(name, "labels", labels, ndim=1, kind="int")
        checks.shape(name, "labels", labels, (pooled.shape[0],), "(batch,)")
        checks.same_device(name, "labels", labels, "pooled", pooled)
        checks.index_range(name, "labels", labels, C, f"labels must be class ids below {C}")

    facts = {"device": pooled.device.type, "dtype": pooled.dtype}
    impl = OP.select(backend, facts).impl
    return impl(pooled, weight, bias, labels)


@OP.register("torch")
def sentence_pair_loss_torch(pooled, weight, bias, labels):
    logits = F.linear(pooled, weight, bias)  # (B, C)
    if labels is None:
        return logits, None
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return logits, F.cross_entropy(compute, labels)
