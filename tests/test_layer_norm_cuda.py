"""The cuda backend of layer_norm (csrc/cuda/layer_norm.cu through bertfast._cuda).

Everywhere: its refusals (CPU tensors, wide rows, parameter dtypes), the error of a forced
``backend="cuda"`` without a GPU, the launchers the built module exposes and the argument checks
they make before touching the GPU.

On a GPU (marked ``gpu``): forward and every gradient against the torch backend with DESIGN.md's
rule (the kernel's error against the float64 reference is at most 2x the torch backend's error in
the same dtype, plus a few ulps; tests/triton_kernels/kernel_helpers.py within_rule), every dtype,
odd row counts, with and without residual, dropout with the same seed (so the same mask: a mask
that differed in one element would break the bound by orders of magnitude), weight / bias None,
the element-wise fallback for odd widths and unaligned rows, the persistent backward grid, and the
custom op under torch.compile.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from bertfast import ops
from bertfast.ops import cuda_support, rng
from helpers import cuda_module, gpu

sys.path.insert(0, str(Path(__file__).parent / "triton_kernels"))
import layer_norm_cases as cases  # noqa: E402
from layer_norm_cases import EPS, NAMES, run  # noqa: E402

LN = importlib.import_module("bertfast.ops.layer_norm")  # the module (ops.layer_norm is the function)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, **kwargs):
    return cases.randn(*shape, device="cuda", **kwargs)


def inputs(*args, **kwargs):
    return cases.inputs(*args, device="cuda", **kwargs)


def compare(*args, **kwargs):
    return cases.compare("cuda", *args, **kwargs)


def _facts(**changes):
    facts = {"device": "cuda", "dtype": torch.bfloat16, "hidden": 768, "residual": True,
             "param_dtype": torch.float32, "rows": 4096}
    facts.update(changes)
    return facts


# ------------------------------------------------------------------------------------------------
# Everywhere: refusals, errors, the module's launchers


def test_cpu_tensors_are_refused_with_a_reason_naming_cuda():
    reason = LN.OP.refusal("cuda", _facts(device="cpu", dtype=torch.float32))
    assert reason is not None and "CUDA" in reason, reason


def test_forcing_cuda_on_cpu_lists_the_reason():
    x = torch.randn(3, 8)
    with pytest.raises(ops.BackendUnavailableError) as info:
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), backend="cuda")
    message = str(info.value)
    assert "requested: cuda" in message
    assert "  cuda: needs CUDA tensors (got cpu)" in message, message


@pytest.mark.parametrize("changes,reason", [
    ({}, None),
    ({"param_dtype": None}, None),
    ({"param_dtype": torch.bfloat16}, None),
    ({"hidden": LN.CUDA_MAX_HIDDEN}, None),
    ({"param_dtype": torch.float64}, "weight and bias must be float16, bfloat16 or float32"),
    ({"hidden": LN.CUDA_MAX_HIDDEN + 1}, "the normalized dim must be at most 8192"),
    ({"rows": 2**31}, "at most 2^31 - 1 rows"),
])
def test_the_kernels_own_limits(monkeypatch, changes, reason):
    """The limits past cuda_support's (module built, CUDA tensors, dtype), which pass here."""
    monkeypatch.setattr(cuda_support, "refusal", lambda facts: None)
    got = LN.OP.refusal("cuda", _facts(**changes))
    assert got is None if reason is None else (got is not None and reason in got), got


def test_a_direct_call_on_cpu_tensors_names_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="needs `x` on a CUDA device"):
        LN.layer_norm_cuda(x, None, None, EPS, None, 0.0, None)


def test_the_built_module_exposes_the_launchers():
    module = cuda_module()
    assert callable(module.layer_norm_forward) and callable(module.layer_norm_backward)
    assert module.LAYER_NORM_MAX_N == LN.CUDA_MAX_HIDDEN


