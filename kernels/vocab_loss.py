"""Decoder GEMM fused with cross-entropy (and Gumbel-max sampling), chunked over the vocabulary.

Math, per row i of h (M, E) (the masked tokens), over the vocabulary v < V:
    z_iv  = h_i . W_v + b_v                                   logits, float32 accumulation
    lse_i = log sum_v exp(z_iv)
    loss_i = (1 - eps) (lse_i - z_i,t_i) + eps (lse_i - sum_v z_iv / V)      eps = label smoothing
    sample_i = argmax_v (z_iv / T - log(-log u_iv))           u from the shared counter-based RNG
Backward, with g_i = d total / d loss_i and p_iv = exp(z_iv - lse_i):
    dz_iv = g_i (p_iv - (1 - eps) [v == t_i] - eps / V)
    dh = dz W        dW = dz^T h        db = sum_i dz_iv
Nothing of size M x V reaches memory. The forward walks the vocabulary in BLOCK_V chunks keeping,
per row, a running max and sum (online logsumexp), the weighted sum of the logits that the loss
needs (loss_i = lse_i - sum_v c_v z_iv, c_v = (1 - eps) [v == t_i] + eps / V) and, when sampling,
the best Gumbel score and its token; it writes loss and lse (float32). The backward
recomputes the logits chunk by chunk from h, W and lse, in two kernels without atomics (so it is
deterministic): one per (row block, E block) accumulates dh over the vocabulary, one per
(vocab block, E block) accumulates dW and db over the rows. E is walked in BLOCK_K steps inside the
logits dot, and the gradients' E is split into BLOCK_E blocks, so no register tile grows with E.

Sampling draws u(row i, token v) = (mix32 bits of (seed, stream 0, i, v) >> 9 + 0.5) / 2^23, the same
numbers as ``bertfast.ops.rng.uniforms(seed, M, V)`` (never 0 or 1), so the torch backend
and this kernel draw the same tokens for a seed (up to round-off in near ties of the scores).

Edge cases: rows past M and tokens past V are masked (masked loads give 0, the ragged vocabulary
tail gets -inf logits); masked rows get g = 0, so they add nothing to dW and db. Row offsets are
int64 (rows x row stride may pass 2^31); V x E of one decoder matrix stays below 2^31 elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertfast.kernels import autotune
from bertfast.kernels.aot import TRITON_TYPE, Launch
from bertfast.kernels.rng import mix32, uniform

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _logits(H, W, BIAS, rows, offs_v, m_ok, v_ok, stride_hm, stride_wv, E,
            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_V) float32 logits h[rows] . W[offs_v] + b[offs_v]; rows are int64."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows[:, None] * stride_hm + offs_k[None, :]
    w_ptrs = W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, E, BLOCK_K):
        k_ok = offs_k[None, :] < E - k0
        h = tl.load(h_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=v_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    bias = tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _dlogits(z, lse, g, target, offs_v, ok, smoothing, V):
    """g (softmax - (1 - eps) onehot - eps / V), 0 outside ``ok`` (masked rows and tokens)."""
    p = tl.math.exp2((z - lse[:, None]) * 1.4426950408889634)
    dz = p - tl.where(offs_v[None, :] == target[:, None], 1.0 - smoothing + smoothing / V, smoothing / V)
    return tl.where(ok, dz * g[:, None], 0.0)


@triton.jit
def _vocab_ce_fwd_kernel(
    H, W, BIAS, TARGET, LOSS, LSE, SAMPLE, SEED,
    stride_hm, stride_wv, M, V, E, smoothing, temperature,
    DRAW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_M rows: loss, lse (and with DRAW the Gumbel-max sample) per row.
    loss = lse - sum_v c_v z_v with c_v = (1 - eps) [v == t] + eps / V: one weighted sum of the logits."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    target = tl.load(TARGET + offs_m, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    z_mix = tl.zeros([BLOCK_M], tl.float32)
    if DRAW:
        key = mix32(mix32(tl.load(SEED).to(tl.uint32)))  # stream 0: mix32(mix32(seed) ^ 0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_v = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits(H, W, BIAS, rows, offs_v, m_ok, v_ok, stride_hm, stride_wv, E, DOT_PRECISION, BLOCK_M, BLOCK_V,
                    BLOCK_K)
        c = tl.where(offs_v[None, :] == target[:, None], 1.0 - smoothing + smoothing / V, smoothing / V)
        z_mix += tl.sum(tl.where(v_ok[None, :], z * c, 0.0), 1)
        z = tl.where(v_ok[None, :], z, float("-inf"))  # the ragged tail of the vocabulary
        # The first chunk holds a real token, so m_new is finite and exp2(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(z, 1))
        p = tl.math.exp2((z - m_new[:, None]) * 1.4426950408889634)
        l_i = l_i * tl.math.exp2((m_i - m_new) * 1.4426950408889634) + tl.sum(p, 1)
        m_i = m_new
        if DRAW:
            u = uniform(key, offs_m, offs_v)  # in (0, 1): finite noise
            score = z / temperature - tl.log(-tl.log(u))  # -inf in the tail
            chunk_best, chunk_v = tl.max(score, 1, return_indices=True)  # first index of a tie
            take = chunk_best > best  # strict: an earlier chunk keeps a tie, as torch.argmax does
            best = tl.where(take, chunk_best, best)
            best_v = tl.where(take, chunk_v + v0, best_v)
    lse = m_i + tl.log(l_i)
    tl.store(LOSS + offs_m, lse - z_mix, mask=m_ok)
    tl.store(LSE + offs_m, lse, mask=m_ok)
    if DRAW:
        tl.store(SAMPLE + offs_m, best_v.to(tl.int64), mask=m_ok)


@triton.jit
def _vocab_ce_bwd_dh_kernel(
    H, W, BIAS, TARGET, LSE, G, DH,
    stride_hm, stride_wv, stride_dhm, M, V, E, smoothing, n_e_blocks,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per (row block, E block): dh[rows, e block] = sum over vocab chunks dz W[chunk, e block]."""
    pid = tl.program_id(0)
    pid_m, pid_e = pid // n_e_blocks, pid % n_e_blocks  # E blocks of one row block are neighbours (L2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    target = tl.load(TARGET + offs_m, mask=m_ok, other=0)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    g = tl.load(G + offs_m, mask=m_ok, other=0.0)
    dh = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits(H, W, BIAS, rows, offs_v, m_ok, v_ok, stride_hm, stride_wv, E, DOT_PRECISION, BLOCK_M, BLOCK_V,
                    BLOCK_K)
        dz = _dlogits(z, lse, g, target, offs_v, m_ok[:, None] & v_ok[None, :], smoothing, V)
        w = tl.load(W + offs_v.to(tl.int64)[:, None] * stride_wv + offs_e[None, :],
                    mask=v_ok[:, None] & e_ok[None, :], other=0.0)
        # dz in the operands' dtype, as the torch backend's linear backward takes it
        dh = tl.dot(dz.to(w.dtype), w, dh, input_precision=DOT_PRECISION)
    tl.store(DH + rows[:, None] * stride_dhm + offs_e[None, :], dh.to(DH.dtype.element_ty),
             mask=m_ok[:, None] & e_ok[None, :])


