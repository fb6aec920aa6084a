"""Masked-language-model head and loss, computed only at the masked positions.

    m      = positions where labels != ignore_index          (M of the B*T tokens)
    h      = LayerNorm(gelu(hidden[m] @ W_dense^T + b_dense))
    logits = h @ W_decoder^T + b_decoder                      (M, vocab): never (B*T, vocab)
    loss   = cross_entropy(logits, labels[m], label_smoothing)

Equal to transformers' "decoder on every token, then CrossEntropyLoss(ignore_index=-100)", but
the head and the vocabulary GEMM run on the ~15% of tokens that carry a label.

The triton backend runs the head through the ``bias_gelu`` and ``layer_norm`` ops and fuses the
decoder GEMM with the cross-entropy (``bertfast.kernels.vocab_loss``): the (M, vocab) logits are
never stored. That fused part is the ``torch.library`` custom op ``bertfast::vocab_cross_entropy``
(with its backward ``bertfast::vocab_cross_entropy_backward`` and fake implementations), which
``generator_sample`` shares, so ``torch.compile`` traces through both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks, triton_support
from bertfast.ops.bias_gelu import bias_gelu
from bertfast.ops.dispatch import Op
from bertfast.ops.layer_norm import layer_norm

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
    E, V = check_head(name, hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, approximate, ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    checks.probability(name, "label_smoothing", label_smoothing)

    facts = {"device": hidden.device.type, "dtype": hidden.dtype, "vocab": V, "head_size": E, "reduction": reduction}
    impl = OP.select(backend, facts).impl
    return impl(hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
                approximate, float(eps), int(ignore_index), float(label_smoothing), reduction)


def check_head(name: str, hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
               decoder_bias, approximate, ignore_index) -> tuple[int, int]:
    """The checks of an MLM head's arguments (shared with ``generator_sample``); returns (E, vocab)."""
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
    checks.index_range(name, "labels", labels, V, f"labels must be token ids below vocab size {V}",
                       allow=ignore_index)
    return E, V


def reduce_losses(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """(M,) per-token losses -> the reduction; "mean" of no token is a zero that keeps the graph
    (where a plain mean gives NaN), as the torch backend's."""
    if reduction == "none":
        return losses
    if reduction == "mean" and losses.numel() > 0:
        return losses.mean()
    return losses.sum() * (0.0 if reduction == "mean" else 1.0)


# ------------------------------------------------------------------------------------------------
# torch backend: the reference, any dtype (float64 too) on any device


def head_logits_torch(h, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias, approximate,
                      eps):
    """(M, H) gathered hidden states -> (M, vocab) logits, in at least float32."""
    h = F.gelu(F.linear(h, dense_weight, dense_bias), approximate=approximate)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    logits = F.linear(h, decoder_weight, decoder_bias)  # (M, V)
    # Cross-entropy in float32 at least: half logits lose the loss' low bits.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def cross_entropy_torch(logits, targets, reduction, label_smoothing):
    if reduction == "mean" and targets.numel() == 0:
        # No masked token: a zero loss that keeps the graph, where cross_entropy gives NaN.
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, reduction=reduction, label_smoothing=label_smoothing)


@OP.register("torch")
def mlm_loss_torch(hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
                   approximate, eps, ignore_index, label_smoothing, reduction):
    selected = labels != ignore_index  # (B, T)
    logits = head_logits_torch(hidden[selected], dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                               decoder_bias, approximate, eps)
    return cross_entropy_torch(logits, labels[selected], reduction, label_smoothing)


# ------------------------------------------------------------------------------------------------
# triton backend: the head through its ops, then the decoder fused with the cross-entropy


def head_hidden(h, dense_weight, dense_bias, norm_weight, norm_bias, approximate, eps):
    """(M, H) gathered hidden states -> (M, E) head output: dense (cuBLAS), then the bias_gelu and
    layer_norm ops, each on its own fastest backend."""
    h = bias_gelu(F.linear(h, dense_weight), dense_bias, approximate)
    return layer_norm(h, norm_weight, norm_bias, eps)


def decoder_cross_entropy(h, targets, decoder_weight, decoder_bias, label_smoothing, backend, seed=None,
                          temperature=1.0):
    """The fused custom op on (M, E) rows: (losses (M,) float32, lse (M,), samples (M,) int64 or (0,))."""
    # Under autocast the decoder runs in the activations' dtype (as F.linear would); the cast is
    # differentiable, so float32 parameters still receive float32 gradients.
    if decoder_weight.dtype != h.dtype:
        decoder_weight = decoder_weight.to(h.dtype)
    if decoder_bias is not None and decoder_bias.dtype != h.dtype:
        decoder_bias = decoder_bias.to(h.dtype)
    h = h if h.stride(-1) == 1 else h.contiguous()
    return vocab_cross_entropy(h, decoder_weight, decoder_bias, targets, label_smoothing, seed, temperature, backend)


