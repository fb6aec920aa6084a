"""The Triton residual + dropout + LayerNorm kernels against the torch backend (itself checked
against transformers).

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md): the kernel's error
against the float64 reference (the torch backend on float64 inputs) is at most 2x the torch
backend's error in the same dtype, plus a few ulps; forward and the gradients of x, residual,
weight and bias. Dropout draws the same counter-based bits in both backends, so it is compared
the same way (a mask that differed in one element would break the bound by orders of magnitude).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from bertfast import ops
from bertfast.kernels import layer_norm as K
from bertfast.ops import rng
import layer_norm_cases as cases
from kernel_helpers import DEVICE, DTYPES, INTERPRETED, within_rule
from layer_norm_cases import EPS, NAMES, run


def randn(*shape, **kwargs):
    return cases.randn(*shape, device=DEVICE, **kwargs)


def inputs(*args, **kwargs):
    return cases.inputs(*args, device=DEVICE, **kwargs)


def compare(*args, **kwargs):
    return cases.compare("triton", *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Shapes, flags, dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N", [(1, 768), (7, 96), (7, 1000), (1151, 768)])
def test_with_residual_matches_torch(dtype, rows, N):
    compare(*inputs(rows, N, dtype, seed=rows + N))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N", [(1, 96), (1151, 1000)])
def test_without_residual_matches_torch(dtype, rows, N):
    compare(*inputs(rows, N, dtype, residual=False, seed=rows))


def test_hidden_4096():
    compare(*inputs(3, 4096, torch.float32, seed=4), dropout_p=0.1, seed=21)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
def test_weight_or_bias_none(affine):
    compare(*inputs(7, 1000, torch.float32, affine=affine, seed=11))


@pytest.mark.parametrize("rows,N", [(7, 768), (1151, 96)])
def test_half_x_with_float32_weights(rows, N):
    """Autocast's mix: float16 activations, float32 parameters; y, dx, dr in float16, dw, db float32."""
    x, w, b, r = inputs(rows, N, torch.float16, param_dtype=torch.float32, seed=3)
    y, dx, dw, db, dr = compare(x, w, b, r, dropout_p=0.1, seed=8)
    assert (y.dtype, dx.dtype, dr.dtype) == (torch.float16,) * 3 and (dw.dtype, db.dtype) == (torch.float32,) * 2


# ------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N,p", [(7, 1000, 0.25), (1151, 96, 0.1)])
def test_dropout_matches_torch_with_the_same_mask(dtype, rows, N, p):
    x, w, b, r = inputs(rows, N, dtype, seed=rows)
    _, dx, _, _, dr = compare(x, w, b, r, dropout_p=p, seed=1234)
    # dx = mask / (1 - p) * dr: zero exactly where the shared RNG drops.
    keep = rng.keep_mask(rng.seed_tensor("t", 1234, x.device), 1, rows, N, p)[0]
    assert (dx[~keep] == 0).all() and torch.equal(dx[keep] != 0, dr[keep] != 0)
    assert (dr != 0).float().mean() > 0.99  # the residual's gradient is not masked


def test_dropout_without_residual():
    compare(*inputs(7, 768, torch.float32, residual=False, seed=2), dropout_p=0.4, seed=3)


def test_dropout_seed_repeats_and_changes():
    x, w, b, r = inputs(9, 200, torch.float32)
    run_ = lambda **kw: ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.3, backend="triton", **kw)
    a, b_, c = run_(seed=7), run_(seed=7), run_(seed=8)
    assert torch.equal(a, b_) and not torch.allclose(a, c)
    assert torch.equal(run_(seed=torch.tensor([7])), a)
    torch.manual_seed(0)
    d = run_()
    torch.manual_seed(0)
    assert torch.equal(run_(), d)


# ------------------------------------------------------------------------------------------------
# Layouts and edge cases


def test_non_contiguous_inputs_equal_contiguous():
    """x a column slice of a wider buffer (row stride != N, read in place), the residual a
    transpose (copied), the upstream gradient broadcast (row stride 0, read in place)."""
    rows, N = 9, 96
    wide = randn(rows, N + 40, seed=1)
    x = wide[:, 7:7 + N]
    r = randn(N, rows, seed=2).t()
    _, w, b, _ = inputs(rows, N, torch.float32)
    assert not x.is_contiguous() and x.stride(-1) == 1 and r.stride(-1) != 1
    y_strided = compare(x, w, b, r, dropout_p=0.2, seed=4)
    y_contig = run("triton", x.contiguous(), w, b, r.contiguous(), randn(rows, N, seed=5, dtype=torch.float64).float(),
                   dropout_p=0.2, seed=4)
    for name, s, c in zip(NAMES, y_strided, y_contig, strict=True):
        assert torch.equal(s, c), name
    dy = randn(N, seed=9).expand(rows, N)  # what y.sum(0) @ v would send back: stride (0, 1)
    assert dy.stride() == (0, 1)
    y_b = run("triton", x, w, b, r, dy)
    y_c = run("triton", x, w, b, r, dy.contiguous())
    for name, s, c in zip(NAMES, y_b, y_c, strict=True):
        assert torch.equal(s, c), name


