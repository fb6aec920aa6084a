"""``bertfast.patch`` on ``torch.nn`` modules: ``nn.TransformerEncoder`` (its layers and final norm),
``nn.TransformerEncoderLayer`` and other ``nn.LayerNorm``s.

Every comparison is against a deep copy of the same module that was never patched (torch's own
forward), with ragged ``src_key_padding_mask``s (True = padding). float32 results follow DESIGN.md's
rule: the error against the unpatched module run in float64 is at most 2x that of the unpatched
module in float32, plus a few ulps. float64 comparisons use the parity suite's 1e-10 (normwise
relative). Outputs are compared at real positions only (torch's nested-tensor path leaves zeros at
padded ones; the patched encoder computes them), input and parameter gradients everywhere (the loss
reads real positions only)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bertfast
from bertfast.patching import is_patched
from helpers import assert_rel_close
from triton_kernels.kernel_helpers import within_rule

E, HEADS, FF, B, T = 32, 4, 48, 3, 7
LENGTHS = [T, T - 2, 2]
F64 = 1e-10  # float64, normwise relative (tests/test_hf_parity.py)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": F.silu}


# --- builders -------------------------------------------------------------------------------------
@torch.no_grad()
def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (norm scales near 1): zero biases and unit norms cannot hide a term."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        owner = name.split(".")[-2] if "." in name else ""
        is_norm_scale = "norm" in owner and name.endswith("weight")
        p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return module


def _layer(batch_first=True, norm_first=False, activation="gelu", **kwargs) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, activation=ACTIVATIONS.get(activation, activation),
                                      batch_first=batch_first, norm_first=norm_first, **kwargs)


def _encoder(batch_first=True, norm_first=False, activation="gelu", nested=False, seed=0) -> nn.TransformerEncoder:
    with warnings.catch_warnings():  # torch warns when it turns enable_nested_tensor off for a layer
        warnings.simplefilter("ignore", UserWarning)
        encoder = nn.TransformerEncoder(_layer(batch_first, norm_first, activation), 2, norm=nn.LayerNorm(E),
                                        enable_nested_tensor=nested)
    return _randomize(encoder, seed)


class Tagger(nn.Module):
    """A user model: a projection, a TransformerEncoder and a LayerNorm of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.encoder = _encoder(norm_first=True, activation="relu")
        self.final_norm = nn.LayerNorm(E)
        _randomize(self, 1)

    def forward(self, src, src_key_padding_mask=None):
        return self.final_norm(self.encoder(self.embed(src), src_key_padding_mask=src_key_padding_mask))


def _inputs(batch_first=True, features=E, seed=0):
    """x (batch-first or not), the (B, T) bool padding mask (True = padding) and a probe like x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, features, generator=g, dtype=torch.float64)
    probe = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    pad = torch.arange(T)[None, :] >= torch.tensor(LENGTHS)[:, None]
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    return x, pad, probe


def _run(model, x, pad, probe, batch_first=True, grad=True, **kwargs):
    """(output batch-first, input gradient, {name: parameter gradient}); the loss reads real positions
    (``pad``: bool, True = padding, or float, 0 = real token)."""
    model.zero_grad(set_to_none=True)
    real = ~pad if pad.dtype == torch.bool else pad == 0
    dtype = next(model.parameters()).dtype
    x = x.to(dtype).requires_grad_(grad)
    out = model(x, src_key_padding_mask=pad, **kwargs)
    out = out if batch_first else out.transpose(0, 1)
    if not grad:
        return out, None, {}
    (out * probe.to(dtype))[real].sum().backward()
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_like_unpatched(patched, unpatched, batch_first=True, train=True, features=E) -> None:
    """Outputs (real positions), input gradients and every parameter gradient of the patched float32
    module within DESIGN's rule of the unpatched float32 module, against the unpatched float64 one."""
    ref64 = copy.deepcopy(unpatched).double()
    runs = []
    for model in (patched, unpatched, ref64):
        model.train(train)
        runs.append(_run(model, *_inputs(batch_first, features), batch_first))
    (out, gx, grads), (out32, gx32, grads32), (out64, gx64, grads64) = runs
    real = ~_inputs()[1]
    within_rule(out[real], out32[real], out64[real], "output at real positions")
    within_rule(gx, gx32, gx64, "input gradient")
    assert set(grads) == set(grads64)
    largest = max(g.abs().max().item() for g in grads64.values())
    for name, g64 in grads64.items():
        assert grads[name] is not None, f"{name}: no gradient"
        # floor: the key bias's exact gradient is 0 (softmax ignores a shift): round-off on both sides
        within_rule(grads[name], grads32[name], g64, f"grad {name}", floor=largest)


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


