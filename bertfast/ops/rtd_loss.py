"""ELECTRA replaced-token-detection head and loss (the discriminator objective).

    z      = act(hidden @ W_dense^T + b_dense)             (B, T, H)
    logits = z @ w_pred + b_pred                           (B, T)
    loss   = mean over real tokens of BCE-with-logits(logits, replaced)

``replaced`` is 1 where the generator's sample differs from the original token. Padding tokens
(``attention_mask`` False) count in neither the sum nor the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("rtd_loss")


def rtd_loss(
    hidden: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor | None,
    prediction_weight: torch.Tensor,
    prediction_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    approximate: str = "none",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTD logits and loss.

    Args:
        hidden: (B, T, H) discriminator output.
        dense_weight: (H, H), dense_bias: (H,).
        prediction_weight: (1, H) (``nn.Linear(H, 1).weight``), prediction_bias: (1,).
        labels: (B, T) int or bool, 1/True = replaced; or None for logits only.
        attention_mask: (B, T) bool, True = real token; None = every token counts.
        approximate: GELU form of the head ("none" = erf "gelu", "tanh" = "gelu_new").

    Returns:
        (logits (B, T), loss scalar or None). With no real token the loss is 0, not NaN.
    """
    name = OP.name
    checks.tensor(name, "hidden", hidden, ndim=3, kind="float")
    B, T, H = hidden.shape
    checks.nonempty(name, "hidden", hidden, (0,), "the batch dim")
    checks.nonempty(name, "hidden", hidden, (1,), "the sequence dim")
    checks.tensor(name, "dense_weight", dense_weight, ndim=2, kind="float")
    checks.shape(name, "dense_weight", dense_weight, (None, H), f"(inner, hidden={H})")
    inner = dense_weight.shape[0]
    checks.tensor(name, "prediction_weight", prediction_weight, ndim=2, kind="float")
    checks.shape(name, "prediction_weight", prediction_weight, (1, inner), f"(1, {inner})")
    for arg, p, n in (("dense_bias", dense_bias, inner), ("prediction_bias", prediction_bias, 1)):
        if p is not None:
            checks.tensor(name, arg, p, ndim=1, kind="float")
            checks.shape(name, arg, p, (n,), f"({n},)")
    for arg, w in (("dense_weight", dense_weight), ("dense_bias", dense_bias),
                   ("prediction_weight", prediction_weight), ("prediction_bias", prediction_bias)):
        if w is not None:
            checks.same_device(name, arg, w, "hidden", hidden)
            checks.same_dtype_unless_autocast(name, arg, w, "hidden", hidden)
    if labels is not None:
        checks.tensor(name, "labels", labels, kind="int_or_bool")
        checks.shape(name, "labels", labels, (B, T), "(batch, seq_len) of hidden")
        checks.same_device(name, "labels", labels, "hidden", hidden)
        if labels.dtype != torch.bool:
            checks.index_range(name, "labels", labels, 2, "labels must be 0 (original) or 1 (replaced)")
    if attention_mask is not None:
        checks.tensor(name, "attention_mask", attention_mask, kind="bool")
        checks.shape(name, "attention_mask", attention_mask, (B, T), "(batch, seq_len) of hidden")
        checks.same_device(name, "attention_mask", attention_mask, "hidden", hidden)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{name}: `approximate` must be 'none' or 'tanh', got {approximate!r}")

    facts = {"device": hidden.device.type, "dtype": hidden.dtype}
    impl = OP.select(backend, facts).impl
    return impl(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                approximate)


@OP.register("torch")
def rtd_loss_torch(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                   approximate):
    z = F.gelu(F.linear(hidden, dense_weight, dense_bias), approximate=approximate)
    logits = F.linear(z, prediction_weight, prediction_bias).squeeze(-1)  # (B, T)
    if labels is None:
        return logits, None
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # With 0/1 labels, BCE-with-logits is softplus(x) for originals and softplus(-x) for replaced
    # tokens. Written so, it has no cancellation; torch's (1 - y) x - logsigmoid(x) loses ~eps |x|
    # on confidently-original tokens (x << 0), the bulk of an ELECTRA batch.
    # threshold 40 (torch's default is 20): beyond it softplus is the identity, off by e^-40, far
    # below float64 round-off; exp(40) still fits float32.
    per_token = F.softplus(torch.where(labels.bool(), -compute, compute), threshold=40.0)
    if attention_mask is None:
        return logits, per_token.mean()
    weights = attention_mask.to(compute.dtype)
    # max(count, 1): a batch of only padding gives 0, not 0/0.
    return logits, (per_token * weights).sum() / weights.sum().clamp(min=1.0)
