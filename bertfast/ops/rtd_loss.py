"""ELECTRA replaced-token-detection head and loss (the discriminator objective).

    z      = act(hidden @ W_dense^T + b_dense)             (B, T, H)
    logits = z @ w_pred + b_pred                           (B, T)
    loss   = mean over real tokens of BCE-with-logits(logits, replaced)

``replaced`` is 1 where the generator's sample differs from the original token. Padding tokens
(``attention_mask`` False) count in neither the sum nor the mean.

The torch backend runs as plain autograd. The kernels (``bertfast.kernels.rtd_loss``) take over after
the dense GEMM: ``F.linear(hidden, W_dense)`` stays under autograd (cuBLAS forward and backward), and
the rest of the head is the ``torch.library`` custom op ``bertfast::rtd_head_forward`` with its
backward ``bertfast::rtd_head_backward`` and fake implementations, so ``torch.compile`` traces through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks, triton_support
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

    device = hidden.device.type
    # Inside torch.autocast the torch backend's F.linear computes in the autocast dtype (float64 stays
    # float64); the kernels do too.
    autocast = torch.is_autocast_enabled(device) and hidden.dtype != torch.float64
    compute = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    facts = {"device": device, "dtype": compute}
    chosen = OP.select(backend, facts)
    if autocast and chosen.name != "torch":
        # The kernels take one dtype: cast as F.linear would (autograd casts the gradients back).
        hidden, dense_weight, dense_bias, prediction_weight, prediction_bias = (
            None if t is None else t.to(compute)
            for t in (hidden, dense_weight, dense_bias, prediction_weight, prediction_bias))
    return chosen.impl(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
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


# ------------------------------------------------------------------------------------------------
# The custom ops (the head after the dense GEMM): the backend name travels as an argument, chosen
# before tracing reaches them.


@torch.library.custom_op("bertfast::rtd_head_forward", mutates_args=())
def rtd_head_forward(z: torch.Tensor, dense_bias: torch.Tensor | None, prediction_weight: torch.Tensor,
                     prediction_bias: torch.Tensor | None, labels: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, approximate: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (B, T, inner) = hidden @ W_dense^T -> (logits (B, T) in z's dtype; loss () float32, 0 without
    labels; count () float32, real tokens clamped to >= 1; rho (B * T,) float32, the loss's gradient
    per logit times count (mask * (sigmoid(logit) - label)), empty without labels)."""
    return _HEAD[backend][0](z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask, approximate)


@rtd_head_forward.register_fake
def _(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask, approximate, backend):
    f32 = torch.float32
    rows = z.numel() // z.shape[-1] if labels is not None else 0
    return (z.new_empty(z.shape[:-1]), z.new_empty((), dtype=f32), z.new_empty((), dtype=f32),
            z.new_empty((rows,), dtype=f32))


@torch.library.custom_op("bertfast::rtd_head_backward", mutates_args=())
def rtd_head_backward(dlogits: torch.Tensor | None, dloss: torch.Tensor | None, z: torch.Tensor,
                      dense_bias: torch.Tensor | None, prediction_weight: torch.Tensor,
                      prediction_bias: torch.Tensor | None, rho: torch.Tensor, count: torch.Tensor,
                      approximate: str,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz like z; d_dense_bias (inner,), d_prediction_weight (1, inner), d_prediction_bias (1,) in the
    dtypes of those parameters, z's dtype for an absent bias)."""
    dz, db, dw, dbp = _HEAD[backend][1](dlogits, dloss, z, dense_bias, prediction_weight, rho, count, approximate)
    return (dz, db.to(_dtype_of(dense_bias, z)), dw.to(prediction_weight.dtype),
            dbp.to(_dtype_of(prediction_bias, z)))


def _dtype_of(param: torch.Tensor | None, z: torch.Tensor) -> torch.dtype:
    return z.dtype if param is None else param.dtype


@rtd_head_backward.register_fake
def _(dlogits, dloss, z, dense_bias, prediction_weight, prediction_bias, rho, count, approximate, backend):
    inner = z.shape[-1]
    return (z.new_empty(z.shape), z.new_empty((inner,), dtype=_dtype_of(dense_bias, z)),
            z.new_empty((1, inner), dtype=prediction_weight.dtype),
            z.new_empty((1,), dtype=_dtype_of(prediction_bias, z)))


def _setup_context(ctx, inputs, output):
    z, dense_bias, prediction_weight, prediction_bias, labels, _, approximate, backend = inputs
    _, _, count, rho = output
    ctx.mark_non_differentiable(count, rho)
    ctx.save_for_backward(z, dense_bias, prediction_weight, prediction_bias, rho, count)
    ctx.args = (approximate, backend, labels is not None)


def _backward(ctx, dlogits, dloss, dcount, drho):
    z, dense_bias, prediction_weight, prediction_bias, rho, count = ctx.saved_tensors
    approximate, backend, has_labels = ctx.args
    if not has_labels:  # the op's caller returns no loss then: whatever reaches it is not a gradient
        dloss = None
    dz, db, dw, dbp = rtd_head_backward(dlogits, dloss, z, dense_bias, prediction_weight, prediction_bias, rho,
                                        count, approximate, backend)
    return (dz, db if dense_bias is not None else None, dw, dbp if prediction_bias is not None else None,
            None, None, None, None)


rtd_head_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# triton backend



@OP.register("triton", refuse=triton_support.refusal)
def rtd_loss_triton(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                    approximate):
    """The dense GEMM under autograd (cuBLAS), then the fused head through the custom op."""
    z = F.linear(hidden, dense_weight)  # (B, T, inner); its bias goes into the fused kernel
    logits, loss, _, _ = rtd_head_forward(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                                          approximate, "triton")
    return logits, (loss if labels is not None else None)


def _triton_head(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask, approximate):
    from bertfast.kernels.rtd_loss import rtd_head_fwd

    return rtd_head_fwd(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask, approximate)


def _triton_head_backward(dlogits, dloss, z, dense_bias, prediction_weight, rho, count, approximate):
    from bertfast.kernels.rtd_loss import rtd_head_bwd

    return rtd_head_bwd(dlogits, dloss, z, dense_bias, prediction_weight, rho, count, approximate)


# backend -> (forward, backward) of the head after the dense GEMM, run by the custom ops.
_HEAD = {"triton": (_triton_head, _triton_head_backward)}
