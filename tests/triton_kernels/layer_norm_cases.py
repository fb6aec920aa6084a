"""Inputs and the comparison of a layer_norm kernel backend (triton, cuda, or the emulated cuda one)
with the torch backend, shared by every kernel test of the op."""

from __future__ import annotations

import torch
from kernel_helpers import max_error, within_rule

from bertfast import ops

EPS = 1e-5
NAMES = ("y", "dx", "dweight", "dbias", "dresidual")


def randn(*shape, device, seed=0, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)


def inputs(rows, N, dtype, residual=True, affine=(True, True), param_dtype=None, seed=0, *, device):
    """x (rows, N) with a non-zero mean (as real activations have), residual, weight near 1, bias."""
    param_dtype = param_dtype or dtype
    x = randn(rows, N, device=device, seed=seed, dtype=dtype, shift=0.5)
    r = randn(rows, N, device=device, seed=seed + 1, dtype=dtype) if residual else None
    w = randn(N, device=device, seed=seed + 2, dtype=param_dtype, scale=0.1, shift=1.0) if affine[0] else None
    b = randn(N, device=device, seed=seed + 3, dtype=param_dtype, scale=0.1) if affine[1] else None
    return x, w, b, r


def run(backend, x, w, b, r, dy, **kwargs):
    """(y, dx, dw, db, dr) of ops.layer_norm on ``backend``; None for an input not given."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    y = ops.layer_norm(leaves[0], leaves[1], leaves[2], EPS, residual=leaves[3], backend=backend, **kwargs)
    y.backward(dy)
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def compare(backend, x, w, b, r, **kwargs):
    """``backend`` and the torch backend in the inputs' dtypes vs the torch backend in float64; returns
    ``backend``'s results. With dropout, pass ``seed``: every run must draw the same mask."""
    assert kwargs.get("dropout_p", 0.0) == 0.0 or "seed" in kwargs
    dy = randn(*x.shape, device=x.device, seed=5, dtype=torch.float64)
    ref = run("torch", *(None if t is None else t.double() for t in (x, w, b, r)), dy, **kwargs)
    same_dtype = run("torch", x, w, b, r, dy.to(x.dtype), **kwargs)
    with ops.record_backends() as ran:
        kernel = run(backend, x, w, b, r, dy.to(x.dtype), **kwargs)
    assert ran == [("layer_norm", backend)]
    for name, rf, t, k in zip(NAMES, ref, same_dtype, kernel, strict=True):
        if rf is None:
            assert k is None, name
            continue
        assert k.dtype == t.dtype, f"{name}: dtype {k.dtype} != the torch backend's {t.dtype}"
        # The rule's budget is the torch backend's own error: make sure that is round-off (a
        # mismatched dropout mask would make it O(1) and the rule toothless). Element-wise outputs
        # only: the column sums dw, db of torch's bfloat16 on a CPU are legitimately a few % off.
        if name in ("y", "dx", "dresidual"):
            assert max_error(t, rf) <= 0.02 * rf.abs().max().item(), f"{name}: the torch backend itself is off"
        within_rule(k, t, rf, name)
    return kernel
