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
from bertfast.kernels import rtd_loss as kernels
import rtd_loss_cases as cases
from kernel_helpers import DEVICE, DTYPES
from rtd_loss_cases import LOSS_WEIGHT, PARAMS, check_all, head_from_z, run

from bertfast import ops
from bertfast.ops.rtd_loss import rtd_head_forward


def make_inputs(*args, **kwargs):
    return cases.make_inputs(*args, device=DEVICE, **kwargs)


def compare(*args, **kwargs):
    return cases.compare("triton", *args, **kwargs)


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
