"""The linear_gelu op on a CPU: the torch backend equals nn.Linear + F.gelu (values and gradients),
the dispatch policy of the fused backend (refused unless measured faster or BERTFAST_FUSED_GEMM=1,
with a message that says so), the custom ops (opcheck, gradcheck of the hand-written backward,
torch.compile) with their torch implementation, and bad input named. The Triton kernels themselves:
tests/triton_kernels/test_linear_gelu_kernel.py and test_bias_gelu_kernel.py."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from bertfast.ops import triton_support
import bertfast
from bertfast.ops import BackendUnavailableError
from bertfast.ops.bias_gelu import bias_gelu_forward
from bertfast.ops.linear_gelu import FUSED_ENV, linear_gelu, linear_gelu_forward, rows_bucket

APPROX = ["none", "tanh"]
# The op modules (bertfast.ops re-exports the functions under the modules' names).
module = importlib.import_module("bertfast.ops.linear_gelu")
bias_gelu_module = importlib.import_module("bertfast.ops.bias_gelu")


def make(lead, K=13, N=29, dtype=torch.float64, bias=True, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=dtype)
    weight = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype) if bias else None
    return tuple(None if t is None else t.requires_grad_(requires_grad) for t in (x, weight, b))


def grads(fn, x, weight, bias, seed=1):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_equals_linear_then_gelu(dtype, lead, approximate, bias):
    inputs = make(lead, dtype=dtype, bias=bias, seed=len(lead))
    ours = grads(lambda x, w, b: linear_gelu(x, w, b, approximate, backend="torch"), *inputs)
    theirs = grads(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate), *inputs)
    for name, o, t in zip(("y", "dx", "dW", "db"), ours, theirs, strict=True):
        if t is None:
            assert o is None, name
        else:
            torch.testing.assert_close(o, t, msg=name)


def test_module_runs_the_op_and_the_op_runs_bias_gelu():
    x = make((2, 3))[0].float()
    layer = bertfast.nn.LinearGELU(13, 7, approximate="tanh")
    with bertfast.record_backends() as ran:
        y = layer(x)
    assert ran == [("linear_gelu", "torch"), ("bias_gelu", "torch")]
    torch.testing.assert_close(y, F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh"))


def test_backend_argument_reaches_bias_gelu():
    x, w, b = make((3,))
    with bertfast.use_backend("cuda"), bertfast.record_backends() as ran:
        linear_gelu(x, w, b, backend="torch")
    assert ran == [("linear_gelu", "torch"), ("bias_gelu", "torch")]


def test_autocast_torch_backend_matches_linear_then_gelu():
    x, w, b = (t.float() for t in make((4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_gelu(x, w, b, backend="torch")
        theirs = F.gelu(F.linear(x, w, b))
    assert ours.dtype == torch.bfloat16
    # F.linear adds the bias inside the GEMM, the op after it in bfloat16: a rounding apart
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Dispatch policy of the fused backend


def _cuda_facts(rows=4096):
    return {"device": "cuda", "dtype": torch.bfloat16, "bias_dtype": torch.float32, "arch": "sm_90",
            "in_features": 768, "out_features": 3072, "rows": rows, "approximate": "none"}


@pytest.fixture
def triton_present(monkeypatch):
    """The policy is checked after the installation and device checks: pretend triton is here."""
    monkeypatch.setattr(triton_support, "TRITON_FOUND", True)
    monkeypatch.delenv(FUSED_ENV, raising=False)


def test_fused_backend_refused_until_measured_faster(triton_present):
    reason = module.OP.refusal("triton", _cuda_facts())
    assert reason is not None
    for words in ("not measured faster than cuBLAS + the bias_gelu kernel", "sm_90", "in_features 768",
                  "out_features 3072", "rows 4096 -> bucket 4096", "MEASURED_FASTER", "benchmarks/RESULTS.md",
                  f"set {FUSED_ENV}=1 to run it anyway"):
        assert words in reason, (words, reason)


def test_fused_backend_runs_with_the_environment_variable(triton_present, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "1")
    assert module.OP.refusal("triton", _cuda_facts()) is None
    monkeypatch.setenv(FUSED_ENV, "0")
    assert module.OP.refusal("triton", _cuda_facts()) is not None


def test_fused_backend_runs_where_measured_faster(triton_present, monkeypatch):
    monkeypatch.setattr(module, "MEASURED_FASTER", frozenset({("sm_90", torch.bfloat16, 768, 3072, 4096)}))
    assert module.OP.refusal("triton", _cuda_facts(rows=4096)) is None
    assert module.OP.refusal("triton", _cuda_facts(rows=3000)) is None  # same bucket
    assert module.OP.refusal("triton", _cuda_facts(rows=5000)) is not None
    assert module.OP.refusal("triton", {**_cuda_facts(), "arch": "sm_80"}) is not None


def test_fused_backend_refuses_other_devices_and_dtypes(triton_present, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "1")
    assert "needs CUDA tensors" in module.OP.refusal("triton", {**_cuda_facts(), "device": "cpu"})
    assert "float16, bfloat16 or float32 only" in module.OP.refusal("triton", {**_cuda_facts(),
                                                                              "dtype": torch.float64})
    assert "bias must have x's dtype or float32" in module.OP.refusal(
        "triton", {**_cuda_facts(), "bias_dtype": torch.float16})


def test_explicit_triton_request_on_cpu_explains():
    x, w, b = make((3,), dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"linear_gelu: no requested backend") as err:
        linear_gelu(x, w, b, backend="triton")
    assert "  triton: " in str(err.value) and "  torch: not requested" in str(err.value)


def test_refusal_with_the_facts_of_bertfast_info(triton_present):
    """`bertfast info` asks every op with one set of typical facts, without the shape facts."""
    reason = module.OP.refusal("triton", {"device": "cuda", "dtype": torch.bfloat16, "approximate": "none"})
    assert reason is not None and "not measured faster" in reason


def test_rows_bucket():
    assert [rows_bucket(r) for r in (1, 2, 3, 1151, 4096, 4097, 10**6)] == [1, 2, 4, 2048, 4096, 8192, 16384]


# ------------------------------------------------------------------------------------------------
# The custom ops with their torch implementation (what the kernels plug into)


def test_custom_ops_pass_opcheck():
    x, w, b = make((5,), dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(linear_gelu_forward, (x, w, b, "tanh", True, "torch"))
    torch.library.opcheck(bias_gelu_forward, (x, None, "none", "torch"))


@pytest.mark.parametrize("approximate", APPROX)
def test_hand_written_backward_passes_gradcheck(approximate):
    x, w, b = make((2, 3), K=5, N=7, requires_grad=True)
    x2 = x.detach().reshape(6, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: linear_gelu_forward(x, w, b, approximate, True, "torch")[0],
                                    (x2, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_gelu_forward(x, w, None, approximate, True, "torch")[0],
                                    (x2, w))
    assert torch.autograd.gradcheck(lambda x, b: bias_gelu_forward(x, b, approximate, "torch"), (x, b[:5]))


def test_custom_op_compiles_fullgraph_with_dynamic_shapes():
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def op(x, w, b):
        return linear_gelu_forward(x, w, b, "none", True, "torch")[0]

    torch._dynamo.reset()
    compiled = torch.compile(op, backend=count_graphs, fullgraph=True)
    for rows in (5, 9, 13):
        x, w, b = make((rows,), dtype=torch.float32, seed=rows, requires_grad=True)
        y = compiled(x, w, b)
        torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))
        y.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w, b))
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 3 row counts"


# ------------------------------------------------------------------------------------------------
# Bad input, named before anything runs

X, W, B = make((3,), dtype=torch.float32)


@pytest.mark.parametrize("kwargs,pattern,error", [
    (dict(x=[1.0]), r"`x` must be a torch.Tensor", TypeError),
    (dict(x=X.long()), r"`x` must have dtype in", TypeError),
    (dict(x=torch.tensor(1.0)), r"`x` must have at least one dim", ValueError),
    (dict(weight=W[0]), r"`weight` must have 2 dims", ValueError),
    (dict(weight=W[:, :-1]), r"`weight` must have shape \(out_features, in_features = x.shape\[-1\]\)", ValueError),
    (dict(weight=W.double()), r"`weight` has dtype torch.float64 but `x` has torch.float32", TypeError),
    (dict(weight=W.to("meta")), r"`weight` is on meta but `x` is on cpu", ValueError),
    (dict(x=X[:, :0], weight=W[:, :0]), r"`x` is empty along in_features", ValueError),
    (dict(weight=W[:0], bias=B[:0]), r"`weight` is empty along out_features", ValueError),
    (dict(bias=B[:-1]), r"`bias` must have shape \(out_features = weight.shape\[0\],\)", ValueError),
    (dict(bias=B[None]), r"`bias` must have 1 dims", ValueError),
    (dict(bias=B.double()), r"`bias` has dtype torch.float64 but `weight` has torch.float32", TypeError),
    (dict(bias=B.to("meta")), r"`bias` is on meta but `x` is on cpu", ValueError),
    (dict(approximate="fast"), r"`approximate` must be 'none' or 'tanh', got 'fast'", ValueError),
], ids=lambda v: None)
def test_bad_input_names_the_argument(kwargs, pattern, error):
    args = {"x": X, "weight": W, "bias": B, "approximate": "none", **kwargs}
    with pytest.raises(error, match=r"^linear_gelu: " + pattern):
        linear_gelu(**args)


def test_empty_rows_are_fine():
    assert linear_gelu(X[:0], W, B).shape == (0, W.shape[0])


# ------------------------------------------------------------------------------------------------
# The Triton side without a GPU: bias_gelu's refusals, and the launches both kernel families
# declare for the static report (every config their launchers can pick)


def _bias_gelu_facts(**changes):
    return {"device": "cuda", "dtype": torch.bfloat16, "approximate": "none", "bias_dtype": torch.float32,
            **changes}


@pytest.mark.parametrize("changes,reason", [
    ({}, None),
    ({"bias_dtype": None}, None),
    ({"bias_dtype": torch.bfloat16}, None),
    ({"device": "cpu"}, "needs CUDA tensors"),
    ({"dtype": torch.float64, "bias_dtype": None}, "float16, bfloat16 or float32 only"),
    ({"bias_dtype": torch.float16}, "bias must have x's dtype or float32"),
])
def test_bias_gelu_triton_refusals(monkeypatch, changes, reason):
    monkeypatch.setattr(triton_support, "TRITON_FOUND", True)
    got = bias_gelu_module.OP.refusal("triton", _bias_gelu_facts(**changes))
    assert got is None if reason is None else (got is not None and reason in got), got


def _check_arguments(launches):
    for launch in launches:  # every kernel argument has a value, none extra
        assert set(launch.args) | set(launch.constexprs) == set(launch.kernel.arg_names), launch.config


def test_bias_gelu_aot_launches_cover_every_config():
    pytest.importorskip("triton")
    from bertfast.kernels import bias_gelu as K

    launches = K.aot_launches()
    _check_arguments(launches)
    seen = {(launch.kernel_name, launch.dtype, launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"],
             launch.num_warps, launch.constexprs["TANH"]) for launch in launches}
    for N in (1, 5, 96, 128, 768, 1000, 3072, 4096, 30522):
        c = K.pick_config(N)
        assert c in K.all_configs() and c.block_m * c.block_n == K.TILE
        for dtype in ("float16", "bfloat16", "float32"):
            for kernel in ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"):
                for tanh in (False, True):
                    assert (kernel, dtype, c.block_m, c.block_n, c.num_warps, tanh) in seen, (kernel, dtype, N)


def test_linear_gelu_aot_launches_cover_every_candidate():
    pytest.importorskip("triton")
    from bertfast.kernels import linear_gelu as K

    launches = K.aot_launches()
    _check_arguments(launches)
    seen = {(launch.dtype, launch.config, launch.num_warps, launch.num_stages) for launch in launches}
    for dtype in ("float16", "bfloat16", "float32"):
        for c in K.candidate_configs(getattr(torch, dtype)):
            assert (dtype, str(c), c.num_warps, c.num_stages) in seen, (dtype, c)