def _forward_args(**changes):
    """Arguments of _cuda.layer_norm_forward with fake pointers (only checked, never read)."""
    args = dict(x=4096, residual=0, weight=0, bias=0, y=8192, mean=12288, rstd=16384, seed=0, rows=2, n=96,
                stride_x=96, stride_r=0, dtype=0, param_dtype=0, eps=EPS, drop_threshold=0, drop_scale=1.0,
                stream=0)
    args.update(changes)
    return args


def _backward_args(**changes):
    args = dict(dy=4096, x=8192, residual=0, weight=0, mean=12288, rstd=16384, seed=0, dx=20480, dr=0, dw_part=0,
                db_part=0, part_rows=0, rows=2, n=96, stride_dy=96, stride_x=96, stride_r=0, dtype=0,
                param_dtype=0, drop_threshold=0, drop_scale=1.0, stream=0)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    ({"n": LN.CUDA_MAX_HIDDEN + 1}, "`n` must be in"),
    ({"n": 0}, "`n` must be in"),
    ({"rows": -1}, "`rows` must be in"),
    ({"rows": 2**31}, "`rows` must be in"),
    ({"dtype": 3}, "`dtype` must be a dtype code"),
    ({"weight": 64, "dtype": 1, "param_dtype": 2}, "`param_dtype` must be"),
    ({"drop_threshold": 2**24 + 1}, "`drop_threshold` must be in"),
    ({"eps": 0.0}, "`eps` must be positive"),
    ({"stride_x": -1}, "`stride_x`"),
    ({"x": 0}, "must be device pointers"),
])
def test_the_forward_launcher_checks_its_arguments_first(changes, match):
    """Bad arguments raise ValueError before any CUDA call (so here, without a GPU)."""
    module = cuda_module()
    with pytest.raises(ValueError, match=match):
        module.layer_norm_forward(**_forward_args(**changes))


@pytest.mark.parametrize("changes,match", [
    ({"n": LN.CUDA_MAX_HIDDEN + 1}, "`n` must be in"),
    ({"dtype": -1}, "`dtype` must be a dtype code"),
    ({"dw_part": 64}, "`dw_part` needs a `weight`"),
    ({"db_part": 64, "part_rows": 0}, "`part_rows` must be >= 1"),
    ({"dx": 0}, "must be device pointers"),
])
def test_the_backward_launcher_checks_its_arguments_first(changes, match):
    module = cuda_module()
    with pytest.raises(ValueError, match=match):
        module.layer_norm_backward(**_backward_args(**changes))


def test_no_rows_launch_nothing():
    """rows == 0 returns before any CUDA call: nothing to do, no grid (0 partial rows written)."""
    module = cuda_module()
    module.layer_norm_forward(**_forward_args(rows=0, x=0, y=0, mean=0, rstd=0))
    assert module.layer_norm_backward(**_backward_args(rows=0, db_part=64, part_rows=1)) == 0


# ------------------------------------------------------------------------------------------------
# On a GPU: against the torch backend


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("N", [96, 768, 1000, 4096])
@pytest.mark.parametrize("rows", [1, 7, 1151])
@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_matches_torch(dtype, rows, N, residual, dropout_p):
    kwargs = {"dropout_p": dropout_p, "seed": 1234 + rows} if dropout_p else {}
    compare(*inputs(rows, N, dtype, residual=residual, seed=rows + N), **kwargs)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_weight_or_bias_none(dtype, affine):
    compare(*inputs(7, 1000, dtype, affine=affine, seed=11), dropout_p=0.1, seed=3)


