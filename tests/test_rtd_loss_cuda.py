"""The cuda backend of rtd_loss (csrc/cuda/rtd_loss.cu) against the torch backend; and, without a GPU,
its refusal, the compiled module's functions and their argument checks.

Rule (DESIGN.md, ``within_rule`` of tests/triton_kernels/kernel_helpers.py), as for the Triton kernels
(tests/triton_kernels/test_rtd_loss_kernel.py): the kernel's error against the float64 reference is at
most 2x the torch backend's error in the same dtype plus a few ulps, for the logits and the gradients of
hidden, the dense weight and bias and the prediction weight over the whole op. The loss and the
prediction-bias gradient (sums over tokens) are checked from the kernel's own input z = hidden @ W^T
rounded to the dtype, which the torch backend (its GEMM adds the bias before rounding) does not share:
there the float64 reference and the torch backend in the dtype both start from that rounded z.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bertfast import ops
from bertfast.ops import compiled
from bertfast.ops.cuda_support import DTYPE_CODES
from bertfast.ops.dispatch import BackendUnavailableError
from bertfast.ops.rtd_loss import rtd_head_backward, rtd_head_forward
from helpers import cuda_module, gpu  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "triton_kernels"))
import rtd_loss_cases as cases  # noqa: E402
from rtd_loss_cases import LOSS_WEIGHT, PARAMS, check_all, head_from_z, run  # noqa: E402

op_module = importlib.import_module("bertfast.ops.rtd_loss")  # the package's `rtd_loss` is the function

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(*args, **kwargs):
    return cases.make_inputs(*args, device=DEVICE, **kwargs)


def compare(*args, **kwargs):
    return cases.compare("cuda", *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# On a GPU

# (B, T, H, approximate, labels, mask, grads). Hidden 96 / 768 / 1000 take the 16-byte vector path in
# every dtype, 90 the scalar one; 3 x 1500 rows make 188 backward row groups of 24 rows (3 per warp),
# the last one ragged.
CASES = [
    pytest.param(3, 7, 96, "none", "int", "ragged", "both", id="3x7x96-erf"),
    pytest.param(2, 130, 768, "tanh", "bool", "empty_row", "both", id="2x130x768-tanh-empty-row"),
    pytest.param(1, 1, 96, "tanh", "int32", None, "both", id="1x1x96-tanh-no-mask"),
    pytest.param(3, 5, 90, "none", "int", "ragged", "both", id="3x5x90-scalar-path"),
    pytest.param(2, 9, 1000, "none", "int32", "ragged", "logits", id="2x9x1000-logit-grads"),
    pytest.param(3, 1500, 64, "tanh", "bool", "empty_row", "loss", id="3x1500x64-row-groups"),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, approximate, labels, mask, grads", CASES)
def test_forward_backward_matches_torch(B, T, H, approximate, labels, mask, grads, dtype):
    tensors, y, m = make_inputs(B, T, H, dtype, seed=B * T + H, labels=labels, mask=mask)
    compare(tensors, y, m, dtype, approximate, grads)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_logits_only_without_labels(approximate, dtype):
    tensors, _, m = make_inputs(3, 11, 96, dtype, seed=2, labels=None)
    compare(tensors, None, m, dtype, approximate, "logits")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grads", ["loss", "both"])
def test_all_padding_batch_gives_zero_loss_and_no_nan(grads, dtype):
    tensors, y, m = make_inputs(2, 5, 96, dtype, seed=3, labels="int", mask="all_padding")
    kernel = compare(tensors, y, m, dtype, "none", grads)
    assert kernel["loss"].item() == 0.0
    if grads == "loss":  # no real token: nothing for any gradient
        assert all(kernel[f"d{k}"].abs().max().item() == 0.0 for k in ("hidden", *PARAMS))


@gpu
def test_without_mask_every_token_counts():
    tensors, y, _ = make_inputs(2, 9, 96, torch.float32, seed=4, labels="bool", mask=None)
    compare(tensors, y, None, torch.float32, "tanh", "both")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_biases(dtype):
    tensors, y, m = make_inputs(3, 7, 96, dtype, seed=5, labels="int", mask="ragged")
    del tensors["dense_bias"], tensors["prediction_bias"]
    compare(tensors, y, m, dtype, "none", "both")


@gpu
@pytest.mark.parametrize("sign", [1, -1])
def test_confident_tokens_keep_their_tiny_loss(sign):
    """Logits near -14 on originals (sign 1) or +14 on replaced tokens: ~1e-6 loss per token, which
    log(1 + exp(-|x|)) written plainly would round away."""
    tensors, _, m = make_inputs(3, 8, 96, torch.float32, seed=7, labels=None, mask="ragged")
    tensors["prediction_bias"] = torch.full((1,), -14.0 * sign, dtype=torch.float32, device=DEVICE)
    labels = torch.full((3, 8), int(sign < 0), dtype=torch.long, device=DEVICE)
    kernel = compare(tensors, labels, m, torch.float32, "none", "loss")
    assert 0 < kernel["loss"].item() < 1e-4


@gpu
def test_strided_inputs_and_an_expanded_logits_gradient():
    """hidden a transposed view, labels and mask non-contiguous, logits.sum() (a stride-0 gradient)."""
    tensors, y, m = make_inputs(9, 5, 96, torch.float32, seed=6, labels="int", mask="ragged")
    tensors["hidden"] = tensors["hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    y, m = y.t().contiguous().t(), m.t().contiguous().t()
    assert not (tensors["hidden"].is_contiguous() or y.is_contiguous() or m.is_contiguous())
    compare(tensors, y, m, torch.float32, "none", "both")
    ones = torch.tensor(1.0)
    ref = run(tensors, y, m, "torch", "none", ones, LOSS_WEIGHT, dtype=torch.float64)
    check_all(run(tensors, y, m, "cuda", "none", ones, LOSS_WEIGHT),
              run(tensors, y, m, "torch", "none", ones, LOSS_WEIGHT), ref,
              *head_from_z(tensors, y, m, "none", ones, LOSS_WEIGHT, torch.float32))


def _head(z, tensors, labels, mask, approximate):
    """Forward and backward of the custom ops on a given z: (logits, loss, count, rho, dz, db, dw, dbp)."""
    args = (tensors["dense_bias"], tensors["prediction_weight"], tensors["prediction_bias"])
    logits, loss, count, rho = rtd_head_forward(z, *args, labels, mask, approximate, "cuda")
    dlogits = torch.linspace(-1, 1, logits.numel(), device=DEVICE).view(logits.shape).to(logits.dtype)
    grads = rtd_head_backward(dlogits, torch.tensor(3.0, device=DEVICE), z, *args, rho, count, approximate, "cuda")
    return (logits, loss, count, rho, *grads)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_vector_and_scalar_paths_agree_bitwise(dtype, approximate):
    """z as an unaligned strided view (row stride inner + 1, start one element in) runs the scalar
    loads; its contiguous copy the 16-byte ones. Each lane takes the same columns in the same order
    either way, so the results are bit for bit equal; and two runs are too (no atomics)."""
    tensors, y, m = make_inputs(4, 37, 96, dtype, seed=13, labels="int", mask="empty_row")
    wide = torch.randn(4, 37, 97, device=DEVICE).to(dtype)
    z = wide[..., 1:]
    assert z.stride(1) == 97 and z.data_ptr() % 16 != 0
    scalar = _head(z, tensors, y, m, approximate)
    vector = _head(z.contiguous(), tensors, y, m, approximate)
    again = _head(z.contiguous(), tensors, y, m, approximate)
    for a, b, c in zip(scalar, vector, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.isfinite(scalar[4]).all() and scalar[4].abs().max() > 0


@gpu
def test_every_label_dtype_reads_the_same():
    """Labels are read at their own width (1, 2, 4 or 8 bytes): every integer dtype and bool agree."""
    tensors, y, m = make_inputs(3, 10, 96, torch.float32, seed=14, labels="int", mask="ragged")
    z = F.linear(tensors["hidden"], tensors["dense_weight"])
    results = [_head(z, tensors, y.to(d), m, "none")
               for d in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@gpu
def test_autocast_bfloat16_with_float32_parameters():
    """Inside autocast the kernels compute in bfloat16 as the torch backend's F.linear does; the float32
    parameters get float32 gradients."""
    tensors, y, m = make_inputs(2, 13, 96, torch.float32, seed=8, labels="int", mask="ragged")
    dlogits = torch.randn(2, 13, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    ref = run(tensors, y, m, "torch", "none", dlogits, LOSS_WEIGHT, dtype=torch.float64)
    out = {}
    for backend in ("torch", "cuda"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out[backend] = run(tensors, y, m, backend, "none", dlogits, LOSS_WEIGHT)
    assert out["cuda"]["logits"].dtype == out["torch"]["logits"].dtype == torch.bfloat16
    assert out["cuda"]["ddense_weight"].dtype == torch.float32
    check_all(out["cuda"], out["torch"], ref,
              *head_from_z(tensors, y, m, "none", dlogits, LOSS_WEIGHT, torch.bfloat16, autocast=True))


@gpu
def test_custom_op_registration_passes_opcheck():
    tensors, y, m = make_inputs(2, 3, 96, torch.float32, seed=9, labels="int", mask="ragged")
    z = F.linear(tensors["hidden"], tensors["dense_weight"]).requires_grad_()
    params = [tensors[k].requires_grad_() for k in ("dense_bias", "prediction_weight", "prediction_bias")]
    torch.library.opcheck(rtd_head_forward, (z, params[0], params[1], params[2], y, m, "tanh", "cuda"))
    torch.library.opcheck(rtd_head_forward, (z, None, params[1], None, None, None, "none", "cuda"))


@gpu
def test_compiles_fullgraph_through_the_custom_op():
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def head(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels, mask):
        logits, loss = ops.rtd_loss(hidden, dense_weight, dense_bias, prediction_weight, prediction_bias, labels,
                                    mask, approximate="tanh", backend="cuda")
        return LOSS_WEIGHT * loss + logits.square().sum()

    torch._dynamo.reset()
    compiled_head = torch.compile(head, backend=count_graphs, fullgraph=True)
    tensors, y, m = make_inputs(2, 5, 96, torch.float32, seed=5, labels="int", mask="ragged")
    results = []
    for fn in (compiled_head, head):
        leaves = [tensors[k].detach().clone().requires_grad_() for k in ("hidden", *PARAMS)]
        total = fn(*leaves, y, m)
        results.append((total.detach(), *torch.autograd.grad(total, leaves)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert len(graphs) == 1


# ------------------------------------------------------------------------------------------------
# Without a GPU


def test_cuda_backend_refuses_cpu_tensors_with_the_reason():
    tensors, y, m = make_inputs_cpu()
    with pytest.raises(BackendUnavailableError, match=r"cuda: needs CUDA tensors \(got cpu\)"):
        ops.rtd_loss(tensors["hidden"], *(tensors[k] for k in PARAMS), y, m, backend="cuda")
    reason = op_module.OP.refusal("cuda", {"device": "cuda", "dtype": torch.float64, "inner": 8})
    assert reason is not None
    if compiled.load("_cuda")[0] is not None:
        assert "float64" in reason
        assert op_module.OP.refusal("cuda", {"device": "cuda", "dtype": torch.bfloat16, "inner": 768}) is None
        too_wide = op_module.OP.refusal("cuda", {"device": "cuda", "dtype": torch.float32, "inner": 10**8})
        assert too_wide is not None and "inner" in too_wide


def make_inputs_cpu():
    g = torch.Generator().manual_seed(0)
    tensors = {"hidden": torch.randn(2, 3, 8, generator=g), "dense_weight": torch.randn(8, 8, generator=g),
               "dense_bias": torch.randn(8, generator=g), "prediction_weight": torch.randn(1, 8, generator=g),
               "prediction_bias": torch.randn(1, generator=g)}
    return tensors, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)


def test_head_functions_reject_cpu_z_naming_it():
    tensors, y, m = make_inputs_cpu()
    z = F.linear(tensors["hidden"], tensors["dense_weight"])
    with pytest.raises(ValueError, match=r"rtd_loss \(cuda\): `z` must be a CUDA tensor"):
        op_module._cuda_head(z, tensors["dense_bias"], tensors["prediction_weight"], tensors["prediction_bias"], y, m,
                             "none")


def test_module_exposes_the_launchers_and_their_sizes():
    module = cuda_module()
    for name in ("rtd_forward", "rtd_backward", "rtd_forward_blocks", "rtd_backward_groups", "rtd_max_inner",
                 "mask_tokens"):
        assert callable(getattr(module, name)), name
    assert [module.rtd_forward_blocks(r) for r in (0, 1, 8, 9, 4096)] == [0, 1, 1, 2, 512]
    for rows in (1, 7, 8, 9, 255, 2048, 2049, 4500, 10**6 + 3):
        per_group, groups = module.rtd_backward_groups(rows)
        assert per_group % 8 == 0 and groups <= 256
        assert (groups - 1) * per_group < rows <= groups * per_group  # every row in exactly one group
    assert module.rtd_backward_groups(0)[1] == 0
    # 65535 column chunks of 32 lanes x 16 bytes; the refusal's Python copy of the limit agrees
    assert module.rtd_max_inner(0) == 65535 * 128 and module.rtd_max_inner(1) == module.rtd_max_inner(2) == 65535 * 256
    for dtype, code in DTYPE_CODES.items():
        assert op_module.cuda_max_inner(dtype) == module.rtd_max_inner(code)


def test_launchers_reject_bad_arguments_before_any_launch():
    """The C++ checks run before CUDA is touched, so they raise here too (no GPU needed)."""
    module = cuda_module()
    fwd = dict(z_ptr=16, dense_bias_ptr=0, pred_w_ptr=16, pred_b_ptr=0, labels_ptr=0, label_bytes=0, mask_ptr=0,
               logits_ptr=16, rho_ptr=0, loss_part_ptr=0, count_part_ptr=0, rows=4, inner=8, stride_z=8, dtype=0,
               tanh=False, stream=0)
    for bad, match in [({"dtype": 7}, "`dtype`"), ({"rows": -1}, "`rows`"), ({"inner": -2}, "`inner`"),
                       ({"inner": 10**9}, "`inner`"), ({"z_ptr": 0}, "`z`"), ({"logits_ptr": 0}, "`logits`"),
                       ({"labels_ptr": 16, "label_bytes": 3}, "`label_bytes`"),
                       ({"labels_ptr": 16, "label_bytes": 8}, "`rho`")]:
        with pytest.raises(ValueError, match=match):
            module.rtd_forward(**{**fwd, **bad})
    bwd = dict(z_ptr=16, dense_bias_ptr=0, pred_w_ptr=16, dlogits_ptr=0, rho_ptr=0, coef_ptr=0, dz_ptr=16,
               dw_part_ptr=16, db_part_ptr=16, dbp_part_ptr=16, rows=4, inner=8, stride_z=8, stride_dz=8,
               rows_per_group=8, dtype=1, tanh=True, stream=0)
    for bad, match in [({"dtype": -1}, "`dtype`"), ({"rows_per_group": 0}, "`rows_per_group`"),
                       ({"rho_ptr": 16}, "`rho` and `coef`"), ({"dz_ptr": 0}, "`dz`"),
                       ({"stride_dz": -8}, "`stride_z` and `stride_dz`")]:
        with pytest.raises(ValueError, match=match):
            module.rtd_backward(**{**bwd, **bad})
    with pytest.raises(ValueError, match="`rows`"):
        module.rtd_forward_blocks(-1)
