"""The FFN up-projection as one GEMM with a bias + GELU epilogue.

    z = x @ W^T + b        y = gelu(z)          x (M, K), W (N, K) (nn.Linear's layout), b (N,)

One program per (BLOCK_M, BLOCK_N) tile of the output, in grouped order: GROUP_M consecutive
programs walk down GROUP_M row tiles of one column tile, so the W tile they share is still in L2
(and the x tiles of the group are reused across neighbouring groups). The K loop accumulates in
float32 (float32 inputs take full-precision ``ieee`` products, as torch's default matmul, not TF32);
the epilogue adds the bias (read in its own dtype: float32 under autocast), stores z in x's dtype
when the backward needs it, and stores y = gelu(z) computed from the float32 z.

The backward is not here: dz = dy * gelu'(z) is the bias_gelu backward kernel (kernels/bias_gelu.py,
bias None, with the row sums that give db), then dx = dz @ W and dW = dz^T x are cuBLAS GEMMs.

Row and column tails: the tile's out-of-range rows and columns re-read valid ones (offsets taken
modulo M and N), so the K loop masks only the K tail; the stores are masked. Row offsets are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bertfast.kernels import autotune
from bertfast.kernels.aot import TRITON_TYPE, Launch
from bertfast.kernels.bias_gelu import gelu


@triton.jit
def _linear_gelu_kernel(
    X, W, B, Y, Z, M, N, K, stride_xm, stride_wn, stride_ym, stride_zm,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_in = (offs_m % M).to(tl.int64)  # tail rows re-read valid rows; their results are not stored
    cols_in = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols_in[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if STORE_Z:
        tl.store(Z + rows * stride_zm + offs_n[None, :], acc.to(Z.dtype.element_ty), mask=mask)
    tl.store(Y + rows * stride_ym + offs_n[None, :], gelu(acc, TANH).to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Candidate configurations and the bounded autotune (the pattern of kernels/attention.py)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


def candidate_configs(dtype: torch.dtype) -> list[Config]:
    """The few configs the dispatcher may time, for BERT's FFN (K = 768..1024, N = 3072..4096,
    M = batch x seq in the thousands), the one launched without autotune first. Half types: tensor
    core tiles (HMMA on sm_80, HGMMA on sm_90) with 3-4 stage pipelines (at most 160 KB of shared
    memory on sm_90, 120 KB on sm_80: under both cards' limits); with 8 warps a 128x128 float32
    accumulator holds 64 registers per thread, leaving room for the erf/tanh epilogue. float32 (full-precision FMA dots):
    smaller tiles. None spills on sm_80 or sm_90 (``aot_launches``, the static report); measured
    there and left out: 128x256x64 w8 (spills on sm_90) and 128x128x32 w4 (128 accumulator
    registers per thread: spills on sm_90)."""
    if dtype == torch.float32:
        return [Config(64, 64, 32, 8, 4, 3), Config(128, 64, 32, 8, 8, 3), Config(64, 128, 32, 8, 8, 3)]
    return [Config(128, 128, 64, 8, 8, 3), Config(64, 256, 64, 8, 8, 4), Config(64, 128, 64, 8, 4, 4),
            Config(128, 64, 64, 8, 4, 4)]


def rows_bucket(rows: int) -> int:
    """Rows rounded up to a power of two, capped: the best tile changes slowly with M."""
    return min(triton.next_power_of_2(max(rows, 1)), 16384)


def _tune_key(x: torch.Tensor, M: int, N: int, K: int) -> tuple:
    arch = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    return (arch, x.dtype, K, N, rows_bucket(M))


# ----------------------------------------------------------------------------------------------
# Launcher


def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
                    store_z: bool = True, config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z): x (M, K) and weight (N, K) float16/bfloat16/float32 of one dtype with unit last
    strides, bias (N,) in that dtype or float32, or None. y = gelu(z), z = x @ weight^T + bias, both
    (M, N) in x's dtype; z is (0, N) when not ``store_z``."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((M if store_z else 0, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, z
    # float32 inputs get full float32 products (as torch's default matmul), not TF32.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    def launch(c: Config):
        grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
        _linear_gelu_kernel[grid](
            x, weight, bias, y, z if store_z else None, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
            z.stride(0) if store_z else 0, HAS_BIAS=bias is not None, STORE_Z=store_z, TANH=approximate == "tanh",
            DOT_PRECISION=precision, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
            num_warps=c.num_warps, num_stages=c.num_stages)

    config = config or autotune.pick(("linear_gelu",) + _tune_key(x, M, N, K), candidate_configs(x.dtype), launch)
    launch(config)
    return y, z


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report


def aot_launches() -> list[Launch]:
    """Every candidate config per dtype, with the heaviest flags (float32 bias, z stored) in both GELU
    forms and the lightest (no bias, no z, erf). Representative problem: BERT base's FFN
    up-projection, (M, K, N) = (8 x 512, 768, 3072)."""
    M, K, N = 8 * 512, 768, 3072
    out = []
    for dtype, dt in TRITON_TYPE.items():
        precision = "ieee" if dtype == "float32" else "tf32"
        for c in candidate_configs(getattr(torch, dtype)):
            for tanh, heavy in ((False, False), (False, True), (True, True)):
                flags = ("tanh" if tanh else "erf",) + (("bias fp32", "store z") if heavy else ())
                out.append(Launch(
                    family="linear_gelu", kernel=_linear_gelu_kernel, dtype=dtype, config=str(c), flags=flags,
                    args=dict(X=dt, W=dt, B="fp32" if heavy else None, Y=dt, Z=dt if heavy else None, M=M, N=N, K=K,
                              stride_xm=K, stride_wn=K, stride_ym=N, stride_zm=N if heavy else 0),
                    constexprs=dict(HAS_BIAS=heavy, STORE_Z=heavy, TANH=tanh, DOT_PRECISION=precision,
                                    BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m),
                    num_warps=c.num_warps, num_stages=c.num_stages))
    return out
