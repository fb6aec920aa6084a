"""LayerNorm over the last dim, with an optional dropout on the input and a residual add.

    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias,   s = dropout(x, p) + residual

This is the "dense -> dropout -> add residual -> LayerNorm" tail of every BERT sub-layer.

Dropout draws the counter-based bits shared by every backend (``bertfast.ops.rng.dropout``: stream 0,
x viewed as (rows, N)), so a seed drops the same elements on every backend, and a backward
regenerates the mask instead of storing it.

The GPU backends run through the ``torch.library`` custom op ``bertfast::layer_norm_forward`` with
its backward ``bertfast::layer_norm_backward`` and fake implementations, so ``torch.compile``
traces through them; the torch backend runs as plain autograd ops when chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks, cuda_support, rng, triton_support
from bertfast.ops.dispatch import Op

OP = Op("layer_norm")

# The widest row the Triton kernels take (bertfast.kernels.layer_norm.MAX_N; rows past 8192 are
# walked in chunks).
TRITON_MAX_HIDDEN = 65536
# The widest row the CUDA kernels take (rows live in registers; csrc/cuda/layer_norm.h kLayerNormMaxN).
CUDA_MAX_HIDDEN = 8192


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual) over the last dim.

    Args:
        x: (..., N) input (the branch output when ``residual`` is given).
        weight, bias: (N,) affine parameters, or None for no scale / no shift.
        eps: added to the variance.
        residual: (..., N) added after dropout, same shape/device as ``x`` and the same dtype
            (under autocast it may differ: both are promoted to the wider dtype); or None.
        dropout_p: dropout on ``x`` before the add (pass 0.0 in eval mode).
        seed: dropout seed (int or int64 tensor of one element); default: drawn from torch's
            generator when ``dropout_p > 0``, so ``torch.manual_seed`` makes runs repeatable.
        backend: force a backend; see ``bertfast.ops.dispatch``.

    Returns:
        (..., N) in the dtype of ``x`` (the wider of ``x`` and ``residual`` under autocast).
    """
    name = OP.name
    checks.tensor(name, "x", x, kind="float")
    if x.dim() == 0:
        raise ValueError(f"{name}: `x` must have at least one dim, got a scalar")
    n = x.shape[-1]
    checks.nonempty(name, "x", x, (-1,), "the normalized (last) dim")
    for arg, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            checks.tensor(name, arg, p, ndim=1, kind="float")
            checks.shape(name, arg, p, (n,), "(x.shape[-1],)")
            checks.same_device(name, arg, p, "x", x)
    if weight is not None and bias is not None:
        checks.same_dtype(name, "bias", bias, "weight", weight)
    if residual is not None:
        checks.tensor(name, "residual", residual, kind="float")
        checks.shape(name, "residual", residual, tuple(x.shape), "the shape of x")
        checks.same_dtype_unless_autocast(name, "residual", residual, "x", x)
        checks.same_device(name, "residual", residual, "x", x)
        if residual.dtype != x.dtype:
            # Under autocast a half branch output meets a float32 residual (the embeddings' output):
            # add them in the wider dtype, as transformers' `hidden + input_tensor` promotes.
            common = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(common), residual.to(common)
    checks.probability(name, "dropout_p", dropout_p)
    if not float(eps) > 0:
        raise ValueError(f"{name}: `eps` must be positive, got {eps}")
    if dropout_p > 0:
        seed_tensor = rng.seed_tensor(name, seed, x.device)
    else:  # no dropout, no draw; a malformed seed is still an error (metadata only, no copy)
        seed_tensor = None
        if seed is not None:
            rng.seed_tensor(name, seed, torch.device("meta"))

    param = weight if weight is not None else bias
    facts = {"device": x.device.type, "dtype": x.dtype, "hidden": n, "residual": residual is not None,
             "param_dtype": None if param is None else param.dtype, "rows": x.numel() // n}
    chosen = OP.select(backend, facts).name
    if chosen == "torch":
        # Plain PyTorch ops under autograd (what transformers runs; torch.compile traces them
        # directly). The custom op below serves the kernels.
        y, _, _ = OP.backends["torch"].impl(x, weight, bias, float(eps), residual, float(dropout_p), seed_tensor)
        return y
    y, _, _ = layer_norm_forward(x, weight, bias, residual, seed_tensor, float(eps), float(dropout_p), chosen)
    return y


# ------------------------------------------------------------------------------------------------
# The custom ops: the backend name travels as an argument, chosen before tracing reaches them.


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """mean and rstd: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _empty(x: torch.Tensor) -> torch.Tensor:
    """The (0,) stand-in for a gradient the backward op does not compute (one per output: the
    outputs of a custom op may not alias each other)."""
    return x.new_empty((0,))


def _separate_dr(residual: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether the residual's gradient differs from x's: only with dropout (else both are ds)."""
    return residual is not None and dropout_p > 0.0


@torch.library.custom_op("bertfast::layer_norm_forward", mutates_args=())
def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       residual: torch.Tensor | None, seed: torch.Tensor | None, eps: float, dropout_p: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y like x, contiguous; mean, rstd (rows,) float32 (float64 for float64 x)) for the backward."""
    return OP.backends[backend].impl(x, weight, bias, eps, residual, dropout_p, seed, need_stats=True)


@layer_norm_forward.register_fake
def _(x, weight, bias, residual, seed, eps, dropout_p, backend):
    stats = x.new_empty((_rows(x),), dtype=_stats_dtype(x))
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("bertfast::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, seed: torch.Tensor | None, mean: torch.Tensor,
                        rstd: torch.Tensor, dropout_p: float, need_dw: bool, need_db: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dr, dw, db). A custom op cannot return None, so a gradient that is not computed is an
    empty (0,) tensor: dr unless it differs from dx (``_separate_dr``), dw / db unless asked."""
    dx, dr, dw, db = _BACKWARD[backend](dy, x, weight, residual, seed, mean, rstd, dropout_p, need_dw, need_db)
    return (dx, _empty(x) if dr is None else dr, _empty(x) if dw is None else dw.to(weight.dtype),
            _empty(x) if db is None else db.to(bias.dtype))


