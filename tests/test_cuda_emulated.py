"""The CUDA kernels of csrc/cuda run on the CPU, in every CI run, through a small CUDA emulation.

tests/cuda_emulation/build.py compiles the real csrc/cuda sources (kernels, launchers, pybind11
bindings) with g++ against tests/cuda_emulation/emu.h once per session; each CUDA thread is a fiber,
so barriers and warp shuffles synchronize for real (emu.h states the model and what it does not
cover). The ops' cuda backends are pointed at that module, on CPU tensors (device pointers are
then host pointers), and checked against the torch backend as on a GPU: DESIGN.md's rule for
floats (the error against the float64 reference at most 2x the torch backend's in the same dtype,
plus a few ulps: within_rule of tests/triton_kernels/kernel_helpers.py), equality for masking.
The emulation itself is pinned down first: bit-exact half / bfloat16 conversions, every collective,
shared memory, and the faults a GPU would raise.

``BERTFAST_EMU_CSRC=/path/to/csrc`` builds another copy of csrc (e.g. a deliberately broken kernel).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bertfast import ops
from bertfast.ops import compiled, cuda_support, rng

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "triton_kernels"))
import layer_norm_cases as ln  # noqa: E402
import rtd_loss_cases as rtd  # noqa: E402
from test_mask_tokens_cuda import MASK_ID, SPECIAL, VOCAB, make_batch  # noqa: E402

_spec = importlib.util.spec_from_file_location("cuda_emulation_build", HERE / "cuda_emulation" / "build.py")
emulation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulation)

SMS = 2  # the emulated card's multiprocessors (emu::Device), also torch's multi_processor_count here
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """(the emulated bertfast._cuda, its shared library through ctypes), built once."""
    why = emulation.missing_tools()
    if why is not None:
        pytest.skip(f"cannot build the CUDA emulation: {why}")
    path = emulation.build(tmp_path_factory.mktemp("cuda_emulation"), os.environ.get("BERTFAST_EMU_CSRC"))
    lib = ctypes.CDLL(str(path))
    lib.emu_configure(SMS, 32)
    return emulation.load(path), lib


@pytest.fixture(scope="module")
def lib(emulated):
    return emulated[1]


@pytest.fixture(scope="module")
def on_host(emulated):
    """The cuda backends of layer_norm, rtd_loss and mask_tokens run the emulated module on CPU tensors:
    the module stands in for bertfast._cuda, CPU counts as CUDA in the backends' refusals, and the
    launch's device context and stream are no-ops, and ``cuda_support.on_cuda`` says yes."""
    module = emulated[0]
    real_load, real_refusal = compiled.load, cuda_support.refusal

    def load(name):
        return (module, None) if name == "_cuda" else real_load(name)

    def refusal(facts, dtypes=cuda_support.KERNEL_DTYPES):
        return real_refusal({**facts, "device": "cuda"} if facts["device"] == "cpu" else facts, dtypes)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "load", load)
        mp.setattr(cuda_support, "refusal", refusal)
        mp.setattr(cuda_support, "stream", lambda device: 0)
        mp.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        mp.setattr(torch.cuda, "get_device_properties",
                   lambda device=None: types.SimpleNamespace(multi_processor_count=SMS))
        mp.setattr(cuda_support, "on_cuda", lambda t: True)
        yield module


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


# ------------------------------------------------------------------------------------------------
# The emulation itself


