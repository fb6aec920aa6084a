"""The Triton RTD head + loss kernels (bertfast.kernels.rtd_loss) against the op's torch backend.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by the runner in
tests/test_triton_interpreted.py) or compiled on a GPU. Rule (DESIGN.md, ``within_rule``): the
kernel's error against the float64 reference (the torch backend on float64 inputs) is at most 2x the
torch backend's error in the same dtype plus a few ulps: logits and the gradients of hidden, the
dense weight and bias and the prediction weight, over the whole op.

The loss and the prediction-bias gradient are sums over tokens, and the same rule is applied to them
from the kernel's own input: z = hidden @ W_dense^T, rounded to the dtype by F.linear without its
bias, as the triton backend computes it. Over the whole op the kernel's error in these sums is
dominated by that rounding of z, which the torch backend (its GEMM adds the bias before rounding)
does not share, and the torch backend's own per-token errors partly cancel by chance, so the whole-op
rule would be seed-lucky. So the float64 reference and the torch backend in the dtype both start
from the same rounded z (``head_from_z``); that checks what the fused kernel computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bertfast.kernels import rtd_loss as kernels
from kernel_helpers import DEVICE, DTYPES, within_rule

from bertfast import ops
from bertfast.ops.rtd_loss import rtd_head_forward

PARAMS = ("dense_weight", "dense_bias", "prediction_weight", "prediction_bias")
LOSS_WEIGHT = 50.0  # ELECTRA's weight of the RTD loss: the loss gradient reaches the op as 50
SUMS = ("loss", "dprediction_bias")  # checked from the kernel's input z (module docstring)


def make_inputs(B, T, H, dtype, seed=0, labels="int", mask="ragged"):
    """hidden, the head's parameters (scaled so logits spread over a few units), labels and mask.

    mask: None, "ragged" (row 0 full, others random lengths >= 1), "empty_row" (ragged, last row
    all padding) or "all_padding"."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)

    tensors = {"hidden": randn(B, T, H), "dense_weight": randn(H, H, scale=H**-0.5), "dense_bias": randn(H, scale=0.5),
                   "prediction_weight": randn(1, H, scale=3 * H**-0.5), "prediction_bias": randn(1)}
    y = None
    if labels is not None:
        y = torch.randint(0, 2, (B, T), generator=g)
        y = {"int": y, "bool": y.bool(), "int32": y.int()}[labels].to(DEVICE)
    m = None
    if mask is not None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        if mask == "empty_row":
            lengths[-1] = 0
        if mask == "all_padding":
            lengths[:] = 0
        m = (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE)
    return tensors, y, m


def run(tensors, labels, mask, backend, approximate, dlogits, loss_weight, dtype=None):
    """(logits, loss, grads of hidden and the parameters) of loss_weight * loss + sum(logits * dlogits)
    (a term is left out when its weight is None; a 0-dim dlogits means logits.sum()); ``dtype`` casts
    the inputs first."""
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_() for k, v in tensors.items()}
    logits, loss = ops.rtd_loss(leaves["hidden"], *(leaves.get(k) for k in PARAMS), labels, mask,
                                approximate=approximate, backend=backend)
    out = {"logits": logits.detach(), "loss": None if loss is None else loss.detach()}
    total = 0
    if loss_weight is not None:
        total = total + loss_weight * loss
    if dlogits is not None:
        total = total + ((logits * dlogits.to(logits.dtype)).sum() if dlogits.dim() else logits.sum())
    grads = torch.autograd.grad(total, list(leaves.values()))
    out.update({f"d{k}": gr for k, gr in zip(leaves, grads, strict=True)})
    return out


def head_from_z(tensors, labels, mask, approximate, dlogits, loss_weight, compute, autocast=False):
    """(torch backend in ``compute``, float64 reference), both of the head alone on the kernel's input
    z = F.linear(hidden, W_dense) in ``compute`` (as the triton backend computes it, casting first
    under autocast): the op's torch backend with hidden = z and the dense weight the identity, whose
    F.linear(z, I, b) rounds z + b once, as the torch backend's GEMM with its bias does."""
    z = F.linear(tensors["hidden"].to(compute), tensors["dense_weight"].to(compute))
    head = {**tensors, "hidden": z, "dense_weight": torch.eye(z.shape[-1], dtype=tensors["dense_weight"].dtype,
                                                                device=DEVICE)}
    with torch.autocast(DEVICE, dtype=compute, enabled=autocast):  # float32 parameters on float16 z
        same_dtype = run(head, labels, mask, "torch", approximate, dlogits, loss_weight)
    ref = run(head, labels, mask, "torch", approximate, dlogits, loss_weight, dtype=torch.float64)
    return same_dtype, ref