# --- 1. parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_equals_unpatched(batch_first, norm_first, activation, train):
    """2 layers + final LayerNorm, no nested tensors: outputs, input and parameter gradients."""
    encoder = _encoder(batch_first, norm_first, activation)
    unpatched = copy.deepcopy(encoder)
    report = bertfast.patch(encoder)
    assert [s.path for s in report.swapped] == ["layers.0", "layers.1", "norm", ""]
    assert report.left == []
    assert all(is_patched(m) for m in (encoder, encoder.layers[0], encoder.layers[1], encoder.norm))
    _assert_like_unpatched(encoder, unpatched, batch_first, train)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_with_nested_tensor_fast_path_equals_unpatched_at_real_positions(batch_first, norm_first, activation):
    """enable_nested_tensor=True (the default), eval, no grad: torch's fast path (nested tensors,
    where torch accepts the layer) zeros padded positions; real positions agree."""
    warnings.filterwarnings("ignore", "The PyTorch API of nested tensors", UserWarning)
    encoder = _encoder(batch_first, norm_first, activation, nested=True)
    unpatched = copy.deepcopy(encoder).eval()
    ref64 = copy.deepcopy(encoder).double().eval()
    bertfast.patch(encoder)
    encoder.eval()
    x, pad, probe = _inputs(batch_first)
    with torch.no_grad():
        out, out32, out64 = (_run(m, x, pad, probe, batch_first, grad=False)[0] for m in (encoder, unpatched, ref64))
    if unpatched.use_nested_tensor:  # the case this test is for: torch took its nested-tensor path,
        # which leaves zeros at padded positions before the final norm (LayerNorm(0) = its bias)
        assert (out32[pad] == unpatched.norm.bias).all()
    assert torch.isfinite(out).all()
    within_rule(out[~pad], out32[~pad], out64[~pad], "output at real positions")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_standalone_encoder_layer_equals_unpatched(batch_first, norm_first, train):
    layer = _randomize(_layer(batch_first, norm_first, "gelu"))
    unpatched = copy.deepcopy(layer)
    report = bertfast.patch(layer)
    assert [(s.path, s.original) for s in report.swapped] == [("", "TransformerEncoderLayer")]
    assert is_patched(layer) and not is_patched(layer.norm1) and not is_patched(layer.norm2)
    _assert_like_unpatched(layer, unpatched, batch_first, train)


def test_user_module_with_encoder_and_layer_norm():
    model = Tagger()
    unpatched = copy.deepcopy(model)
    report = bertfast.patch(model)
    assert {(s.path, s.original) for s in report.swapped} == {
        ("encoder.layers.0", "TransformerEncoderLayer"), ("encoder.layers.1", "TransformerEncoderLayer"),
        ("encoder.norm", "LayerNorm"), ("encoder", "TransformerEncoder"), ("final_norm", "LayerNorm")}
    assert report.left == [] and not is_patched(model) and not is_patched(model.embed)
    text = str(report)
    for path in ("encoder.layers.0", "encoder.layers.1", "encoder.norm", "final_norm"):
        assert path in text
    _assert_like_unpatched(model, unpatched, features=8)


