"""The embedding op on the torch backend: dropout with the shared counter-based bits (the mask the
kernels draw), seeds, padding-index arguments, and the custom op the GPU backends run through (its
registration, fake implementation and written-out backward, checked here with the torch variant)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from bertfast.ops import triton_support
from bertfast import ops
from bertfast.ops import rng
from bertfast.ops.embedding import embedding_forward

B, T, E, H, V, P = 3, 5, 8, 6, 11, 9


def inputs(dtype=torch.float64, seed=0, requires_grad=False, projection=True, embeds=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = 0  # padding id
    real = (ids != 0).long()
    return {
        "input_ids": None if embeds else ids,
        "position_ids": torch.cumsum(real, 1) * real + 1,  # RoBERTa-style: padding at position 1
        "token_type_ids": torch.randint(0, 2, (B, T), generator=g),
        "word_weight": randn(V, E), "position_weight": randn(P, E), "token_type_weight": randn(2, E),
        "norm_weight": randn(E), "norm_bias": randn(E),
        "projection_weight": randn(H, E) if projection else None, "projection_bias": randn(H) if projection else None,
        "inputs_embeds": randn(B, T, E) if embeds else None,
    }


def call(kw, **options):
    return ops.embedding(kw["input_ids"], kw["position_ids"], kw["token_type_ids"], kw["word_weight"],
                         kw["position_weight"], kw["token_type_weight"], kw["norm_weight"], kw["norm_bias"],
                         projection_weight=kw["projection_weight"], projection_bias=kw["projection_bias"],
                         inputs_embeds=kw["inputs_embeds"], backend="torch", **options)


# ------------------------------------------------------------------------------------------------
# Dropout: the kernels' bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_mask_is_rng_keep_mask_of_the_normalized_rows(dtype):
    kw = inputs(dtype, projection=False)
    p, seed = 0.3, 77
    plain = call(kw)
    out = call(kw, dropout_p=p, seed=seed)
    keep = rng.keep_mask(torch.tensor([seed]), 1, B * T, E, p).view(B, T, E)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out, plain * keep * (1.0 / (1 - p)), rtol=0, atol=0)


def test_dropout_comes_before_the_projection():
    kw = inputs()
    p, seed = 0.4, 5
    normalized = call({**kw, "projection_weight": None, "projection_bias": None})
    expected = F.linear(rng.dropout(normalized, torch.tensor([seed]), p), kw["projection_weight"],
                        kw["projection_bias"])
    torch.testing.assert_close(call(kw, dropout_p=p, seed=seed), expected, rtol=0, atol=0)


def test_seed_repeats_changes_and_follows_torch_manual_seed():
    kw = inputs(torch.float32)
    a = call(kw, dropout_p=0.2, seed=3)
    assert torch.equal(a, call(kw, dropout_p=0.2, seed=3))
    assert torch.equal(a, call(kw, dropout_p=0.2, seed=torch.tensor([3])))
    assert not torch.equal(a, call(kw, dropout_p=0.2, seed=4))
    torch.manual_seed(0)
    b = call(kw, dropout_p=0.2)
    torch.manual_seed(0)
    assert torch.equal(b, call(kw, dropout_p=0.2))
    # Without dropout the seed is never read (and a bad one is not an error).
    assert torch.equal(call(kw), call(kw, seed="unused"))


def test_dropout_gradient_flows_through_kept_elements_only():
    kw = inputs(projection=False, requires_grad=True)
    p, seed = 0.5, 21
    out = call(kw, dropout_p=p, seed=seed)
    out.backward(torch.ones_like(out))
    keep = rng.keep_mask(torch.tensor([seed]), 1, B * T, E, p).view(B, T, E)
    # d out / d norm_bias = sum of keep / (1 - p) over tokens
    torch.testing.assert_close(kw["norm_bias"].grad, keep.sum((0, 1)).double() / (1 - p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed"),
    ({"dropout_p": 0.1, "seed": torch.tensor([1, 2])}, ValueError, "seed"),
    ({"padding_idx": V}, ValueError, "padding_idx"),
    ({"padding_idx": -V - 1}, ValueError, "padding_idx"),
    ({"padding_idx": 1.0}, ValueError, "padding_idx"),
    ({"position_padding_idx": P}, ValueError, "position_padding_idx"),
])
def test_bad_seed_and_padding_index_name_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=f"`{pattern}`"):
        call(inputs(torch.float32), **kwargs)


def test_negative_padding_index_counts_from_the_end():
    kw = inputs(requires_grad=True, projection=False)
    ids = kw["input_ids"].clone()
    ids[1, 2], ids[2, 0] = V - 1, 3
    kw["input_ids"] = ids
    out = call(kw, padding_idx=-1)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype))
    assert (kw["word_weight"].grad[V - 1] == 0).all() and (kw["word_weight"].grad[3] != 0).all()


# ------------------------------------------------------------------------------------------------
# The custom op (torch variant): registration, fake implementation, written-out backward


def op_args(kw, seed=None, dropout_p=0.0, padding_idx=0, position_padding_idx=1, out_dtype=None):
    return (kw["input_ids"], kw["position_ids"], kw["token_type_ids"], kw["word_weight"], kw["position_weight"],
            kw["token_type_weight"], kw["norm_weight"], kw["norm_bias"], kw["projection_weight"],
            kw["projection_bias"], kw["inputs_embeds"], seed, 1e-5, dropout_p, padding_idx, position_padding_idx,
            out_dtype or kw["word_weight"].dtype, "torch", False)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("embeds", [False, True])
def test_custom_op_registration_passes_opcheck(projection, embeds):
    kw = inputs(torch.float32, requires_grad=True, projection=projection, embeds=embeds)
    torch.library.opcheck(embedding_forward, op_args(kw))
    torch.library.opcheck(embedding_forward, op_args(kw, seed=torch.tensor([9]), dropout_p=0.25, padding_idx=-1,
                                                     position_padding_idx=-1))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("embeds", [False, True])
def test_written_out_backward_passes_gradcheck_and_equals_the_torch_backend(dropout_p, projection, embeds):
    kw = inputs(requires_grad=True, projection=projection, embeds=embeds)
    seed = torch.tensor([13])
    names = [n for n in ("word_weight", "position_weight", "token_type_weight", "norm_weight", "norm_bias",
                         "projection_weight", "projection_bias", "inputs_embeds")
             if kw[n] is not None and not (embeds and n == "word_weight")]

    def custom_op(*tensors, padding=(0, 1)):
        out, _, _ = embedding_forward(*op_args({**kw, **dict(zip(names, tensors))}, seed, dropout_p, *padding))
        return out

    tensors = [kw[n] for n in names]
    # Padding rows get no gradient by definition (not the derivative): gradcheck without them.
    assert torch.autograd.gradcheck(lambda *t: custom_op(*t, padding=(-1, -1)), tensors)
    # The custom op's output and gradients equal the public op's plain-autograd torch backend.
    out = custom_op(*tensors).view(B, T, -1)
    expected = call(kw, eps=1e-5, dropout_p=dropout_p, seed=seed, padding_idx=0, position_padding_idx=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    ours = torch.autograd.grad(out, tensors, g)
    theirs = torch.autograd.grad(expected, tensors, g)
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert (ours[names.index("position_weight")][1] == 0).all()  # the position padding row
    if not embeds:
        assert (ours[0][0] == 0).all()  # the word padding row


def test_custom_op_traces_under_torch_compile():
    kw = inputs(torch.float32, requires_grad=True)
    seed = torch.tensor([2])

    def f(word_weight, projection_weight):
        out, _, _ = embedding_forward(*op_args({**kw, "word_weight": word_weight,
                                                "projection_weight": projection_weight}, seed=seed, dropout_p=0.1))
        return out.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(kw["word_weight"], kw["projection_weight"])
    loss.backward()
    expected = torch.autograd.grad(f(kw["word_weight"], kw["projection_weight"]),
                                   (kw["word_weight"], kw["projection_weight"]))
    torch.testing.assert_close(kw["word_weight"].grad, expected[0])
    torch.testing.assert_close(kw["projection_weight"].grad, expected[1])


# ------------------------------------------------------------------------------------------------
# The triton backend, as far as it is visible without a GPU


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):

    monkeypatch.setattr(triton_support, "INTERPRETING", False)
    with pytest.raises(ops.BackendUnavailableError, match="needs CUDA tensors"):
        ops.embedding(*(inputs(torch.float32)[k] for k in ("input_ids", "position_ids", "token_type_ids",
                                                           "word_weight", "position_weight", "token_type_weight",
                                                           "norm_weight", "norm_bias")), backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_aot_launches_name_every_kernel_argument():
    """Every launch the static report compiles gives each kernel argument: a runtime value or a constexpr."""
    from bertfast.kernels import embedding as kernels

    launches = kernels.aot_launches()
    seen = set()
    for launch in launches:
        fn = launch.kernel
        names = set(fn.arg_names)
        assert set(launch.args) | set(launch.constexprs) == names, launch.config
        assert not set(launch.args) & set(launch.constexprs), launch.config
        seen.add((launch.kernel_name, launch.dtype))
    expected = {"_emb_fwd_kernel", "_emb_bwd_kernel", "_emb_bwd_proj_kernel", "_segment_sum_kernel"}
    assert seen == {(k, d) for k in expected for d in ("float16", "bfloat16", "float32")}