@layer_norm_backward.register_fake
def _(dy, x, weight, bias, residual, seed, mean, rstd, dropout_p, need_dw, need_db, backend):
    return (x.new_empty(x.shape), x.new_empty(x.shape) if _separate_dr(residual, dropout_p) else _empty(x),
            weight.new_empty(weight.shape) if need_dw else _empty(x),
            bias.new_empty(bias.shape) if need_db else _empty(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, seed, _eps, dropout_p, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, residual, seed, mean, rstd)
    ctx.args = (dropout_p, backend)


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, residual, seed, mean, rstd = ctx.saved_tensors
    dropout_p, backend = ctx.args
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    need_dw, need_db = need_w and weight is not None, need_b and bias is not None
    dx, dr, dw, db = layer_norm_backward(dy, x, weight, bias, residual, seed, mean, rstd, dropout_p, need_dw,
                                         need_db, backend)
    if need_r and not _separate_dr(residual, dropout_p):
        dr = dx  # without dropout, d/dx = d/dresidual = ds
    return (dx if need_x else None, dw if need_dw else None, db if need_db else None, dr if need_r else None,
            None, None, None, None)


layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# torch backend: the reference, any dtype (float64 too) on any device


def _sum(x, residual, dropout_p, seed):
    """s = dropout(x) + residual in x's dtype (as transformers adds them)."""
    if dropout_p > 0.0:
        x = rng.dropout(x, seed, dropout_p)
    return x if residual is None else x + residual


@OP.register("torch")
def layer_norm_torch(x, weight, bias, eps, residual, dropout_p, seed, need_stats=False):
    """The reference: the same calls as transformers' BertSelfOutput / BertOutput tail, with the
    shared counter-based dropout mask. Returns (y, mean, rstd); mean and rstd ((rows,), float32 or
    float64) only with ``need_stats``, else None."""
    s = _sum(x, residual, dropout_p, seed)
    # Half inputs with float32 parameters (autocast-style mixes) normalize in the parameters' dtype.
    dtype = s.dtype
    param = weight if weight is not None else bias
    if param is not None and param.dtype != dtype:
        s = s.to(param.dtype)
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps).to(dtype)
    if not need_stats:
        return y, None, None
    var, mean = torch.var_mean(s.detach().to(_stats_dtype(x)).reshape(-1, s.shape[-1]), dim=-1, correction=0)
    return y, mean, torch.rsqrt(var + eps)


def layer_norm_torch_backward(dy, x, weight, residual, seed, mean, rstd, dropout_p, need_dw, need_db):
    """The backward of ``layer_norm_torch`` written out with the kernels' formulas (for the custom op):
    xhat = (s - mean) rstd, g = dy w, ds = rstd (g - mean(g) - xhat mean(g xhat)), dr = ds,
    dx = dropout(ds), dw = sum_rows dy xhat, db = sum_rows dy. s is recomputed, the mask regenerated.
    Returns (dx, dr or None when dr = dx, dw or None, db or None); dw, db in the statistics' dtype."""
    n = x.shape[-1]
    compute = mean.dtype
    s = _sum(x, residual, dropout_p, seed).to(compute).reshape(-1, n)
    xhat = (s - mean[:, None]) * rstd[:, None]
    dy2 = dy.reshape(-1, n).to(compute)
    g = dy2 * weight.to(compute) if weight is not None else dy2
    ds = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    dr = ds.to(x.dtype).view(x.shape) if _separate_dr(residual, dropout_p) else None
    dx = (rng.dropout(ds, seed, dropout_p) if dropout_p > 0.0 else ds).to(x.dtype).view(x.shape)
    dw = (dy2 * xhat).sum(0) if need_dw else None
    db = dy2.sum(0) if need_db else None
    return dx, dr, dw, db


