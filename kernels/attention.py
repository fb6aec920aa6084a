"""Flash attention for bidirectional encoders: forward and backward, padded or packed (varlen).

Math, per sequence b, head h, query row i, over the real keys j of that sequence:
    s_ij = scale * q_i . k_j        lse_i = log sum_j exp(s_ij)        p_ij = exp(s_ij - lse_i)
    out_i = sum_j p_ij * z_ij / (1 - p_drop) * v_j           z = dropout keep mask (see below)
Backward (FlashAttention-2), with delta_i = dout_i . out_i:
    dv_j = sum_i p_ij z_ij / (1 - p_drop) dout_i
    dp_ij = z_ij / (1 - p_drop) * dout_i . v_j      ds_ij = p_ij (dp_ij - delta_i)
    dq_i = scale * sum_j ds_ij k_j                  dk_j = scale * sum_i ds_ij q_i
Nothing of size T x T reaches memory: the forward keeps a running max and sum per row (online
softmax) and saves only lse; the backward recomputes p from q, k and lse.

Layouts. Padded: q (B, Tq, H, D), k and v (B, Tk, H, D), any strides with a unit last stride,
and an optional key mask (B, Tk) (nonzero = attend). Packed: (total_tokens, H, D) with
``cu_seqlens`` (B + 1,) int32; sequence b is rows cu_seqlens[b] : cu_seqlens[b + 1] of q, k and v.
One kernel serves both: a program finds its sequence's first row and length, then works on rows.
lse and delta are float32 (H, rows): rows = B * Tq (padded) or total_tokens (packed).

Edge cases, by construction: padded or out-of-range keys are never read (masked loads give 0, so
NaN/Inf stored there cannot reach a dot product) and get p = 0; a row with no real key stores
out = 0 and lse = +inf, so the backward's p = exp(s - lse) is 0 there and every gradient is 0.
Sequence and batch offsets are int64; in-sequence offsets (< max_seqlen * row stride) int32.

Dropout uses a counter-based hash (not a stored mask): bits = mix32(mix32(key_bh ^ i) ^ j) with
key_bh = mix32(mix32(seed) ^ (b * H + h)) and i, j positions inside the sequence; a position is
kept when (bits >> 8) >= round(p_drop * 2^24). The backward regenerates the same z; padded and
packed layouts of one batch draw the same mask; ``bertfast.ops.attention.dropout_keep_mask`` is the
same formula in PyTorch, which the torch backend uses, so both backends drop the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertfast.kernels import autotune
from bertfast.kernels.rng import dropout_args, keep, keep_t, stream_key

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _program(n_blocks, H):
    """This program's (batch * heads index, block index, batch, head): programs are laid out
    block-fastest so that neighbours share a head's keys and values in L2."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    b = bh // H
    return bh, pid % n_blocks, b, bh % H


