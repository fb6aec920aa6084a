"""Masked-language-model head and loss, computed only at the masked positions.

    m      = positions where labels != ignore_index          (M of the B*T tokens)
    h      = LayerNorm(gelu(hidden[m] @ W_dense^T + b_dense))
    logits = h @ W_decoder^T + b_decoder                      (M, vocab): never (B*T, vocab)
    loss   = cross_entropy(logits, labels[m], label_smoothing)

Equal to transformers' "decoder on every token, then CrossEntropyLoss(ignore_index=-100)", but
the head and the vocabulary GEMM run on the ~15% of tokens that carry a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("mlm_loss")
REDUCTIONS = ("mean", "sum", "none")


def mlm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    eps: float = 1e-12,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """MLM loss from encoder output.

    Args:
        hidden: (B, T, H) encoder output.
        labels: (B, T) int ids in [0, vocab), or ``ignore_index`` at unmasked positions.
        dense_weight: (E, H), dense_bias: (E,) head transform (E = H for BERT/RoBERTa).
        norm_weight, norm_bias: (E,) head LayerNorm.
        decoder_weight: (vocab, E) -- usually the tied word embeddings; decoder_bias: (vocab,).
        approximate: GELU form of the head ("none" = erf, "tanh").
        eps: LayerNorm epsilon; label_smoothing in [0, 1).
        reduction: "mean" over masked tokens (0 when none are masked), "sum", or "none" -> (M,)
            losses of the masked tokens in row-major order.

    Returns:
        scalar loss, or (M,) for reduction="none"; float32 for half inputs.
    """
    name = OP.name
    checks.tensor(name, "hidden", hidden, ndim=3, kind="float")
    checks.tensor(name, "labels", labels, ndim=2, kind="int")
    B, T, H = hidden.shape
    checks.shape(name, "labels", labels, (B, T), "(batch, seq_len) of hidden")
    checks.same_device(name, "labels", labels, "hidden", hidden)
    checks.nonempty(name, "hidden", hidden, (0,), "the batch dim")
    checks.nonempty(name, "hidden", hidden, (1,), "the sequence dim")
    checks.tensor(name, "dense_weight", dense_weight, ndim=2, kind="float")
    checks.shape(name, "dense_weight", dense_weight, (None, H), f"(head_size, hidden={H})")
    E = dense_weight.shape[0]
    checks.tensor(name, "decoder_weight", decoder_weight, ndim=2, kind="float")
    checks.shape(name, "decoder_weight", decoder_weight, (None, E), f"(vocab, head_size={E})")
    V = decoder_weight.shape[0]
    for arg, p, n in (("dense_bias", dense_bias, E), ("norm_weight", norm_weight, E), ("norm_bias", norm_bias, E),
                      ("decoder_bias", decoder_bias, V)):
        if p is not None:
            checks.tensor(name, arg, p, ndim=1, kind="float")
            checks.shape(name, arg, p, (n,), f"({n},)")
            checks.same_device(name, arg, p, "hidden", hidden)
            checks.same_dtype_unless_autocast(name, arg, p, "hidden", hidden)
    for arg, w in (("dense_weight", dense_weight), ("decoder_weight", decoder_weight)):
        checks.same_device(name, arg, w, "hidden", hidden)
        checks.same_dtype_unless_autocast(name, arg, w, "hidden", hidden)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{name}: `approximate` must be 'none' or 'tanh', got {approximate!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    checks.probability(name, "label_smoothing", label_smoothing)
    checks.index_range(name, "labels", labels, V, f"labels must be token ids below vocab size {V}",
                       allow=ignore_index)

    facts = {"device": hidden.device.type, "dtype": hidden.dtype, "vocab": V, "reduction": reduction}
    impl = OP.select(backend, facts).impl
    return impl(hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
                approximate, float(eps), int(ignore_index), float(label_smoothing), reduction)


@OP.register("torch")
def mlm_loss_torch(hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
                   approximate, eps, ignore_index, label_smoothing, reduction):
    selected = labels != ignore_index  # (B, T)
    h = hidden[selected]  # (M, H)
    targets = labels[selected]  # (M,)
    h = F.gelu(F.linear(h, dense_weight, dense_bias), approximate=approximate)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    logits = F.linear(h, decoder_weight, decoder_bias)  # (M, V)
    # Cross-entropy in float32 at least: half logits lose the loss' low bits.
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if reduction == "mean" and targets.numel() == 0:
        # No masked token: a zero loss that keeps the graph, where cross_entropy gives NaN.
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=label_smoothing)