# ------------------------------------------------------------------------------------------------
# triton backend




def _triton_refusal(facts) -> str | None:
    reason = triton_support.refusal(facts)
    if reason is not None:
        return reason
    if facts["param_dtype"] not in (None, *triton_support.KERNEL_DTYPES):
        return f"weight and bias must be float16, bfloat16 or float32 (got {facts['param_dtype']})"
    if facts["hidden"] > TRITON_MAX_HIDDEN:
        return f"the normalized dim must be at most {TRITON_MAX_HIDDEN} (got {facts['hidden']})"
    if facts["rows"] >= 2**31:
        return f"at most 2^31 - 1 rows (got {facts['rows']})"
    return None


@OP.register("triton", refuse=_triton_refusal)
def layer_norm_triton(x, weight, bias, eps, residual, dropout_p, seed, need_stats=True):
    from bertfast.kernels.layer_norm import layer_norm_fwd

    return layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed)


def layer_norm_triton_backward(dy, x, weight, residual, seed, mean, rstd, dropout_p, need_dw, need_db):
    from bertfast.kernels.layer_norm import layer_norm_bwd

    return layer_norm_bwd(dy, x, weight, mean, rstd, residual, dropout_p, seed, need_dw=need_dw, need_db=need_db)


# ------------------------------------------------------------------------------------------------
# cuda backend: csrc/cuda/layer_norm.cu through bertfast._cuda (raw pointers + the current stream)


