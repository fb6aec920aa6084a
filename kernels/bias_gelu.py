"""Bias + GELU, forward and backward, elementwise over a (rows, N) matrix.

    z = x + b        y = gelu(z)        dx = dy * gelu'(z)        db = sum over rows of dx
    erf form:   gelu(z) = z Phi(z) = 0.5 z (1 + erf(z / sqrt 2))      gelu'(z) = Phi(z) + z phi(z)
    tanh form:  gelu(z) = 0.5 z (1 + tanh(u)),  u = sqrt(2/pi) (z + 0.044715 z^3)
                0.5 (1 + tanh(u)) = s = sigmoid(2u), so gelu(z) = z s and
                gelu'(z) = s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
The tanh form is evaluated through exp(-2|u|) <= 1: no overflow, and no 1 + tanh cancellation.

Precision: x, b and dy are read in their own dtypes (b may be float32 while x is half: autocast
keeps parameters in float32), every computation is float32, y and dx are cast to x's dtype at the
store. The backward's programs each walk a group of row tiles and write the float32 column sums of
their dx to one row of a small (groups, N) buffer, so db needs no second pass over dx: the launcher
sums that buffer (a few dozen rows) with torch.

Layout: one program per (BLOCK_M rows) x (BLOCK_N columns) tile; rows are any stride (int64
offsets: rows x stride may pass 2^31), columns are contiguous, so loads vectorize. Ragged row and
column tails are masked; masked lanes read 0, whose dx is 0 (dy = 0), so they add nothing to db.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertfast.kernels.aot import TRITON_TYPE, Launch

# ----------------------------------------------------------------------------------------------
# GELU and its derivative on float32 blocks (shared with kernels/linear_gelu.py's epilogue)


@triton.jit
def _tanh_parts(z):
    """(s, 1 - s) with s = sigmoid(2u) = 0.5 (1 + tanh(u)), both without cancellation."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)  # sqrt(2 / pi) (z + 0.044715 z^3)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]
    r = 1.0 / (1.0 + e)
    pos = u >= 0.0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def gelu(z, TANH: tl.constexpr):
    """gelu(z) of a float32 block: erf form, or the tanh form when TANH."""
    if TANH:
        s, _ = _tanh_parts(z)
        return z * s
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # z / sqrt(2)


