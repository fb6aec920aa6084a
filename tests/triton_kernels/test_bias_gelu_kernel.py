"""The Triton bias + GELU kernels (kernels/bias_gelu.py) against the op's torch backend.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md): the kernel's error
against the float64 torch backend is at most 2x the torch backend's error in the same dtype, plus a
few ulps: forward, dx and the bias gradient (the kernel's per-program row sums).
"""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.kernels.bias_gelu import Config, all_configs, bias_gelu_bwd, bias_gelu_fwd
from bertfast.ops.bias_gelu import bias_gelu_forward
from kernel_helpers import DEVICE, DTYPES, within_rule, within_rule_all

APPROX = ["none", "tanh"]


def make(shape, dtype, bias_dtype, seed=0, scale=2.0):
    """x (shape) in dtype, bias (N,) in bias_dtype or None, dy: values that span GELU's curved part."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    bias = None if bias_dtype is None else torch.randn(shape[-1], generator=g, dtype=torch.float64).to(DEVICE,
                                                                                                        bias_dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    return x, bias, dy


def run(x, bias, dy, approximate, backend):
    x = x.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = ops.bias_gelu(x, bias, approximate, backend=backend)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, None if bias is None else bias.grad


def compare(x, bias, dy, approximate):
    """Kernel and torch backend (same dtypes) vs the torch backend in float64: y, dx, db."""
    ref = run(x.double(), None if bias is None else bias.double(), dy, approximate, "torch")
    same_dtype = run(x, bias, dy, approximate, "torch")
    kernel = run(x, bias, dy, approximate, "triton")
    within_rule_all(("y", "dx", "db"), kernel, same_dtype, ref)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (7, 768), (3, 5, 1000)], ids=["1x96", "7x768", "3x5x1000"])
def test_forward_backward_matches_torch(shape, dtype, approximate):
    compare(*make(shape, dtype, dtype, seed=shape[-1]), approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_without_bias(approximate):
    compare(*make((7, 1000), torch.float32, None, seed=1), approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_half_x_with_float32_bias(approximate):
    """Under autocast the bias stays float32: read as float32, its gradient float32."""
    x, bias, dy = make((7, 768), torch.float16, torch.float32, seed=2)
    compare(x, bias, dy, approximate)
    assert run(x, bias, dy, approximate, "triton")[2].dtype == torch.float32


def test_1151_rows_several_row_groups():
    """One large case: 1151 rows (ragged against every BLOCK_M), hidden 1000, in several row groups
    (their partial bias sums are added by torch)."""
    compare(*make((1151, 1000), torch.float16, torch.float32, seed=3), "none")


def test_1151_rows_narrow_tanh_no_bias():
    compare(*make((1151, 96), torch.float32, None, seed=4), "tanh")


@pytest.mark.parametrize("config", all_configs(), ids=str)
def test_every_config(config):
    x, bias, dy = make((7, 300), torch.float32, torch.float32, seed=5)
    z = (x + bias).double()
    y_ref = ops.bias_gelu(z, None, "tanh", backend="torch")
    y = bias_gelu_fwd(x, bias, "tanh", config=config)
    within_rule(y, ops.bias_gelu(x, bias, "tanh", backend="torch"), y_ref, f"y {config}")
    dx, dsum = bias_gelu_bwd(dy.float(), x, bias, "tanh", sum_rows=True, config=config)
    ref = run(x.double(), bias.double(), dy, "tanh", "torch")
    same = run(x, bias, dy, "tanh", "torch")
    within_rule(dx, same[1], ref[1], f"dx {config}")
    within_rule(dsum, same[2], ref[2], f"db {config}")


@pytest.mark.parametrize("groups", [1, 3, 10])
def test_row_groups_ragged(groups):
    """Row sums over 1, 3 or 10 groups of 4-row tiles, 37 rows (the last tile and group ragged),
    50 columns in two column tiles: the same dx, and db within the rule."""
    x, bias, dy = make((37, 50), torch.float32, torch.float32, seed=6)
    ref = run(x.double(), bias.double(), dy, "none", "torch")
    same = run(x, bias, dy, "none", "torch")
    dx, dsum = bias_gelu_bwd(dy.float(), x, bias, "none", sum_rows=True, config=Config(4, 32, 4), groups=groups)
    within_rule(dx, same[1], ref[1], f"dx, {groups} groups")
    within_rule(dsum, same[2], ref[2], f"db, {groups} groups")


def test_row_sums_without_bias():
    """linear_gelu's backward: no bias to add, but dx summed over rows (its db)."""
    x, _, dy = make((29, 70), torch.float16, None, seed=7)
    dx, dsum = bias_gelu_bwd(dy.half(), x, None, "none", sum_rows=True)
    xr = x.double().requires_grad_()
    ops.bias_gelu(xr, None, "none", backend="torch").backward(dy.half().double())
    same = run(x, torch.zeros(70, dtype=torch.float16, device=DEVICE), dy, "none", "torch")
    within_rule(dx, same[1], xr.grad, "dx")
    within_rule(dsum, same[2].float(), xr.grad.sum(0), "row sums")


def test_strided_input_equals_contiguous():
    """A transposed view (column stride 7) is copied to unit column stride; a view with a row
    stride of 192 is read in place: both as their contiguous copies."""
    xt = make((96, 7), torch.float32, None, seed=8)[0].t()
    b = torch.randn(96, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert torch.equal(ops.bias_gelu(xt, b, "none", backend="triton"),
                       ops.bias_gelu(xt.contiguous(), b, "none", backend="triton"))
    rows = torch.randn(7, 2, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE)[:, 1]  # row stride 192
    assert torch.equal(ops.bias_gelu(rows, b, "tanh", backend="triton"),
                       ops.bias_gelu(rows.contiguous(), b, "tanh", backend="triton"))


@pytest.mark.parametrize("approximate", APPROX)
def test_large_magnitudes_stay_finite(approximate):
    """|x| up to 1e4 (float32) and 6e4 (float16): exp(-2|u|) and exp(-z^2/2) underflow to 0,
    nothing overflows, no NaN; values and gradients within the rule."""
    for dtype, top in ((torch.float32, 1e4), (torch.float16, 6e4)):
        x = torch.linspace(-top, top, 301, dtype=torch.float64).reshape(7, 43).to(DEVICE, dtype)
        dy = torch.ones(7, 43, dtype=torch.float64, device=DEVICE)
        compare(x, None, dy, approximate)


def test_empty_rows():
    x = torch.empty(0, 5, device=DEVICE)
    assert ops.bias_gelu(x, torch.ones(5, device=DEVICE), "none", backend="triton").shape == (0, 5)
    dx, dsum = bias_gelu_bwd(x, x, None, "none", sum_rows=True)
    assert dx.shape == (0, 5) and torch.equal(dsum, torch.zeros(5, device=DEVICE))


def test_custom_op_registration_passes_opcheck():
    """Schema, fake implementation and autograd registration of the op the kernel runs in."""
    x, bias, _ = make((5, 24), torch.float32, torch.float32, seed=9)
    torch.library.opcheck(bias_gelu_forward, (x.requires_grad_(), bias.requires_grad_(), "tanh", "triton"))


def test_dispatch_picks_the_kernel():
    x, bias, _ = make((3, 24), torch.float32, torch.float32)
    with ops.record_backends() as ran, ops.use_backend("triton", "torch"):
        ops.bias_gelu(x, bias)
    assert ran == [("bias_gelu", "triton")]
