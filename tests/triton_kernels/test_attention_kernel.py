"""The Triton attention kernel against the torch backend (itself checked against transformers).

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md): the kernel's error
against the float64 reference is at most 2x the torch backend's error in the same dtype, plus a
small atol. Dropout draws the same counter-based bits in both backends, so dropout is compared
directly too.
"""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.ops.attention import dropout_keep_mask
from kernel_helpers import DEVICE, DTYPES, within_rule

ATTENTION = ops.attention


def make_qkv(B, T, H, D, dtype, seed=0, fused=False):
    g = torch.Generator().manual_seed(seed)
    if fused:  # views of one (B, T, 3, H, D) projection: non-contiguous, unit last stride
        qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        return qkv.unbind(2)
    return tuple(torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3))


def ragged_mask(B, T, seed=0, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if empty_row and B > 1:
        mask[-1] = False
    return mask.to(DEVICE)


def run(q, k, v, backend, dout, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ATTENTION(q, k, v, backend=backend, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def compare(q, k, v, dtype, **kwargs):
    """Kernel and torch backend in ``dtype`` vs the torch backend in float64: forward and grads."""
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ref = run(*(t.double() for t in (q, k, v)), "torch", dout, **kwargs)
    same_dtype = run(q, k, v, "torch", dout.to(dtype), **kwargs)
    kernel = run(q, k, v, "triton", dout.to(dtype), **kwargs)
    floor = max(r.abs().max().item() for r in ref)
    for name, r, t, kk in zip(("out", "dq", "dk", "dv"), ref, same_dtype, kernel, strict=True):
        within_rule(kk, t, r, name, floor=floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 129, 257])
def test_padded_forward_backward_matches_torch(dtype, T):
    B, H, D = (3, 2, 32) if T < 200 else (2, 1, 32)
    q, k, v = make_qkv(B, T, H, D, dtype, seed=T)
    mask = ragged_mask(B, T, seed=T)
    compare(q, k, v, dtype, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequence_1000(dtype):
    q, k, v = make_qkv(1, 1000, 1, 16, dtype, seed=3)
    compare(q, k, v, dtype, key_padding_mask=ragged_mask(1, 1000))


@pytest.mark.parametrize("D", [8, 24, 40, 64, 128])
def test_head_dims_padded_to_a_power_of_two(D):
    q, k, v = make_qkv(2, 19, 2, D, torch.float32, seed=D)
    compare(q, k, v, torch.float32, key_padding_mask=ragged_mask(2, 19), scale=0.3)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_qkv_views_and_both_backward_modes(deterministic):
    q, k, v = make_qkv(2, 33, 3, 16, torch.float32, fused=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    compare(q, k, v, torch.float32, key_padding_mask=ragged_mask(2, 33), deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_lengths_without_mask(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 2, 16, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    k, v = (torch.randn(2, 70, 2, 16, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2))
    compare(q, k, v, dtype)


def packed(q, mask):
    """(B, T, H, D) + mask -> (total, H, D), cu_seqlens int32, max_seqlen (prefix masks only)."""
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0)
    return q[mask], cu, int(lengths.max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_torch_and_the_padded_layout(dtype, monkeypatch):
    B, T, H, D = 4, 70, 2, 24
    q, k, v = make_qkv(B, T, H, D, dtype, seed=9)
    mask = ragged_mask(B, T, seed=4)
    (pq, cu, max_len), pk, pv = packed(q, mask), k[mask], v[mask]
    compare(pq, pk, pv, dtype, cu_seqlens=cu, max_seqlen=max_len)
    # The packed kernel's real rows equal the padded kernel's, run with the same tile config: on a
    # GPU the autotuner may pick different ones for the two layouts (the first H200 run did), so
    # both take the first candidate (the candidates depend on the head dim and dtype only).
    monkeypatch.setenv("BERTFAST_AUTOTUNE", "0")
    padded = ATTENTION(q, k, v, key_padding_mask=mask, backend="triton")[mask]
    varlen = ATTENTION(pq, pk, pv, cu_seqlens=cu, max_seqlen=max_len, backend="triton")
    assert torch.equal(varlen, padded)  # same tiles, same order of operations


def test_varlen_with_empty_and_single_token_sequences():
    lengths = torch.tensor([5, 0, 1, 64, 3])
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(total, 2, 16, generator=g, dtype=torch.float64).float().to(DEVICE) for _ in range(3))
    compare(q, k, v, torch.float32, cu_seqlens=cu.to(DEVICE), max_seqlen=64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_dropout_matches_torch_backend_bit_for_bit_in_the_mask(dtype, layout):
    B, T, H, D = 2, 45, 2, 16
    q, k, v = make_qkv(B, T, H, D, dtype, seed=11)
    mask = ragged_mask(B, T, seed=2)
    kwargs = dict(dropout_p=0.25, seed=1234)
    if layout == "varlen":
        (q, cu, max_len), k, v = packed(q, mask), k[mask], v[mask]
        kwargs.update(cu_seqlens=cu, max_seqlen=max_len)
    else:
        kwargs.update(key_padding_mask=mask)
    compare(q, k, v, dtype, **kwargs)


def test_dropout_seed_repeats_and_changes():
    q, k, v = make_qkv(2, 40, 2, 16, torch.float32)
    a = ATTENTION(q, k, v, dropout_p=0.3, seed=7, backend="triton")
    b = ATTENTION(q, k, v, dropout_p=0.3, seed=7, backend="triton")
    c = ATTENTION(q, k, v, dropout_p=0.3, seed=8, backend="triton")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(0)
    d = ATTENTION(q, k, v, dropout_p=0.3, backend="triton")
    torch.manual_seed(0)
    e = ATTENTION(q, k, v, dropout_p=0.3, backend="triton")
    assert torch.equal(d, e)


def test_dropout_keep_rate_within_binomial_bounds():
    p, n_rows, n_cols = 0.1, 256, 256
    keep = dropout_keep_mask(torch.tensor([99]), 2, 3, n_rows, n_cols, p)
    n = keep.numel()
    kept = keep.sum().item()
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs((n - kept) - n * p) < 5 * sigma
    # Neighbouring rows and heads are not copies of each other.
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep[0, 0], keep[0, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_padding_row_gives_exact_zeros_and_zero_grads(dtype):
    q, k, v = make_qkv(3, 20, 2, 16, dtype)
    mask = ragged_mask(3, 20, empty_row=True)
    dout = torch.randn(q.shape, dtype=torch.float64).to(DEVICE, dtype)
    out, dq, dk, dv = run(q, k, v, "triton", dout, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[-1] == 0).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all() and (g[-1] == 0).all()


def test_nan_in_padded_keys_and_values_never_leaks():
    q, k, v = make_qkv(2, 30, 2, 16, torch.float32)
    mask = ragged_mask(2, 30, seed=5)
    dout = torch.randn(q.shape, dtype=torch.float64).float().to(DEVICE)
    clean = run(q, k, v, "triton", dout, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = float("nan")
    v2[~mask] = float("inf")
    dirty = run(q, k2, v2, "triton", dout, key_padding_mask=mask)
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a, b)
    assert (dirty[2][~mask] == 0).all() and (dirty[3][~mask] == 0).all()  # padded keys get no gradient


def test_refused_head_dim_names_the_reason_and_auto_dispatch_falls_back():
    q, k, v = make_qkv(1, 5, 1, 12, torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="head_dim must be a multiple of 8"):
        ATTENTION(q, k, v, backend="triton")
    with ops.record_backends() as ran, ops.use_backend("triton", "torch"):
        ATTENTION(q, k, v)
    assert ran == [("attention", "torch")]