def test_three_dim_input():
    x, w, b, r = inputs(3 * 5, 96, torch.float32, seed=6)
    compare(x.view(3, 5, 96), w, b, r.view(3, 5, 96), dropout_p=0.1, seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_rows_are_finite(dtype):
    """All-zero rows and constant rows: var = 0, rstd = 1 / sqrt(eps), y = bias, finite gradients."""
    x, w, b, r = inputs(6, 100, dtype, seed=9)
    x[0], r[0] = 0.0, 0.0  # all zero
    x[2], r[2] = 1.5, 0.25  # constant
    x[4] = 0.0  # only the residual
    y, *grads = compare(x, w, b, r)
    torch.testing.assert_close(y[0], b.to(dtype), rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_hidden_past_one_tile_walks_in_chunks():
    """A row wider than MAX_TILE_N (16384 > 8192): the chunked walks, ragged last chunk."""
    N = 2 * K.MAX_TILE_N + 100
    assert K.heuristic_config("fwd", N, torch.float32).chunked
    compare(*inputs(3, N, torch.float32, seed=12), dropout_p=0.1, seed=5)


def _launch_vs_torch(x, w, b, r, p, fwd_config, bwd_config, programs):
    """The launchers with explicit configs vs the torch backend (float64 reference)."""
    seed = rng.seed_tensor("t", 17, x.device)
    dy = randn(*x.shape, seed=3, dtype=torch.float64)
    ref = run("torch", *(t.double() for t in (x, w, b, r)), dy, dropout_p=p, seed=17)
    same = run("torch", x, w, b, r, dy.to(x.dtype), dropout_p=p, seed=17)
    y, mean, rstd = K.layer_norm_fwd(x, w, b, EPS, r, p, seed, config=fwd_config)
    dx, dr, dw, db = K.layer_norm_bwd(dy.to(x.dtype), x, w, mean, rstd, r, p, seed, config=bwd_config,
                                      programs=programs)
    dr = dx if dr is None else dr
    for name, rf, t, k in zip(NAMES, ref, same, (y, dx, dw.to(w.dtype), db.to(b.dtype), dr), strict=True):
        within_rule(k, t, rf, name)


@pytest.mark.parametrize("block_n", [128, 256])
def test_chunked_walks_with_small_chunks(block_n):
    """N = 1000 walked in chunks of 128 or 256 (ragged last chunk), several rows per tile, a
    persistent grid of 2 programs over 4 row blocks."""
    x, w, b, r = inputs(13, 1000, torch.float32, seed=13)
    _launch_vs_torch(x, w, b, r, 0.2, K.Config(4, block_n, 4, chunked=True), K.Config(4, block_n, 4, chunked=True),
                     programs=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [96, 768, 4096])
def test_gpu_configs(dtype, N):
    """The configs the launchers pick on a GPU (fewer rows per tile than under the interpreter),
    with a ragged last row block and fewer programs than row blocks."""
    fwd = K.heuristic_config("fwd", N, dtype, interpreter=False)
    bwd = K.heuristic_config("bwd", N, dtype, interpreter=False)
    rows = 2 * bwd.rows + 1
    x, w, b, r = inputs(rows, N, dtype, seed=N)
    _launch_vs_torch(x, w, b, r, 0.1, fwd, bwd, programs=2)


def test_persistent_grid_size_changes_only_the_order_of_dw_sums():
    """dx, dr do not depend on the backward grid; dw, db only through the order of float32 sums."""
    x, w, b, r = inputs(300, 96, torch.float32, seed=14)
    seed = rng.seed_tensor("t", 3, x.device)
    _, mean, rstd = K.layer_norm_fwd(x, w, b, EPS, r, 0.1, seed)
    dy = randn(300, 96, seed=15)
    one = K.layer_norm_bwd(dy, x, w, mean, rstd, r, 0.1, seed, programs=1)
    for programs in (2, 5):
        other = K.layer_norm_bwd(dy, x, w, mean, rstd, r, 0.1, seed, programs=programs)
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
        for a, c in zip(one[2:], other[2:], strict=True):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_gradients_only_for_inputs_that_require_them():
    x, w, b, r = inputs(7, 96, torch.float32)
    xg = x.clone().requires_grad_()
    y = ops.layer_norm(xg, w, b, EPS, residual=r, backend="triton")  # w, b, r need no gradient
    y.sum().backward()
    assert xg.grad is not None and w.grad is None and b.grad is None and r.grad is None
    # Without dropout x and the residual share one gradient, but never one tensor.
    _, dx, _, _, dr = run("triton", x, w, b, r, randn(7, 96, seed=1))
    assert torch.equal(dx, dr) and dx.data_ptr() != dr.data_ptr()


def test_refusals_name_the_reason_and_auto_dispatch_falls_back():
    x = randn(2, 8, dtype=torch.float64)
    with pytest.raises(ops.BackendUnavailableError, match="float16, bfloat16 or float32 only"):
        ops.layer_norm(x, None, None, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="weight and bias must be"):
        ops.layer_norm(x.float(), x.new_ones(8), None, backend="triton")
    wide = torch.zeros(1, importlib.import_module("bertfast.ops.layer_norm").TRITON_MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(ops.BackendUnavailableError, match="at most 65536"):
        ops.layer_norm(wide, None, None, backend="triton")
    with ops.record_backends() as ran, ops.use_backend("triton", "torch"):
        ops.layer_norm(x, None, None)
        ops.layer_norm(x.float(), None, None)
    assert ran == [("layer_norm", "torch"), ("layer_norm", "triton")]


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's tile scaling")
def test_interpreter_tiles_hold_more_rows():
    gpu = K.heuristic_config("fwd", 768, torch.float32, interpreter=False)
    assert K.heuristic_config("fwd", 768, torch.float32).rows == K.INTERPRETER_TILE_SCALE * gpu.rows