@triton.jit
def _vocab_ce_bwd_dw_kernel(
    H, W, BIAS, TARGET, LSE, G, DW, DB,
    stride_hm, stride_wv, stride_dwv, M, V, E, smoothing, n_e_blocks,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per (vocab block, E block): dW[block, e block] = sum over row chunks dz^T h[chunk, e block];
    the E block 0 program also writes db[block] = sum_i dz."""
    pid = tl.program_id(0)
    pid_v, pid_e = pid // n_e_blocks, pid % n_e_blocks
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    dw = tl.zeros([BLOCK_V, BLOCK_E], tl.float32)
    db = tl.zeros([BLOCK_V], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        target = tl.load(TARGET + offs_m, mask=m_ok, other=0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        g = tl.load(G + offs_m, mask=m_ok, other=0.0)
        z = _logits(H, W, BIAS, rows, offs_v, m_ok, v_ok, stride_hm, stride_wv, E, DOT_PRECISION, BLOCK_M, BLOCK_V,
                    BLOCK_K)
        dz = _dlogits(z, lse, g, target, offs_v, m_ok[:, None] & v_ok[None, :], smoothing, V)
        h = tl.load(H + rows[:, None] * stride_hm + offs_e[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        dw = tl.dot(tl.trans(dz.to(h.dtype)), h, dw, input_precision=DOT_PRECISION)
        db += tl.sum(dz, 0)
    w_rows = offs_v.to(tl.int64)[:, None] * stride_dwv
    tl.store(DW + w_rows + offs_e[None, :], dw.to(DW.dtype.element_ty), mask=v_ok[:, None] & e_ok[None, :])
    if pid_e == 0:
        tl.store(DB + offs_v, db.to(DB.dtype.element_ty), mask=v_ok)


# ----------------------------------------------------------------------------------------------
# Block configurations and the bounded autotune

KINDS = ("fwd", "bwd_dh", "bwd_dw")


@dataclass(frozen=True)
class Config:
    """block_m rows x block_v tokens per logits tile, block_k the E step of its dot, block_e the E width of
    a gradient block (backward only; 0 in the forward). The forward and dh programs hold block_m rows and
    step over the vocabulary; the dW program holds block_v tokens and steps over the rows."""

    block_m: int
    block_v: int
    block_k: int
    block_e: int
    num_warps: int
    num_stages: int



def fit(config: Config, E: int) -> Config:
    """``config`` with block_k and block_e cut to E rounded up to a power of two (>= 16, the smallest
    tl.dot K), so a narrow head (E = 40, 128) masks no more than it must."""
    width = max(16, triton.next_power_of_2(E))
    return Config(config.block_m, config.block_v, min(config.block_k, width),
                  min(config.block_e, width) if config.block_e else 0, config.num_warps, config.num_stages)


def candidate_configs(kind: str, E: int, dtype: torch.dtype) -> list[Config]:
    """Every configuration the launchers may pick for a kernel kind, best guess for an H100 first (the
    one launched when autotune is off), already fitted to E. float32 tiles are smaller (full-precision
    FMA dots, no tensor cores). The float32 accumulators are the logits tile (block_m x block_v) and,
    in the backward, the gradient block (block_m or block_v x block_e)."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown kernel kind {kind!r}")
    if dtype == torch.float32:
        table = {
            "fwd": [Config(64, 64, 16, 0, 8, 2), Config(32, 64, 16, 0, 4, 2), Config(32, 32, 16, 0, 4, 2)],
            "bwd_dh": [Config(32, 32, 16, 64, 4, 2), Config(64, 32, 16, 64, 8, 2), Config(32, 32, 16, 128, 8, 2)],
            "bwd_dw": [Config(32, 32, 16, 64, 4, 2), Config(32, 64, 16, 64, 8, 2), Config(32, 32, 16, 128, 8, 2)],
        }[kind]
    else:
        table = {
            "fwd": [Config(64, 128, 64, 0, 8, 3), Config(128, 64, 64, 0, 8, 3), Config(64, 64, 64, 0, 4, 3)],
            "bwd_dh": [Config(64, 64, 64, 256, 8, 3), Config(64, 128, 64, 128, 8, 3), Config(128, 64, 64, 128, 8, 2)],
            "bwd_dw": [Config(64, 64, 64, 256, 8, 3), Config(64, 128, 64, 128, 8, 3), Config(128, 64, 64, 128, 8, 2)],
        }[kind]
    fitted = []
    for c in table:
        c = fit(c, E)
        if c not in fitted:  # a narrow E can make two candidates equal
            fitted.append(c)
    return fitted


