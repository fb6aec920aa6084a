"""The attention op on the torch backend: its custom-op registration, its hand-written backward
(gradcheck, dropout and packing included), packed == padded, and the packed-layout checks."""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.ops.attention import attention_forward, dropout_keep_mask
from helpers import mix32_python

B, T, H, D = 3, 6, 2, 4


def inputs(dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    mask = torch.tensor([[1] * T, [1, 1, 1, 0, 0, 0], [0] * T], dtype=torch.bool)
    return q, k, v, mask


def pack(x, mask):
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return x[mask], cu, int(lengths.max())


def test_custom_op_registration_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    q, k, v, mask = inputs(torch.float32, requires_grad=True)
    seed = torch.tensor([5])
    torch.library.opcheck(attention_forward, (q, k, v, mask, None, 0, 0.0, 0.5, None, "torch", False))
    torch.library.opcheck(attention_forward, (q, k, v, mask, None, 0, 0.2, 0.5, seed, "torch", True))
    pq, cu, longest = pack(q.detach(), mask)
    pk, pv = k.detach()[mask], v.detach()[mask]
    packed = [t.requires_grad_() for t in (pq, pk, pv)]
    torch.library.opcheck(attention_forward, (*packed, None, cu, longest, 0.1, 0.5, seed, "torch", False))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_hand_written_backward_passes_gradcheck(layout, dropout_p):
    q, k, v, mask = inputs(requires_grad=True)
    kwargs = {"dropout_p": dropout_p, "seed": 11}
    if layout == "packed":
        _, cu, longest = pack(q.detach(), mask)
        q, k, v = (t.detach()[mask].requires_grad_() for t in (q, k, v))
        kwargs.update(cu_seqlens=cu, max_seqlen=longest)
    else:
        kwargs.update(key_padding_mask=mask)
    # The public op on the torch backend runs under autograd; the custom op's torch backend has
    # the backward written out (the kernels' formulas): check both.
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, **kwargs), (q, k, v))
    seed = torch.tensor([11])

    def custom_op(q, k, v):
        return attention_forward(q, k, v, kwargs.get("key_padding_mask"), kwargs.get("cu_seqlens"),
                                 kwargs.get("max_seqlen", 0), dropout_p, D**-0.5, seed, "torch", False)[0]

    assert torch.autograd.gradcheck(custom_op, (q, k, v))


def test_packed_equals_padded_forward_and_gradients_with_dropout():
    q, k, v, mask = inputs(requires_grad=True)
    out = ops.attention(q, k, v, key_padding_mask=mask, dropout_p=0.4, seed=3)
    pq, cu, longest = pack(q.detach(), mask)
    packed = [pq.requires_grad_(), k.detach()[mask].requires_grad_(), v.detach()[mask].requires_grad_()]
    out_packed = ops.attention(*packed, cu_seqlens=cu, max_seqlen=longest, dropout_p=0.4, seed=3)
    torch.testing.assert_close(out_packed, out[mask], rtol=1e-12, atol=1e-12)
    # Padded query rows attend to real keys too: give them no upstream gradient, as packing does.
    g = torch.randn(out.shape, dtype=torch.float64) * mask[:, :, None, None]
    out.backward(g)
    out_packed.backward(g[mask])
    for padded_t, packed_t in zip((q, k, v), packed, strict=True):
        torch.testing.assert_close(packed_t.grad, padded_t.grad[mask], rtol=1e-12, atol=1e-12)


def test_dropout_is_the_documented_hash_mask():
    q, k, v, _ = inputs()
    p = 0.25
    keep = dropout_keep_mask(torch.tensor([42]), B, H, T, T, p)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * D**-0.5, -1)
    expected = torch.einsum("bhij,bjhd->bihd", probs * keep / (1 - p), v)
    torch.testing.assert_close(ops.attention(q, k, v, dropout_p=p, seed=42), expected, rtol=1e-12, atol=1e-12)
    seed_tensor = ops.attention(q, k, v, dropout_p=p, seed=torch.tensor([42]))
    torch.testing.assert_close(seed_tensor, expected, rtol=1e-12, atol=1e-12)


