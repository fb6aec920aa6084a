"""The fused GEMM + bias + GELU kernel (kernels/linear_gelu.py) against the op's torch backend
(F.linear, then bias_gelu), forward and the gradients of x, weight and bias.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. The fused backend runs only where measured
faster or with BERTFAST_FUSED_GEMM=1, which these tests set. Rule (DESIGN.md): the kernel's error
against the float64 torch backend is at most 2x the torch backend's error in the same dtype, plus
a few ulps.
"""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.kernels.linear_gelu import candidate_configs, linear_gelu_fwd
from bertfast.ops.linear_gelu import FUSED_ENV, linear_gelu, linear_gelu_forward
from kernel_helpers import DEVICE, DTYPES, within_rule, within_rule_all

APPROX = ["none", "tanh"]


@pytest.fixture(autouse=True)
def _fused_allowed(monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "1")


def make(lead, K, N, dtype, bias_dtype, seed=0):
    """x (*lead, K), weight (N, K) scaled as nn.Linear's init, bias (N,) or None, dy (*lead, N) float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    weight = (torch.randn(N, K, generator=g, dtype=torch.float64) * 2 / K**0.5).to(DEVICE, dtype)
    bias = None if bias_dtype is None else torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE, bias_dtype)
    dy = torch.randn(*lead, N, generator=g, dtype=torch.float64).to(DEVICE)
    return x, weight, bias, dy


def run(x, weight, bias, dy, approximate, backend, autocast=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    with torch.autocast(DEVICE, dtype=autocast, enabled=autocast is not None):
        y = linear_gelu(*leaves, approximate, backend=backend)
    y.backward(dy.to(y.dtype))
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def compare(x, weight, bias, dy, approximate, autocast=None):
    """Kernel and torch backend (same dtypes) vs the torch backend in float64: y, dx, dW, db."""
    ref = run(x.double(), weight.double(), None if bias is None else bias.double(), dy, approximate, "torch")
    same_dtype = run(x, weight, bias, dy, approximate, "torch", autocast)
    kernel = run(x, weight, bias, dy, approximate, "triton", autocast)
    within_rule_all(("y", "dx", "dW", "db"), kernel, same_dtype, ref)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_small_gemm(dtype, approximate):
    """M x K x N = 7 x 40 x 96: every tile ragged in M and K, K below one BLOCK_K."""
    compare(*make((7,), 40, 96, dtype, dtype, seed=1), approximate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_one_row_wide_n(dtype):
    """(1, 1, 96) x (1000, 96): one row, N = 1000 ragged against every BLOCK_N."""
    compare(*make((1, 1), 96, 1000, dtype, dtype, seed=2), "none")


def test_1151_rows():
    """The large case: (1151, 96) x (1000, 96)^T, several groups of row tiles (GROUP_M) with a
    short last group, ragged row and column tails."""
    compare(*make((1151,), 96, 1000, torch.float16, torch.float16, seed=3), "tanh")


def test_without_bias():
    compare(*make((3, 5), 72, 130, torch.float32, None, seed=4), "none")


def test_autocast_half_inputs_float32_parameters():
    """Inside autocast the parameters stay float32: x and weight are cast to float16 (as F.linear
    would), the bias is read as float32, and the gradients reach the float32 parameters."""
    x, weight, bias, dy = make((9,), 48, 80, torch.float32, torch.float32, seed=5)
    ref = run(x.double(), weight.double(), bias.double(), dy, "none", "torch")
    same_dtype = run(x, weight, bias, dy, "none", "torch", autocast=torch.float16)
    kernel = run(x, weight, bias, dy, "none", "triton", autocast=torch.float16)
    assert kernel[0].dtype == torch.float16 and same_dtype[0].dtype == torch.float16
    for name, r, t, k in zip(("y", "dx", "dW", "db"), ref, same_dtype, kernel, strict=True):
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != {t.dtype}"
        within_rule(k, t, r, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_candidate_config(dtype):
    """Each config the autotune may pick, on 37 x 40 x 200 (ragged in M, N and K): y and z."""
    x, weight, bias, _ = make((37,), 40, 200, dtype, dtype, seed=6)
    z_ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    y_ref = ops.bias_gelu(z_ref, None, "none", backend="torch")
    z_same = torch.nn.functional.linear(x, weight, bias)
    y_same = linear_gelu(x, weight, bias, "none", backend="torch")
    for config in candidate_configs(dtype):
        y, z = linear_gelu_fwd(x, weight, bias, "none", store_z=True, config=config)
        within_rule(z, z_same, z_ref, f"z {config}")
        within_rule(y, y_same, y_ref, f"y {config}")


def test_strided_inputs_equal_contiguous():
    x, weight, bias, _ = make((11,), 24, 40, torch.float32, torch.float32, seed=7)
    xt = x.t().contiguous().t()  # column-major: copied to unit column stride
    wt = weight.t().contiguous().t()
    assert torch.equal(linear_gelu(xt, wt, bias, backend="triton"), linear_gelu(x, weight, bias, backend="triton"))


def test_no_pre_activation_stored_without_grad():
    x, weight, bias, _ = make((5,), 16, 24, torch.float32, torch.float32, seed=8)
    y, z = linear_gelu_forward(x, weight, bias, "none", False, "triton")
    assert z.shape == (0, 24)
    y2, z2 = linear_gelu_forward(x, weight, bias, "none", True, "triton")
    assert torch.equal(y, y2) and z2.shape == (5, 24)
    with torch.no_grad():
        assert torch.equal(linear_gelu(x, weight.requires_grad_(), bias, backend="triton"), y)


def test_custom_op_registration_passes_opcheck():
    x, weight, bias, _ = make((5,), 16, 24, torch.float32, torch.float32, seed=9)
    torch.library.opcheck(linear_gelu_forward, (x.requires_grad_(), weight.requires_grad_(),
                                                bias.requires_grad_(), "tanh", True, "triton"))


def test_refused_without_measurement_or_opt_in(monkeypatch):
    """Without BERTFAST_FUSED_GEMM=1 (and an empty MEASURED_FASTER), dispatch runs the torch
    backend, whose bias_gelu takes its Triton kernel; an explicit request explains the refusal."""
    monkeypatch.delenv(FUSED_ENV)
    x, weight, bias, _ = make((3,), 16, 24, torch.float32, torch.float32)
    with ops.record_backends() as ran, ops.use_backend("triton", "torch"):
        linear_gelu(x, weight, bias)
    assert ran == [("linear_gelu", "torch"), ("bias_gelu", "triton")]
    with pytest.raises(ops.BackendUnavailableError, match=f"not measured faster.*{FUSED_ENV}=1"):
        linear_gelu(x, weight, bias, backend="triton")