def _message():
    return ctypes.create_string_buffer(512)


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def test_rewrite_of_launches_and_shared_declarations():
    src = ("// a comment with k<<<1, 2>>>(x) and __shared__ float no;\n"
           "  ns::kern<T, decltype(c)::value>\n      <<<grid, 256, 0, s>>>(a,\n b);\n"
           "  k2<<<1, 32>>>();\n"
           "  __shared__ __align__(16) float s[G][RT / 32];\n"
           "  extern __shared__ __align__(16) unsigned char dyn[];\n")
    out = emulation.rewrite(src, "x.cu")
    assert out.count("\n") == src.count("\n")
    lines = out.split("\n")
    assert lines[0] == src.split("\n")[0]  # comments untouched
    assert ('emu::launch("x.cu:3 ns::kern<T, decltype(c)::value>", ns::kern<T, decltype(c)::value>\n      , '
            'emu::Config(grid, 256, 0, s), a,\n b);') in out
    assert 'emu::launch("x.cu:5 k2", k2, emu::Config(1, 32));' in out
    assert "auto& s = emu::shared<float[G][RT / 32]>([] {});" in lines[5]
    assert "unsigned char* const dyn = static_cast<unsigned char*>(emu::detail::dynamic_shared());" in lines[6]
    with pytest.raises(ValueError, match="x.cu:1: cannot rewrite this __shared__"):
        emulation.rewrite("__shared__ float a[2], b[2];\n", "x.cu")


def test_half_and_bfloat16_conversions_are_bit_exact(lib):
    """Every 16-bit pattern to float32 and back, and float32 patterns (ties, subnormals, overflow,
    random bits) rounded to nearest even, as torch rounds; NaN becomes CUDA's canonical 0x7FFF."""
    patterns = np.arange(1 << 16, dtype=np.uint16)
    g = np.random.default_rng(0)
    floats = np.concatenate([g.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32),
                             np.arange(0x33000000, 0x33800000, 997, dtype=np.uint32),  # around 2^-25
                             np.arange(0x477FE000, 0x47800100, 1, dtype=np.uint32),  # around max half
                             np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
                                       0x3F800FFF, 0x3F801000, 0x3F803000, 0x3F808000, 0x3F818000], np.uint32)])
    floats = floats.view(np.float32)
    for name, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        to_float = np.empty(1 << 16, np.float32)
        getattr(lib, f"emu_{name}_to_float")(_ptr(patterns), _ptr(to_float), ctypes.c_int64(1 << 16))
        expected = torch.from_numpy(patterns.view(np.int16)).view(dtype).float().numpy()
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(to_float), nan)
        assert np.array_equal(to_float[~nan].view(np.uint32), expected[~nan].view(np.uint32)), name

        from_float = np.empty(floats.size, np.uint16)
        getattr(lib, f"emu_{name}_from_float")(_ptr(floats), _ptr(from_float), ctypes.c_int64(floats.size))
        expected = torch.from_numpy(floats).to(dtype).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(floats)
        assert (from_float[nan] == 0x7FFF).all()
        mismatch = np.flatnonzero(from_float[~nan] != expected[~nan])
        assert mismatch.size == 0, f"{name}: {floats[~nan][mismatch[:5]]} -> {from_float[~nan][mismatch[:5]]}"


def test_warp_collectives(lib):
    out, msg = np.zeros((64, 8), np.int32), _message()
    assert lib.emu_run_collectives(_ptr(out), msg, 512) == 0, msg.value
    t = np.arange(64)
    lane, base = t % 32, t - t % 32
    seg16, seg8 = lane & ~15, lane & ~7
    xor9 = lane ^ 9
    ballot = sum(1 << k for k in range(0, 32, 3))  # lanes 0, 3, ..., 30
    expected = np.stack([
        (base + (lane * 7) % 32) * 10,
        np.where(lane >= 3, t - 3, t),
        np.where(lane + 5 < seg16 + 16, t + 5, t),
        np.where(xor9 < seg8 + 8, base + xor9, t),
        np.full(64, ballot),
        np.where(t < 32, 2, 1),  # any(t == 40): warp 1; all(t < 63): warp 0
        np.where(lane < 16, t ^ 1, t ^ 2),
        np.full(64, 13),  # t % 5 == 0 for 13 of 64
    ], axis=1)
    assert np.array_equal(out, expected)


