"""ELECTRA replaced-token-detection head and loss (the discriminator objective).

    z      = act(hidden @ W_dense^T + b_dense)             (B, T, H)
    logits = z @ w_pred + b_pred                           (B, T)
    loss   = mean over real tokens of BCE-with-logits(logits, replaced)

``replaced`` is 1 where the generator's sample differs from the original token. Padding tokens
(``attention_mask`` False) count in neither the sum nor the mean.

The torch backend runs as plain autograd. The kernels (triton: ``bertfast.kernels.rtd_loss``; cuda:
``csrc/cuda/rtd_loss.cu``, with the same inputs and outputs) take over after the dense GEMM:
``F.linear(hidden, W_dense)`` stays under autograd (cuBLAS forward and backward), and the rest of the
head is the ``torch.library`` custom op ``bertfast::rtd_head_forward`` with its backward
``bertfast::rtd_head_backward`` and fake implementations, so ``torch.compile`` traces through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bertfast.ops import checks, compiled, cuda_support, triton_support
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
    facts = {"device": device, "dtype": compute, "inner": inner}
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


# ------------------------------------------------------------------------------------------------
# cuda backend: csrc/cuda/rtd_loss.cu (same math, inputs and outputs as the Triton kernels)

_CUDA = "rtd_loss (cuda)"


def cuda_max_inner(dtype: torch.dtype) -> int:
    """The widest inner size the kernels take: the backward's grid has at most 65535 column chunks of
    32 lanes x 16 bytes (``_cuda.rtd_max_inner``, restated here so that dispatch under torch.compile
    calls no compiled function)."""
    return 65535 * 32 * (16 // dtype.itemsize)


def _cuda_refusal(facts):
    why = cuda_support.refusal(facts)
    if why is not None:
        return why
    inner, limit = facts.get("inner"), cuda_max_inner(facts["dtype"])
    if inner is not None and inner > limit:
        return f"inner size (rows of dense_weight) at most {limit} in {facts['dtype']}, got {inner}"
    return None


@OP.register("cuda", refuse=_cuda_refusal)
def rtd_loss_cuda(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                  approximate):
    """The dense GEMM under autograd (cuBLAS), then the CUDA head kernels through the custom op."""
    z = F.linear(hidden, dense_weight)  # (B, T, inner); its bias goes into the fused kernel
    logits, loss, _, _ = rtd_head_forward(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask,
                                          approximate, "cuda")
    return logits, (loss if labels is not None else None)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_z(z: torch.Tensor):
    """(the module, z as (rows, inner) with a unit column stride (copied only if needed), rows, inner)."""
    if not isinstance(z, torch.Tensor) or z.dim() < 1:
        raise ValueError(f"{_CUDA}: `z` must be a tensor (..., inner)")
    if not cuda_support.on_cuda(z):
        raise ValueError(f"{_CUDA}: `z` must be a CUDA tensor, got {z.device}")
    if z.dtype not in cuda_support.DTYPE_CODES:
        raise TypeError(f"{_CUDA}: `z` must be float16, bfloat16 or float32, got {z.dtype}")
    module, why = compiled.load("_cuda")
    if module is None:
        raise RuntimeError(f"{_CUDA}: {why}")
    inner = z.shape[-1]
    rows = math.prod(z.shape[:-1])
    if inner > cuda_max_inner(z.dtype):
        raise ValueError(f"{_CUDA}: `z` has {inner} columns, more than the kernels take ({cuda_max_inner(z.dtype)})")
    z2 = z.reshape(rows, inner)
    if inner > 1 and z2.stride(1) != 1:
        z2 = z2.contiguous()
    return module, z2, rows, inner


def _cuda_vector(name: str, t: torch.Tensor | None, z: torch.Tensor, n: int) -> torch.Tensor | None:
    """A parameter as a contiguous (n,) vector; the kernels read it in z's dtype."""
    if t is None:
        return None
    if t.device != z.device:
        raise ValueError(f"{_CUDA}: `{name}` is on {t.device} but `z` is on {z.device}")
    if t.dtype != z.dtype:
        raise TypeError(f"{_CUDA}: `{name}` has dtype {t.dtype} but `z` has {z.dtype}; the kernels take one dtype")
    if t.numel() != n:
        raise ValueError(f"{_CUDA}: `{name}` must hold {n} values, got shape {tuple(t.shape)}")
    return t.reshape(n).contiguous()


def _cuda_per_row(name: str, t: torch.Tensor, z: torch.Tensor, rows: int, dtypes) -> torch.Tensor:
    """labels / attention_mask / dlogits as a contiguous (rows,) tensor (a copy only for strided input,
    e.g. a gradient expanded from a scalar)."""
    if t.device != z.device:
        raise ValueError(f"{_CUDA}: `{name}` is on {t.device} but `z` is on {z.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{_CUDA}: `{name}` has dtype {t.dtype}, expected one of {dtypes}")
    if t.numel() != rows:
        raise ValueError(f"{_CUDA}: `{name}` must hold one value per row of `z` ({rows}), got shape {tuple(t.shape)}")
    return t.reshape(rows).contiguous()


_LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _cuda_head(z, dense_bias, prediction_weight, prediction_bias, labels, attention_mask, approximate):
    """``rtd_head_fwd``'s contract (kernels/rtd_loss.py) on csrc/cuda/rtd_loss.cu: (logits (B, T) in z's
    dtype, loss () float32, count () float32 clamped to >= 1, rho (B * T,) float32 or empty)."""
    module, z2, rows, inner = _cuda_z(z)
    w = _cuda_vector("prediction_weight", prediction_weight, z, inner)
    b = _cuda_vector("dense_bias", dense_bias, z, inner)
    pb = _cuda_vector("prediction_bias", prediction_bias, z, 1)
    dev, f32 = z.device, torch.float32
    has_labels = labels is not None
    y = _cuda_per_row("labels", labels, z, rows, _LABEL_DTYPES) if has_labels else None
    m = (_cuda_per_row("attention_mask", attention_mask, z, rows, (torch.bool,))
         if has_labels and attention_mask is not None else None)
    logits = torch.empty(z.shape[:-1], dtype=z.dtype, device=dev)
    rho = torch.empty(rows if has_labels else 0, dtype=f32, device=dev)
    blocks = module.rtd_forward_blocks(rows) if has_labels else 0
    loss_part = torch.empty(blocks, dtype=torch.float64, device=dev)  # float64 sums (see the .cu file)
    count_part = torch.empty(blocks, dtype=f32, device=dev)
    with torch.cuda.device(dev):
        module.rtd_forward(z2.data_ptr(), _ptr(b), _ptr(w), _ptr(pb), _ptr(y), 0 if y is None else y.element_size(),
                           _ptr(m), logits.data_ptr(), _ptr(rho), _ptr(loss_part), _ptr(count_part), rows, inner,
                           z2.stride(0), cuda_support.DTYPE_CODES[z.dtype], approximate == "tanh",
                           cuda_support.stream(dev))
    if not has_labels:
        zero = torch.zeros((), dtype=f32, device=dev)
        return logits, zero, zero.clone(), rho
    # max(count, 1): a batch of only padding has loss 0 (its partial sums are 0), not 0/0
    count = count_part.sum().clamp(min=1.0)
    return logits, (loss_part.sum() / count.double()).to(f32), count, rho


def _cuda_head_backward(dlogits, dloss, z, dense_bias, prediction_weight, rho, count, approximate):
    """``rtd_head_bwd``'s contract: (dz like z, d_dense_bias (inner,), d_prediction_weight (1, inner),
    d_prediction_bias (1,)), the last three float32, summed from the kernel's per-group partials."""
    module, z2, rows, inner = _cuda_z(z)
    w = _cuda_vector("prediction_weight", prediction_weight, z, inner)
    b = _cuda_vector("dense_bias", dense_bias, z, inner)
    dev, f32 = z.device, torch.float32
    has_dloss = dloss is not None and rho.numel() > 0
    if has_dloss:
        rho = _cuda_per_row("rho", rho, z, rows, (f32,))
        coef = (dloss.to(f32) / count).reshape(1).contiguous()  # a tensor: read on the device, no sync
    else:
        rho = coef = None
    # autograd hands the logits' gradient in their dtype (z's); cast anyway, as the kernel reads z's
    dl = None if dlogits is None else _cuda_per_row("dlogits", dlogits.to(z.dtype), z, rows, (z.dtype,))
    per_group, groups = module.rtd_backward_groups(rows)
    dz = torch.empty((rows, inner), dtype=z.dtype, device=dev)
    dw_part = torch.empty((groups, inner), dtype=f32, device=dev)
    db_part = torch.empty_like(dw_part)
    dbp_part = torch.empty(groups, dtype=torch.float64, device=dev)  # float64 sums (see the .cu file)
    with torch.cuda.device(dev):
        module.rtd_backward(z2.data_ptr(), _ptr(b), _ptr(w), _ptr(dl), _ptr(rho), _ptr(coef), dz.data_ptr(),
                            dw_part.data_ptr(), db_part.data_ptr(), dbp_part.data_ptr(), rows, inner, z2.stride(0),
                            inner, per_group, cuda_support.DTYPE_CODES[z.dtype], approximate == "tanh",
                            cuda_support.stream(dev))
    return dz.view(z.shape), db_part.sum(0), dw_part.sum(0).view(1, inner), dbp_part.sum().to(f32).reshape(1)


# backend -> (forward, backward) of the head after the dense GEMM, run by the custom ops.
_HEAD = {"triton": (_triton_head, _triton_head_backward), "cuda": (_cuda_head, _cuda_head_backward)}