def test_all_padding_row_and_lse_convention():
    q, k, v, mask = inputs()
    out, lse = attention_forward(q, k, v, mask, None, 0, 0.0, D**-0.5, None, "torch", False)
    assert (out[2] == 0).all()
    assert lse.shape == (H, B * T)
    assert torch.isinf(lse.view(H, B, T)[:, 2]).all() and torch.isfinite(lse.view(H, B, T)[:, :2]).all()


PACKED = torch.randn(5, H, D)


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"cu_seqlens": torch.tensor([0, 2, 5.0]), "max_seqlen": 3}, TypeError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int16), "max_seqlen": 3}, TypeError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([[0, 2, 5]], dtype=torch.int32), "max_seqlen": 3}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0], dtype=torch.int32), "max_seqlen": 3}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([1, 2, 5], dtype=torch.int32), "max_seqlen": 3}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 2, 4], dtype=torch.int32), "max_seqlen": 3}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 3, 2, 5], dtype=torch.int32), "max_seqlen": 3}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32)}, ValueError, "max_seqlen"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 2}, ValueError, "max_seqlen"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 3.0}, ValueError, "max_seqlen"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 3,
      "key_padding_mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 3, "dropout_p": 0.1,
      "seed": 1.5}, TypeError, "seed"),
    ({"cu_seqlens": torch.tensor([0, 2, 5], dtype=torch.int32), "max_seqlen": 3, "dropout_p": 0.1,
      "seed": torch.tensor([1, 2])}, ValueError, "seed"),
])
def test_packed_layout_errors_name_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=f"`{pattern}`"):
        ops.attention(PACKED, PACKED, PACKED, **kwargs)


def test_packed_inputs_must_be_three_dimensional_and_equal():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="`q`"):
        ops.attention(PACKED[None], PACKED[None], PACKED[None], cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="`k`"):
        ops.attention(PACKED, PACKED[:4], PACKED, cu_seqlens=cu, max_seqlen=3)


def test_offsets_are_read_once_then_again_after_an_in_place_write():
    """Every layer of an unpadded encoder passes the same cu_seqlens: only the first call reads
    it (one sync on a GPU); an in-place write makes the next call check it again."""
    from bertfast.ops import checks

    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    ops.attention(PACKED, PACKED, PACKED, cu_seqlens=cu, max_seqlen=3)
    assert checks.already_accepted(cu, ("cu_seqlens", 5, 3))
    cu[1] = 4  # now a sequence of 4 > max_seqlen
    with pytest.raises(ValueError, match="`max_seqlen`"):
        ops.attention(PACKED, PACKED, PACKED, cu_seqlens=cu, max_seqlen=3)


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31 + 5])
def test_dropout_bits_equal_a_pure_python_hash(seed):
    p, batch, heads, rows, cols = 0.3, 2, 3, 5, 7
    keep = dropout_keep_mask(torch.tensor([seed]), batch, heads, rows, cols, p)
    threshold = round(p * (1 << 24))
    for bh in range(batch * heads):
        key = mix32_python(mix32_python(seed & 0xFFFFFFFF) ^ bh)
        for i in range(rows):
            row_key = mix32_python(key ^ i)
            for j in range(cols):
                expected = (mix32_python(row_key ^ j) >> 8) >= threshold
                assert keep[bh // heads, bh % heads, i, j].item() == expected, (bh, i, j)


def test_custom_op_compiles_fullgraph_with_dynamic_shapes():
    """The path the kernels take under torch.compile: the custom op (here with its torch backend)
    in one graph, forward and backward, reused across sequence lengths."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def op(q, k, v, mask):
        return attention_forward(q, k, v, mask, None, 0, 0.0, D**-0.5, None, "torch", False)[0]

    torch._dynamo.reset()
    compiled = torch.compile(op, backend=count_graphs, fullgraph=True)
    for seq_len in (5, 9, 13):
        g = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(2, seq_len, H, D, generator=g, requires_grad=True) for _ in range(3))
        mask = torch.ones(2, seq_len, dtype=torch.bool)
        mask[1, seq_len // 2:] = False
        out = compiled(q, k, v, mask)
        torch.testing.assert_close(out, ops.attention(q, k, v, key_padding_mask=mask))
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 sequence lengths"