def test_dynamic_and_static_shared_memory_per_block(lib):
    """Blocks of 48 threads (a partial warp) reverse their slice through `extern __shared__` and sum
    it in a `__shared__` variable; shared memory is the block's own: 0xFF (NaN) where unwritten."""
    blocks, threads = 3, 48
    x = np.arange(blocks * threads, dtype=np.float32)
    out, msg = np.zeros(blocks * threads + blocks, np.float32), _message()
    assert lib.emu_run_reverse(_ptr(x), _ptr(out), blocks, threads, msg, 512) == 0, msg.value
    assert np.array_equal(out[:-blocks], x.reshape(blocks, threads)[:, ::-1].ravel())
    assert np.array_equal(out[-blocks:], x.reshape(blocks, threads).sum(1))
    out = np.zeros(64, np.float32)
    assert lib.emu_run_unwritten_shared(_ptr(out), msg, 512) == 0, msg.value
    assert (out[:48] == 1).all() and np.isnan(out[48:]).all()


@pytest.mark.parametrize("which, threads, code, match", [
    (0, 64, 719, "__syncthreads reached by 32 threads while 32 have exited"),
    (1, 64, 719, "__shfl_xor_sync with mask 0xffffffff in warp 0: lane 5 has exited"),
    (2, 64, 716, r"misaligned address 0x[0-9a-f]+: an access that needs 16-byte alignment at .*selftest.cu:"),
    (3, 64, 719, "deadlock: 48 threads wait at a barrier, 16 at warp collectives"),
    (4, 64, 719, r"meet at different collectives \(__\w+_sync, __\w+_sync\)"),
    (5, 64, 719, "__shfl_sync: lane [1-9]\\d* calls it with mask 0x1, which leaves the lane out"),
    (6, 64, 701, "shared memory passes 48 KiB"),
    (7, 2048, 9, r"invalid configuration argument: grid \(1,1,1\), block \(2048,1,1\)"),
], ids=["barrier-skipped", "exited-lane", "misaligned", "deadlock", "mixed-collectives", "mask-without-lane",
        "shared-overflow", "block-too-large"])
def test_faults_a_gpu_would_raise_fail_the_launch(lib, which, threads, code, match):
    x, out, msg = np.zeros(64, np.float32), np.zeros(64, np.float32), _message()
    assert lib.emu_run_fault(which, threads, _ptr(x), _ptr(out), msg, 512) == code
    text = msg.value.decode()
    assert re.search(match, text), text
    assert re.search(r"selftest.cu:\d+ fault_kernel", text), text  # the launch site
    assert lib.emu_run_collectives(_ptr(np.zeros((64, 8), np.int32)), msg, 512) == 0  # the next launch is clean


@pytest.mark.parametrize("op", ["layer_norm_forward", "layer_norm_backward", "rtd_forward", "rtd_backward",
                                "mask_tokens"])
def test_every_launcher_reports_a_kernel_fault(on_host, lib, op):
    """A faulting kernel (here one the emulation makes fail) becomes a RuntimeError naming the launcher,
    through check_launch, instead of results that were never written."""
    x = randn(3, 96, seed=1).requires_grad_()
    z = randn(2, 5, 96, seed=2).requires_grad_()
    ids, row_keys, _ = make_batch(2, 40, torch.int64, seed=3)
    if op.startswith("layer_norm"):
        run = lambda: ops.layer_norm(x, None, None, ln.EPS, backend="cuda")  # noqa: E731
    elif op.startswith("rtd"):
        tensors, y, m = rtd_inputs(2, 5, 96, torch.float32)
        run = lambda: ops.rtd_loss(z, *(tensors[k] for k in rtd.PARAMS), y, m, backend="cuda")[1]  # noqa: E731
    else:
        from bertfast.ops.mask_tokens import mask_tokens

        run = lambda: mask_tokens(ids, row_keys, 1, vocab_size=VOCAB, mask_token_id=MASK_ID,  # noqa: E731
                                  special_token_ids=SPECIAL, backend="cuda")[0]
    if op.endswith("backward"):
        out = run()
        lib.emu_fail_next_launch()
        with pytest.raises(RuntimeError, match=f"{op}: CUDA launch failed: emulated kernel fault: injected"):
            out.sum().backward()
    else:
        lib.emu_fail_next_launch()
        with pytest.raises(RuntimeError, match=f"{op}: CUDA launch failed: emulated kernel fault: injected"):
            run()
    run()  # the next launch runs


