"""rtd_loss without a GPU or the interpreter: the triton backend's refusal, the custom ops' fake
implementations (what torch.compile traces), and the kernel family's launch list for the static
report. The kernels themselves run in tests/triton_kernels/test_rtd_loss_kernel.py."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bertfast.ops import triton_support
from bertfast import ops
from bertfast.ops.dispatch import BackendUnavailableError
from bertfast.ops.rtd_loss import rtd_head_backward, rtd_head_forward

op_module = importlib.import_module("bertfast.ops.rtd_loss")  # the package's `rtd_loss` is the function
triton = pytest.importorskip("triton")
from bertfast.kernels import rtd_loss as kernels


def _inputs(dtype=torch.float32, B=2, T=3, H=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, H, generator=g).to(dtype), torch.randn(H, H, generator=g).to(dtype),
            torch.randn(H, generator=g).to(dtype), torch.randn(1, H, generator=g).to(dtype),
            torch.randn(1, generator=g).to(dtype))


@pytest.mark.skipif(triton_support.INTERPRETING, reason="CPU tensors are accepted under TRITON_INTERPRET")
def test_triton_backend_refuses_cpu_tensors_and_float64():
    hidden, w, b, pw, pb = _inputs()
    with pytest.raises(BackendUnavailableError, match=r"triton: needs CUDA tensors \(got cpu"):
        ops.rtd_loss(hidden, w, b, pw, pb, None, backend="triton")
    assert "float64" in op_module.OP.refusal("triton", {"device": "cuda", "dtype": torch.float64})
    assert op_module.OP.refusal("triton", {"device": "cuda", "dtype": torch.bfloat16}) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_labels", [True, False])
def test_fake_implementations_give_the_real_shapes_and_dtypes(dtype, with_labels):
    """Traced with fake tensors, nothing runs: the triton backend's kernels are never called."""
    with FakeTensorMode():
        hidden, w, b, pw, pb = _inputs(dtype)
        z = torch.nn.functional.linear(hidden, w)
        labels = torch.zeros(2, 3, dtype=torch.bool) if with_labels else None
        mask = torch.ones(2, 3, dtype=torch.bool)
        logits, loss, count, rho = rtd_head_forward(z, b, pw, pb, labels, mask, "none", "triton")
        assert logits.shape == (2, 3) and logits.dtype == dtype
        assert loss.shape == count.shape == () and loss.dtype == count.dtype == torch.float32
        assert rho.shape == ((6,) if with_labels else (0,)) and rho.dtype == torch.float32
        dz, db, dw, dbp = rtd_head_backward(logits, loss, z, b, pw.float(), None, rho, count, "tanh", "triton")
        assert dz.shape == z.shape and dz.dtype == dtype
        assert (db.shape, db.dtype) == ((8,), dtype)
        assert (dw.shape, dw.dtype) == ((1, 8), torch.float32)  # each gradient in its parameter's dtype
        assert (dbp.shape, dbp.dtype) == ((1,), dtype)  # no prediction bias: z's dtype


def test_row_groups_cover_every_row_once():
    for rows in (1, 7, 15, 1151, 1155, 4096, 100_003):
        for block_m in (8, 16, 32):
            for max_groups in (1, 4, 256):
                per_program, groups = kernels.row_groups(rows, block_m, max_groups)
                assert per_program % block_m == 0 and groups <= max_groups
                assert (groups - 1) * per_program < rows <= groups * per_program


def test_aot_launches_cover_every_config_dtype_and_argument():
    launches = kernels.aot_launches()
    kinds = {kernels._rtd_fwd_kernel: "fwd", kernels._rtd_bwd_kernel: "bwd"}
    seen = set()
    for launch in launches:
        names = set(inspect.signature(launch.kernel.fn).parameters)
        assert set(launch.args) | set(launch.constexprs) == names, launch.config
        assert not set(launch.args) & set(launch.constexprs)
        c = kernels.Config(launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"], launch.num_warps)
        seen.add((kinds[launch.kernel], launch.dtype, c))
    configs = {kernels.config_for(inner) for inner in range(1, 5000)}
    assert {(k, d, c) for k in ("fwd", "bwd") for d in ("float16", "bfloat16", "float32") for c in configs} == seen
    # the heaviest flags of each kernel, for hidden 4096 in bfloat16
    wide = [launch for launch in launches if launch.args["inner"] == 4096 and launch.dtype == "bfloat16"]
    assert any({"HAS_LABELS", "HAS_MASK"} <= set(launch.flags) for launch in wide)
    assert any({"HAS_DLOGITS", "HAS_DLOSS"} <= set(launch.flags) for launch in wide)