def _cuda_refusal(facts) -> str | None:
    reason = cuda_support.refusal(facts)
    if reason is not None:
        return reason
    if facts["param_dtype"] not in (None, *cuda_support.KERNEL_DTYPES):
        return f"weight and bias must be float16, bfloat16 or float32 (got {facts['param_dtype']})"
    if facts["hidden"] > CUDA_MAX_HIDDEN:
        return (f"the normalized dim must be at most {CUDA_MAX_HIDDEN} (got {facts['hidden']}; "
                f"the triton backend takes wider rows)")
    if facts["rows"] >= 2**31:
        return f"at most 2^31 - 1 rows (got {facts['rows']})"
    return None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) view with a unit column stride, any row stride (a copy only when strides force one)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _cuda_check(x, weight, bias, residual, seed, dropout_p) -> torch.Tensor | None:
    """Validates what the kernels read (the op checked it already; direct calls are checked here) and
    returns the seed on x's device when there is dropout, else None."""
    name = OP.name
    checks.tensor(name, "x", x, kind="float")
    if not cuda_support.on_cuda(x):
        raise ValueError(f"{name}: the cuda backend needs `x` on a CUDA device, got {x.device}")
    if x.dtype not in cuda_support.KERNEL_DTYPES:
        raise TypeError(f"{name}: the cuda backend takes `x` in float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or not 1 <= x.shape[-1] <= CUDA_MAX_HIDDEN:
        raise ValueError(f"{name}: the cuda backend takes `x` with a last dim in [1, {CUDA_MAX_HIDDEN}], "
                         f"got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if x.numel() // n >= 2**31:
        raise ValueError(f"{name}: the cuda backend takes at most 2^31 - 1 rows of `x`, got {x.numel() // n}")
    for arg, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            checks.tensor(name, arg, p, ndim=1, kind="float")
            checks.shape(name, arg, p, (n,), "(x.shape[-1],)")
            checks.same_device(name, arg, p, "x", x)
    if residual is not None:
        checks.tensor(name, "residual", residual, kind="float")
        checks.shape(name, "residual", residual, tuple(x.shape), "the shape of x")
        checks.same_dtype(name, "residual", residual, "x", x)
        checks.same_device(name, "residual", residual, "x", x)
    checks.probability(name, "dropout_p", dropout_p)
    if dropout_p == 0.0:
        return None
    if not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"{name}: dropout needs `seed` as an int64 tensor of one element, got {seed!r}")
    return seed.reshape(1).to(x.device)


def _cuda_params(weight, bias, dtype):
    """(weight, bias, dtype code) as the kernels read them: contiguous, in x's dtype or float32 (a
    float32 copy of any other dtype, e.g. float64 parameters of a float32 x)."""
    param = weight if weight is not None else bias
    if param is None:
        return None, None, cuda_support.DTYPE_CODES[dtype]
    pdtype = param.dtype if param.dtype in (dtype, torch.float32) else torch.float32
    weight, bias = (None if p is None else p.to(pdtype).contiguous() for p in (weight, bias))
    return weight, bias, cuda_support.DTYPE_CODES[pdtype]


@OP.register("cuda", refuse=_cuda_refusal)
def layer_norm_cuda(x, weight, bias, eps, residual, dropout_p, seed, need_stats=True):
    """The CUDA kernels: x, residual (..., N) with N <= CUDA_MAX_HIDDEN, any strides (rows are read in
    place when the last dim is unit-stride); weight, bias (N,) or None. Returns y (x's shape and dtype,
    contiguous), mean and rstd ((rows,) float32), as the triton backend does."""
    seed = _cuda_check(x, weight, bias, residual, seed, dropout_p)
    if not float(eps) > 0:
        raise ValueError(f"{OP.name}: `eps` must be positive, got {eps}")
    n = x.shape[-1]
    x2 = _cuda_rows(x, n)  # (rows, N)
    rows = x2.shape[0]
    r2 = None if residual is None else _cuda_rows(residual, n)
    w, b, param_code = _cuda_params(weight, bias, x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    with torch.cuda.device(x.device):
        cuda_support.module().layer_norm_forward(
            x2.data_ptr(), _ptr(r2), _ptr(w), _ptr(b), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(seed),
            rows, n, x2.stride(0), 0 if r2 is None else r2.stride(0), cuda_support.DTYPE_CODES[x.dtype], param_code,
            float(eps), rng.dropout_threshold(dropout_p) if seed is not None else 0,
            rng.dropout_scale(dropout_p), cuda_support.stream(x.device))
    return y, mean, rstd


def layer_norm_cuda_backward(dy, x, weight, residual, seed, mean, rstd, dropout_p, need_dw, need_db):
    """Gradients of ``layer_norm_cuda``: (dx, dr or None when dr = dx, dw or None, db or None); dw, db
    (N,) float32, the column sums of the kernel's per-block partial sums (a (blocks, N) buffer)."""
    name = OP.name
    seed = _cuda_check(x, weight, None, residual, seed, dropout_p)
    n = x.shape[-1]
    checks.tensor(name, "dy", dy, kind="float")
    checks.shape(name, "dy", dy, tuple(x.shape), "the shape of x")
    checks.same_device(name, "dy", dy, "x", x)
    x2 = _cuda_rows(x, n)  # (rows, N)
    rows = x2.shape[0]
    for arg, t in (("mean", mean), ("rstd", rstd)):
        checks.tensor(name, arg, t, ndim=1, kind="float")
        checks.shape(name, arg, t, (rows,), "(rows,)")
        checks.same_device(name, arg, t, "x", x)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    dy2 = _cuda_rows(dy.to(x.dtype), n)
    r2 = None if residual is None else _cuda_rows(residual, n)
    need_dw = need_dw and weight is not None
    w, _, param_code = _cuda_params(weight, None, x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dr = torch.empty(x.shape, dtype=x.dtype, device=x.device) if _separate_dr(residual, dropout_p) else None
    if rows == 0:
        zeros = lambda: x.new_zeros((n,), dtype=torch.float32)  # noqa: E731
        return dx, dr, zeros() if need_dw else None, zeros() if need_db else None
    # The kernel launches at most one block per 1-8 rows and at most 8 resident blocks per SM.
    part_rows = min(rows, 8 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    dw_part = torch.empty((part_rows, n), dtype=torch.float32, device=x.device) if need_dw else None
    db_part = torch.empty((part_rows, n), dtype=torch.float32, device=x.device) if need_db else None
    with torch.cuda.device(x.device):
        blocks = cuda_support.module().layer_norm_backward(
            dy2.data_ptr(), x2.data_ptr(), _ptr(r2), _ptr(w), mean.data_ptr(), rstd.data_ptr(), _ptr(seed),
            dx.data_ptr(), _ptr(dr), _ptr(dw_part), _ptr(db_part), part_rows, rows, n, dy2.stride(0), x2.stride(0),
            0 if r2 is None else r2.stride(0), cuda_support.DTYPE_CODES[x.dtype], param_code,
            rng.dropout_threshold(dropout_p) if seed is not None else 0, rng.dropout_scale(dropout_p),
            cuda_support.stream(x.device))
    dw = dw_part[:blocks].sum(0) if need_dw else None
    db = db_part[:blocks].sum(0) if need_db else None
    return dx, dr, dw, db


# Each backend's backward, beside its forward registered in OP.
_BACKWARD = {"torch": layer_norm_torch_backward, "triton": layer_norm_triton_backward,
             "cuda": layer_norm_cuda_backward}