# ------------------------------------------------------------------------------------------------
# layer_norm (csrc/cuda/layer_norm.cu)

def ln_inputs(*args, **kwargs):
    return ln.inputs(*args, device="cpu", **kwargs)


def _layer_norm_case(dtype, rows, N, residual, dropout_p):
    kwargs = {"dropout_p": dropout_p, "seed": 1234 + rows} if dropout_p else {}
    x, w, b, r = ln_inputs(rows, N, dtype, residual=residual, seed=rows + N)
    y, dx, dw, db, dr = ln.compare("cuda", x, w, b, r, **kwargs)
    if dropout_p:  # exactly the seed's mask drops: dx is 0 there and only there (dr is not masked)
        keep = rng.keep_mask(rng.seed_tensor("t", kwargs["seed"], x.device), 1, rows, N, dropout_p)[0]
        assert (dx[~keep] == 0).all()
        if residual:
            assert torch.equal(dx[keep] != 0, dr[keep] != 0)


# N: a warp per row (96, 768, 1000: forward up to 1024, backward up to 512 then 128 threads per row)
# and a block per row (2056: forward 256 threads, backward 512); rows: one row, a partial block of
# 8 rows, several blocks (the backward's persistent blocks walk several row blocks at 37 x 768 and
# 37 x 2056 on the emulated card of 2 SMs).
@pytest.mark.parametrize("residual, dropout_p", [(True, 0.1), (False, 0.0), (True, 0.0), (False, 0.1)],
                         ids=["residual-dropout", "plain", "residual", "dropout"])
