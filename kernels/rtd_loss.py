"""ELECTRA replaced-token-detection head after its dense GEMM: bias + GELU + prediction dot + BCE loss.

The dense GEMM ``z = hidden @ W_dense^T`` (no bias) stays with cuBLAS. Per row r of z (B * T rows,
``inner`` columns), in float32:
    t_r      = z_r + b_dense                       a_r = gelu(t_r)     (never stored)
    x_r      = a_r . w_pred + b_pred               (the logit, stored in z's dtype)
    loss     = sum_r m_r softplus(s_r) / max(sum_r m_r, 1),   s_r = -x_r if y_r else x_r
m_r is the attention mask (1 without one). softplus(s) = max(s, 0) + log1p(exp(-|s|)) has no
cancellation, as the torch backend's form (an ELECTRA batch is mostly confident originals, x << 0).
The forward keeps only rho_r = m_r (sigmoid(x_r) - y_r) = m_r sign_r sigmoid(s_r) (float32, one per
row) for the backward, and per-program partial sums of the loss and the real-token count.

Backward, from dlogits (B, T) and/or dloss (scalar), either may be absent:
    g_r        = dlogits_r + dloss / count * rho_r
    dz_r       = g_r * w_pred * gelu'(t_r)         (stored in z's dtype; cuBLAS then gives dW, dhidden)
    dw_pred    = sum_r g_r a_r      db_pred = sum_r g_r      db_dense = sum_r dz_r   (float32)
gelu is recomputed from z. Programs tile (row group, column chunk); each row group writes float32
partial column sums and a tiny torch sum finishes them (deterministic, no atomics).

GELU: erf form  a = t Phi(t),  a' = Phi(t) + t phi(t);  tanh form  a = t sigmoid(2u),
u = sqrt(2/pi) (t + 0.044715 t^3), which is 0.5 t (1 + tanh u) without a tanh (Triton has none),
a' = s + 2 t s (1 - s) u' with s = sigmoid(2u), 1 - s = sigmoid(-2u) (no cancellation).

Row offsets are int64 (rows * row stride may pass 2^31); ragged tails are masked loads; rows of
padding contribute exactly 0 to the loss and count (tl.where, so not even NaN in a padded row of z
reaches the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from bertfast.kernels.aot import TRITON_TYPE, Launch

# constexpr: a @triton.jit function may read only constexpr globals
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _gelu(t, TANH: tl.constexpr):
    if TANH:
        u = _SQRT_2_PI * (t + _KAPPA * t * t * t)
        return t * tl.sigmoid(2.0 * u)
    else:
        return t * (0.5 + 0.5 * tl.math.erf(t * _SQRT1_2))


@triton.jit
def _gelu_and_grad(t, TANH: tl.constexpr):
    """(gelu(t), gelu'(t)), float32."""
    if TANH:
        u = _SQRT_2_PI * (t + _KAPPA * t * t * t)
        s = tl.sigmoid(2.0 * u)
        du = _SQRT_2_PI * (1.0 + 3.0 * _KAPPA * t * t)
        return t * s, s + 2.0 * t * s * tl.sigmoid(-2.0 * u) * du
    else:
        cdf = 0.5 + 0.5 * tl.math.erf(t * _SQRT1_2)
        return t * cdf, cdf + t * (_INV_SQRT_2PI * tl.exp(-0.5 * t * t))


@triton.jit
def _softplus(s):
    """log(1 + exp(s)) without cancellation: log1p(e) as log(1 + e) * e / ((1 + e) - 1) (exact to a
    few ulps in IEEE arithmetic; Triton has no log1p), e = exp(-|s|) in (0, 1]."""
    e = tl.exp(-tl.abs(s))
    u = 1.0 + e
    d = u - 1.0  # 0 where e < eps / 2: then log1p(e) = e to round-off
    log1p_e = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(s, 0.0) + log1p_e


@triton.jit
def _rtd_fwd_kernel(
    Z, DENSE_BIAS, PRED_W, PRED_B, LABELS, MASK, LOGITS, RHO, LOSS_PART, COUNT_PART,
    rows, inner, stride_z,
    HAS_DENSE_BIAS: tl.constexpr, HAS_PRED_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per BLOCK_M rows: logits, rho and the program's loss / count partial sums."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    z_rows = Z + offs_m.to(tl.int64)[:, None] * stride_z
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # reduced once, after the column loop
    for start in range(0, inner, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < inner
        t = tl.load(z_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DENSE_BIAS:
            t += tl.load(DENSE_BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(PRED_W + cols, mask=col_ok, other=0.0).to(tl.float32)  # 0 past inner: no term
        acc += _gelu(t, TANH) * w[None, :]
    x = tl.sum(acc, 1)
    if HAS_PRED_BIAS:
        x += tl.load(PRED_B).to(tl.float32)
    tl.store(LOGITS + offs_m, x.to(LOGITS.dtype.element_ty), mask=row_ok)
    if HAS_LABELS:
        replaced = tl.load(LABELS + offs_m, mask=row_ok, other=0) != 0
        real = row_ok
        if HAS_MASK:
            real = real & (tl.load(MASK + offs_m, mask=row_ok, other=0) != 0)
        # From the float32 logit, not the stored (rounded) one.
        s = tl.where(replaced, -x, x)
        tl.store(LOSS_PART + pid, tl.sum(tl.where(real, _softplus(s), 0.0), 0))
        tl.store(COUNT_PART + pid, tl.sum(real.to(tl.float32), 0))
        # d softplus(s)/dx = sign * sigmoid(s) = sigmoid(x) - y, without 1 - sigmoid cancellation
        rho = tl.where(replaced, -1.0, 1.0) * tl.sigmoid(s)
        tl.store(RHO + offs_m, tl.where(real, rho, 0.0), mask=row_ok)


@triton.jit
def _rtd_bwd_kernel(
    Z, DENSE_BIAS, PRED_W, DLOGITS, RHO, COEF, DZ, DW_PART, DB_PART, DBP_PART,
    rows, inner, stride_z, stride_dz, rows_per_program,
    HAS_DENSE_BIAS: tl.constexpr, HAS_DLOGITS: tl.constexpr, HAS_DLOSS: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row group, column chunk): dz of its tile rows, and the group's float32 partial
    column sums of dw_pred and db_dense; column chunk 0 also sums g for db_pred."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inner
    w = tl.load(PRED_W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_DENSE_BIAS:
        b = tl.load(DENSE_BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_DLOSS:
        coef = tl.load(COEF)  # dloss / count, float32
    first = group * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    dbp = tl.zeros([BLOCK_M], tl.float32)
    for start in range(first, last, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < last
        rows64 = offs_m.to(tl.int64)
        g = tl.zeros([BLOCK_M], tl.float32)  # 0 on rows past the group: they add nothing below
        if HAS_DLOGITS:
            g += tl.load(DLOGITS + rows64, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_DLOSS:
            g += coef * tl.load(RHO + offs_m, mask=row_ok, other=0.0)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        t = tl.load(Z + rows64[:, None] * stride_z + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_DENSE_BIAS:
            t += b[None, :]
        a, da = _gelu_and_grad(t, TANH)
        dz = g[:, None] * w[None, :] * da
        tl.store(DZ + rows64[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty), mask=tile_ok)
        dw += tl.sum(g[:, None] * a, 0)
        db += tl.sum(dz, 0)  # float32 dz, before the rounding of the store
        dbp += g
    part = group.to(tl.int64) * inner
    tl.store(DW_PART + part + cols, dw, mask=col_ok)
    tl.store(DB_PART + part + cols, db, mask=col_ok)
    if chunk == 0:
        tl.store(DBP_PART + group, tl.sum(dbp, 0))


# ----------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int


def config_for(inner: int) -> Config:
    """Tiles of 2048 elements (16 float32 per thread at 4 warps) walking the row in 256-column
    chunks: wide rows (hidden 4096) loop instead of holding the row in registers. Narrow rows
    take more rows per tile. The same config serves forward and backward and every dtype (the
    static report compiles each, no spills)."""
    if inner <= 64:
        return Config(32, 64, 4)
    if inner <= 128:
        return Config(16, 128, 4)
    return Config(8, 256, 4)


# Most row groups of the backward: its float32 partial sums are (groups, inner), at most
# 256 x 4096 x 4 B = 4 MB each, and 256 groups x column chunks fill any card.
MAX_ROW_GROUPS = 256


def row_groups(rows: int, block_m: int, max_groups: int | None = None) -> tuple[int, int]:
    """(rows per program, a multiple of block_m; number of row groups)."""
    max_groups = MAX_ROW_GROUPS if max_groups is None else max_groups
    blocks = triton.cdiv(rows, block_m)
    per_program = block_m * triton.cdiv(blocks, max_groups)
    return per_program, triton.cdiv(rows, per_program)


# ----------------------------------------------------------------------------------------------
# Launchers


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B * T,) with a unit stride; bool as uint8 (Triton has no bool pointers)."""
    flat = t.reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.contiguous()
    return flat.view(torch.uint8) if flat.dtype == torch.bool else flat


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def rtd_head_fwd(z, dense_bias, prediction_weight, prediction_bias, labels=None, attention_mask=None,
                 approximate="none", config: Config | None = None):
    """Forward of the head on z = hidden @ W_dense^T.

    Args:
        z: (B, T, inner) (any leading shape), unit last stride; float16, bfloat16 or float32.
        dense_bias: (inner,) or None; prediction_weight: (1, inner); prediction_bias: (1,) or None.
        labels: (B, T) int or bool (nonzero = replaced) or None; attention_mask: (B, T) bool or None.

    Returns:
        logits (B, T) in z's dtype; loss () float32 (0 without labels); count () float32, the
        real tokens clamped to >= 1; rho (B * T,) float32 = mask * (sigmoid(logit) - label), or
        an empty tensor without labels.
    """
    inner = z.shape[-1]
    z2 = z.reshape(-1, inner)
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    rows = z2.shape[0]
    c = config or config_for(inner)
    n_prog = triton.cdiv(rows, c.block_m)
    dev = z.device
    logits = torch.empty(z.shape[:-1], dtype=z.dtype, device=dev)
    has_labels = labels is not None
    f32 = torch.float32
    rho = torch.empty(rows if has_labels else 0, dtype=f32, device=dev)
    loss_part = torch.empty(n_prog if has_labels else 0, dtype=f32, device=dev)
    count_part = torch.empty_like(loss_part)
    labels_flat = _rows_view(labels) if has_labels else None
    mask_flat = _rows_view(attention_mask) if has_labels and attention_mask is not None else None
    _rtd_fwd_kernel[(n_prog,)](
        z2, _vector(dense_bias), _vector(prediction_weight), _vector(prediction_bias), labels_flat, mask_flat,
        logits, rho, loss_part, count_part, rows, inner, z2.stride(0),
        HAS_DENSE_BIAS=dense_bias is not None, HAS_PRED_BIAS=prediction_bias is not None, HAS_LABELS=has_labels,
        HAS_MASK=mask_flat is not None, TANH=approximate == "tanh", BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        num_warps=c.num_warps)
    if not has_labels:
        zero = torch.zeros((), dtype=f32, device=dev)
        return logits, zero, zero.clone(), rho
    # max(count, 1): a batch of only padding has loss 0 (its partial sums are 0), not 0/0
    count = count_part.sum().clamp(min=1.0)
    return logits, loss_part.sum() / count, count, rho


def rtd_head_bwd(dlogits, dloss, z, dense_bias, prediction_weight, rho, count, approximate="none",
                 config: Config | None = None, max_groups: int | None = None):
    """Backward of ``rtd_head_fwd``: (dz like z, d_dense_bias (inner,), d_prediction_weight (1, inner),
    d_prediction_bias (1,)), the last three float32. ``dlogits`` (B, T) or None; ``dloss`` a scalar
    tensor or None (ignored when ``rho`` is empty: no labels)."""
    inner = z.shape[-1]
    z2 = z.reshape(-1, inner)
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    rows = z2.shape[0]
    c = config or config_for(inner)
    per_program, groups = row_groups(rows, c.block_m, max_groups)
    dev = z.device
    f32 = torch.float32
    has_dloss = dloss is not None and rho.numel() > 0
    coef = (dloss.to(f32) / count).reshape(1) if has_dloss else None  # tensors: no sync
    dl = _rows_view(dlogits) if dlogits is not None else None
    dz = torch.empty((rows, inner), dtype=z.dtype, device=dev)
    dw_part = torch.empty((groups, inner), dtype=f32, device=dev)
    db_part = torch.empty_like(dw_part)
    dbp_part = torch.empty(groups, dtype=f32, device=dev)
    _rtd_bwd_kernel[(groups, triton.cdiv(inner, c.block_n))](
        z2, _vector(dense_bias), _vector(prediction_weight), dl, rho if has_dloss else None, coef, dz, dw_part,
        db_part, dbp_part, rows, inner, z2.stride(0), dz.stride(0), per_program,
        HAS_DENSE_BIAS=dense_bias is not None, HAS_DLOGITS=dl is not None, HAS_DLOSS=has_dloss,
        TANH=approximate == "tanh", BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps)
    return dz.view(z.shape), db_part.sum(0), dw_part.sum(0).view(1, inner), dbp_part.sum().reshape(1)


# ----------------------------------------------------------------------------------------------
# Static report


def aot_launches() -> list[Launch]:
    """Every config ``config_for`` picks, in each dtype, for hidden 256 / 768 / 1024 / 4096 with the
    flag sets training runs (labels + mask, labels only, logits only; erf and tanh GELU; backward
    from the loss and the logits, the loss only, the logits only), plus hidden 64 and 96 (the
    narrow tiles) and 1000 (no divisibility hint: scalar masked loads) with the heaviest flags. The
    problem is 8 x 512 rows, the ELECTRA discriminator head (inner = hidden)."""
    rows = 8 * 512
    launches = []
    fwd_flags = [  # (labels, mask, tanh)
        (True, True, False), (True, True, True), (True, False, False), (False, False, False)]
    bwd_flags = [  # (dlogits, dloss, tanh)
        (True, True, False), (True, True, True), (False, True, False), (True, False, False)]
    for inner in (64, 96, 256, 768, 1000, 1024, 4096):
        c = config_for(inner)
        per_program, _ = row_groups(rows, c.block_m)
        heaviest_only = inner in (64, 96, 1000)
        for dtype, ty in TRITON_TYPE.items():
            config = f"inner={inner} BLOCK_M={c.block_m} BLOCK_N={c.block_n} warps={c.num_warps}"
            for labels, mask, tanh in fwd_flags[:1] if heaviest_only else fwd_flags:
                flags = ("HAS_LABELS",) * labels + ("HAS_MASK",) * mask + ("TANH",) * tanh
                launches.append(Launch(
                    "rtd_loss", _rtd_fwd_kernel, dtype, config,
                    args={"Z": ty, "DENSE_BIAS": ty, "PRED_W": ty, "PRED_B": ty, "LABELS": "i64" if labels else None,
                              "MASK": "u8" if mask else None, "LOGITS": ty, "RHO": "fp32", "LOSS_PART": "fp32",
                              "COUNT_PART": "fp32", "rows": rows, "inner": inner, "stride_z": inner},
                    constexprs={"HAS_DENSE_BIAS": True, "HAS_PRED_BIAS": True, "HAS_LABELS": labels, "HAS_MASK": mask,
                                    "TANH": tanh, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                    num_warps=c.num_warps, flags=flags))
            for dlogits, dloss, tanh in bwd_flags[:1] if heaviest_only else bwd_flags:
                flags = ("HAS_DLOGITS",) * dlogits + ("HAS_DLOSS",) * dloss + ("TANH",) * tanh
                launches.append(Launch(
                    "rtd_loss", _rtd_bwd_kernel, dtype, config,
                    args={"Z": ty, "DENSE_BIAS": ty, "PRED_W": ty, "DLOGITS": ty if dlogits else None,
                              "RHO": "fp32" if dloss else None, "COEF": "fp32" if dloss else None, "DZ": ty,
                              "DW_PART": "fp32", "DB_PART": "fp32", "DBP_PART": "fp32", "rows": rows, "inner": inner,
                              "stride_z": inner, "stride_dz": inner, "rows_per_program": per_program},
                    constexprs={"HAS_DENSE_BIAS": True, "HAS_DLOGITS": dlogits, "HAS_DLOSS": dloss, "TANH": tanh,
                                    "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                    num_warps=c.num_warps, flags=flags))
    return launches
