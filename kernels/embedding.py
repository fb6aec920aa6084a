"""Fused token embeddings: gather, LayerNorm, dropout and the optional E -> H projection.

Math, for token m (flattened batch * T + t) and embedding column j < E:
    x_m = (W_word[id_m] + W_type[type_m]) + W_pos[pos_m]      (or inputs_embeds_m for W_word[id_m])
    mu_m = mean_j x_mj       rstd_m = 1 / sqrt(var_j x_mj + eps)       xhat = (x - mu) * rstd
    e_mj = z_mj / (1 - p) * (xhat_mj * w_j + b_j)              z = dropout keep bit of (m, j)
    out_m = e_m @ P^T + p_bias   (ALBERT / ELECTRA factorized embedding)   or   out_m = e_m
Backward, with g = d out / d e (dy @ P with projection, else dy) and g' = z / (1 - p) * g:
    dP = dy^T e    dp_bias = sum_m dy_m    dw = sum_m g' xhat    db = sum_m g'
    dx = rstd * (g' w - mean_j(g' w) - xhat * mean_j(g' w xhat))
    dW_word[id] += dx, dW_pos[pos] += dx, dW_type[type] += dx  (rows at the padding indices: none)

Forward: one program per (BLOCK_M tokens, group of BLOCK_N output columns). It gathers the three
rows of its tokens (ids read once per tile, int64 row offsets), sums them in float32 in the torch
backend's order, normalizes in float32 (E padded to a power of two with masks), drops with the
shared RNG (``bertfast.kernels.rng``, stream 0, element (token, j)), and with a projection
multiplies the [BLOCK_M, E] tile, still in registers, by [E, BLOCK_N] tiles of P^T: the (tokens, E)
activation never reaches memory; only the output and the per-token mean and rstd (float32) do.
Column groups exist only to fill the GPU when there are few token blocks; each group recomputes
the (cheap, L2-resident) gather.

Backward, in up to three kernels:
  * ``_emb_bwd_kernel``, one program per token block: recomputes xhat (from ids, tables, mean,
    rstd; z from the seed), forms g (dy @ P in BLOCK_N chunks with a projection), the LayerNorm
    backward, and per-program float32 partials of dw, db and the token-type rows (tiny table:
    masked sums per type, no atomics); then the word and position rows of dx go out either by
    float32 atomics into (rows, E) buffers (default), or into a (tokens, E) float32 buffer.
  * ``_emb_bwd_proj_kernel`` (projection only), one program per (BLOCK_N rows of P, token split):
    recomputes e tile by tile and accumulates dP = dy^T e and dp_bias in registers, writing one
    float32 partial per split. dP needs a reduction over every token, dx one over H: one kernel
    cannot own both without atomics on a (H, E) accumulator, so the GEMM-shaped dP has its own.
  * ``_segment_sum_kernel`` (``deterministic=True``): the token ids of a table are sorted once by
    torch (stable), and the program at the first position of each run of equal ids adds that
    run's dx rows, BLOCK_Q sorted rows at a time, in sorted order. Every gradient row is written
    by one program in a fixed order, so results are bitwise repeatable; no atomics anywhere.
Partials are reduced by ``torch.sum`` over a fixed axis, so they are repeatable too.

Precision: gathers, statistics and accumulators in float32; the dot operands in the output dtype
(float16/bfloat16 tensor cores; float32 uses full-precision "ieee" products, as torch's matmul).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from bertfast.kernels.aot import TRITON_TYPE, Launch
from bertfast.kernels.rng import dropout_args, dropout_threshold, keep, stream_key

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _ids(IDS, stride_b, stride_t, b, t, ok):
    """(BLOCK_M,) int64 ids of tokens (b, t); a (1, T) id tensor has stride_b = 0."""
    return tl.load(IDS + b * stride_b + t * stride_t, mask=ok, other=0).to(tl.int64)


@triton.jit
def _embedding_sum(IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE,
                   stride_ib, stride_it, stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et,
                   stride_word, stride_pos, stride_type, offs_m, m_ok, cols, col_ok, T, HAS_IDS: tl.constexpr):
    """x = (word + type) + position rows of tokens ``offs_m`` in float32 (0 outside the tile),
    and the (word, position, type) ids; word ids are -1 with inputs_embeds."""
    b = (offs_m // T).to(tl.int64)
    t = (offs_m % T).to(tl.int64)
    mask = m_ok[:, None] & col_ok[None, :]
    pos = _ids(POS_IDS, stride_pb, stride_pt, b, t, m_ok)
    typ = _ids(TYPE_IDS, stride_tb, stride_tt, b, t, m_ok)
    if HAS_IDS:
        word = _ids(IDS, stride_ib, stride_it, b, t, m_ok)
        w = tl.load(WORD + word[:, None] * stride_word + cols[None, :], mask=mask, other=0.0)
    else:
        word = pos * 0 - 1
        w = tl.load(EMBEDS + b[:, None] * stride_eb + t[:, None] * stride_et + cols[None, :], mask=mask, other=0.0)
    ty = tl.load(TYPE + typ[:, None] * stride_type + cols[None, :], mask=mask, other=0.0)
    ps = tl.load(POS + pos[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0)
    x = (w.to(tl.float32) + ty.to(tl.float32)) + ps.to(tl.float32)  # the torch backend's order
    return x, word, pos, typ


@triton.jit
def _dropped(y, SEED, offs_m, cols, drop_threshold, drop_scale, DROPOUT: tl.constexpr):
    """Dropout of a [BLOCK_M, BLOCK_E] tile: element (token, column) of stream 0."""
    if DROPOUT:
        key = stream_key(SEED, tl.full([], 0, tl.int32))  # stream 0: one plain (tokens, E) tensor
        y = tl.where(keep(key, offs_m, cols, drop_threshold), y * drop_scale, 0.0)
    return y


@triton.jit
def _emb_fwd_kernel(
    IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, NORM_W, NORM_B, PROJ_W, PROJ_B, OUT, MEAN, RSTD, SEED,
    stride_ib, stride_it, stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et,
    stride_word, stride_pos, stride_type, stride_proj, stride_out,
    n_tokens, T, E, H, eps, drop_threshold, drop_scale, blocks_per_group,
    HAS_IDS: tl.constexpr, PROJECT: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_tokens
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x, _, _, _ = _embedding_sum(IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, stride_ib, stride_it, stride_pb,
                                stride_pt, stride_tb, stride_tt, stride_eb, stride_et, stride_word, stride_pos,
                                stride_type, offs_m, m_ok, cols, col_ok, T, HAS_IDS)
    mean = tl.sum(x, 1) / E
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, 1) / E + eps)
    w = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(NORM_B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = _dropped(xc * rstd[:, None] * w[None, :] + b[None, :], SEED, offs_m, cols, drop_threshold, drop_scale,
                 DROPOUT)
    if pid_n == 0:
        tl.store(MEAN + offs_m, mean, mask=m_ok)
        tl.store(RSTD + offs_m, rstd, mask=m_ok)
    row = offs_m.to(tl.int64)[:, None] * stride_out
    if PROJECT:
        e = y.to(OUT.dtype.element_ty)  # the dot operand in the output dtype, as F.linear's input
        for i in range(blocks_per_group):
            offs_n = (pid_n * blocks_per_group + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < H
            p_t = tl.load(PROJ_W + offs_n.to(tl.int64)[None, :] * stride_proj + cols[:, None],
                          mask=col_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_E, BLOCK_N] = P^T
            acc = tl.dot(e, p_t.to(e.dtype), input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(PROJ_B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + row + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(OUT + row + cols[None, :], y.to(OUT.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])


@triton.jit
def _emb_bwd_kernel(
    DY, IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, NORM_W, PROJ_W, MEAN, RSTD, SEED,
    DX, DWORD, DPOS, DEMBEDS, PART,
    stride_ib, stride_it, stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et,
    stride_word, stride_pos, stride_type, stride_proj, stride_dy, stride_deb, stride_det,
    n_tokens, T, E, H, n_types, padding_idx, position_padding_idx, drop_threshold, drop_scale,
    HAS_IDS: tl.constexpr, PROJECT: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dx of BLOCK_M tokens, scattered (ATOMIC) or stored to DX (tokens, E) float32; inputs_embeds'
    gradient to DEMBEDS; partials PART[program] = (dw, db, d type row 0, 1, ...) in float32."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_tokens
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    mask = m_ok[:, None] & col_ok[None, :]
    row = offs_m.to(tl.int64)[:, None]
    if PROJECT:  # g = dy @ P, BLOCK_N columns of dy at a time
        g = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
        for n0 in range(0, H, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < H
            dy = tl.load(DY + row * stride_dy + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            p = tl.load(PROJ_W + offs_n.to(tl.int64)[:, None] * stride_proj + cols[None, :],
                        mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            g += tl.dot(dy, p.to(dy.dtype), input_precision=DOT_PRECISION)
    else:
        g = tl.load(DY + row * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = _dropped(g, SEED, offs_m, cols, drop_threshold, drop_scale, DROPOUT)
    # x is gathered after the dot loop, so that the loop holds no more than g (register pressure).
    x, word, pos, typ = _embedding_sum(IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, stride_ib, stride_it,
                                       stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et,
                                       stride_word, stride_pos, stride_type, offs_m, m_ok, cols, col_ok, T, HAS_IDS)
    mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
    rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

    # LayerNorm backward over the E columns (padded columns hold xhat = g = 0).
    w = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dxhat = g * w[None, :]
    c1 = tl.sum(dxhat * xhat, 1) / E
    c2 = tl.sum(dxhat, 1) / E
    dx = tl.where(mask, (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)

    part = PART + pid.to(tl.int64) * (2 + n_types) * E
    tl.store(part + cols, tl.sum(g * xhat, 0), mask=col_ok)
    tl.store(part + E + cols, tl.sum(g, 0), mask=col_ok)
    for k in range(n_types):  # token types: a handful of rows, one masked sum each
        tl.store(part + (2 + k) * E + cols, tl.sum(tl.where((typ == k)[:, None], dx, 0.0), 0), mask=col_ok)

    if HAS_IDS:
        if ATOMIC:
            tl.atomic_add(DWORD + word[:, None] * E + cols[None, :], dx, mask=mask & (word != padding_idx)[:, None],
                          sem="relaxed")
    else:
        b = (offs_m // T).to(tl.int64)
        t = (offs_m % T).to(tl.int64)
        tl.store(DEMBEDS + b[:, None] * stride_deb + t[:, None] * stride_det + cols[None, :],
                 dx.to(DEMBEDS.dtype.element_ty), mask=mask)
    if ATOMIC:
        tl.atomic_add(DPOS + pos[:, None] * E + cols[None, :], dx, mask=mask & (pos != position_padding_idx)[:, None],
                      sem="relaxed")
    else:
        tl.store(DX + row * E + cols[None, :], dx, mask=mask)


@triton.jit
def _emb_bwd_proj_kernel(
    DY, IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, NORM_W, NORM_B, MEAN, RSTD, SEED, DP_PART, DB_PART,
    stride_ib, stride_it, stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et,
    stride_word, stride_pos, stride_type, stride_dy,
    n_tokens, T, E, H, drop_threshold, drop_scale, n_splits,
    HAS_IDS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """DP_PART[split, n, :] = sum over the split's tokens of dy[m, n] e[m, :]; DB_PART[split, n] =
    sum dy[m, n]. Split s takes token blocks s, s + n_splits, ... ; e is recomputed, never loaded."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    w = tl.load(NORM_W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(NORM_B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(split * BLOCK_M, n_tokens, n_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_tokens
        x, _, _, _ = _embedding_sum(IDS, POS_IDS, TYPE_IDS, EMBEDS, WORD, POS, TYPE, stride_ib, stride_it,
                                    stride_pb, stride_pt, stride_tb, stride_tt, stride_eb, stride_et, stride_word,
                                    stride_pos, stride_type, offs_m, m_ok, cols, col_ok, T, HAS_IDS)
        mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
        rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
        xhat = tl.where(m_ok[:, None] & col_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        e = _dropped(xhat * w[None, :] + b[None, :], SEED, offs_m, cols, drop_threshold, drop_scale, DROPOUT)
        # Rows past the end hold e = b, but their dy rows load as 0: they add nothing.
        dy = tl.load(DY + offs_m.to(tl.int64)[:, None] * stride_dy + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(dy), e.to(dy.dtype), input_precision=DOT_PRECISION)
        dbias += tl.sum(dy.to(tl.float32), 0)
    base = split.to(tl.int64) * H
    tl.store(DP_PART + (base + offs_n.to(tl.int64))[:, None] * E + cols[None, :], acc,
             mask=n_ok[:, None] & col_ok[None, :])
    tl.store(DB_PART + base + offs_n, dbias, mask=n_ok)


@triton.jit
def _segment_sum_kernel(DX, ORDER, SORTED, RUN_END, GRAD, E, skip_idx,
                        BLOCK_Q: tl.constexpr, BLOCK_E: tl.constexpr):
    """GRAD[id, cols] = sum of the rows DX[ORDER[q]] over the run of sorted position p (SORTED[q] == id),
    written by the program at the run's first position, BLOCK_Q rows at a time in sorted order."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    cur = tl.load(SORTED + p)
    prev = tl.load(SORTED + p - 1, mask=p > 0, other=-1)
    if (cur != prev) & (cur != skip_idx):
        end = tl.load(RUN_END + p).to(tl.int32)  # token counts stay below 2^31
        acc = tl.zeros([BLOCK_E], tl.float32)
        for q0 in range(p, end, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            q_ok = q < end
            rows = tl.load(ORDER + q, mask=q_ok, other=0).to(tl.int64)
            acc += tl.sum(tl.load(DX + rows[:, None] * E + cols[None, :], mask=q_ok[:, None] & col_ok[None, :],
                                  other=0.0), 0)
        tl.store(GRAD + cur.to(tl.int64) * E + cols, acc.to(GRAD.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Configurations (a heuristic per shape; the static report compiles every one of them)


@dataclass(frozen=True)
class Config:
    block_m: int  # tokens per tile
    block_n: int  # projection columns per dot (0: no projection)
    num_warps: int
    num_stages: int = 1


MAX_E = 1024  # widest row held in registers without a projection
MAX_E_PROJECTED = 256  # widest E whose [BLOCK_M, E] tile feeds the projection's dot
MAX_TYPES = 16  # token-type rows reduced per program by masked sums
SEGMENT_BLOCK_Q, SEGMENT_BLOCK_E = 32, 128


def block_e(E: int, project: bool) -> int:
    """E rounded up to a power of two; >= 16 (the smallest tl.dot K) with a projection."""
    return max(16 if project else 1, triton.next_power_of_2(E))


def _rows_for(be: int) -> tuple[int, int]:
    """(tokens per tile, warps) without a projection: about 4096 elements per tile."""
    return max(1, min(64, 4096 // be)), 4 if be <= 128 else 8


def fwd_config(E: int, project: bool, dtype: torch.dtype) -> Config:
    be = block_e(E, project)
    if not project:
        rows, warps = _rows_for(be)
        return Config(rows, 0, warps)
    if dtype == torch.float32:  # full-precision FMA dots: narrow column tiles, more warps
        return Config(32, 32, 8) if be <= 128 else Config(32, 16, 8)
    return Config(64, 128, 8) if be <= 128 else Config(32, 64, 8)


def bwd_config(E: int, project: bool, dtype: torch.dtype, table_dtype: torch.dtype | None = None) -> Config:
    """``dtype``: of dy (the dot); ``table_dtype``: of the tables and P (float32 under autocast)."""
    be = block_e(E, project)
    if not project:  # the forward's tile, with 8 warps: the backward holds g, xhat, dx and the ids
        return Config(_rows_for(be)[0], 0, 8)
    if dtype != torch.float32 and table_dtype == torch.float32:  # autocast: P tiles converted in registers
        return Config(16, 64, 8)
    if dtype == torch.float32:
        return Config(32, 32, 8) if be <= 128 else Config(16, 32, 8)
    return Config(32, 64, 8) if be <= 128 else Config(16, 64, 8)


def bwd_proj_config(E: int, dtype: torch.dtype) -> Config:
    """block_n = rows of P per program (the [block_n, E] float32 accumulator), block_m = token step."""
    be = block_e(E, True)
    if dtype == torch.float32:
        return Config(16, 64, 4) if be <= 128 else Config(16, 32, 8)
    return Config(32, 128, 8) if be <= 128 else Config(32, 64, 8)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 gets full float32 products


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    """About two programs per SM; a small number on the CPU (the interpreter), so tests split too."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class _Tokens:
    """What every kernel reads to rebuild x: ids, tables and their strides (pointer args + ints)."""

    pointers: tuple
    strides: tuple
    n_tokens: int
    T: int
    has_ids: bool


def _tokens(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
            inputs_embeds) -> _Tokens:
    lead = input_ids if input_ids is not None else inputs_embeds
    B, T = lead.shape[0], lead.shape[1]

    def id_strides(ids):  # (B, T) or (1, T): batch stride 0 for a shared row
        return (0 if ids.shape[0] == 1 else ids.stride(0)), ids.stride(1)

    ib, it = id_strides(input_ids) if input_ids is not None else (0, 0)
    eb, et = (inputs_embeds.stride(0), inputs_embeds.stride(1)) if inputs_embeds is not None else (0, 0)
    return _Tokens(
        pointers=(input_ids, position_ids, token_type_ids, inputs_embeds, word_weight, position_weight,
                  token_type_weight),
        strides=(ib, it, *id_strides(position_ids), *id_strides(token_type_ids), eb, et, word_weight.stride(0),
                 position_weight.stride(0), token_type_weight.stride(0)),
        n_tokens=B * T, T=T, has_ids=input_ids is not None)


def embedding_fwd(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  norm_weight, norm_bias, eps, dropout_p=0.0, seed=None, projection_weight=None,
                  projection_bias=None, inputs_embeds=None, out_dtype=None, config: Config | None = None):
    """Forward. Ids (B, T) (position / type ids may be (1, T)); tables (rows, E) with unit last
    stride; projection_weight (H, E); seed: int64 tensor (1,) when dropout_p > 0. Returns
    (out (B * T, H or E) in ``out_dtype`` (default: the word table's dtype), mean, rstd (B * T,) float32)."""
    tok = _tokens(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  inputs_embeds)
    E = word_weight.shape[1]
    project = projection_weight is not None
    H = projection_weight.shape[0] if project else E
    device = word_weight.device
    out_dtype = out_dtype or word_weight.dtype
    out = torch.empty((tok.n_tokens, H), dtype=out_dtype, device=device)
    mean = torch.empty(tok.n_tokens, dtype=torch.float32, device=device)
    rstd = torch.empty_like(mean)
    c = config or fwd_config(E, project, out_dtype)
    n_m = triton.cdiv(tok.n_tokens, c.block_m)
    groups, per_group = 1, 0
    if project:  # split the columns only as far as it takes to fill the GPU
        n_n = triton.cdiv(H, c.block_n)
        per_group = triton.cdiv(n_n, min(n_n, triton.cdiv(_target_programs(device), n_m)))
        groups = triton.cdiv(n_n, per_group)
    threshold, drop_scale = dropout_args(dropout_p)
    _emb_fwd_kernel[(n_m, groups)](
        *tok.pointers, norm_weight, norm_bias, projection_weight, projection_bias, out, mean, rstd, seed,
        *tok.strides, projection_weight.stride(0) if project else 0, out.stride(0),
        tok.n_tokens, tok.T, E, H, float(eps), threshold, drop_scale, per_group,
        HAS_IDS=tok.has_ids, PROJECT=project, HAS_BIAS=projection_bias is not None, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(out_dtype), BLOCK_M=c.block_m, BLOCK_N=max(c.block_n, 16),
        BLOCK_E=block_e(E, project), num_warps=c.num_warps, num_stages=c.num_stages)
    return out, mean, rstd


def _sorted_runs(ids: torch.Tensor, n_tokens: int):
    """(order, sorted ids, run end per sorted position) of the ids of every token, by a stable sort."""
    flat = ids.expand(n_tokens // ids.shape[1], ids.shape[1]).reshape(-1).to(torch.int64)
    sorted_ids, order = torch.sort(flat, stable=True)
    return order, sorted_ids, torch.searchsorted(sorted_ids, sorted_ids, right=True)


def _segment_sum(dx, ids, rows, dtype, skip_idx):
    """(rows, E) gradient of one table from dx (tokens, E) float32, without atomics."""
    grad = torch.zeros((rows, dx.shape[1]), dtype=dtype, device=dx.device)
    order, sorted_ids, run_end = _sorted_runs(ids, dx.shape[0])
    _segment_sum_kernel[(dx.shape[0], triton.cdiv(dx.shape[1], SEGMENT_BLOCK_E))](
        dx, order, sorted_ids, run_end, grad, dx.shape[1], skip_idx, BLOCK_Q=SEGMENT_BLOCK_Q,
        BLOCK_E=min(SEGMENT_BLOCK_E, triton.next_power_of_2(dx.shape[1])), num_warps=4)
    return grad


def embedding_bwd(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  norm_weight, norm_bias, mean, rstd, dropout_p=0.0, seed=None, padding_idx=None,
                  position_padding_idx=None, projection_weight=None, projection_bias=None, inputs_embeds=None,
                  deterministic=False, configs: tuple[Config, Config] | None = None):
    """Backward from dout (B * T, H or E). Returns (d_word or None, d_position, d_type, d_norm_weight,
    d_norm_bias, d_projection_weight or None, d_projection_bias or None, d_inputs_embeds or None),
    each in its input's dtype. ``deterministic``: no atomics (bitwise repeatable). ``configs`` =
    (dx config, projection-gradient config) overrides the heuristic."""
    tok = _tokens(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                  inputs_embeds)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    E = word_weight.shape[1]
    project = projection_weight is not None
    H = dout.shape[1]
    device = word_weight.device
    n_types = token_type_weight.shape[0]
    threshold, drop_scale = dropout_args(dropout_p)
    dropout = dropout_p > 0.0
    dot_precision = _dot_precision(dout.dtype)
    be = block_e(E, project)

    c = configs[0] if configs else bwd_config(E, project, dout.dtype, word_weight.dtype)
    n_m = triton.cdiv(tok.n_tokens, c.block_m)
    part = torch.empty((n_m, 2 + n_types, E), dtype=torch.float32, device=device)
    if deterministic:
        dx = torch.empty((tok.n_tokens, E), dtype=torch.float32, device=device)
        dword = dpos = None
    else:
        dx = None
        dword = torch.zeros((word_weight.shape[0], E), dtype=torch.float32, device=device) if tok.has_ids else None
        dpos = torch.zeros((position_weight.shape[0], E), dtype=torch.float32, device=device)
    dembeds = None
    if inputs_embeds is not None:
        dembeds = torch.empty(inputs_embeds.shape, dtype=inputs_embeds.dtype, device=device)
    pad = -1 if padding_idx is None else padding_idx
    pos_pad = -1 if position_padding_idx is None else position_padding_idx
    _emb_bwd_kernel[(n_m,)](
        dout, *tok.pointers, norm_weight, projection_weight, mean, rstd, seed, dx, dword, dpos, dembeds, part,
        *tok.strides, projection_weight.stride(0) if project else 0, dout.stride(0),
        dembeds.stride(0) if dembeds is not None else 0, dembeds.stride(1) if dembeds is not None else 0,
        tok.n_tokens, tok.T, E, H, n_types, pad, pos_pad, threshold, drop_scale,
        HAS_IDS=tok.has_ids, PROJECT=project, DROPOUT=dropout, ATOMIC=not deterministic,
        DOT_PRECISION=dot_precision, BLOCK_M=c.block_m, BLOCK_N=max(c.block_n, 16), BLOCK_E=be,
        num_warps=c.num_warps, num_stages=c.num_stages)
    # Fixed-order reductions over the programs; three tensors, not views of one (no aliasing outputs).
    d_norm_weight = part[:, 0].sum(0).to(norm_weight.dtype)
    d_norm_bias = part[:, 1].sum(0).to(norm_bias.dtype)
    d_type = part[:, 2:].sum(0).to(token_type_weight.dtype)

    if deterministic:
        d_word = _segment_sum(dx, input_ids, word_weight.shape[0], word_weight.dtype, pad) if tok.has_ids else None
        d_pos = _segment_sum(dx, position_ids, position_weight.shape[0], position_weight.dtype, pos_pad)
    else:
        d_word = dword.to(word_weight.dtype) if tok.has_ids else None
        d_pos = dpos.to(position_weight.dtype)

    d_proj_w = d_proj_b = None
    if project:
        c2 = configs[1] if configs else bwd_proj_config(E, dout.dtype)
        n_n = triton.cdiv(H, c2.block_n)
        splits = max(1, min(triton.cdiv(tok.n_tokens, c2.block_m), triton.cdiv(_target_programs(device), n_n)))
        dp_part = torch.empty((splits, H, E), dtype=torch.float32, device=device)
        db_part = torch.empty((splits, H), dtype=torch.float32, device=device)
        _emb_bwd_proj_kernel[(n_n, splits)](
            dout, *tok.pointers, norm_weight, norm_bias, mean, rstd, seed, dp_part, db_part,
            *tok.strides, dout.stride(0), tok.n_tokens, tok.T, E, H, threshold, drop_scale, splits,
            HAS_IDS=tok.has_ids, DROPOUT=dropout, DOT_PRECISION=dot_precision, BLOCK_M=c2.block_m,
            BLOCK_N=c2.block_n, BLOCK_E=be, num_warps=c2.num_warps, num_stages=c2.num_stages)
        d_proj_w = dp_part.sum(0).to(projection_weight.dtype)
        if projection_bias is not None:
            d_proj_b = db_part.sum(0).to(projection_bias.dtype)
    return d_word, d_pos, d_type, d_norm_weight, d_norm_bias, d_proj_w, d_proj_b, dembeds


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report: every kernel / config / flag set the launchers can pick


_AOT_TOKENS, _AOT_T, _AOT_TYPES, _AOT_DROPOUT_P, _AOT_PROGRAMS = 8192, 512, 2, 0.1, 264  # 2 x 132 SMs


def _flags(**on) -> tuple[str, ...]:
    return tuple(name for name, value in on.items() if value)


def _aot_common(table: str, E: int, has_ids: bool, dropout: bool) -> dict:
    """Runtime args shared by the kernels for a (B, T) = (16, 512) batch: contiguous ids, (1, T)
    positions, tables of element type ``table``."""
    return {
        "IDS": "i64" if has_ids else None, "POS_IDS": "i64", "TYPE_IDS": "i64", "EMBEDS": None if has_ids else table,
        "WORD": table, "POS": table, "TYPE": table, "NORM_W": table, "NORM_B": table, "MEAN": "fp32", "RSTD": "fp32",
        "SEED": "i64" if dropout else None,
        "stride_ib": _AOT_T if has_ids else 0, "stride_it": 1 if has_ids else 0, "stride_pb": 0, "stride_pt": 1,
        "stride_tb": _AOT_T, "stride_tt": 1, "stride_eb": 0 if has_ids else _AOT_T * E,
        "stride_et": 0 if has_ids else E, "stride_word": E, "stride_pos": E, "stride_type": E,
        "n_tokens": _AOT_TOKENS, "T": _AOT_T, "E": E,
        "drop_threshold": dropout_threshold(_AOT_DROPOUT_P) if dropout else 0,
        "drop_scale": 1.0 / (1.0 - _AOT_DROPOUT_P) if dropout else 1.0,
    }


def _aot_fwd(dtype, table, E, H, has_ids, has_bias, dropout, note="") -> Launch:
    project = H is not None
    width = H if project else E
    c = fwd_config(E, project, dtype)
    dt = TRITON_TYPE[str(dtype)[6:]]
    groups = triton.cdiv(_AOT_PROGRAMS, triton.cdiv(_AOT_TOKENS, c.block_m))
    args = {**_aot_common(table, E, has_ids, dropout), "PROJ_W": table if project else None,
            "PROJ_B": table if has_bias else None, "OUT": dt, "stride_proj": E if project else 0, "stride_out": width,
            "H": width, "eps": 1e-12,
            "blocks_per_group": triton.cdiv(triton.cdiv(width, c.block_n), groups) if project else 0}
    return Launch("embedding", _emb_fwd_kernel, str(dtype)[6:],
                  f"fwd E={E} H={width} M{c.block_m} N{c.block_n} w{c.num_warps}{note}", args,
                  {"HAS_IDS": has_ids, "PROJECT": project, "HAS_BIAS": has_bias, "DROPOUT": dropout,
                   "DOT_PRECISION": _dot_precision(dtype), "BLOCK_M": c.block_m, "BLOCK_N": max(c.block_n, 16),
                   "BLOCK_E": block_e(E, project)},
                  num_warps=c.num_warps, num_stages=c.num_stages,
                  flags=_flags(HAS_IDS=has_ids, PROJECT=project, HAS_BIAS=has_bias, DROPOUT=dropout))


def _aot_bwd(dtype, table, E, H, has_ids, dropout, atomic, note="") -> Launch:
    project = H is not None
    width = H if project else E
    c = bwd_config(E, project, dtype, torch.float32 if table == "fp32" else dtype)
    dt = TRITON_TYPE[str(dtype)[6:]]
    args = {**_aot_common(table, E, has_ids, dropout), "DY": dt, "PROJ_W": table if project else None,
            "DX": None if atomic else "fp32", "DWORD": "fp32" if atomic and has_ids else None,
            "DPOS": "fp32" if atomic else None, "DEMBEDS": None if has_ids else table, "PART": "fp32",
            "stride_proj": E if project else 0, "stride_dy": width, "stride_deb": 0 if has_ids else _AOT_T * E,
            "stride_det": 0 if has_ids else E, "H": width, "n_types": _AOT_TYPES, "padding_idx": 0,
            "position_padding_idx": -1}
    del args["NORM_B"]  # the LayerNorm backward needs only the weight
    return Launch("embedding", _emb_bwd_kernel, str(dtype)[6:],
                  f"bwd E={E} H={width} M{c.block_m} N{c.block_n} w{c.num_warps}{note}", args,
                  {"HAS_IDS": has_ids, "PROJECT": project, "DROPOUT": dropout, "ATOMIC": atomic,
                   "DOT_PRECISION": _dot_precision(dtype), "BLOCK_M": c.block_m, "BLOCK_N": max(c.block_n, 16),
                   "BLOCK_E": block_e(E, project)},
                  num_warps=c.num_warps, num_stages=c.num_stages,
                  flags=_flags(HAS_IDS=has_ids, PROJECT=project, DROPOUT=dropout, ATOMIC=atomic))


def _aot_bwd_proj(dtype, table, E, H, has_ids, dropout, note="") -> Launch:
    c = bwd_proj_config(E, dtype)
    dt = TRITON_TYPE[str(dtype)[6:]]
    args = {**_aot_common(table, E, has_ids, dropout), "DY": dt, "DP_PART": "fp32", "DB_PART": "fp32",
            "stride_dy": H, "H": H, "n_splits": max(1, triton.cdiv(_AOT_PROGRAMS, triton.cdiv(H, c.block_n)))}
    return Launch("embedding", _emb_bwd_proj_kernel, str(dtype)[6:],
                  f"bwd_proj E={E} H={H} M{c.block_m} N{c.block_n} w{c.num_warps}{note}", args,
                  {"HAS_IDS": has_ids, "DROPOUT": dropout, "DOT_PRECISION": _dot_precision(dtype),
                   "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_E": block_e(E, True)},
                  num_warps=c.num_warps, num_stages=c.num_stages, flags=_flags(HAS_IDS=has_ids, DROPOUT=dropout))


def aot_launches() -> list[Launch]:
    """E = 128 projected to H = 768 / 256 / 4096 (ALBERT-base, ELECTRA-small, ALBERT-xxlarge) and
    E = 768 / 1024 unprojected (BERT/RoBERTa base, large); float16, bfloat16, float32. Every flag set
    (ids or inputs_embeds, projection bias, dropout, atomic or deterministic) at H = 768 and without
    a projection; the heaviest set at H = 256 / 4096 (H changes no specialization: every H here is a
    multiple of 16) and under autocast (float32 tables, half output and dots)."""
    launches = []
    bools = (False, True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        dt = TRITON_TYPE[str(dtype)[6:]]
        for E, H in ((128, 768), (768, None), (1024, None)):
            for has_ids in bools:
                for dropout in bools:
                    for has_bias in (bools if H else (False,)):
                        launches.append(_aot_fwd(dtype, dt, E, H, has_ids, has_bias, dropout))
                    for atomic in bools:
                        launches.append(_aot_bwd(dtype, dt, E, H, has_ids, dropout, atomic))
                    if H:
                        launches.append(_aot_bwd_proj(dtype, dt, E, H, has_ids, dropout))
        # The heaviest flags at the other widths: H = 256, 4096; E = 256 (the second tile choice);
        # BERT-tiny / small / medium rows without a projection; autocast.
        heaviest = [(dtype, dt, 128, 256, ""), (dtype, dt, 128, 4096, ""), (dtype, dt, 256, 1024, ""),
                    (dtype, dt, 128, None, ""), (dtype, dt, 256, None, ""), (dtype, dt, 512, None, "")]
        if dtype != torch.float32:
            heaviest.append((dtype, "fp32", 128, 768, " autocast"))
        for dtype_, table, E, H, note in heaviest:
            launches += [_aot_fwd(dtype_, table, E, H, True, bool(H), True, note),
                         _aot_bwd(dtype_, table, E, H, True, True, True, note)]
            if H:
                launches.append(_aot_bwd_proj(dtype_, table, E, H, True, True, note))
        for E in (128, 768, 1024):  # the deterministic table gradients, written in the table dtype
            launches.append(Launch(
                "embedding", _segment_sum_kernel, str(dtype)[6:], f"segment_sum E={E} Q{SEGMENT_BLOCK_Q}",
                {"DX": "fp32", "ORDER": "i64", "SORTED": "i64", "RUN_END": "i64", "GRAD": dt, "E": E,
                 "skip_idx": 0},
                {"BLOCK_Q": SEGMENT_BLOCK_Q, "BLOCK_E": min(SEGMENT_BLOCK_E, triton.next_power_of_2(E))},
                num_warps=4))
    return launches