def _tune_key(h: torch.Tensor, M: int, V: int, flags: tuple) -> tuple:
    arch = torch.cuda.get_device_capability(h.device) if h.is_cuda else None
    # Row and vocabulary buckets (next power of two, capped): the best tile changes slowly with them.
    return (arch, h.dtype, h.shape[1], min(triton.next_power_of_2(max(M, 1)), 16384),
            min(triton.next_power_of_2(V), 65536)) + flags


# ----------------------------------------------------------------------------------------------
# Launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get full float32 products (as torch's default matmul), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _operands(h, weight, bias, targets):
    """Unit last strides, the bias in the weight's dtype (zeros when absent: one launch form), int32 targets."""
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias = bias.to(weight.dtype).contiguous()
    return h, weight, bias, targets.to(torch.int32).contiguous()


def vocab_ce_fwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 label_smoothing: float = 0.0, seed: torch.Tensor | None = None, temperature: float = 1.0,
                 config: Config | None = None):
    """Forward. h (M, E), weight (V, E) and bias (V,) or None in one dtype; targets (M,) ints in [0, V);
    seed: int64 tensor (1,) on the device to also draw one Gumbel-max sample per row at ``temperature``.
    Returns loss (M,) and lse (M,) float32, and samples (M,) int64 (empty (0,) without a seed)."""
    M, E = h.shape
    V = weight.shape[0]
    h, weight, bias, targets = _operands(h, weight, bias, targets)
    loss = torch.empty(M, dtype=torch.float32, device=h.device)
    lse = torch.empty(M, dtype=torch.float32, device=h.device)
    draw = seed is not None
    samples = torch.empty(M if draw else 0, dtype=torch.int64, device=h.device)
    if M == 0:
        return loss, lse, samples

    def launch(c: Config):
        _vocab_ce_fwd_kernel[(triton.cdiv(M, c.block_m),)](
            h, weight, bias, targets, loss, lse, samples if draw else None, seed,
            h.stride(0), weight.stride(0), M, V, E, float(label_smoothing), float(temperature),
            DRAW=draw, DOT_PRECISION=_dot_precision(h.dtype), BLOCK_M=c.block_m, BLOCK_V=c.block_v,
            BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)

    if config is None:
        key = ("vocab_loss", "fwd") + _tune_key(h, M, V, (draw,))
        config = autotune.pick(key, candidate_configs("fwd", E, h.dtype), launch)
    launch(config)
    return loss, lse, samples