def compare(tensors, labels, mask, dtype, approximate="none", grads="both", seed=5):
    """Kernel and torch backend in ``dtype`` vs the torch backend in float64."""
    B, T = tensors["hidden"].shape[:2]
    g = torch.Generator().manual_seed(seed)
    dlogits = torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE) if grads in ("both", "logits") else None
    loss_weight = LOSS_WEIGHT if grads in ("both", "loss") and labels is not None else None
    ref = run(tensors, labels, mask, "torch", approximate, dlogits, loss_weight, dtype=torch.float64)
    same_dtype = run(tensors, labels, mask, "torch", approximate, dlogits, loss_weight)
    kernel = run(tensors, labels, mask, "triton", approximate, dlogits, loss_weight)
    assert kernel["logits"].dtype == dtype
    assert (kernel["loss"] is None) == (labels is None)
    check_all(kernel, same_dtype, ref, *head_from_z(tensors, labels, mask, approximate, dlogits, loss_weight, dtype))
    return kernel


def check_all(kernel, same_dtype, ref, head_same_dtype, head_ref):
    """within_rule for every result: the sums against the head from z (module docstring), the rest
    against the whole op."""
    for name, k in kernel.items():
        if k is None:
            continue
        assert k.dtype == same_dtype[name].dtype, name
        if name in SUMS:
            assert k.dtype == head_same_dtype[name].dtype, name
            within_rule(k, head_same_dtype[name], head_ref[name], name)
        else:
            within_rule(k, same_dtype[name], ref[name], name)