@triton.jit
def gelu_grad(z, TANH: tl.constexpr):
    """d gelu(z) / dz of a float32 block."""
    if TANH:
        s, one_minus_s = _tanh_parts(z)
        return s + 2.0 * z * s * one_minus_s * 0.7978845608028654 * (1.0 + 0.134145 * z * z)  # 3 * 0.044715
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327  # phi(z) = exp(-z^2 / 2) / sqrt(2 pi)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _bias_gelu_fwd_kernel(
    X, B, Y, M, N, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = gelu(x + b) on one (BLOCK_M, BLOCK_N) tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    z = tl.load(X + rows * stride_xm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows * stride_ym + offs_n[None, :], gelu(z, TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, B, DX, DSUM, M, N, stride_dym, stride_xm, stride_dxm, tiles_per_program,
    HAS_BIAS: tl.constexpr, SUM_ROWS: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = dy * gelu'(x + b) over ``tiles_per_program`` row tiles of one column tile; with
    SUM_ROWS, the float32 column sums of those dx rows go to row program_id(0) of DSUM (groups, N)."""
    group = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_BIAS:
        b = tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SUM_ROWS:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = group * tiles_per_program * BLOCK_M
    for i in range(tiles_per_program):
        offs_m = first + i * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & n_ok[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        z = tl.load(X + rows * stride_xm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b
        dy = tl.load(DY + rows * stride_dym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dy * gelu_grad(z, TANH)
        tl.store(DX + rows * stride_dxm + offs_n[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if SUM_ROWS:
            acc += dx  # masked lanes: dy = 0, so dx = 0
    if SUM_ROWS:
        tl.store(DSUM + group.to(tl.int64) * N + offs_n, tl.sum(acc, 0), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Configuration: a heuristic, no autotune (a memory-bound elementwise op; the tile only has to be
# wide enough for 16-byte loads and big enough to hide latency)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int


TILE = 4096  # elements per program: 16 per thread with 8 warps, 2 or 4 vector loads per tensor
BLOCK_NS = (32, 64, 128, 256)


def pick_config(n_cols: int) -> Config:
    """The tile for rows of ``n_cols`` columns: BLOCK_N the columns rounded up to a power of two in
    [32, 256] (wider rows take several column tiles), BLOCK_M rows to make ``TILE`` elements."""
    block_n = min(max(triton.next_power_of_2(n_cols), BLOCK_NS[0]), BLOCK_NS[-1])
    return Config(TILE // block_n, block_n, 8)


def all_configs() -> list[Config]:
    """Every config ``pick_config`` can return."""
    return [pick_config(n) for n in BLOCK_NS]


# Programs per SM the backward aims for (its programs loop over row tiles, so a few per SM hide
# latency while keeping the partial-sum buffer short).
_PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 4


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_groups(n_rows: int, n_cols: int, config: Config, sms: int) -> tuple[int, int]:
    """(groups, row tiles per group) for the backward: about ``_PROGRAMS_PER_SM`` programs per SM in
    all, never more groups than row tiles."""
    tiles = triton.cdiv(n_rows, config.block_m)
    col_tiles = triton.cdiv(n_cols, config.block_n)
    groups = max(1, min(tiles, (_PROGRAMS_PER_SM * sms) // col_tiles))
    per_group = triton.cdiv(tiles, groups)
    return triton.cdiv(tiles, per_group), per_group


# ----------------------------------------------------------------------------------------------
# Launchers


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, N) with a unit column stride: a view when the strides allow, else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
                  config: Config | None = None) -> torch.Tensor:
    """gelu(x + bias): x (..., N) float16/bfloat16/float32, bias (N,) in x's dtype or float32, or
    None. Returns a contiguous tensor of x's shape and dtype."""
    N = x.shape[-1]
    x2 = _as_rows(x)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        c = config or pick_config(N)
        grid = (triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))
        _bias_gelu_fwd_kernel[grid](x2, bias, y, M, N, x2.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                    TANH=approximate == "tanh", BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                    num_warps=c.num_warps)
    return y.view(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
                  sum_rows: bool = False, config: Config | None = None,
                  groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dsum): dx = dy * gelu'(x + bias) in x's shape and dtype (contiguous); dsum = dx summed
    over every row, float32 (N,), when ``sum_rows`` (the bias gradient), else None. ``groups``
    overrides the number of row groups (tests)."""
    N = x.shape[-1]
    x2, dy2 = _as_rows(x), _as_rows(dy)
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return dx.view(x.shape), (torch.zeros(N, dtype=torch.float32, device=x.device) if sum_rows else None)
    c = config or pick_config(N)
    n_groups, per_group = row_groups(M, N, c, _sm_count(x.device))
    if groups is not None:
        per_group = triton.cdiv(triton.cdiv(M, c.block_m), groups)
        n_groups = triton.cdiv(triton.cdiv(M, c.block_m), per_group)
    partial = torch.empty((n_groups, N), dtype=torch.float32, device=x.device) if sum_rows else None
    _bias_gelu_bwd_kernel[(n_groups, triton.cdiv(N, c.block_n))](
        dy2, x2, bias, dx, partial, M, N, dy2.stride(0), x2.stride(0), dx.stride(0), per_group,
        HAS_BIAS=bias is not None, SUM_ROWS=sum_rows, TANH=approximate == "tanh", BLOCK_M=c.block_m,
        BLOCK_N=c.block_n, num_warps=c.num_warps)
    return dx.view(x.shape), (partial.sum(0) if sum_rows else None)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report


def aot_launches() -> list[Launch]:
    """Every config ``pick_config`` can pick, per dtype, with the heaviest flags (a float32 bias, row
    sums) in both GELU forms and the lightest (no bias, no row sums) in the erf form. (Every config
    holds TILE / (32 num_warps) = 16 elements per thread, so their registers differ little: the
    heaviest is 97 per thread on sm_80/sm_90, measured with every flag set in both forms.)
    Representative problem: BERT base's FFN activation, rows = 8 x 512, N = 3072."""
    M, N = 8 * 512, 3072
    out = []
    for dtype, dt in TRITON_TYPE.items():
        for c in all_configs():
            _, per_group = row_groups(M, N, c, 132)  # an H100's SMs
            common = dict(family="bias_gelu", dtype=dtype, config=f"{c.block_m}x{c.block_n} w{c.num_warps}",
                          num_warps=c.num_warps)
            for tanh, heavy in ((False, False), (False, True), (True, True)):
                bias = "fp32" if heavy else None
                flags = ("tanh" if tanh else "erf",) + (("bias fp32",) if heavy else ())
                out.append(Launch(
                    kernel=_bias_gelu_fwd_kernel, flags=flags, **common,
                    args=dict(X=dt, B=bias, Y=dt, M=M, N=N, stride_xm=N, stride_ym=N),
                    constexprs=dict(HAS_BIAS=heavy, TANH=tanh, BLOCK_M=c.block_m, BLOCK_N=c.block_n)))
                out.append(Launch(
                    kernel=_bias_gelu_bwd_kernel, flags=flags + (("sum rows",) if heavy else ()), **common,
                    args=dict(DY=dt, X=dt, B=bias, DX=dt, DSUM="fp32" if heavy else None, M=M, N=N,
                              stride_dym=N, stride_xm=N, stride_dxm=N, tiles_per_program=per_group),
                    constexprs=dict(HAS_BIAS=heavy, SUM_ROWS=heavy, TANH=tanh, BLOCK_M=c.block_m,
                                    BLOCK_N=c.block_n)))
    return out