@pytest.mark.parametrize("rows,N", [(7, 768), (1151, 96), (5, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@gpu
def test_half_x_with_float32_parameters(dtype, rows, N):
    """Autocast's mix: half activations, float32 parameters; y, dx, dr in x's dtype, dw, db float32."""
    x, w, b, r = inputs(rows, N, dtype, param_dtype=torch.float32, seed=3)
    y, dx, dw, db, dr = compare(x, w, b, r, dropout_p=0.1, seed=8)
    assert (y.dtype, dx.dtype, dr.dtype) == (dtype,) * 3 and (dw.dtype, db.dtype) == (torch.float32,) * 2


@pytest.mark.parametrize("N", [3, 77, 520, 1001, 1032, 2050, 2056, 8192])
@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_every_row_group_size_and_odd_widths(dtype, N):
    """Widths that pick each kernel family (forward: a warp per row up to 1024, a block above;
    backward: 32, 128 or 512 threads per row past 512 and 2048), odd ones on the element-wise path."""
    compare(*inputs(13, N, dtype, seed=N), dropout_p=0.1, seed=N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N", [(20000, 96), (3001, 768), (700, 4096)])
@gpu
def test_persistent_backward_walks_several_row_blocks(dtype, rows, N):
    """More row blocks than resident blocks: each block of the backward grid walks several, with a
    ragged last one (the dw, db partials accumulate across them)."""
    compare(*inputs(rows, N, dtype, seed=rows), dropout_p=0.1, seed=rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N,p", [(7, 1000, 0.25), (1151, 96, 0.1), (33, 4096, 0.5)])
@gpu
def test_dropout_drops_exactly_the_shared_mask(dtype, rows, N, p):
    x, w, b, r = inputs(rows, N, dtype, seed=rows)
    _, dx, _, _, dr = compare(x, w, b, r, dropout_p=p, seed=99)
    keep = rng.keep_mask(rng.seed_tensor("t", 99, x.device), 1, rows, N, p)[0]
    assert (dx[~keep] == 0).all() and torch.equal(dx[keep] != 0, dr[keep] != 0)
    assert (dr != 0).float().mean() > 0.99  # the residual's gradient is not masked


@gpu
def test_seed_repeats_and_changes():
    x, w, b, r = inputs(9, 200, torch.float32)
    run_ = lambda **kw: ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.3, backend="cuda", **kw)  # noqa: E731
    a, b_, c = run_(seed=7), run_(seed=7), run_(seed=8)
    assert torch.equal(a, b_) and not torch.allclose(a, c)
    assert torch.equal(run_(seed=torch.tensor([7])), a)
    torch.manual_seed(0)
    d = run_()
    torch.manual_seed(0)
    assert torch.equal(run_(), d)


@pytest.mark.parametrize("seed", [-5, 2**31 + 1, 2**40 + 3])
@gpu
def test_seed_tensors_use_their_low_32_bits_as_the_torch_backend_does(seed):
    """A seed tensor is not reduced modulo 2^31: its low 32 bits key the mask on every backend."""
    rows, N, p = 7, 1000, 0.25
    x, w, b, r = inputs(rows, N, torch.float32, seed=1)
    seed_t = torch.tensor([seed])
    _, dx, _, _, dr = compare(x, w, b, r, dropout_p=p, seed=seed_t)
    keep = rng.keep_mask(seed_t.cuda(), 1, rows, N, p)[0]
    assert (dx[~keep] == 0).all() and (dx[keep] != 0).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_unaligned_and_strided_inputs_equal_contiguous(dtype):
    """x a column slice starting one element in (rows not 16-byte aligned: the element-wise path, read
    in place), the residual a transpose (copied), dy broadcast (row stride 0, read in place): bitwise
    the results of contiguous inputs, whose rows take the 16-byte path."""
    rows, N = 9, 96
    _, w, b, _ = inputs(rows, N, dtype)
    dy = randn(N, seed=9, dtype=dtype).expand(rows, N)
    results = []
    for contiguous in (False, True):
        wide = randn(rows, N + 40, seed=1, dtype=dtype).requires_grad_()
        x = wide[:, 1:1 + N]
        r_leaf = randn(N, rows, seed=2, dtype=dtype).t().detach().requires_grad_()
        wl, bl = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        x, r = (x.contiguous(), r_leaf.contiguous()) if contiguous else (x, r_leaf)
        if not contiguous:
            assert x.data_ptr() % 16 != 0 and r.stride(-1) != 1
        y = ops.layer_norm(x, wl, bl, EPS, residual=r, dropout_p=0.2, seed=4, backend="cuda")
        y.backward(dy if not contiguous else dy.contiguous())
        results.append([y.detach(), wide.grad[:, 1:1 + N], wl.grad, bl.grad, r_leaf.grad])
    for name, s, c in zip(NAMES, *results, strict=True):
        assert torch.equal(s, c), name
    x, r = randn(rows, N + 40, seed=1, dtype=dtype)[:, 1:1 + N], randn(N, rows, seed=2, dtype=dtype).t()
    compare(x, w, b, r, dropout_p=0.2, seed=4)


@gpu
def test_three_dim_input_and_saved_statistics():
    x, w, b, r = inputs(3 * 5, 96, torch.float32, seed=6)
    compare(x.view(3, 5, 96), w, b, r.view(3, 5, 96), dropout_p=0.1, seed=2)
    seed = rng.seed_tensor("t", 2, x.device)
    y, mean, rstd = LN.layer_norm_forward(x, w, b, r, seed, EPS, 0.1, "cuda")
    _, mean_t, rstd_t = LN.layer_norm_forward(x, w, b, r, seed, EPS, 0.1, "torch")
    assert (mean.dtype, rstd.dtype, mean.shape) == (torch.float32, torch.float32, (15,))
    torch.testing.assert_close(mean, mean_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, rstd_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_constant_rows_are_finite(dtype):
    """All-zero rows and constant rows: var = 0, rstd = 1 / sqrt(eps), y = bias, finite gradients."""
    x, w, b, r = inputs(6, 100, dtype, seed=9)
    x[0], r[0] = 0.0, 0.0  # all zero
    x[2], r[2] = 1.5, 0.25  # constant
    x[4] = 0.0  # only the residual
    y, *grads = compare(x, w, b, r)
    torch.testing.assert_close(y[0], b.to(dtype), rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in grads)


@gpu
def test_no_rows():
    x = torch.zeros(0, 96, device="cuda", requires_grad=True)
    w = torch.ones(96, device="cuda", requires_grad=True)
    b = torch.zeros(96, device="cuda", requires_grad=True)
    y = ops.layer_norm(x, w, b, EPS, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 96) and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@gpu
def test_gradients_only_for_inputs_that_require_them():
    x, w, b, r = inputs(7, 96, torch.float32)
    xg = x.clone().requires_grad_()
    ops.layer_norm(xg, w, b, EPS, residual=r, backend="cuda").sum().backward()  # w, b, r need none
    assert xg.grad is not None and w.grad is None and b.grad is None and r.grad is None
    _, dx, _, _, dr = run("cuda", x, w, b, r, randn(7, 96, seed=1))
    assert torch.equal(dx, dr) and dx.data_ptr() != dr.data_ptr()  # without dropout: equal, not shared


@gpu
def test_dispatch_prefers_cuda_and_falls_back_past_its_width():
    x = randn(4, 96)
    wide = randn(2, LN.CUDA_MAX_HIDDEN + 8)
    with ops.record_backends() as ran, ops.use_backend("cuda", "torch"):
        ops.layer_norm(x, None, None)
        ops.layer_norm(wide, None, None)
    assert ran == [("layer_norm", "cuda"), ("layer_norm", "torch")]
    with pytest.raises(ops.BackendUnavailableError, match="the normalized dim must be at most 8192"):
        ops.layer_norm(wide, None, None, backend="cuda")


@gpu
def test_custom_op_under_torch_compile():
    """The custom op on the cuda backend in one compiled graph (inductor, fullgraph), forward and
    backward, equal to the eager op with the same seed."""

    def op(x, w, b, r, seed):
        return LN.layer_norm_forward(x, w, b, r, seed, EPS, 0.1, "cuda")[0]

    torch._dynamo.reset()
    compiled_op = torch.compile(op, fullgraph=True)
    x, w, b, r = inputs(37, 768, torch.bfloat16, param_dtype=torch.float32, seed=4)
    seed = rng.seed_tensor("t", 5, x.device)
    results = []
    for fn in (op, compiled_op):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        out = fn(*leaves, seed)
        (out.float() * torch.arange(768, device="cuda")).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, eager, comp in zip(NAMES, *results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0, msg=name)