def vocab_ce_bwd(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, lse: torch.Tensor, label_smoothing: float = 0.0,
                 configs: tuple[Config, Config] | None = None):
    """Backward: g (M,) = d total / d loss_i, lse (M,) float32 from the forward. Returns dh (M, E), dW (V, E)
    and db (V,) in the dtypes of h and weight, contiguous. ``configs`` = (dh config, dW config)."""
    M, E = h.shape
    V = weight.shape[0]
    h, weight, bias, targets = _operands(h, weight, bias, targets)
    g = g.to(torch.float32).contiguous()
    lse = lse.contiguous()
    dh = torch.empty((M, E), dtype=h.dtype, device=h.device)
    dw = torch.empty((V, E), dtype=weight.dtype, device=weight.device)
    db = torch.empty(V, dtype=weight.dtype, device=weight.device)
    if M == 0:
        return dh, dw.zero_(), db.zero_()
    common = {"DOT_PRECISION": _dot_precision(h.dtype)}
    smoothing = float(label_smoothing)

    def launch_dh(c: Config):
        n_e = triton.cdiv(E, c.block_e)
        _vocab_ce_bwd_dh_kernel[(triton.cdiv(M, c.block_m) * n_e,)](
            h, weight, bias, targets, lse, g, dh, h.stride(0), weight.stride(0), dh.stride(0), M, V, E, smoothing,
            n_e, BLOCK_M=c.block_m, BLOCK_V=c.block_v, BLOCK_K=c.block_k, BLOCK_E=c.block_e,
            num_warps=c.num_warps, num_stages=c.num_stages, **common)

    def launch_dw(c: Config):
        n_e = triton.cdiv(E, c.block_e)
        _vocab_ce_bwd_dw_kernel[(triton.cdiv(V, c.block_v) * n_e,)](
            h, weight, bias, targets, lse, g, dw, db, h.stride(0), weight.stride(0), dw.stride(0), M, V, E,
            smoothing, n_e, BLOCK_M=c.block_m, BLOCK_V=c.block_v, BLOCK_K=c.block_k, BLOCK_E=c.block_e,
            num_warps=c.num_warps, num_stages=c.num_stages, **common)

    key = _tune_key(h, M, V, ())
    dh_config = configs[0] if configs else autotune.pick(("vocab_loss", "bwd_dh") + key,
                                                         candidate_configs("bwd_dh", E, h.dtype), launch_dh)
    launch_dh(dh_config)
    dw_config = configs[1] if configs else autotune.pick(("vocab_loss", "bwd_dw") + key,
                                                         candidate_configs("bwd_dw", E, h.dtype), launch_dw)
    launch_dw(dw_config)
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# What the static report compiles

