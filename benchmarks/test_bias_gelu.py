"""Bias + GELU, and the FFN up-projection gelu(x @ W^T + b): bertfast vs PyTorch, side by side.

    python -m pytest benchmarks/test_bias_gelu.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds and its output
is finite). ``--benchmark-json=FILE`` keeps ``extra_info``. ``-k bias_gelu`` / ``-k linear_gelu``
runs one half.

THIS IS THE BENCHMARK THAT DECIDES THE GEMM-EPILOGUE QUESTION. ``test_linear_gelu`` times the fused
Triton GEMM with a bias+GELU epilogue (``bertfast.ops.linear_gelu(..., backend="triton")``, which
refuses unless ``BERTFAST_FUSED_GEMM=1``: the case sets it) against cuBLAS followed by bertfast's
elementwise bias_gelu kernel, per shape, forward and backward. Where the fused kernel's fwd+bwd
median is lower on a card, that shape goes into ``bertfast.ops.linear_gelu``'s table of shapes
measured faster (and the card and numbers into benchmarks/RESULTS.md); elsewhere the unfused path
stays the default.

test_bias_gelu: gelu(x + b), mode (fwd | bwd | fwd+bwd) x N (3072, 4096) x GELU form (erf "none" as
BERT, "tanh" as ALBERT), 16384 rows in bfloat16 on a GPU (512 rows in float32 on a CPU):

  torch-eager       F.gelu(x + b, approximate=...)
  torch-compile     the same under torch.compile (default mode; GPU only, see flops.py)
  bertfast-torch    bertfast.ops.bias_gelu(..., backend="torch")
  bertfast-triton   bertfast.ops.bias_gelu(..., backend="triton")

extra_info: bytes (``flops.bias_gelu_bytes``), GB/s and the fraction of the card's copy bandwidth.

test_linear_gelu: gelu(x @ W^T + b), erf GELU, (tokens, K -> N) = (16384, 768 -> 3072) (BERT/ALBERT
base) and (16384, 1024 -> 4096) (large), bfloat16 on a GPU (512 tokens in float32 on a CPU);
gradients of x, W and b:

  torch-linear+gelu           F.gelu(F.linear(x, W, b)): cuBLAS, then torch's GELU
  torch-compile               the same under torch.compile (inductor may fuse the epilogue itself)
  linear+bertfast-bias_gelu   F.linear(x, W) (cuBLAS), then bertfast.ops.bias_gelu(backend="triton")
                              (backend="torch" on a CPU): linear_gelu's unfused path
  bertfast-fused              bertfast.ops.linear_gelu(..., backend="triton") with BERTFAST_FUSED_GEMM=1

extra_info: TFLOP/s (``flops.gemm_flops``: 2*M*K*N forward, 2x that backward; the GELU is not
counted) and the fraction of the card's measured bfloat16 matmul rate.

Both: timing, rounds and peak memory as in test_attention.py (``flops.run_case``), ``speedup_vs_X``
/ ``memory_ratio_vs_X`` against each PyTorch implementation that ran earlier in the group, the
bertfast backends that ran, the card and versions. Outputs are checked to be finite, nothing more.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from flops import (
    DTYPE,
    MODES,
    TRITON_NEEDS_CUDA,
    bias_gelu_bytes,
    compile_skip_reason,
    fresh_compile,
    gemm_flops,
    run_case,
)

import bertfast

ROWS = {"cuda": 16384, "cpu": 512}  # tokens of every case
APPROXIMATE = ("none", "tanh")


def _skip_compile_here(device):
    reason = compile_skip_reason(device)
    if reason:
        pytest.skip(reason)


def _skip_triton_here(device):
    if device.type != "cuda":
        pytest.skip(f"needs CUDA: {TRITON_NEEDS_CUDA}")


# ------------------------------------------------------------------------------------------------
# bias + GELU


BIAS_GELU_HIDDEN = (3072, 4096)
BIAS_GELU_IMPLS = ("torch-eager", "torch-compile", "bertfast-torch", "bertfast-triton")
BIAS_GELU_BASELINES = ("torch-eager", "torch-compile")


def torch_bias_gelu(x, bias, approximate):
    return F.gelu(x + bias, approximate=approximate)


def bias_gelu_impl(impl: str, device: torch.device):
    if impl == "torch-eager":
        return torch_bias_gelu
    if impl == "torch-compile":
        _skip_compile_here(device)
        return fresh_compile(torch_bias_gelu)
    backend = impl.removeprefix("bertfast-")
    if backend == "triton":
        _skip_triton_here(device)
    return lambda x, bias, approximate: bertfast.ops.bias_gelu(x, bias, approximate, backend=backend)


BIAS_GELU_CASES = [pytest.param(mode, n, approximate, impl, id=f"{mode}-N{n}-{approximate}-{impl}")
                   for mode, n, approximate, impl in itertools.product(MODES, BIAS_GELU_HIDDEN, APPROXIMATE,
                                                                       BIAS_GELU_IMPLS)]


@pytest.mark.parametrize("mode, hidden, approximate, impl", BIAS_GELU_CASES)
def test_bias_gelu(benchmark, device, env_info, mode, hidden, approximate, impl):
    fn = bias_gelu_impl(impl, device)
    kind = device.type
    dtype, rows = DTYPE[kind], ROWS[kind]
    g = torch.Generator(device=device).manual_seed(0)
    grad = mode != "fwd"
    x = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype).requires_grad_(grad)
    bias = (0.1 * torch.randn(hidden, generator=g, device=device, dtype=dtype)).requires_grad_(grad)
    grad_out = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype) if grad else None

    dtype_name = str(dtype).removeprefix("torch.")
    run_case(benchmark, device, env_info, group=f"bias_gelu {mode} rows={rows} N={hidden} {approximate} {dtype_name}",
             impl=impl, mode=mode, forward=lambda: fn(x, bias, approximate), leaves=[x, bias], grad_out=grad_out,
             baselines=BIAS_GELU_BASELINES, nbytes=bias_gelu_bytes(mode, rows, hidden, x.element_size()),
             info={"rows": rows, "hidden": hidden, "approximate": approximate})


# ------------------------------------------------------------------------------------------------
# The FFN up-projection: GEMM + bias + GELU


LINEAR_GELU_SHAPES = ((768, 3072), (1024, 4096))  # (K, N): in and out features
LINEAR_GELU_IMPLS = ("torch-linear+gelu", "torch-compile", "linear+bertfast-bias_gelu", "bertfast-fused")
LINEAR_GELU_BASELINES = ("torch-linear+gelu", "torch-compile", "linear+bertfast-bias_gelu")
FUSED_ENV = "BERTFAST_FUSED_GEMM"


def torch_linear_gelu(x, weight, bias, approximate):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_gelu_impl(impl: str, device: torch.device, monkeypatch):
    if impl == "torch-linear+gelu":
        return torch_linear_gelu
    if impl == "torch-compile":
        _skip_compile_here(device)
        return fresh_compile(torch_linear_gelu)
    if impl == "linear+bertfast-bias_gelu":
        backend = "triton" if device.type == "cuda" else "torch"
        return lambda x, weight, bias, approximate: bertfast.ops.bias_gelu(F.linear(x, weight), bias, approximate,
                                                                          backend=backend)
    if impl == "bertfast-fused":
        _skip_triton_here(device)
        linear_gelu = bertfast.ops.linear_gelu
        monkeypatch.setenv(FUSED_ENV, "1")  # the fused backend refuses without it; undone after the case
        return lambda x, weight, bias, approximate: linear_gelu(x, weight, bias, approximate, backend="triton")
    raise ValueError(f"impl: unknown implementation {impl!r}")


LINEAR_GELU_CASES = [pytest.param(mode, k, n, impl, id=f"{mode}-{k}x{n}-{impl}")
                     for mode, (k, n), impl in itertools.product(MODES, LINEAR_GELU_SHAPES, LINEAR_GELU_IMPLS)]


@pytest.mark.parametrize("mode, in_features, out_features, impl", LINEAR_GELU_CASES)
def test_linear_gelu(benchmark, device, env_info, monkeypatch, mode, in_features, out_features, impl):
    fn = linear_gelu_impl(impl, device, monkeypatch)
    kind = device.type
    dtype, tokens = DTYPE[kind], ROWS[kind]
    approximate = "none"  # BERT's erf GELU; the epilogue's cost hardly depends on the form
    g = torch.Generator(device=device).manual_seed(0)
    grad = mode != "fwd"
    x = torch.randn(tokens, in_features, generator=g, device=device, dtype=dtype).requires_grad_(grad)
    weight = (torch.randn(out_features, in_features, generator=g, device=device, dtype=dtype)
              * in_features**-0.5).requires_grad_(grad)
    bias = (0.1 * torch.randn(out_features, generator=g, device=device, dtype=dtype)).requires_grad_(grad)
    grad_out = torch.randn(tokens, out_features, generator=g, device=device, dtype=dtype) if grad else None

    dtype_name = str(dtype).removeprefix("torch.")
    run_case(benchmark, device, env_info,
             group=f"linear_gelu {mode} tokens={tokens} {in_features}->{out_features} {approximate} {dtype_name}",
             impl=impl, mode=mode, forward=lambda: fn(x, weight, bias, approximate), leaves=[x, weight, bias],
             grad_out=grad_out, baselines=LINEAR_GELU_BASELINES,
             flops=gemm_flops(mode, tokens, (in_features, out_features)),
             info={"tokens": tokens, "in_features": in_features, "out_features": out_features,
                   "approximate": approximate})
