"""Residual + dropout + LayerNorm over the last dim: forward and backward.

Math, per row of x, residual viewed as (rows, N), z = dropout keep mask, q = 1 / (1 - p):
    s = z * q * x + r          mean = sum(s) / N          var = sum((s - mean)^2) / N
    rstd = 1 / sqrt(var + eps)     xhat = (s - mean) * rstd     y = xhat * w + b
Backward, with g = dy * w (w = 1 without a weight):
    ds = rstd * (g - mean(g) - xhat * mean(g * xhat))     dr = ds     dx = z * q * ds
    dw = sum over rows of dy * xhat                       db = sum over rows of dy
Statistics and every accumulation are float32 whatever the input dtype; weight and bias are loaded
as float32 (they may be float32 while x is half, as under autocast); y, dx, dr are stored in x's
dtype. A constant row has var = 0 and rstd = 1 / sqrt(eps): finite, y = b.

Dropout draws the shared counter-based bits (``bertfast.kernels.rng``, stream 0, element (row, col)
of x viewed as (rows, N)); ``bertfast.ops.rng.dropout`` is the same mask in PyTorch, which the torch
backend uses, so both backends drop the same elements for the same seed.

Save little, recompute s. The forward saves only mean and rstd (float32, per row); the backward
reloads x and r and regenerates the mask. Storing s instead costs the same memory traffic
(forward +1 write of s, backward -1 or -2 reads: x, r -> s; per element, in units of one tensor:
recompute = fwd 3 (x, r, y) + bwd 4 (x, r, dy, dx), store = fwd 4 + bwd 3) and the same
activation memory (s kept alive instead of x), but it would slow the forward, which evaluation
and inference run alone; the mask costs a few integer ops per element, which the memory-bound
backward hides. So: recompute.

Grids. Forward: one program per ROWS rows, [ROWS, BLOCK_N] tiles (several rows per program at a
small hidden size, so that each program moves ~16 KB per tensor). Backward: a persistent grid
(about as many programs as fit on the card at once) in which each program walks row blocks
pid, pid + programs, ... and keeps its partial dw, db in float32 registers; it writes one row of
a (programs, N) float32 buffer each, and one small sum over programs gives dw, db: no second pass
over the rows, no atomics (bitwise repeatable).

Wide rows. BLOCK_N = next power of two >= N (masked tail) up to MAX_TILE_N; a wider row (up to
MAX_N) is walked in BLOCK_N chunks (CHUNKED): the forward merges per-chunk mean and M2 (Chan's
parallel variance, exact as a two-pass variance) and then normalizes chunk by chunk; the backward
sums its two row terms in a first walk and writes in a second (the re-reads hit L1/L2). There the
partial dw, db rows live in the (programs, N) buffer, owned by one program each (no races).
Row offsets are int64 (rows * stride can pass 2^31); column offsets and row indices int32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertfast.kernels import autotune
from bertfast.kernels.aot import TRITON_TYPE, Launch
from bertfast.kernels.rng import dropout_args, keep, stream_key

MAX_N = 65536  # the widest row the launchers take (chunked past MAX_TILE_N)
MAX_TILE_N = 8192  # the widest row held whole in registers
CHUNK_N = {"fwd": 4096, "bwd": 2048}  # the chunk of a wider row
# Under the Triton interpreter (CPU tests) a program costs per operation, not per element: tiles
# take INTERPRETER_TILE_SCALE x more rows (the same code, masks and ragged tails), and the backward
# grid is sized for INTERPRETER_SMS "SMs", so that every program walks several row blocks.
INTERPRETER_TILE_SCALE = 8
INTERPRETER_SMS = 3


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale,
              HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr):
    """s = dropout(x) + r of one [ROWS, BLOCK_N] tile, float32, 0 where masked; ``kept`` is the
    tile's keep mask (unused without DROPOUT)."""
    rows64 = offs_m.to(tl.int64)[:, None]
    s = tl.load(X + rows64 * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        s = tl.where(kept, s * drop_scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(R + rows64 * stride_r + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _param(P, offs_n, n_ok, default: tl.constexpr, HAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(1, BLOCK_N) float32 weight or bias (any float dtype), or the constant ``default``."""
    if HAS:
        return tl.load(P + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        return tl.full([1, BLOCK_N], default, tl.float32)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, MEAN, RSTD, SEED,
    stride_x, stride_r, stride_y, rows, N, eps, drop_threshold, drop_scale,
    HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHUNKED: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = LayerNorm(dropout(x) + r) * w + b for ROWS rows; mean, rstd (float32) per row."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_ok = offs_m < rows
    rows64 = offs_m.to(tl.int64)[:, None]
    key = stream_key(SEED, tl.full((), 0, tl.int32)) if DROPOUT else 0  # stream 0: x viewed as (rows, N)
    if not CHUNKED:
        offs_n = tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        mask = m_ok[:, None] & n_ok[None, :]
        kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
        s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL, DROPOUT)
        mean = tl.sum(s, 1) / N
        d = tl.where(mask, s - mean[:, None], 0.0)  # exact two-pass variance from registers
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, 1) / N + eps)
        w = _param(W, offs_n, n_ok, 1.0, HAS_WEIGHT, BLOCK_N)
        y = d * rstd[:, None] * w + _param(B, offs_n, n_ok, 0.0, HAS_BIAS, BLOCK_N)
        tl.store(Y + rows64 * stride_y + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Walk 1: per-chunk mean and M2, merged (Chan et al.): as exact as a two-pass variance.
        mean = tl.zeros([ROWS], tl.float32)
        m2 = tl.zeros([ROWS], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask = m_ok[:, None] & (offs_n < N)[None, :]
            kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
            s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL,
                          DROPOUT)
            count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            c_mean = tl.sum(s, 1) / count
            d = tl.where(mask, s - c_mean[:, None], 0.0)
            total = start + count
            delta = c_mean - mean
            mean += delta * (count / total)
            m2 += tl.sum(d * d, 1) + delta * delta * (start * (count / total))
        rstd = 1.0 / tl.sqrt_rn(m2 / N + eps)
        # Walk 2: normalize and store, chunk by chunk (the re-read hits L1/L2).
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            mask = m_ok[:, None] & n_ok[None, :]
            kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
            s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL,
                          DROPOUT)
            y = (s - mean[:, None]) * rstd[:, None] * _param(W, offs_n, n_ok, 1.0, HAS_WEIGHT, BLOCK_N) \
                + _param(B, offs_n, n_ok, 0.0, HAS_BIAS, BLOCK_N)
            tl.store(Y + rows64 * stride_y + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + offs_m, mean, mask=m_ok)
    tl.store(RSTD + offs_m, rstd, mask=m_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, R, W, MEAN, RSTD, SEED, DX, DR, DW_PART, DB_PART,
    stride_dy, stride_x, stride_r, stride_dx, stride_dr, rows, N, drop_threshold, drop_scale,
    HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, STORE_DR: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, CHUNKED: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx (and dr = ds when STORE_DR, i.e. with dropout: without, dr = dx) for the row blocks
    pid, pid + programs, ...; this program's float32 partial dw, db into row pid of DW_PART, DB_PART."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_blocks = tl.cdiv(rows, ROWS)
    key = stream_key(SEED, tl.full((), 0, tl.int32)) if DROPOUT else 0  # stream 0: x viewed as (rows, N)
    part = pid.to(tl.int64) * N
    if not CHUNKED:
        offs_n = tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        w = _param(W, offs_n, n_ok, 1.0, HAS_WEIGHT, BLOCK_N)
        dw = tl.zeros([ROWS, BLOCK_N], tl.float32)
        db = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for block in range(pid, n_blocks, n_programs):
            offs_m = block * ROWS + tl.arange(0, ROWS)
            m_ok = offs_m < rows
            mask = m_ok[:, None] & n_ok[None, :]
            rows64 = offs_m.to(tl.int64)[:, None]
            kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
            s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL,
                          DROPOUT)
            mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
            rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(DY + rows64 * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            c_xhat = tl.sum(g * xhat, 1) / N
            c_one = tl.sum(g, 1) / N
            ds = (g - (xhat * c_xhat[:, None] + c_one[:, None])) * rstd[:, None]
            if STORE_DR:
                tl.store(DR + rows64 * stride_dr + offs_n[None, :], ds.to(DR.dtype.element_ty), mask=mask)
            if DROPOUT:
                ds = tl.where(kept, ds * drop_scale, 0.0)
            tl.store(DX + rows64 * stride_dx + offs_n[None, :], ds.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
        if COMPUTE_DW:
            tl.store(DW_PART + part + offs_n, tl.sum(dw, 0), mask=n_ok)
        if COMPUTE_DB:
            tl.store(DB_PART + part + offs_n, tl.sum(db, 0), mask=n_ok)
    else:
        for block in range(pid, n_blocks, n_programs):
            offs_m = block * ROWS + tl.arange(0, ROWS)
            m_ok = offs_m < rows
            rows64 = offs_m.to(tl.int64)[:, None]
            mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
            rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
            # Walk 1: the two row terms.
            c_xhat = tl.zeros([ROWS], tl.float32)
            c_one = tl.zeros([ROWS], tl.float32)
            for start in range(0, N, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                mask = m_ok[:, None] & n_ok[None, :]
                kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
                s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL,
                              DROPOUT)
                xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
                dy = tl.load(DY + rows64 * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
                g = dy * _param(W, offs_n, n_ok, 1.0, HAS_WEIGHT, BLOCK_N)
                c_xhat += tl.sum(g * xhat, 1)
                c_one += tl.sum(g, 1)
            c_xhat = c_xhat / N
            c_one = c_one / N
            # Walk 2: the gradients; partial dw, db accumulate in this program's buffer rows.
            for start in range(0, N, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                mask = m_ok[:, None] & n_ok[None, :]
                kept = keep(key, offs_m, offs_n, drop_threshold) if DROPOUT else 0  # one draw per tile
                s = _load_sum(X, R, kept, offs_m, offs_n, mask, stride_x, stride_r, drop_scale, HAS_RESIDUAL,
                              DROPOUT)
                xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
                dy = tl.load(DY + rows64 * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
                g = dy * _param(W, offs_n, n_ok, 1.0, HAS_WEIGHT, BLOCK_N)
                ds = (g - (xhat * c_xhat[:, None] + c_one[:, None])) * rstd[:, None]
                if STORE_DR:
                    tl.store(DR + rows64 * stride_dr + offs_n[None, :], ds.to(DR.dtype.element_ty), mask=mask)
                if DROPOUT:
                    ds = tl.where(kept, ds * drop_scale, 0.0)
                tl.store(DX + rows64 * stride_dx + offs_n[None, :], ds.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    acc = tl.load(DW_PART + part + offs_n, mask=n_ok, other=0.0)
                    tl.store(DW_PART + part + offs_n, acc + tl.sum(dy * xhat, 0), mask=n_ok)
                if COMPUTE_DB:
                    acc = tl.load(DB_PART + part + offs_n, mask=n_ok, other=0.0)
                    tl.store(DB_PART + part + offs_n, acc + tl.sum(dy, 0), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    rows: int  # ROWS: rows per tile
    block_n: int  # BLOCK_N: columns per tile (the whole row, or one chunk when chunked)
    num_warps: int
    chunked: bool = False


# Elements of one [ROWS, BLOCK_N] tile, per kernel and element size: about 16 KB of a 16-bit
# tensor per forward tile (enough bytes in flight per SM with two programs resident), half that in
# the backward, which holds three more float32 tiles (g, and the dw, db accumulators).
_TILE = {("fwd", 2): 8192, ("fwd", 4): 4096, ("bwd", 2): 4096, ("bwd", 4): 2048}
ELEMENTS_PER_THREAD = 16  # float32 values of one tile per thread: num_warps = tile / (32 * 16)



def heuristic_config(kind: str, N: int, dtype: torch.dtype, interpreter: bool | None = None) -> Config:
    """The launch configuration of kernel ``kind`` ("fwd" or "bwd") for rows of N elements of
    ``dtype``: a deterministic heuristic (memory-bound kernels; no autotune). The tile covers the
    row (BLOCK_N = next power of two >= N) and as many rows as fill the tile budget; warps scale
    with the tile so that each thread holds ~16 float32 values per tensor (vectorized 16-byte
    loads of half types, no spills); rows wider than MAX_TILE_N are walked in CHUNK_N chunks.
    ``interpreter`` (default: whether TRITON_INTERPRET is set): INTERPRETER_TILE_SCALE x the rows."""
    if kind not in ("fwd", "bwd"):
        raise ValueError(f"kind: expected 'fwd' or 'bwd', got {kind!r}")
    if not 1 <= N <= MAX_N:
        raise ValueError(f"N: the layer_norm kernels take rows of 1..{MAX_N} elements, got {N}")
    size = 4 if dtype == torch.float32 else 2
    block_n = max(16, triton.next_power_of_2(N))
    chunked = block_n > MAX_TILE_N
    if chunked:
        block_n = CHUNK_N[kind]
    tile = _TILE[(kind, size)]
    if autotune.interpreting() if interpreter is None else interpreter:
        tile *= INTERPRETER_TILE_SCALE
    rows = max(1, tile // block_n)
    warps = min(16, max(2, rows * block_n // (32 * ELEMENTS_PER_THREAD)))
    return Config(rows, block_n, triton.next_power_of_2(warps), chunked)


def backward_programs(n_blocks: int, num_warps: int, device: torch.device) -> int:
    """The persistent backward grid: as many programs as are resident on the card at once (about
    16 warps per SM at ~128 registers per thread), never more than there are row blocks."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
           else INTERPRETER_SMS)
    return max(1, min(n_blocks, sms * max(1, 16 // num_warps)))


# ----------------------------------------------------------------------------------------------
# Launchers


def _rows_view(t: torch.Tensor, N: int) -> torch.Tensor:
    """(rows, N) view with a unit column stride (a copy only when the strides force one)."""
    t2 = t.reshape(-1, N)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def layer_norm_fwd(x, weight, bias, eps, residual=None, dropout_p=0.0, seed=None, config: Config | None = None):
    """y = LayerNorm(dropout(x) + residual) * weight + bias over the last dim.

    x, residual: (..., N), same dtype (float16, bfloat16, float32), any strides; weight, bias: (N,)
    or None, float32 or x's dtype; seed: int64 tensor (1,) on the device, needed when dropout_p > 0.
    Returns y (x's shape and dtype, contiguous), mean and rstd ((rows,) float32)."""
    N = x.shape[-1]
    x2 = _rows_view(x, N)
    rows = x2.shape[0]
    r2 = _rows_view(residual, N) if residual is not None else None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    c = config or heuristic_config("fwd", N, x.dtype)
    threshold, drop_scale = dropout_args(dropout_p)
    dropout = dropout_p > 0.0
    _layer_norm_fwd_kernel[(triton.cdiv(rows, c.rows),)](
        x2, r2, weight, bias, y, mean, rstd, seed if dropout else None,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, N, rows, N, float(eps), threshold, drop_scale,
        HAS_RESIDUAL=r2 is not None, DROPOUT=dropout, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        CHUNKED=c.chunked, ROWS=c.rows, BLOCK_N=c.block_n, num_warps=c.num_warps)
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, residual=None, dropout_p=0.0, seed=None, separate_dr=None,
                   need_dw=True, need_db=True, config: Config | None = None, programs: int | None = None):
    """Gradients of ``layer_norm_fwd``: (dx, dr, dw, db).

    dx: x's shape and dtype. dr: the residual's gradient (= ds) as a separate tensor only when it
    differs from dx (dropout with a residual; ``separate_dr`` overrides), else None: dr = dx.
    dw, db: (N,) float32 (None unless ``need_dw`` and a weight, ``need_db``), summed from the
    per-program partials. ``programs`` overrides the persistent grid size."""
    N = x.shape[-1]
    x2 = _rows_view(x, N)
    rows = x2.shape[0]
    r2 = _rows_view(residual, N) if residual is not None else None
    dy2 = _rows_view(dy, N)
    dropout = dropout_p > 0.0
    if separate_dr is None:
        separate_dr = dropout and residual is not None
    need_dw = need_dw and weight is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dr = torch.empty(x.shape, dtype=x.dtype, device=x.device) if separate_dr else None
    c = config or heuristic_config("bwd", N, x.dtype)
    n_blocks = triton.cdiv(rows, c.rows)
    P = programs or backward_programs(n_blocks, c.num_warps, x.device)
    # The chunked walk accumulates into its buffer rows, so they start at zero.
    alloc = torch.zeros if c.chunked else torch.empty
    dw_part = alloc((P, N), dtype=torch.float32, device=x.device) if need_dw else None
    db_part = alloc((P, N), dtype=torch.float32, device=x.device) if need_db else None
    if rows > 0:
        threshold, drop_scale = dropout_args(dropout_p)
        _layer_norm_bwd_kernel[(P,)](
            dy2, x2, r2, weight, mean, rstd, seed if dropout else None, dx, dr, dw_part, db_part,
            dy2.stride(0), x2.stride(0), r2.stride(0) if r2 is not None else 0, N, N, rows, N, threshold,
            drop_scale, HAS_RESIDUAL=r2 is not None, DROPOUT=dropout, HAS_WEIGHT=weight is not None,
            STORE_DR=separate_dr, COMPUTE_DW=need_dw, COMPUTE_DB=need_db, CHUNKED=c.chunked, ROWS=c.rows,
            BLOCK_N=c.block_n, num_warps=c.num_warps)
    elif dw_part is not None or db_part is not None:
        dw_part = dw_part.zero_() if dw_part is not None else None
        db_part = db_part.zero_() if db_part is not None else None
    dw = dw_part.sum(0) if dw_part is not None else None
    db = db_part.sum(0) if db_part is not None else None
    return dx, dr, dw, db


# ----------------------------------------------------------------------------------------------
# What the static report compiles


AOT_HIDDEN = (128, 768, 1024, 4096, 16384)  # 16384: a chunked row
_AOT_ROWS = 8 * 512


def aot_launches() -> list[Launch]:
    """Every (kernel, config, flags) the launchers pick for N in AOT_HIDDEN and float16, bfloat16,
    float32, specialized for a contiguous (4096, N) problem with dropout 0.1 when on. Forward flags:
    every combination of residual, dropout, weight+bias (both or neither); backward: the heaviest
    (residual, dropout, weight, separate dr, dw, db) and the lightest (none of them)."""
    from bertfast.kernels.rng import dropout_threshold

    launches = []
    for dtype_name, dt in TRITON_TYPE.items():
        dtype = getattr(torch, dtype_name)
        for N in AOT_HIDDEN:
            for kind in ("fwd", "bwd"):
                c = heuristic_config(kind, N, dtype, interpreter=False)
                if kind == "fwd":
                    combos = [(res, drop, aff) for res in (False, True) for drop in (False, True)
                              for aff in (False, True)]
                else:
                    combos = [(True, True, True), (False, False, False)]
                for res, drop, aff in combos:
                    common = {"SEED": "i64" if drop else None, "R": dt if res else None, "W": "fp32" if aff else None,
                              "stride_x": N, "stride_r": N if res else 0, "rows": _AOT_ROWS, "N": N,
                              "drop_threshold": dropout_threshold(0.1) if drop else 0,
                              "drop_scale": 1.0 / 0.9 if drop else 1.0, "X": dt, "MEAN": "fp32", "RSTD": "fp32"}
                    flags = tuple(name for name, on in (("residual", res), ("dropout", drop), ("affine", aff)) if on)
                    if kind == "fwd":
                        fn = _layer_norm_fwd_kernel
                        args = {**common, "B": "fp32" if aff else None, "Y": dt, "stride_y": N, "eps": 1e-12}
                        constexprs = {"HAS_RESIDUAL": res, "DROPOUT": drop, "HAS_WEIGHT": aff, "HAS_BIAS": aff}
                    else:
                        fn = _layer_norm_bwd_kernel
                        args = {**common, "DY": dt, "DX": dt, "DR": dt if res and drop else None,
                                "DW_PART": "fp32" if aff else None, "DB_PART": "fp32" if aff else None,
                                "stride_dy": N, "stride_dx": N, "stride_dr": N}
                        constexprs = {"HAS_RESIDUAL": res, "DROPOUT": drop, "HAS_WEIGHT": aff,
                                      "STORE_DR": res and drop, "COMPUTE_DW": aff, "COMPUTE_DB": aff}
                    constexprs.update(CHUNKED=c.chunked, ROWS=c.rows, BLOCK_N=c.block_n)
                    launches.append(Launch(
                        family="layer_norm", kernel=fn, dtype=dtype_name,
                        config=f"N={N} {c.rows}x{c.block_n}{' chunked' if c.chunked else ''} w{c.num_warps}",
                        args=args, constexprs=constexprs, num_warps=c.num_warps, num_stages=1, flags=flags))
    return launches
