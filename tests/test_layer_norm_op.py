"""The layer_norm op on the torch backend: the shared counter-based dropout mask, seeds, the custom
op the kernels run through (opcheck, its hand-written backward, torch.compile), the triton
backend's refusals and the launches it declares for the static report."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from bertfast.ops import triton_support
from bertfast import ops
from bertfast.ops import rng

LN = importlib.import_module("bertfast.ops.layer_norm")  # the module (ops.layer_norm is the function)
EPS = 1e-5


def inputs(rows=6, n=10, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, n, generator=g, dtype=dtype) for _ in range(2))
    w = 1 + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    b = 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (x, w, b, r))


# ------------------------------------------------------------------------------------------------
# Dropout: the shared mask


def test_torch_backend_drops_the_shared_rng_mask():
    x, w, b, r = inputs(rows=15, n=33)
    p, seed = 0.3, 1234
    y = ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=p, seed=seed, backend="torch")
    keep = rng.keep_mask(torch.tensor([seed]), 1, 15, 33, p)[0]  # (rows, N), stream 0
    expected = F.layer_norm(torch.where(keep, x / (1 - p), 0.0) + r, (33,), w, b, EPS)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # A leading batch dim is part of the rows: (3, 5, 33) draws the mask of (15, 33).
    y3 = ops.layer_norm(x.view(3, 5, 33), w, b, EPS, residual=r.view(3, 5, 33), dropout_p=p, seed=seed,
                        backend="torch")
    assert torch.equal(y3.view(15, 33), y)


def test_gradient_recovers_the_mask_exactly():
    """dx = ds * keep / (1 - p), dr = ds: dropped elements get exactly no gradient."""
    x, w, b, r = inputs(rows=20, n=64, requires_grad=True)
    p, seed = 0.25, 99
    ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=p, seed=seed, backend="torch").backward(
        torch.randn(20, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    keep = rng.keep_mask(torch.tensor([seed]), 1, 20, 64, p)[0]
    assert (x.grad[~keep] == 0).all()
    torch.testing.assert_close(x.grad[keep], r.grad[keep] / (1 - p), rtol=1e-12, atol=0)


def test_seed_repeats_changes_and_follows_manual_seed():
    x, w, b, r = inputs()
    call = lambda **kw: ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.5, backend="torch", **kw)
    assert torch.equal(call(seed=3), call(seed=3))
    assert torch.equal(call(seed=3), call(seed=torch.tensor([3])))
    assert torch.equal(call(seed=3), call(seed=torch.tensor(3)))
    assert not torch.equal(call(seed=3), call(seed=4))
    torch.manual_seed(7)
    first = call()
    torch.manual_seed(7)
    assert torch.equal(call(), first)
    assert not torch.equal(call(), first)  # a fresh draw
    # Without dropout the seed changes nothing and draws nothing from the generator.
    no_drop = ops.layer_norm(x, w, b, EPS, residual=r, backend="torch")
    state = torch.get_rng_state()
    assert torch.equal(ops.layer_norm(x, w, b, EPS, residual=r, seed=5, backend="torch"), no_drop)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("seed,error,pattern", [
    (1.5, TypeError, "must be an int or an int64 tensor"),
    (True, TypeError, "must be an int or an int64 tensor"),
    (torch.tensor([1, 2]), ValueError, "tensor must hold one int64"),
    (torch.tensor([1], dtype=torch.int32), ValueError, "tensor must hold one int64"),
])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bad_seed_names_the_argument(seed, error, pattern, p):
    x, w, b, _ = inputs()
    with pytest.raises(error, match=rf"layer_norm: `seed` {pattern}"):
        ops.layer_norm(x, w, b, EPS, dropout_p=p, seed=seed)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_within_binomial_bounds(p):
    x = torch.ones(256, 512)
    y = ops.layer_norm(x, None, None, EPS, residual=torch.zeros_like(x), dropout_p=p, seed=11, backend="torch")
    keep = rng.keep_mask(torch.tensor([11]), 1, 256, 512, p)[0]
    # Per row: kept elements share one value, dropped ones another.
    assert all(len(set(row.tolist())) <= 2 for row in y[:8])
    n, dropped = keep.numel(), (~keep).sum().item()
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 5 * sigma, f"dropped {dropped} of {n}, expected {n * p:.0f} +- {sigma:.0f}"
    rows_rate = (~keep).float().mean(1)
    assert rows_rate.std() > 0 and not torch.equal(keep[0], keep[1])  # no repeated row pattern


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_with_dropout(residual):
    x, w, b, r = inputs(rows=4, n=7, requires_grad=True)
    args = (x, w, b, r) if residual else (x, w, b)

    def fn(x, w, b, r=None):
        return ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.3, seed=17, backend="torch")

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


# ------------------------------------------------------------------------------------------------
# The custom op (what the kernels run through), exercised with its torch backend


def _seed(p):
    return torch.tensor([5]) if p > 0 else None


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("flags", ["all", "no_residual", "no_weight", "no_params"])
def test_custom_op_registration_passes_opcheck(flags, p):
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    x, w, b, r = inputs(requires_grad=True, dtype=torch.float32)
    w = None if flags in ("no_weight", "no_params") else w
    b = None if flags == "no_params" else b
    r = None if flags == "no_residual" else r
    torch.library.opcheck(LN.layer_norm_forward, (x, w, b, r, _seed(p), EPS, p, "torch"))


def test_backward_op_passes_opcheck():
    x, w, b, r = inputs(dtype=torch.float32)
    dy = torch.randn_like(x)
    seed = torch.tensor([5])
    _, mean, rstd = LN.layer_norm_forward(x, w, b, r, seed, EPS, 0.2, "torch")
    for need_dw, need_db in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(LN.layer_norm_backward, (dy, x, w, b, r, seed, mean, rstd, 0.2, need_dw, need_db, "torch"))
    torch.library.opcheck(LN.layer_norm_backward, (dy, x, None, None, None, None, mean, rstd, 0.0, False, False,
                                                   "torch"))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("residual", [False, True])
def test_hand_written_backward_equals_autograd(residual, p):
    """The custom op's torch backward (the kernels' formulas) vs autograd through the plain ops."""
    x, w, b, r = inputs(rows=9, n=13, seed=3)
    r = r if residual else None
    dy = torch.randn(9, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)] + ([r.clone().requires_grad_()] if residual else [])
    plain = ops.layer_norm(*leaves[:3], EPS, residual=leaves[3] if residual else None, dropout_p=p, seed=8,
                           backend="torch")
    plain.backward(dy)
    custom_leaves = [t.clone().requires_grad_() for t in (x, w, b)] + ([r.clone().requires_grad_()] if residual
                                                                          else [])
    y, mean, rstd = LN.layer_norm_forward(*custom_leaves[:3], custom_leaves[3] if residual else None,
                                          None if p == 0 else torch.tensor([8]), EPS, p, "torch")
    y.backward(dy)
    torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
    for a, c in zip(custom_leaves, leaves, strict=True):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-12)
    # The saved statistics are the normalized input's: float64 here, float32 for float32 inputs.
    s = x.clone() if p == 0 else rng.dropout(x, torch.tensor([8]), p)
    s = s + r if residual else s
    torch.testing.assert_close(mean, s.mean(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, (s.var(-1, correction=0) + EPS).rsqrt(), rtol=1e-12, atol=1e-12)
    assert not mean.requires_grad and not rstd.requires_grad


def test_custom_op_gradcheck_with_dropout():
    x, w, b, r = inputs(rows=3, n=6, requires_grad=True)

    def fn(x, w, b, r):
        return LN.layer_norm_forward(x, w, b, r, torch.tensor([21]), EPS, 0.3, "torch")[0]

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


def test_custom_op_gradients_only_where_asked():
    x, w, b, r = inputs(requires_grad=False)
    xg = x.clone().requires_grad_()
    y, _, _ = LN.layer_norm_forward(xg, w, b, r, None, EPS, 0.0, "torch")
    y.sum().backward()
    assert xg.grad is not None and w.grad is None and b.grad is None and r.grad is None
    # x and residual get equal gradients without dropout, as two tensors.
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    LN.layer_norm_forward(xg, None, None, rg, None, EPS, 0.0, "torch")[0].pow(2).sum().backward()
    assert torch.equal(xg.grad, rg.grad) and xg.grad.data_ptr() != rg.grad.data_ptr()


def test_half_input_with_float32_parameters():
    """Autocast's mix on the custom op: y, dx, dr in float16; dw, db in float32; statistics float32."""
    x, w, b, r = inputs(dtype=torch.float32)
    x, r = x.half().requires_grad_(), r.half().requires_grad_()
    w, b = w.requires_grad_(), b.requires_grad_()
    y, mean, rstd = LN.layer_norm_forward(x, w, b, r, torch.tensor([2]), EPS, 0.1, "torch")
    y.float().sum().backward()
    assert (y.dtype, x.grad.dtype, r.grad.dtype) == (torch.float16,) * 3
    assert (w.grad.dtype, b.grad.dtype, mean.dtype, rstd.dtype) == (torch.float32,) * 4