# --- 2. the triton backend under the interpreter --------------------------------------------------
def _triton_child() -> None:
    """Run in a process of its own with TRITON_INTERPRET=1 (the interpreter is read when kernels are
    decorated): a patched post-norm GELU encoder with triton preferred equals the unpatched one."""
    encoder = _encoder(batch_first=True, norm_first=False, activation="gelu")
    unpatched = copy.deepcopy(encoder)
    ref64 = copy.deepcopy(encoder).double()
    bertfast.patch(encoder)
    x, pad, probe = _inputs()
    with bertfast.use_backend("triton", "torch"), bertfast.record_backends() as ran:
        out, gx, grads = _run(encoder.train(), x, pad, probe)
    (out32, gx32, grads32), (out64, gx64, grads64) = (_run(m.train(), x, pad, probe) for m in (unpatched, ref64))
    ops_ran = set(ran)
    for op in ("attention", "layer_norm"):
        assert (op, "triton") in ops_ran and (op, "torch") not in ops_ran, sorted(ops_ran)
    within_rule(out[~pad], out32[~pad], out64[~pad], "output at real positions")
    within_rule(gx, gx32, gx64, "input gradient")
    largest = max(g.abs().max().item() for g in grads64.values())
    for name, g64 in grads64.items():
        within_rule(grads[name], grads32[name], g64, f"grad {name}", floor=largest)
    print("triton child ok:", sorted(ops_ran))


def test_patched_encoder_on_the_triton_backend_under_the_interpreter():
    pytest.importorskip("triton")
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import test_patch_torch as t; t._triton_child()"
    result = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    tail = (result.stdout + result.stderr)[-8000:]
    assert result.returncode == 0, f"the triton run failed:\n{tail}"
    assert "triton child ok" in result.stdout


# --- 3. identity: state_dict, parameters, optimizer, unpatch, idempotence -------------------------
def test_patch_and_unpatch_keep_state_dict_and_parameter_objects():
    encoder = _encoder()
    original_types = _types(encoder)
    params = [id(p) for p in encoder.parameters()]
    names = [n for n, _ in encoder.named_parameters()]
    before = encoder.state_dict()
    saved = {k: v.clone() for k, v in before.items()}

    def same_state():
        after = encoder.state_dict()
        assert list(after) == list(before)
        for k, v in after.items():
            assert v.data_ptr() == before[k].data_ptr() and torch.equal(v, saved[k]), k
        assert [id(p) for p in encoder.parameters()] == params
        assert [n for n, _ in encoder.named_parameters()] == names

    bertfast.patch(encoder)
    same_state()
    assert _types(encoder) != original_types
    bertfast.unpatch(encoder)
    same_state()
    assert _types(encoder) == original_types


def test_unpatch_restores_the_original_classes_and_bitwise_outputs():
    model = Tagger()
    never = copy.deepcopy(model)
    original_types = _types(model)
    report = bertfast.patch(model)
    assert bertfast.unpatch(model) == len(report.swapped) == 5
    assert all(_types(model)[name] is cls for name, cls in original_types.items())
    assert not any(is_patched(m) for m in model.modules())
    assert all("_bertfast_plan" not in m.__dict__ for m in model.modules())
    for train in (True, False):
        a, b = (_run(m.train(train), *_inputs(features=8)) for m in (model, never))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert all(torch.equal(a[2][n], b[2][n]) for n in b[2])
    assert bertfast.unpatch(model) == 0


def test_patch_twice_is_idempotent():
    model = Tagger()
    first = bertfast.patch(model)
    types = _types(model)
    second = bertfast.patch(model)
    assert second.swapped == [] and second.left == []
    assert _types(model) == types
    assert bertfast.unpatch(model) == len(first.swapped)
    # patching again after unpatch: the same generated classes as the first time
    bertfast.patch(model)
    assert _types(model) == types


def test_adamw_created_before_patching_keeps_training_the_model():
    """Three AdamW steps on the patched model == on an unpatched copy. float64, and eps=1e-5: Adam
    divides by sqrt(v) + eps, so the key bias's gradient (exactly zero: softmax ignores a shift; pure
    round-off, ~1e-16 here) moves that bias by lr * round-off / eps: ~lr/2 per step in float32, and
    with the default eps=1e-8 ~2e-10 even in float64, which is round-off amplification, not a
    difference. The other gradients are >= 0.1, so eps=1e-5 leaves Adam's steps as they were."""
    encoder = _encoder(norm_first=True).double()
    unpatched = copy.deepcopy(encoder)
    initial = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-5) for m in (encoder, unpatched)]
    bertfast.patch(encoder)
    for step in range(3):
        for model, optimizer in zip((encoder, unpatched), optimizers):
            x, pad, probe = _inputs(seed=step)
            _run(model.train(), x, pad, probe)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    expected = dict(unpatched.named_parameters())
    largest = max(p.abs().max().item() for p in expected.values())
    for name, p in encoder.named_parameters():
        assert_rel_close(p.detach(), expected[name].detach(), F64, name, floor=largest)
    moved = max((p.detach() - initial[n]).abs().max().item() for n, p in encoder.named_parameters())
    assert moved > 1e-2  # the optimizer did move the patched model's parameters
    assert all(id(p) in {id(q) for q in encoder.parameters()} for p in optimizers[0].param_groups[0]["params"])