@OP.register("triton", refuse=triton_support.refusal)
def mlm_loss_triton(hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
                    approximate, eps, ignore_index, label_smoothing, reduction):
    selected = labels != ignore_index  # (B, T)
    h = head_hidden(hidden[selected], dense_weight, dense_bias, norm_weight, norm_bias, approximate, eps)  # (M, E)
    losses, _, _ = decoder_cross_entropy(h, labels[selected], decoder_weight, decoder_bias, label_smoothing, "triton")
    return reduce_losses(losses, reduction)


# ------------------------------------------------------------------------------------------------
# The custom ops of the fused decoder + cross-entropy (+ sampling); the backend name travels as an argument.


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


@torch.library.custom_op("bertfast::vocab_cross_entropy", mutates_args=())
def vocab_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        label_smoothing: float, seed: torch.Tensor | None, temperature: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of h (M, E) with logits z = h W^T + b (vocab): (loss (M,) = cross-entropy against targets with
    label smoothing; lse (M,) = logsumexp z, both float32 (float64 for float64); samples (M,) int64 =
    argmax(z / temperature + Gumbel noise of ``seed``), or (0,) when seed is None)."""
    return _FUSED[backend][0](h, weight, bias, targets, label_smoothing, seed, temperature)


@vocab_cross_entropy.register_fake
def _(h, weight, bias, targets, label_smoothing, seed, temperature, backend):
    M = h.shape[0]
    dtype = _compute_dtype(h)
    return (h.new_empty((M,), dtype=dtype), h.new_empty((M,), dtype=dtype),
            h.new_empty((M if seed is not None else 0,), dtype=torch.int64))


@torch.library.custom_op("bertfast::vocab_cross_entropy_backward", mutates_args=())
def vocab_cross_entropy_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, lse: torch.Tensor, label_smoothing: float,
                                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh like h, dW like weight, db (vocab,) in weight's dtype) from grad (M,) = d total / d loss."""
    return _FUSED[backend][1](grad, h, weight, bias, targets, lse, label_smoothing)


@vocab_cross_entropy_backward.register_fake
def _(grad, h, weight, bias, targets, lse, label_smoothing, backend):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    h, weight, bias, targets, label_smoothing, seed, temperature, backend = inputs
    _, lse, _ = output
    ctx.save_for_backward(h, weight, bias, targets, lse)
    ctx.args = (label_smoothing, backend)


def _backward(ctx, dloss, dlse, dsamples):
    h, weight, bias, targets, lse = ctx.saved_tensors
    label_smoothing, backend = ctx.args
    # lse and the samples are outputs for the caller's use only: no gradient flows through them.
    dh, dw, db = vocab_cross_entropy_backward(dloss, h, weight, bias, targets, lse, label_smoothing, backend)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None


vocab_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def _fused_torch(h, weight, bias, targets, label_smoothing, seed, temperature):
    """The fused op's math in PyTorch (the kernels' reference, and the op's CPU form for opcheck)."""
    from bertfast.ops.sample_tokens import sample_tokens_torch

    z = F.linear(h, weight, bias).to(_compute_dtype(h))  # (M, V)
    lse = torch.logsumexp(z, dim=-1)
    eps = label_smoothing
    target_z = z.gather(1, targets.long()[:, None])[:, 0]
    loss = lse - (1.0 - eps) * target_z - eps * z.mean(-1)
    samples = z.new_empty((0,), dtype=torch.int64) if seed is None else sample_tokens_torch(z, seed, temperature)
    return loss, lse, samples


def _fused_torch_backward(grad, h, weight, bias, targets, lse, label_smoothing):
    """dz = g (softmax(z) - (1 - eps) onehot - eps / V); dh = dz W, dW = dz^T h, db = sum_rows dz."""
    z = F.linear(h, weight, bias).to(_compute_dtype(h))
    eps, V = label_smoothing, weight.shape[0]
    dz = torch.exp(z - lse[:, None]) - eps / V
    dz[torch.arange(z.shape[0], device=z.device), targets.long()] -= 1.0 - eps
    dz = dz * grad.to(dz.dtype)[:, None]
    db = dz.sum(0).to(weight.dtype)
    dz = dz.to(h.dtype)
    return dz @ weight, (dz.t() @ h).to(weight.dtype), db


def _fused_triton(h, weight, bias, targets, label_smoothing, seed, temperature):
    from bertfast.kernels.vocab_loss import vocab_ce_fwd

    return vocab_ce_fwd(h, weight, bias, targets, label_smoothing, seed, temperature)


def _fused_triton_backward(grad, h, weight, bias, targets, lse, label_smoothing):
    from bertfast.kernels.vocab_loss import vocab_ce_bwd

    return vocab_ce_bwd(grad, h, weight, bias, targets, lse, label_smoothing)


# Each backend's (forward, backward) of the fused op.
_FUSED = {"torch": (_fused_torch, _fused_torch_backward), "triton": (_fused_triton, _fused_triton_backward)}