@pytest.mark.parametrize("N", [96, 768, 1000, 2056])
@pytest.mark.parametrize("rows", [1, 7, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_torch(on_host, dtype, rows, N, residual, dropout_p):
    _layer_norm_case(dtype, rows, N, residual, dropout_p)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_weight_or_bias_none(on_host, dtype, affine):
    ln.compare("cuda", *ln_inputs(7, 1000, dtype, affine=affine, seed=11), dropout_p=0.1, seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_half_x_with_float32_parameters(on_host, dtype):
    y, dx, dw, db, dr = ln.compare("cuda", *ln_inputs(9, 768, dtype, param_dtype=torch.float32, seed=3), dropout_p=0.1,
                                    seed=8)
    assert (dw.dtype, db.dtype) == (torch.float32, torch.float32)


@pytest.mark.parametrize("N", [3, 77, 1001, 2050])
def test_layer_norm_odd_widths_take_the_elementwise_path(on_host, N):
    ln.compare("cuda", *ln_inputs(5, N, torch.float16, seed=N), dropout_p=0.1, seed=N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_unaligned_and_strided_inputs_equal_contiguous(on_host, dtype):
    """x sliced one element into a wider tensor (misaligned rows: the element-wise path) and a transposed
    residual (copied) give bitwise the results of contiguous inputs (the 16-byte vector path)."""
    rows, N = 9, 96
    _, w, b, _ = ln_inputs(rows, N, dtype)
    dy = randn(N, seed=9, dtype=dtype).expand(rows, N)
    results = []
    for contiguous in (False, True):
        wide = randn(rows, N + 40, seed=1, dtype=dtype).requires_grad_()
        r_leaf = randn(N, rows, seed=2, dtype=dtype).t().detach().requires_grad_()
        wl, bl = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        x, r = wide[:, 1:1 + N], r_leaf
        if contiguous:
            x, r = x.contiguous(), r.contiguous()
        else:
            assert x.data_ptr() % 16 != 0 and r.stride(-1) != 1
        y = ops.layer_norm(x, wl, bl, ln.EPS, residual=r, dropout_p=0.2, seed=4, backend="cuda")
        y.backward(dy if not contiguous else dy.contiguous())
        results.append([y.detach(), wide.grad[:, 1:1 + N], wl.grad, bl.grad, r_leaf.grad])
    for name, s, c in zip(ln.NAMES, *results, strict=True):
        assert torch.equal(s, c), (dtype, name)
    ln.compare("cuda", randn(rows, N + 40, seed=1, dtype=dtype, shift=0.5)[:, 1:1 + N], w, b, None)


def test_layer_norm_persistent_backward_on_a_small_card(on_host, lib):
    """One block per card: the backward's single block walks every row block, summing dw, db."""
    lib.emu_configure(1, 1)
    try:
        for rows, N in [(61, 96), (23, 768), (9, 2056)]:
            ln.compare("cuda", *ln_inputs(rows, N, torch.float32, seed=rows), dropout_p=0.1, seed=rows)
    finally:
        lib.emu_configure(SMS, 32)


def test_layer_norm_seed_tensors_use_their_low_32_bits(on_host):
    x, w, b, r = ln_inputs(7, 1000, torch.float32, seed=2)
    for seed in (torch.tensor([-5]), torch.tensor([2**40 + 3])):
        ln.compare("cuda", x, w, b, r, dropout_p=0.25, seed=seed)


# ------------------------------------------------------------------------------------------------
# rtd_loss (csrc/cuda/rtd_loss.cu)

def rtd_compare(tensors, labels, mask, dtype, approximate):
    return rtd.compare("cuda", tensors, labels, mask, dtype, approximate)


def rtd_inputs(B, T, H, dtype, seed=0, labels=True, mask="empty_row"):
    """hidden, the head's parameters, labels (or None), and a mask ("empty_row": ragged with the last
    row all padding, "all_padding", or None)."""
    return rtd.make_inputs(B, T, H, dtype, seed=seed, labels="int" if labels else None, mask=mask, device="cpu")


# 3 x 7 x 96: one forward block of 8 rows, partly idle; 2 x 33 x 128: several forward blocks and two
# backward column chunks in float32. Hidden sizes take the 16-byte vector path; 90 the scalar one.
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("B, T, H", [(3, 7, 96), (2, 33, 128), (3, 5, 90)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rtd_loss_matches_torch(on_host, dtype, B, T, H, approximate):
    rtd_compare(*rtd_inputs(B, T, H, dtype, seed=B * T), dtype, approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rtd_loss_logits_only_without_labels(on_host, dtype, approximate):
    kernel = rtd_compare(*rtd_inputs(2, 33, 128, dtype, seed=4, labels=False), dtype, approximate)
    assert kernel["loss"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rtd_loss_all_padding_batch_is_zero_not_nan(on_host, dtype):
    tensors, y, m = rtd_inputs(3, 7, 96, dtype, seed=6, mask="all_padding")
    kernel = rtd_compare(tensors, y, m, dtype, "none")
    assert kernel["loss"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in kernel.values())


def test_rtd_loss_without_mask_every_token_counts(on_host):
    rtd_compare(*rtd_inputs(2, 33, 128, torch.float32, seed=8, mask=None), torch.float32, "tanh")


# ------------------------------------------------------------------------------------------------
# mask_tokens (csrc/cuda/masking.cu): bit-exact, so equality is the only rule


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
@pytest.mark.parametrize("words", [None, "short", "long"])
@pytest.mark.parametrize("B, T", [(3, 37), (2, 700)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mask_tokens_equals_torch(on_host, dtype, B, T, words, seed):
    from bertfast.ops.mask_tokens import mask_tokens

    ids, row_keys, word_ids = make_batch(B, T, dtype, seed=B * T + seed % 1000, words=words)
    args = dict(vocab_size=VOCAB, mask_token_id=MASK_ID, special_token_ids=SPECIAL, probability=0.3,
                word_ids=word_ids)
    with ops.record_backends() as ran:
        cuda_ids, cuda_labels = mask_tokens(ids, row_keys, seed, backend="cuda", **args)
    assert ran == [("mask_tokens", "cuda")]
    torch_ids, torch_labels = mask_tokens(ids, row_keys, seed, backend="torch", **args)
    assert cuda_ids.dtype == dtype and cuda_labels.dtype == torch.int64
    assert torch.equal(cuda_ids, torch_ids) and torch.equal(cuda_labels, torch_labels)
    assert (cuda_labels != -100).any() and (cuda_labels == -100).any()
