"""LayerNorm(dropout(x) + residual), side by side: bertfast (triton, torch reference) vs PyTorch's
``F.layer_norm(F.dropout(x) + r)`` eager and under ``torch.compile``, and Liger-Kernel's LayerNorm
(skipped unless ``liger_kernel`` is installed; it is not in this project's environments).

    python -m pytest benchmarks/test_layer_norm.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds and its output
is finite). ``--benchmark-json=FILE`` keeps ``extra_info``.

Cases: mode (fwd | bwd | fwd+bwd) x hidden N (128 on a GPU only, 768, 1024, 4096) x variant:
  plain              LayerNorm(x): the embeddings' and the heads' norm
  residual+dropout   LayerNorm(dropout(x, 0.1) + residual): the tail of every BERT sub-layer
on 16384 rows in bfloat16 on a GPU (512 rows in float32 on a CPU). Gradients of x, the residual,
the weight and the bias. One pytest-benchmark group per case, implementations side by side:

  torch-eager       F.layer_norm(F.dropout(x, p) + r, (N,), w, b, eps)
  torch-compile     the same function under torch.compile (default mode; GPU only, see flops.py)
  liger             liger_kernel's LigerLayerNormFunction on F.dropout(x) + r
  bertfast-torch    bertfast.ops.layer_norm(..., backend="torch"): the reference backend
  bertfast-triton   bertfast.ops.layer_norm(..., backend="triton"): one kernel per direction
  bertfast-cuda     bertfast.ops.layer_norm(..., backend="cuda"): the CUDA kernels (csrc/cuda/layer_norm.cu)

Timing, rounds and peak memory as in test_attention.py (``flops.run_case``: CUDA events and an L2
flush between rounds on a GPU; wall time, 3 rounds, one thread on a CPU). ``extra_info``: bytes
(``flops.layer_norm_bytes``), GB/s and the fraction of the card's measured copy bandwidth, peak
memory, ``speedup_vs_X`` / ``memory_ratio_vs_X`` against each PyTorch/Liger implementation that
ran earlier in the group, the bertfast backends that ran, the card and versions. Goal of the issue
(bertfast-triton, bfloat16, H100): >= 1.5x torch-eager at hidden 768/1024 and >= 85% of the copy
bandwidth. Outputs are checked to be finite, nothing more.
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
    compile_skip_reason,
    fresh_compile,
    layer_norm_bytes,
    run_case,
)

import bertfast

HIDDEN = (128, 768, 1024, 4096)
GPU_ONLY_HIDDEN = (128,)
ROWS = {"cuda": 16384, "cpu": 512}
VARIANTS = {"plain": (False, 0.0), "residual+dropout": (True, 0.1)}  # (residual, dropout_p)
EPS = 1e-12  # BERT's layer_norm_eps
IMPLS = ("torch-eager", "torch-compile", "liger", "bertfast-torch", "bertfast-triton", "bertfast-cuda")
BASELINES = ("torch-eager", "torch-compile", "liger")


def torch_layer_norm(x, residual, weight, bias, dropout_p):
    """What transformers' BertSelfOutput / BertOutput do after their dense layer."""
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def liger_layer_norm():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        pytest.skip("liger_kernel is not installed here (pip install liger-kernel to compare with it)")

    def liger(x, residual, weight, bias, dropout_p):
        if dropout_p > 0.0:
            x = F.dropout(x, p=dropout_p, training=True)
        if residual is not None:
            x = x + residual
        return LigerLayerNormFunction.apply(x, weight, bias, EPS)

    return liger


def implementation(impl: str, device: torch.device):
    """(x, residual, weight, bias, dropout_p) -> y for ``impl``; skips what cannot run here."""
    if impl == "torch-eager":
        return torch_layer_norm
    if impl == "torch-compile":
        reason = compile_skip_reason(device)
        if reason:
            pytest.skip(reason)
        return fresh_compile(torch_layer_norm)
    if impl == "liger":
        if device.type != "cuda":
            pytest.skip("needs CUDA: Liger-Kernel's LayerNorm is a Triton kernel")
        return liger_layer_norm()
    backend = impl.removeprefix("bertfast-")
    if backend == "triton" and device.type != "cuda":
        pytest.skip(f"needs CUDA: {TRITON_NEEDS_CUDA}")
    if backend == "cuda" and device.type != "cuda":
        pytest.skip("needs CUDA: the cuda backend's kernels (bertfast._cuda) run on a GPU")
    return lambda x, residual, weight, bias, p: bertfast.ops.layer_norm(x, weight, bias, EPS, residual=residual,
                                                                         dropout_p=p, backend=backend)


CASES = [pytest.param(mode, n, variant, impl, id=f"{mode}-N{n}-{variant}-{impl}")
         for mode, n, variant, impl in itertools.product(MODES, HIDDEN, VARIANTS, IMPLS)]


@pytest.mark.parametrize("mode, hidden, variant, impl", CASES)
def test_layer_norm(benchmark, device, env_info, mode, hidden, variant, impl):
    kind = device.type
    if kind != "cuda" and hidden in GPU_ONLY_HIDDEN:
        cpu_hidden = ", ".join(str(n) for n in HIDDEN if n not in GPU_ONLY_HIDDEN)
        pytest.skip(f"needs CUDA: the CPU run covers hidden {cpu_hidden}")
    fn = implementation(impl, device)
    has_residual, dropout_p = VARIANTS[variant]
    dtype, rows = DTYPE[kind], ROWS[kind]
    g = torch.Generator(device=device).manual_seed(0)
    grad = mode != "fwd"
    x = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype).requires_grad_(grad)
    residual = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype).requires_grad_(grad) \
        if has_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=g, device=device, dtype=dtype)).requires_grad_(grad)
    bias = (0.1 * torch.randn(hidden, generator=g, device=device, dtype=dtype)).requires_grad_(grad)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    grad_out = torch.randn(rows, hidden, generator=g, device=device, dtype=dtype) if grad else None

    dtype_name = str(dtype).removeprefix("torch.")
    run_case(benchmark, device, env_info, group=f"layer_norm {mode} rows={rows} N={hidden} {variant} {dtype_name}",
             impl=impl, mode=mode, forward=lambda: fn(x, residual, weight, bias, dropout_p), leaves=leaves,
             grad_out=grad_out, baselines=BASELINES,
             nbytes=layer_norm_bytes(mode, rows, hidden, x.element_size(), has_residual),
             info={"rows": rows, "hidden": hidden, "variant": variant, "residual": has_residual,
                   "dropout_p": dropout_p, "eps": EPS})