def test_custom_op_compiles_fullgraph_with_dynamic_shapes():
    """The path the kernels take under torch.compile: the custom op (here with its torch backend)
    in one graph, forward and backward, reused across row counts."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def op(x, w, b, r, seed):
        return LN.layer_norm_forward(x, w, b, r, seed, EPS, 0.1, "torch")[0]

    torch._dynamo.reset()
    compiled = torch.compile(op, backend=count_graphs, fullgraph=True)
    for rows in (5, 9, 13):
        x, w, b, r = inputs(rows=rows, n=12, dtype=torch.float32, requires_grad=True, seed=rows)
        seed = torch.tensor([rows])
        out = compiled(x, w, b, r, seed)
        torch.testing.assert_close(out, ops.layer_norm(x, w, b, EPS, residual=r, dropout_p=0.1, seed=seed))
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w, b, r))
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 row counts"


# ------------------------------------------------------------------------------------------------
# The triton backend, without a GPU: its refusals and its static-report launches


def _facts(**changes):
    facts = {"device": "cuda", "dtype": torch.bfloat16, "hidden": 768, "residual": True,
             "param_dtype": torch.float32, "rows": 4096}
    facts.update(changes)
    return facts


@pytest.mark.skipif(not triton_support.TRITON_FOUND, reason="triton is not installed")
@pytest.mark.parametrize("changes,reason", [
    ({}, None),
    ({"param_dtype": None}, None),
    ({"hidden": LN.TRITON_MAX_HIDDEN}, None),
    ({"device": "cpu"}, "needs CUDA tensors"),
    ({"dtype": torch.float64}, "float16, bfloat16 or float32 only"),
    ({"param_dtype": torch.float64}, "weight and bias must be float16, bfloat16 or float32"),
    ({"hidden": LN.TRITON_MAX_HIDDEN + 1}, "the normalized dim must be at most 65536"),
    ({"rows": 2**31}, "at most 2^31 - 1 rows"),
])
def test_triton_refusals(changes, reason):
    got = LN.OP.refusal("triton", _facts(**changes))
    assert got is None if reason is None else (got is not None and reason in got), got


def test_triton_limit_matches_the_kernels():
    pytest.importorskip("triton")
    from bertfast.kernels import layer_norm as K

    assert K.MAX_N == LN.TRITON_MAX_HIDDEN


def test_aot_launches_cover_every_config_the_launchers_pick():
    pytest.importorskip("triton")
    from bertfast.kernels import layer_norm as K

    launches = K.aot_launches()
    for launch in launches:  # every kernel argument has a value, none extra
        assert set(launch.args) | set(launch.constexprs) == set(launch.kernel.arg_names), launch.config
    seen = {(launch.kernel_name, launch.dtype, launch.constexprs["ROWS"], launch.constexprs["BLOCK_N"],
             launch.constexprs["CHUNKED"], launch.num_warps, launch.flags) for launch in launches}
    for dtype in ("float16", "bfloat16", "float32"):
        for N in (128, 768, 1024, 4096):
            for kind, name in (("fwd", "_layer_norm_fwd_kernel"), ("bwd", "_layer_norm_bwd_kernel")):
                c = K.heuristic_config(kind, N, getattr(torch, dtype), interpreter=False)
                combos = {flags for (k, d, rows, bn, ch, w, flags) in seen
                          if (k, d, rows, bn, ch, w) == (name, dtype, c.rows, c.block_n, c.chunked, c.num_warps)}
                expected = 8 if kind == "fwd" else 2  # every forward flag set; the extremes of the backward
                assert len(combos) == expected, (kind, dtype, N, combos)


def test_heuristic_configs():
    pytest.importorskip("triton")
    from bertfast.kernels import layer_norm as K

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for N in (1, 96, 128, 768, 1000, 1024, 4096, 8192, 8193, 65536):
            for kind in ("fwd", "bwd"):
                c = K.heuristic_config(kind, N, dtype, interpreter=False)
                assert c.chunked == (N > K.MAX_TILE_N)
                assert c.block_n >= N or c.chunked
                assert c.rows * c.block_n <= 8192 or c.rows == 1
                assert 2 <= c.num_warps <= 16 and c.num_warps & (c.num_warps - 1) == 0
    # Several rows per program at BERT sizes, one wide row per program at 4096 in the backward.
    assert K.heuristic_config("fwd", 768, torch.bfloat16, interpreter=False).rows >= 4
    assert K.heuristic_config("bwd", 4096, torch.float32, interpreter=False).rows == 1
    for bad in (0, K.MAX_N + 1):
        with pytest.raises(ValueError, match="N: the layer_norm kernels take rows of"):
            K.heuristic_config("fwd", bad, torch.float32)