# --- 4. calls that run torch's own forward --------------------------------------------------------
def _fallback_pair(batch_first=True):
    encoder = _encoder(batch_first, norm_first=False, activation="gelu")
    unpatched = copy.deepcopy(encoder)
    bertfast.patch(encoder)
    return encoder, unpatched


@pytest.mark.filterwarnings("ignore:bertfast.patch")
@pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask")  # torch's, bool padding + float mask
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("call", ["src_mask", "is_causal", "float_padding"])
def test_calls_bertfast_does_not_serve_run_torchs_forward(call, train):
    encoder, unpatched = _fallback_pair()
    x, pad, probe = _inputs()
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    kwargs = {"src_mask": {"mask": causal}, "is_causal": {"mask": causal, "is_causal": True}}.get(call, {})
    if call == "float_padding":
        pad = torch.zeros(B, T).masked_fill(pad, float("-inf"))
    for model in (encoder, unpatched):
        model.train(train)
    out, gx, grads = _run(encoder, x, pad, probe, **kwargs)
    out0, gx0, grads0 = _run(unpatched, x, pad, probe, **kwargs)
    assert torch.equal(out, out0)
    assert torch.equal(gx, gx0)
    assert all(torch.equal(grads[n], grads0[n]) for n in grads0)
    # the layers on their own too
    layer, layer0 = encoder.layers[0], unpatched.layers[0]
    src_kwargs = {"src_mask" if k == "mask" else k: v for k, v in kwargs.items()}
    a = layer(x.float(), src_key_padding_mask=pad, **src_kwargs)
    b = layer0(x.float(), src_key_padding_mask=pad, **src_kwargs)
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:bertfast.patch")
def test_is_causal_without_a_mask_fails_like_torch():
    encoder, unpatched = _fallback_pair()
    x, pad, _ = _inputs()
    errors = []
    for model in (encoder, unpatched):
        with pytest.raises(Exception) as info:
            model(x.float(), src_key_padding_mask=pad, is_causal=True)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# --- 5. left alone --------------------------------------------------------------------------------
class OwnForwardLayer(nn.TransformerEncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 2.0


class ConfiguredLayer(nn.TransformerEncoderLayer):
    """A subclass that only sets defaults: torch's forward, so it is patched."""

    def __init__(self):
        super().__init__(E, HEADS, FF, dropout=0.0, batch_first=True)


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder_layer = nn.TransformerDecoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.custom = OwnForwardLayer(E, HEADS, FF, dropout=0.0, batch_first=True)
        self.configured = ConfiguredLayer()
        _randomize(self)


def _left(report) -> dict[str, tuple[str, str]]:
    return {s.path: (s.original, s.reason) for s in report.left}


def test_decoder_bare_attention_and_overridden_forward_are_left_unchanged():
    model = Seq2Seq()
    never = copy.deepcopy(model)
    types = _types(model)
    report = bertfast.patch(model)
    left = _left(report)
    assert set(left) == {"decoder_layer", "attn", "custom"}, str(report)
    assert left["decoder_layer"][0] == "TransformerDecoderLayer" and left["decoder_layer"][1]
    assert left["attn"][0] == "MultiheadAttention" and left["attn"][1]
    assert left["custom"][0] == "OwnForwardLayer" and "overridden" in left["custom"][1]
    assert [(s.path, s.original) for s in report.swapped] == [("configured", "ConfiguredLayer")]
    assert {n: t for n, t in _types(model).items() if not n.startswith("configured")} == \
        {n: t for n, t in types.items() if not n.startswith("configured")}  # nothing inside a left module
    assert type(model.custom) is OwnForwardLayer and type(model.decoder_layer.norm1) is nn.LayerNorm
    # left modules compute exactly what they computed before
    x, pad, _ = _inputs()
    x = x.float()
    mem = torch.randn(B, 5, E)
    assert torch.equal(model.decoder_layer(x, mem, tgt_key_padding_mask=pad),
                       never.decoder_layer(x, mem, tgt_key_padding_mask=pad))
    assert torch.equal(model.attn(x, x, x, key_padding_mask=pad)[0], never.attn(x, x, x, key_padding_mask=pad)[0])
    assert torch.equal(model.custom(x, src_key_padding_mask=pad), never.custom(x, src_key_padding_mask=pad))


def _without_biases() -> nn.TransformerEncoderLayer:
    return _layer(bias=False)


def _other_kv_dims() -> nn.TransformerEncoderLayer:
    layer = _layer()
    layer.self_attn = nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=16, vdim=24)
    return layer