@triton.jit
def _sequence(CU, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first row in the packed layout (int64; 0 when padded), query length, key length)."""
    if VARLEN:
        first = tl.load(CU + b)
        n = tl.load(CU + b + 1) - first
        return first.to(tl.int64), n, n
    else:
        return b.to(tl.int64) * 0, seqlen_q, seqlen_k


@triton.jit
def _key_ok(MASK, stride_mb, b, offs_n, seqlen_k, HAS_MASK: tl.constexpr):
    ok = offs_n < seqlen_k
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b.to(tl.int64) * stride_mb + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, CU, SEED,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_mb, lse_stride_h, lse_rows_per_batch,
    H, seqlen_q, seqlen_k, head_dim, n_m_blocks, scale, drop_threshold, drop_scale,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, pid_m, b, h = _program(n_m_blocks, H)
    first, seqlen_q, seqlen_k = _sequence(CU, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + first * stride_qt + h * stride_qh
    k_base = K + b64 * stride_kb + first * stride_kt + h * stride_kh
    v_base = V + b64 * stride_vb + first * stride_vt + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DROPOUT:
        key_bh = stream_key(SEED, bh)

    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_ok(MASK, stride_mb, b, offs_n, seqlen_k, HAS_MASK)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet: avoid -inf - -inf
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax sum counts dropped entries too
        if DROPOUT:
            p = tl.where(keep(key_bh, offs_m, offs_n, drop_threshold), p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc * (drop_scale / tl.where(has_key, l_i, 1.0))[:, None]
    o_base = O + b64 * stride_ob + first * stride_ot + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    lse_base = LSE + h.to(tl.int64) * lse_stride_h + b64 * lse_rows_per_batch + first
    tl.store(lse_base + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, lse_stride_h, lse_rows_per_batch,
    H, seqlen_q, head_dim, n_m_blocks,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = dout_i . out_i (float32), the row term of the softmax backward."""
    bh, pid_m, b, h = _program(n_m_blocks, H)
    first, seqlen_q, _ = _sequence(CU, b, seqlen_q, seqlen_q, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b64 * stride_ob + first * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + first * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    delta_base = DELTA + h.to(tl.int64) * lse_stride_h + b64 * lse_rows_per_batch + first
    tl.store(delta_base + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DQ_ACC, DK, DV, LSE, DELTA, MASK, CU, SEED,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_mb, lse_stride_h, lse_rows_per_batch,
    H, seqlen_q, seqlen_k, head_dim, n_n_blocks, scale, drop_threshold, drop_scale,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per key block: dk, dv over every query block; with ATOMIC_DQ it also adds
    each block's dq share into a float32 buffer (fast, order of additions not fixed)."""
    bh, pid_n, b, h = _program(n_n_blocks, H)
    first, seqlen_q, seqlen_k = _sequence(CU, b, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + first * stride_qt + h * stride_qh
    do_base = DO + b64 * stride_dob + first * stride_dot + h * stride_doh
    lse_base = LSE + h.to(tl.int64) * lse_stride_h + b64 * lse_rows_per_batch + first
    delta_base = DELTA + h.to(tl.int64) * lse_stride_h + b64 * lse_rows_per_batch + first

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    key_ok = _key_ok(MASK, stride_mb, b, offs_n, seqlen_k, HAS_MASK)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + first * stride_kt + h * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + first * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=kv_mask, other=0.0)
    if DROPOUT:
        key_bh = stream_key(SEED, bh)

    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (N, M)
        p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            kept_t = keep_t(key_bh, offs_m, offs_n, drop_threshold)
            pz_t = tl.where(kept_t, p_t * drop_scale, 0.0)
            dp_t = tl.where(kept_t, dp_t * drop_scale, 0.0)
        else:
            pz_t = p_t
        dv += tl.dot(pz_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(DQ_ACC + b64 * stride_dqb + first * stride_dqt + h * stride_dqh
                          + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=qd_mask)

    out_mask = (offs_n < seqlen_k)[:, None] & d_ok[None, :]
    tl.store(DK + b64 * stride_dkb + first * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt
             + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b64 * stride_dvb + first * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, MASK, CU, SEED,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_mb, lse_stride_h, lse_rows_per_batch,
    H, seqlen_q, seqlen_k, head_dim, n_m_blocks, scale, drop_threshold, drop_scale,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query block: dq over every key block (deterministic, no atomics)."""
    bh, pid_m, b, h = _program(n_m_blocks, H)
    first, seqlen_q, seqlen_k = _sequence(CU, b, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    k_base = K + b64 * stride_kb + first * stride_kt + h * stride_kh
    v_base = V + b64 * stride_vb + first * stride_vt + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + first * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + first * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    row = h.to(tl.int64) * lse_stride_h + b64 * lse_rows_per_batch + first + offs_m
    lse2 = tl.load(LSE + row, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    if DROPOUT:
        key_bh = stream_key(SEED, bh)

    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_ok(MASK, stride_mb, b, offs_n, seqlen_k, HAS_MASK)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = tl.where(keep(key_bh, offs_m, offs_n, drop_threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + first * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# Block configurations and the bounded autotune


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int



def block_d(head_dim: int) -> int:
    """Head dim rounded up to a power of two (>= 16, the smallest tl.dot K); the rest is masked."""
    return max(16, triton.next_power_of_2(head_dim))


def candidate_configs(kind: str, head_dim: int, dtype: torch.dtype) -> list[Config]:
    """Every configuration the dispatcher may pick for a kernel kind ("fwd", "bwd_dkdv", "bwd_dq"),
    best guess for an H100 first (the one launched when autotune is off), by BLOCK_D: the float32
    accumulators grow with it, so wide heads take fewer rows and more warps. A head dim that is not
    a multiple of 16 (40, 72, ...) gets the JIT no divisibility hint, so its loads are scalar and
    masked, without async copies, and need more registers: wide heads then take smaller tiles.
    float32 tiles are smaller still (full-precision FMA dots). None of them spills on sm_80 or
    sm_90 with any flags; the static report compiles each (benchmarks/STATIC.md)."""
    if kind not in ("fwd", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"kind: unknown kernel kind {kind!r}")
    bd, aligned = block_d(head_dim), head_dim % 16 == 0
    if dtype == torch.float32:
        if kind == "fwd":
            if bd <= 64:
                return [Config(32, 32, 8, 2), Config(32, 16, 4, 2), Config(16, 32, 4, 2)]
            return [Config(16, 32, 8, 2), Config(16, 16, 4, 2)]
        if kind == "bwd_dkdv":  # block_n = keys held by the program, block_m = query step
            if bd <= 32:
                return [Config(32, 32, 4, 2), Config(16, 32, 8, 2), Config(16, 16, 4, 2)]
            if bd == 64:
                return [Config(32, 32, 8, 2), Config(32, 16, 8, 2), Config(32, 16, 4, 2)]
            return [Config(32, 16, 8, 2), Config(32, 16, 4, 2)]
        if bd <= 64:  # bwd_dq: block_m = queries held by the program, block_n = key step
            return [Config(32, 32, 4, 2), Config(32, 16, 8, 2), Config(32, 16, 4, 2)]
        return [Config(32, 32, 8, 2), Config(32, 16, 4, 2), Config(16, 32, 4, 2)]
    if kind == "fwd":
        if bd <= 32:
            return [Config(128, 128, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 4, 4)]
        if bd == 64:
            return [Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 4, 3)]
        if aligned:
            return [Config(128, 32, 8, 3), Config(64, 64, 8, 3), Config(64, 32, 4, 3)]
        return [Config(64, 64, 8, 3), Config(128, 16, 8, 3), Config(64, 32, 4, 3)]
    if kind == "bwd_dkdv":  # block_n = keys held by the program, block_m = query step
        if bd <= 32:
            return [Config(64, 128, 8, 3), Config(64, 64, 8, 3), Config(64, 64, 4, 3)]
        if bd == 64:
            if aligned:
                return [Config(32, 128, 8, 3), Config(32, 64, 4, 3), Config(16, 128, 4, 3)]
            return [Config(32, 64, 8, 3), Config(32, 64, 4, 2), Config(16, 64, 4, 3)]
        if aligned:
            return [Config(32, 64, 8, 2), Config(16, 64, 8, 2), Config(32, 32, 8, 2)]
        return [Config(32, 32, 8, 2), Config(16, 32, 8, 2), Config(16, 32, 4, 2)]
    # bwd_dq: block_m = queries held by the program, block_n = key step
    if bd <= 32:
        return [Config(128, 32, 4, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 3)]
    if bd == 64:
        return [Config(128, 32, 8, 3), Config(64, 64, 8, 3), Config(64, 64, 4, 3)]
    if aligned:
        return [Config(128, 32, 8, 2), Config(64, 32, 4, 2), Config(64, 64, 8, 2)]
    return [Config(64, 32, 8, 2), Config(64, 32, 4, 2), Config(32, 64, 4, 2)]


def _tune_key(q: torch.Tensor, max_seqlen: int, flags: tuple) -> tuple:
    arch = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    # Sequence length bucket (next power of two, capped): the best tile changes slowly with it.
    return (arch, q.dtype, q.shape[-1], min(triton.next_power_of_2(max_seqlen), 4096)) + flags


# ----------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class Layout:
    """How the kernels walk one tensor: (batch stride, row stride, head stride)."""

    batch: int
    row: int
    head: int

    @staticmethod
    def of(t: torch.Tensor, varlen: bool) -> Layout:
        if varlen:  # (total, H, D): every sequence starts at its own row
            return Layout(0, t.stride(0), t.stride(1))
        return Layout(t.stride(0), t.stride(1), t.stride(2))

    def args(self) -> tuple[int, int, int]:
        return self.batch, self.row, self.head


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get full float32 products (as torch's default matmul), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _problem(q, k, v, key_padding_mask, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    H = q.shape[-2]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens.numel() - 1, max_seqlen, max_seqlen
        rows_per_batch, rows = 0, q.shape[0]
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        rows_per_batch, rows = seqlen_q, batch * seqlen_q
    row_axis = 0 if varlen else 1
    largest = max(seqlen_q, seqlen_k) * max(t.stride(row_axis) for t in (q, k, v))
    if largest >= 2**31:
        raise ValueError(f"attention: one sequence spans {largest} elements (max_seqlen x row stride), past the "
                         "int32 in-sequence offsets of the kernels; batch and sequence offsets are int64")
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    return varlen, batch, H, seqlen_q, seqlen_k, rows_per_batch, rows, mask


def attention_fwd(q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                  scale=None, seed=None, config: Config | None = None):
    """Forward. q, k, v: (B, T, H, D) or packed (total, H, D) with ``cu_seqlens`` (int32, B + 1)
    and ``max_seqlen``; key_padding_mask (B, Tk) bool (padded only); seed: int64 tensor (1,) on the
    device, needed when dropout_p > 0. Returns out (same shape as q, contiguous) and lse (H, rows)
    float32, +inf for rows without a real key."""
    varlen, batch, H, seqlen_q, seqlen_k, rows_per_batch, rows, mask = _problem(q, k, v, key_padding_mask,
                                                                                cu_seqlens, max_seqlen)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((H, rows), dtype=torch.float32, device=q.device)
    threshold, drop_scale = dropout_args(dropout_p)
    dropout = dropout_p > 0.0

    def launch(c: Config):
        n_m = triton.cdiv(seqlen_q, c.block_m)
        _attn_fwd_kernel[(n_m * batch * H,)](
            q, k, v, out, lse, mask, cu_seqlens, seed,
            *Layout.of(q, varlen).args(), *Layout.of(k, varlen).args(), *Layout.of(v, varlen).args(),
            *Layout.of(out, varlen).args(), mask.stride(0) if mask is not None else 0, lse.stride(0),
            rows_per_batch, H, seqlen_q, seqlen_k, D, n_m, scale, threshold, drop_scale,
            VARLEN=varlen, HAS_MASK=mask is not None, DROPOUT=dropout, DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d(D), num_warps=c.num_warps,
            num_stages=c.num_stages)

    flags = (varlen, mask is not None, dropout)
    if config is None:
        key = ("attention", "fwd") + _tune_key(q, seqlen_q, flags)
        config = autotune.pick(key, candidate_configs("fwd", D, q.dtype), launch)
    launch(config)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                  dropout_p=0.0, scale=None, seed=None, deterministic=False,
                  configs: tuple[Config, Config] | None = None):
    """Backward: (dq, dk, dv) in the layouts and dtypes of q, k, v (contiguous).

    Default: one key-major pass computes dk, dv and adds dq through float32 atomics.
    ``deterministic=True``: a second, query-major pass computes dq without atomics, so the result
    is bitwise repeatable. ``configs`` = (dkdv config, dq config) overrides the tuned choice."""
    varlen, batch, H, seqlen_q, seqlen_k, rows_per_batch, _, mask = _problem(q, k, v, key_padding_mask, cu_seqlens,
                                                                             max_seqlen)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    threshold, drop_scale = dropout_args(dropout_p)
    dropout = dropout_p > 0.0
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    BD = block_d(D)
    lq, lk, lv, ldo = (Layout.of(t, varlen) for t in (q, k, v, dout))

    delta = torch.empty_like(lse)
    n_m = triton.cdiv(seqlen_q, 64)
    _attn_bwd_delta_kernel[(n_m * batch * H,)](
        out, dout, delta, cu_seqlens, *Layout.of(out, varlen).args(), *ldo.args(), lse.stride(0), rows_per_batch,
        H, seqlen_q, D, n_m, VARLEN=varlen, BLOCK_M=64, BLOCK_D=BD)

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    atomic = not deterministic
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dk  # dk: unused placeholder
    ldq_acc = Layout.of(dq_acc, varlen)
    common = {"VARLEN": varlen, "HAS_MASK": mask is not None, "DROPOUT": dropout,
              "DOT_PRECISION": _dot_precision(q.dtype), "BLOCK_D": BD}
    mask_stride = mask.stride(0) if mask is not None else 0

    def launch_dkdv(c: Config):
        if atomic:
            dq_acc.zero_()
        n_n = triton.cdiv(seqlen_k, c.block_n)
        _attn_bwd_dkdv_kernel[(n_n * batch * H,)](
            q, k, v, dout, dq_acc, dk, dv, lse, delta, mask, cu_seqlens, seed,
            *lq.args(), *lk.args(), *lv.args(), *ldo.args(), *ldq_acc.args(), *Layout.of(dk, varlen).args(),
            *Layout.of(dv, varlen).args(), mask_stride, lse.stride(0), rows_per_batch,
            H, seqlen_q, seqlen_k, D, n_n, scale, threshold, drop_scale, ATOMIC_DQ=atomic,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common)

    flags = (varlen, mask is not None, dropout, atomic)
    key = _tune_key(q, max(seqlen_q, seqlen_k), flags)
    dkdv_config = configs[0] if configs else autotune.pick(("attention", "bwd_dkdv") + key,
                                                           candidate_configs("bwd_dkdv", D, q.dtype), launch_dkdv)
    launch_dkdv(dkdv_config)
    if atomic:
        return dq_acc.to(q.dtype), dk, dv

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def launch_dq(c: Config):
        n_m = triton.cdiv(seqlen_q, c.block_m)
        _attn_bwd_dq_kernel[(n_m * batch * H,)](
            q, k, v, dout, dq, lse, delta, mask, cu_seqlens, seed,
            *lq.args(), *lk.args(), *lv.args(), *ldo.args(), *Layout.of(dq, varlen).args(),
            mask_stride, lse.stride(0), rows_per_batch, H, seqlen_q, seqlen_k, D, n_m, scale, threshold,
            drop_scale, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
            **common)

    dq_config = configs[1] if configs else autotune.pick(("attention", "bwd_dq") + key,
                                                         candidate_configs("bwd_dq", D, q.dtype), launch_dq)
    launch_dq(dq_config)
    return dq, dk, dv