# Representative problems: BERT-base's head (E = 768, the gradient's E split in blocks) and
# ALBERT/ELECTRA's (E = 128, one block), 4096 masked tokens, BERT's vocabulary.
AOT_HEAD_SIZES = (768, 128)
_AOT_M, _AOT_V = 4096, 30522


def aot_launches() -> list[Launch]:
    """Every (kernel, config, flags) the launchers can pick for float16, bfloat16 and float32 at the
    representative head sizes, with the argument values of that problem; a launch that compiles the
    same at both sizes (same blocks, flags and constant arguments: the forward) is listed once."""
    out, seen = [], set()
    for dtype_name, ptr in TRITON_TYPE.items():
        dtype = getattr(torch, dtype_name)
        precision = _dot_precision(dtype)
        for E in AOT_HEAD_SIZES:
            sizes = {"stride_hm": E, "stride_wv": E, "M": _AOT_M, "V": _AOT_V, "E": E, "smoothing": 0.1}
            for c in candidate_configs("fwd", E, dtype):
                blocks = {"BLOCK_M": c.block_m, "BLOCK_V": c.block_v, "BLOCK_K": c.block_k}
                for draw in (False, True):
                    args = {"H": ptr, "W": ptr, "BIAS": ptr, "TARGET": "i32", "LOSS": "fp32", "LSE": "fp32",
                            "SAMPLE": "i64" if draw else None, "SEED": "i64" if draw else None,
                            "temperature": 1.0, **sizes}
                    out.append(Launch("vocab_loss", _vocab_ce_fwd_kernel, dtype_name, _describe(c, E),
                                      args, {"DRAW": draw, "DOT_PRECISION": precision, **blocks},
                                      c.num_warps, c.num_stages, ("DRAW",) if draw else ()))
            for kind, kernel in (("bwd_dh", _vocab_ce_bwd_dh_kernel), ("bwd_dw", _vocab_ce_bwd_dw_kernel)):
                for c in candidate_configs(kind, E, dtype):
                    args = {"H": ptr, "W": ptr, "BIAS": ptr, "TARGET": "i32", "LSE": "fp32", "G": "fp32", **sizes,
                            "n_e_blocks": triton.cdiv(E, c.block_e)}
                    if kind == "bwd_dh":
                        args.update(DH=ptr, stride_dhm=E)
                    else:
                        args.update(DW=ptr, DB=ptr, stride_dwv=E)
                    blocks = {"BLOCK_M": c.block_m, "BLOCK_V": c.block_v, "BLOCK_K": c.block_k, "BLOCK_E": c.block_e}
                    out.append(Launch("vocab_loss", kernel, dtype_name, _describe(c, E), args,
                                      {"DOT_PRECISION": precision, **blocks}, c.num_warps, c.num_stages))
    unique = []
    for launch in out:
        ones = tuple(sorted(k for k, v in launch.args.items() if type(v) is int and v == 1))  # made constants
        key = (launch.kernel_name, launch.dtype, tuple(sorted(launch.constexprs.items())), ones, launch.num_warps,
               launch.num_stages)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


def _describe(c: Config, E: int) -> str:
    e = f"e{c.block_e} " if c.block_e else ""
    return f"E={E} {c.block_m}x{c.block_v} k{c.block_k} {e}w{c.num_warps} s{c.num_stages}"