@pytest.mark.parametrize("build, reason", [(_without_biases, "bias"), (_other_kv_dims, "kdim/vdim")],
                         ids=["bias_false", "kdim_vdim"])
def test_layer_with_attention_bertfast_cannot_run_is_left(build, reason):
    layer = _randomize(build())
    types = _types(layer)
    report = bertfast.patch(layer)
    assert report.swapped == [] and list(_left(report)) == [""]
    assert reason in report.left[0].reason
    assert _types(layer) == types
    # inside an encoder: the whole encoder is left, nothing inside it half-replaced (its norm neither)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
    types = _types(encoder)
    report = bertfast.patch(encoder)
    assert report.swapped == [] and list(_left(report)) == [""] and reason in report.left[0].reason
    assert _types(encoder) == types


# --- 6. dtype changes and torch.compile -----------------------------------------------------------
def test_to_float64_after_patching_stays_patched_and_equals_unpatched_float64():
    encoder = _encoder(batch_first=False, norm_first=False, activation="gelu")
    unpatched = copy.deepcopy(encoder).double()
    bertfast.patch(encoder)
    encoder.to(torch.float64)
    assert all(is_patched(m) for m in (encoder, encoder.layers[0], encoder.layers[1], encoder.norm))
    assert all(p.dtype == torch.float64 for p in encoder.parameters())
    for train in (True, False):
        (out, gx, grads), (out0, gx0, grads0) = (_run(m.train(train), *_inputs(False), batch_first=False)
                                                 for m in (encoder, unpatched))
        real = ~_inputs()[1]
        assert out.dtype == torch.float64
        assert_rel_close(out[real], out0[real], F64, "output")
        assert_rel_close(gx, gx0, F64, "input gradient")
        largest = max(g.abs().max().item() for g in grads0.values())
        for name in grads0:
            assert_rel_close(grads[name], grads0[name], F64, f"grad {name}", floor=largest)


def test_torch_compile_of_a_patched_encoder_equals_unpatched():
    encoder = _encoder(batch_first=True, norm_first=False, activation="gelu")
    unpatched = copy.deepcopy(encoder)
    bertfast.patch(encoder)
    compiled = torch.compile(encoder, backend="eager")
    ref64 = copy.deepcopy(unpatched).double()
    x, pad, probe = _inputs()
    (out, gx, _), (out32, gx32, grads32), (out64, gx64, grads64) = (
        _run(m.train(), x, pad, probe) for m in (compiled, unpatched, ref64))
    grads = {n: p.grad for n, p in encoder.named_parameters()}
    within_rule(out[~pad], out32[~pad], out64[~pad], "output at real positions")
    within_rule(gx, gx32, gx64, "input gradient")
    largest = max(g.abs().max().item() for g in grads64.values())
    for name, g64 in grads64.items():
        within_rule(grads[name], grads32[name], g64, f"grad {name}", floor=largest)


def test_patching_an_encoder_after_its_layer_keeps_the_layer_patched_once():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    bertfast.patch(encoder.layers[0])
    report = bertfast.patch(encoder)
    assert sorted(s.path for s in report.swapped) == ["", "layers.1"]
    assert bertfast.unpatch(encoder) == 3
    assert type(encoder.layers[0]) is nn.TransformerEncoderLayer