# (B, T, H, approximate, labels, mask, grads): rows 1, 7, 15, 1155; hidden 96, 768, 1000; both GELU forms.
CASES = [
    pytest.param(1, 1, 96, "none", "int", None, "both", id="rows1-h96-erf"),
    pytest.param(1, 7, 1000, "tanh", "bool", "ragged", "both", id="rows7-h1000-tanh"),
    pytest.param(3, 5, 768, "none", "int32", "ragged", "logits", id="rows15-h768-erf-logit-grads"),
    pytest.param(7, 165, 96, "tanh", "bool", "empty_row", "loss", id="rows1155-h96-tanh-empty-row"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, approximate, labels, mask, grads", CASES)
def test_forward_backward_matches_torch(B, T, H, approximate, labels, mask, grads, dtype):
    tensors, y, m = make_inputs(B, T, H, dtype, seed=B * T + H, labels=labels, mask=mask)
    compare(tensors, y, m, dtype, approximate, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_1151_rows_in_few_row_groups(dtype, monkeypatch):
    """The large case, loss and logits both with gradients; 4 row groups, so each backward program
    walks up to 18 row tiles (the last group a ragged 17.9) and the partial sums of the groups add up."""
    monkeypatch.setattr(kernels, "MAX_ROW_GROUPS", 4)
    assert kernels.row_groups(1151, kernels.config_for(96).block_m) == (18 * 16, 4)
    tensors, y, m = make_inputs(1, 1151, 96, dtype, seed=11, labels="int", mask="ragged")
    compare(tensors, y, m, dtype, "none", "both")


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the tests above run bfloat16 too")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bfloat16_under_the_interpreter(approximate):
    """These kernels hold no tl.dot (the interpreter's bfloat16 bug), so bfloat16 is checked here too."""
    tensors, y, m = make_inputs(3, 9, 768, torch.bfloat16, seed=12, labels="int", mask="empty_row")
    compare(tensors, y, m, torch.bfloat16, approximate, "both")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_logits_only_without_labels(approximate):
    tensors, _, m = make_inputs(3, 11, 96, torch.float32, seed=2, labels=None)
    compare(tensors, None, m, torch.float32, approximate, "logits")


@pytest.mark.parametrize("grads", ["loss", "both"])
def test_all_padding_batch_gives_zero_loss_and_no_nan(grads):
    tensors, y, m = make_inputs(2, 5, 96, torch.float32, seed=3, labels="int", mask="all_padding")
    kernel = compare(tensors, y, m, torch.float32, "none", grads)
    assert kernel["loss"].item() == 0.0
    if grads == "loss":  # no real token: nothing for any gradient
        assert all(kernel[f"d{k}"].abs().max().item() == 0.0 for k in ("hidden", *PARAMS))


def test_without_mask_every_token_counts():
    tensors, y, _ = make_inputs(2, 9, 96, torch.float32, seed=4, labels="bool", mask=None)
    compare(tensors, y, None, torch.float32, "tanh", "both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_without_biases(dtype):
    tensors, y, m = make_inputs(3, 7, 96, dtype, seed=5, labels="int", mask="ragged")
    del tensors["dense_bias"], tensors["prediction_bias"]
    compare(tensors, y, m, dtype, "none", "both")


@pytest.mark.parametrize("sign", [1, -1])
def test_confident_tokens_keep_their_tiny_loss(sign):
    """Logits near -14 on originals (sign 1) or +14 on replaced tokens: the loss per token is
    ~1e-6, where log(1 + exp(-|x|)) written plainly would lose every digit (1 + 1e-6 rounds)."""
    tensors, _, m = make_inputs(3, 8, 96, torch.float32, seed=7, labels=None, mask="ragged")
    tensors["prediction_bias"] = torch.full((1,), -14.0 * sign, dtype=torch.float32, device=DEVICE)
    labels = torch.full((3, 8), int(sign < 0), dtype=torch.long, device=DEVICE)
    kernel = compare(tensors, labels, m, torch.float32, "none", "loss")
    assert 0 < kernel["loss"].item() < 1e-4


def test_strided_inputs_and_an_expanded_logits_gradient():
    """hidden a transposed view, labels and mask non-contiguous, logits.sum() (a stride-0 gradient)."""
    tensors, y, m = make_inputs(9, 5, 96, torch.float32, seed=6, labels="int", mask="ragged")
    tensors["hidden"] = tensors["hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    y, m = y.t().contiguous().t(), m.t().contiguous().t()
    assert not (tensors["hidden"].is_contiguous() or y.is_contiguous() or m.is_contiguous())
    compare(tensors, y, m, torch.float32, "none", "both")  # dlogits (B, T) strided ...
    ones = torch.tensor(1.0)  # ... and expanded from a scalar
    ref = run(tensors, y, m, "torch", "none", ones, LOSS_WEIGHT, dtype=torch.float64)
    check_all(run(tensors, y, m, "triton", "none", ones, LOSS_WEIGHT), run(tensors, y, m, "torch", "none", ones,
                                                                            LOSS_WEIGHT), ref,
              *head_from_z(tensors, y, m, "none", ones, LOSS_WEIGHT, torch.float32))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast, under the interpreter")
def test_autocast_float16_with_float32_parameters():
    """Inside autocast the kernels compute in float16 as the torch backend's F.linear does; the
    float32 parameters get float32 gradients."""
    tensors, y, m = make_inputs(2, 13, 96, torch.float32, seed=8, labels="int", mask="ragged")
    dlogits = torch.randn(2, 13, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = run(tensors, y, m, "torch", "none", dlogits, LOSS_WEIGHT, dtype=torch.float64)
    out = {}
    for backend in ("torch", "triton"):
        with torch.autocast("cpu", dtype=torch.float16):
            out[backend] = run(tensors, y, m, backend, "none", dlogits, LOSS_WEIGHT)
    assert out["triton"]["logits"].dtype == out["torch"]["logits"].dtype == torch.float16
    assert out["triton"]["ddense_weight"].dtype == torch.float32
    check_all(out["triton"], out["torch"], ref,
              *head_from_z(tensors, y, m, "none", dlogits, LOSS_WEIGHT, torch.float16, autocast=True))


def test_custom_op_registration_passes_opcheck():
    """Schema, fake implementation and autograd registration of the kernels' custom op."""
    tensors, y, m = make_inputs(2, 3, 96, torch.float32, seed=9, labels="int", mask="ragged")
    z = torch.nn.functional.linear(tensors["hidden"], tensors["dense_weight"]).requires_grad_()
    params = [tensors[k].requires_grad_() for k in ("dense_bias", "prediction_weight", "prediction_bias")]
    torch.library.opcheck(rtd_head_forward, (z, params[0], params[1], params[2], y, m, "tanh", "triton"))
    torch.library.opcheck(rtd_head_forward, (z, None, params[1], None, None, None, "none", "triton"))


def test_compiles_fullgraph_through_the_custom_op():
    """torch.compile traces the whole op (checks, dense GEMM, custom op) in one graph, reused across
    sequence lengths, and its results and gradients are the eager kernels'."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def head(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, mask):
        logits, loss = ops.rtd_loss(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels,
                                    mask, approximate="tanh", backend="triton")
        return LOSS_WEIGHT * loss + logits.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(head, backend=count_graphs, fullgraph=True)
    for T in (5, 9, 13):
        tensors, y, m = make_inputs(2, T, 96, torch.float32, seed=T, labels="int", mask="ragged")
        results = []
        for fn in (compiled, head):
            leaves = [tensors[k].detach().clone().requires_grad_() for k in ("hidden", *PARAMS)]
            total = fn(*leaves, y, m)
            results.append((total.detach(), *torch.autograd.grad(total, leaves)))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)  # the same kernels on the same inputs
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 sequence lengths"
