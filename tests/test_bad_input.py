"""Bad input: a clear error that names the argument, raised before any backend runs.

DESIGN.md, "Bad input and faults": wrong dtype/device/shape/mask, sequence longer than the
position table, empty batch -> an error naming the argument, before any kernel launch; a row whose
keys are all padding gives zeros, never NaN.

"Before any backend runs" is proved two ways: at op level every backend of every op is replaced by
a spy (``backend_calls``) that records each call; at model level ``bertfast.record_backends()``
must stay empty. There is no GPU here: device mismatches use the 'meta' device against the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import pytest
import torch

import bertfast
from bertfast import models as M
from bertfast import ops

META = torch.device("meta")
BAD = (TypeError, ValueError)  # a clear Python error; never torch's RuntimeError from inside a kernel


def names(arg: str) -> str:
    """A regex that finds ``arg`` as a whole identifier (so 'labels' does not match 'sentence_order_label')."""
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


@pytest.fixture
def backend_calls(monkeypatch):
    """Wrap every backend of every op in a spy; the returned list collects (op, backend) per call."""
    calls: list[tuple[str, str]] = []
    for op_name, op in ops.ALL_OPS.items():
        for backend_name, backend in list(op.backends.items()):
            def spy(*args, _impl=backend.impl, _key=(op_name, backend_name), **kwargs):
                calls.append(_key)
                return _impl(*args, **kwargs)

            monkeypatch.setitem(op.backends, backend_name, dataclasses.replace(backend, impl=spy))
    return calls


# ------------------------------------------------------------------------------------------------
# Op level
# ------------------------------------------------------------------------------------------------
B, T, HEADS, D = 2, 5, 2, 4  # attention: (B, T, HEADS, D)
V, E, HID, P = 11, 6, 8, 7  # vocab, embedding width, hidden width, position-table rows


def op_inputs(op: str) -> dict:
    """Valid keyword arguments of each op (small, odd sizes, a ragged mask)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    if op == "attention":
        return dict(q=randn(B, T, HEADS, D), k=randn(B, T, HEADS, D), v=randn(B, T, HEADS, D), key_padding_mask=mask)
    if op == "layer_norm":
        return dict(x=randn(B, T, HID), weight=randn(HID), bias=randn(HID), residual=randn(B, T, HID))
    if op == "bias_gelu":
        return dict(x=randn(B, T, HID), bias=randn(HID))
    if op == "linear_gelu":
        return dict(x=randn(B, T, E), weight=randn(HID, E), bias=randn(HID))
    if op == "embedding":
        return dict(input_ids=torch.randint(0, V, (B, T), generator=g), position_ids=torch.arange(T)[None],
                    token_type_ids=torch.randint(0, 2, (B, T), generator=g), word_weight=randn(V, E),
                    position_weight=randn(P, E), token_type_weight=randn(2, E), norm_weight=randn(E),
                    norm_bias=randn(E), projection_weight=randn(HID, E), projection_bias=randn(HID))
    if op == "mlm_loss":
        labels = torch.full((B, T), -100)
        labels[0, 1], labels[1, 4] = 3, V - 1
        return dict(hidden=randn(B, T, HID), labels=labels, dense_weight=randn(E, HID), dense_bias=randn(E),
                    norm_weight=randn(E), norm_bias=randn(E), decoder_weight=randn(V, E), decoder_bias=randn(V))
    if op == "sentence_pair_loss":
        return dict(pooled=randn(B, HID), weight=randn(2, HID), bias=randn(2), labels=torch.tensor([0, 1]))
    if op == "rtd_loss":
        return dict(hidden=randn(B, T, HID), dense_weight=randn(HID, HID), dense_bias=randn(HID),
                    prediction_weight=randn(1, HID), prediction_bias=randn(1),
                    labels=torch.randint(0, 2, (B, T), generator=g), attention_mask=mask)
    if op == "sample_tokens":
        return dict(logits=randn(B * T, V))
    if op == "generator_sample":
        labels = torch.full((B, T), -100)
        labels[0, 1], labels[1, 4] = 3, V - 1
        return dict(hidden=randn(B, T, HID), labels=labels, input_ids=torch.randint(0, V, (B, T), generator=g),
                    dense_weight=randn(E, HID), dense_bias=randn(E), norm_weight=randn(E), norm_bias=randn(E),
                    decoder_weight=randn(V, E), decoder_bias=randn(V), attention_mask=mask)
    if op == "mask_tokens":
        ids = torch.randint(3, V, (B, T), generator=g)
        ids[1, 3:] = 0
        return dict(input_ids=ids, row_keys=torch.tensor([5, 2**32 - 1]), seed=0, vocab_size=V, mask_token_id=2,
                    special_token_ids=(0, 1, 2), word_ids=torch.arange(T, dtype=torch.int32).repeat(B, 1) // 2)
    raise KeyError(op)


OPS = tuple(ops.ALL_OPS)
TENSOR_ARGS = [(op, arg) for op in OPS for arg, value in op_inputs(op).items() if isinstance(value, torch.Tensor)]
# The arguments a second tensor can be checked against: ops with more than one tensor.
DEVICE_ARGS = [(op, arg) for op, arg in TENSOR_ARGS if sum(o == op for o, _ in TENSOR_ARGS) > 1]


def call_op(op: str, kwargs: dict):
    return getattr(ops, op)(**kwargs)


def with_arg(op: str, **changes) -> dict:
    kwargs = op_inputs(op)
    kwargs.update(changes)
    return kwargs


def test_every_op_is_covered():
    assert set(OPS) == {"attention", "layer_norm", "bias_gelu", "linear_gelu", "embedding", "mlm_loss", "sentence_pair_loss",
                        "rtd_loss", "sample_tokens", "generator_sample", "mask_tokens"}


@pytest.mark.parametrize("op", OPS)
def test_valid_inputs_run_and_the_spy_sees_them(op, backend_calls):
    # The baseline of every bad-input case below is valid, and the spy is not blind.
    call_op(op, op_inputs(op))
    assert backend_calls[0] == (op, "torch")
    # an op may be built on others (linear_gelu's torch backend calls bias_gelu), all on torch here
    assert all(backend == "torch" for _, backend in backend_calls)


def test_spy_replaces_the_torch_impl_itself(monkeypatch):
    # The same proof by hand, on the module (``bertfast.ops.attention`` is the function, not the module).
    module = importlib.import_module("bertfast.ops.attention")
    ran = []
    torch_backend = module.OP.backends["torch"]
    def spy(*args, **kwargs):
        ran.append(args)
        return torch_backend.impl(*args, **kwargs)

    monkeypatch.setitem(module.OP.backends, "torch", dataclasses.replace(torch_backend, impl=spy))
    kwargs = with_arg("attention", q=torch.zeros(B, T, HEADS, D, dtype=torch.int32))
    with pytest.raises(TypeError, match=names("q")):
        ops.attention(**kwargs)
    assert ran == []
    ops.attention(**op_inputs("attention"))
    assert len(ran) == 1


def _wrong_kind(t: torch.Tensor) -> torch.Tensor:
    """float -> int64, int -> float32, bool -> float32."""
    return t.long() if t.is_floating_point() else t.float()


@pytest.mark.parametrize("op,arg", TENSOR_ARGS, ids=[f"{o}-{a}" for o, a in TENSOR_ARGS])
def test_wrong_dtype_kind_names_the_argument(op, arg, backend_calls):
    kwargs = op_inputs(op)
    kwargs[arg] = _wrong_kind(kwargs[arg])
    with pytest.raises(BAD, match=names(arg)):
        call_op(op, kwargs)
    assert backend_calls == []


@pytest.mark.parametrize("op,arg", DEVICE_ARGS, ids=[f"{o}-{a}" for o, a in DEVICE_ARGS])
def test_device_mismatch_names_the_argument(op, arg, backend_calls):
    kwargs = op_inputs(op)
    kwargs[arg] = kwargs[arg].to(META)
    with pytest.raises(BAD, match=names(arg)):
        call_op(op, kwargs)
    assert backend_calls == []


# A float tensor in another float dtype than the activation it meets. Either the op accepts the
# mix (as layer_norm accepts half x with float32 parameters), or it refuses naming one of the two.
MIXED_FLOAT = [
    ("attention", "k", "q"),
    ("attention", "v", "q"),
    ("layer_norm", "residual", "x"),
    ("layer_norm", "bias", "weight"),
    ("embedding", "position_weight", "word_weight"),
    ("embedding", "norm_weight", "word_weight"),
    ("embedding", "projection_weight", "word_weight"),
    ("mlm_loss", "dense_weight", "hidden"),
    ("mlm_loss", "decoder_weight", "hidden"),
    ("sentence_pair_loss", "weight", "pooled"),
    ("rtd_loss", "dense_weight", "hidden"),
]


@pytest.mark.parametrize("op,arg,other", MIXED_FLOAT, ids=[f"{o}-{a}" for o, a, _ in MIXED_FLOAT])
def test_mixed_float_dtypes_run_or_name_the_argument(op, arg, other, backend_calls):
    kwargs = op_inputs(op)
    kwargs[arg] = kwargs[arg].double()
    try:
        call_op(op, kwargs)
    except Exception as e:  # noqa: BLE001 -- the point is which error, and what it says
        assert isinstance(e, BAD) and (re.search(names(arg), str(e)) or re.search(names(other), str(e))), (
            f"{op}: {arg} float64 vs {other} float32 raised {type(e).__name__}: {e}")
        assert backend_calls == []


SHAPE_CASES = [
    ("attention", "key_padding_mask", torch.ones(B, T + 1, dtype=torch.bool)),
    ("attention", "key_padding_mask", torch.ones(B, dtype=torch.bool)),
    ("attention", "key_padding_mask", torch.ones(B, 1, 1, T, dtype=torch.bool)),  # transformers' 4D layout
    ("attention", "k", torch.randn(B, T, HEADS + 1, D)),
    ("attention", "k", torch.randn(B, T, HEADS, D + 1)),
    ("attention", "v", torch.randn(B, T + 1, HEADS, D)),
    ("attention", "q", torch.randn(B, T, HEADS * D)),
    ("layer_norm", "weight", torch.randn(HID + 1)),
    ("layer_norm", "bias", torch.randn(1, HID)),
    ("layer_norm", "residual", torch.randn(B, T + 1, HID)),
    ("bias_gelu", "bias", torch.randn(HID - 1)),
    ("embedding", "input_ids", torch.zeros(B * T, dtype=torch.long)),
    ("embedding", "position_ids", torch.arange(T + 1)[None]),
    ("embedding", "token_type_ids", torch.zeros(B + 1, T, dtype=torch.long)),
    ("embedding", "position_weight", torch.randn(P, E + 1)),
    ("embedding", "norm_bias", torch.randn(E + 1)),
    ("embedding", "projection_weight", torch.randn(HID, E + 1)),
    ("embedding", "projection_bias", torch.randn(HID + 1)),
    ("mlm_loss", "labels", torch.full((B, T + 1), -100)),
    ("mlm_loss", "dense_weight", torch.randn(E, HID + 1)),
    ("mlm_loss", "decoder_weight", torch.randn(V, E + 1)),
    ("mlm_loss", "decoder_bias", torch.randn(V + 1)),
    ("mlm_loss", "norm_weight", torch.randn(E - 1)),
    ("sentence_pair_loss", "labels", torch.tensor([0, 1, 0])),
    ("sentence_pair_loss", "weight", torch.randn(2, HID + 1)),
    ("sentence_pair_loss", "bias", torch.randn(3)),
    ("rtd_loss", "labels", torch.zeros(B, T - 1, dtype=torch.long)),
    ("rtd_loss", "attention_mask", torch.ones(B + 1, T, dtype=torch.bool)),
    ("rtd_loss", "prediction_weight", torch.randn(2, HID)),
    ("sample_tokens", "logits", torch.randn(V)),
    ("sample_tokens", "logits", torch.randn(B, T, V)),
    ("mask_tokens", "row_keys", torch.tensor([1, 2, 3])),
    ("mask_tokens", "word_ids", torch.zeros(B, T + 1, dtype=torch.int32)),
    ("mask_tokens", "input_ids", torch.zeros(B * T, dtype=torch.long)),
]


@pytest.mark.parametrize("op,arg,value", SHAPE_CASES, ids=[f"{o}-{a}-{tuple(v.shape)}" for o, a, v in SHAPE_CASES])
def test_wrong_shape_names_the_argument(op, arg, value, backend_calls):
    with pytest.raises(BAD, match=names(arg)):
        call_op(op, with_arg(op, **{arg: value}))
    assert backend_calls == []


def _ids_with(value):
    ids = torch.randint(0, 2, (B, T))
    ids[1, 2] = value
    return ids


VALUE_CASES = [
    ("embedding", "input_ids", _ids_with(V)),
    ("embedding", "input_ids", _ids_with(-1)),
    ("embedding", "position_ids", torch.arange(P - T + 1, P + 1)[None]),  # one past the table
    ("embedding", "position_ids", torch.arange(-1, T - 1)[None]),
    ("embedding", "token_type_ids", _ids_with(2)),
    ("mlm_loss", "labels", torch.where(op_inputs("mlm_loss")["labels"] == 3, V, -100)),
    ("mlm_loss", "labels", torch.where(op_inputs("mlm_loss")["labels"] == 3, -1, -100)),  # -1 is not ignore_index
    ("sentence_pair_loss", "labels", torch.tensor([0, 2])),
    ("sentence_pair_loss", "labels", torch.tensor([-1, 0])),
    ("rtd_loss", "labels", _ids_with(2)),
    ("rtd_loss", "labels", _ids_with(-1)),
    ("mask_tokens", "input_ids", _ids_with(V)),
    ("mask_tokens", "input_ids", _ids_with(-1)),
    ("mask_tokens", "row_keys", torch.tensor([0, 2**32])),
]


@pytest.mark.parametrize("op,arg,value", VALUE_CASES, ids=[f"{o}-{a}-{i}" for i, (o, a, _) in enumerate(VALUE_CASES)])
def test_id_out_of_range_names_the_argument(op, arg, value, backend_calls):
    with pytest.raises(ValueError, match=names(arg)):
        call_op(op, with_arg(op, **{arg: value}))
    assert backend_calls == []


def _empty(op: str, dim: int) -> dict:
    """The op's inputs with every activation-like tensor cut to length 0 along ``dim`` (0 = batch, 1 = seq)."""
    kwargs = op_inputs(op)
    lead = {"attention": ("q", "k", "v", "key_padding_mask"),
            "embedding": ("input_ids", "token_type_ids") + (("position_ids",) if dim == 1 else ()),
            "mlm_loss": ("hidden", "labels"), "rtd_loss": ("hidden", "labels", "attention_mask"),
            "sentence_pair_loss": ("pooled", "labels")}[op]
    for arg in lead:
        kwargs[arg] = kwargs[arg].narrow(dim, 0, 0)
    return kwargs


EMPTY_CASES = [
    ("attention", 0, "q"), ("attention", 1, "q"),
    ("embedding", 0, "input_ids"), ("embedding", 1, "input_ids"),
    ("sentence_pair_loss", 0, "pooled"),
    ("mlm_loss", 0, "hidden"), ("mlm_loss", 1, "hidden"),
    ("rtd_loss", 0, "hidden"), ("rtd_loss", 1, "hidden"),
]


@pytest.mark.parametrize("op,dim,arg", EMPTY_CASES, ids=[f"{o}-{'BT'[d]}=0" for o, d, _ in EMPTY_CASES])
def test_empty_batch_or_sequence_names_the_argument(op, dim, arg, backend_calls):
    with pytest.raises(ValueError, match=names(arg)):
        call_op(op, _empty(op, dim))
    assert backend_calls == []


OTHER_EMPTY = [
    ("attention", "k", dict(k=torch.randn(B, 0, HEADS, D), v=torch.randn(B, 0, HEADS, D), key_padding_mask=None)),
    ("attention", "q", dict(q=torch.randn(B, T, HEADS, 0), k=torch.randn(B, T, HEADS, 0),
                            v=torch.randn(B, T, HEADS, 0))),
    ("layer_norm", "x", dict(x=torch.randn(B, T, 0), weight=None, bias=None, residual=None)),
    ("sample_tokens", "logits", dict(logits=torch.randn(3, 0))),
]


@pytest.mark.parametrize("op,arg,changes", OTHER_EMPTY, ids=[f"{o}-{a}" for o, a, _ in OTHER_EMPTY])
def test_empty_key_head_or_feature_dim_names_the_argument(op, arg, changes, backend_calls):
    with pytest.raises(ValueError, match=names(arg)):
        call_op(op, with_arg(op, **changes))
    assert backend_calls == []


SCALAR_CASES = [
    ("attention", "dropout_p", 1.0), ("attention", "dropout_p", -0.1), ("attention", "dropout_p", float("nan")),
    ("attention", "scale", 0.0), ("attention", "scale", -1.0),
    ("layer_norm", "dropout_p", 1.5), ("layer_norm", "eps", 0.0), ("layer_norm", "eps", -1e-5),
    ("embedding", "dropout_p", 1.0),
    ("bias_gelu", "approximate", "fast"),
    ("mlm_loss", "approximate", "sigmoid"), ("mlm_loss", "reduction", "avg"), ("mlm_loss", "label_smoothing", 1.0),
    ("rtd_loss", "approximate", "exact"),
    ("sample_tokens", "temperature", 0.0), ("sample_tokens", "temperature", float("nan")),
    ("sample_tokens", "seed", 1.5),
]


@pytest.mark.parametrize("op,arg,value", SCALAR_CASES, ids=[f"{o}-{a}-{v}" for o, a, v in SCALAR_CASES])
def test_bad_scalar_names_the_argument(op, arg, value, backend_calls):
    with pytest.raises(BAD, match=names(arg)):
        call_op(op, with_arg(op, **{arg: value}))
    assert backend_calls == []


NON_TENSOR_CASES = [
    ("attention", "q", lambda t: t.tolist()),
    ("layer_norm", "residual", lambda t: t.tolist()),
    ("mlm_loss", "labels", lambda t: t.tolist()),
    ("embedding", "projection_bias", lambda t: t.tolist()),
]


@pytest.mark.parametrize("op,arg,convert", NON_TENSOR_CASES, ids=[f"{o}-{a}" for o, a, _ in NON_TENSOR_CASES])
def test_non_tensor_names_the_argument(op, arg, convert, backend_calls):
    kwargs = op_inputs(op)
    kwargs[arg] = convert(kwargs[arg])
    with pytest.raises(TypeError, match=names(arg)):
        call_op(op, kwargs)
    assert backend_calls == []


@pytest.mark.parametrize("op", ["mlm_loss", "rtd_loss"])
@pytest.mark.parametrize("dim", [0, 1], ids=["B=0", "T=0"])
def test_loss_of_empty_input_without_mask_is_never_nan(op, dim):
    # Refusing is right (see above); a NaN loss is never right.
    kwargs = _empty(op, dim)
    kwargs.pop("attention_mask", None)
    try:
        out = call_op(op, kwargs)
    except ValueError as e:
        assert re.search(names("hidden"), str(e))
        return
    loss = out[1] if isinstance(out, tuple) else out
    assert torch.isfinite(loss).all(), f"{op} on an empty input returned {loss}"


# --- all-padding rows and NaN at padded keys: the attention op itself -----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_all_padding_row_is_exactly_zero_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 7, 2, 5, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1] = False  # row 1: every key is padding
    mask[2, 4:] = False
    out = ops.attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    out.backward(torch.randn(out.shape, generator=g, dtype=dtype))
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    # Padded keys/values of a partly padded row get no gradient either.
    assert torch.equal(k.grad[2, 4:], torch.zeros_like(k.grad[2, 4:]))
    assert torch.equal(v.grad[2, 4:], torch.zeros_like(v.grad[2, 4:]))


def test_attention_nan_in_padded_keys_and_values_never_leaks():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 2, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1] = False
    clean = ops.attention(q, k, v, key_padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[0, 4:], v2[0, 4:] = float("nan"), float("inf")
    k2[1], v2[1] = float("inf"), float("nan")
    k2.requires_grad_(), v2.requires_grad_()
    q2 = q.clone().requires_grad_()
    dirty = ops.attention(q2, k2, v2, key_padding_mask=mask)
    assert torch.equal(dirty, clean)
    dirty.sum().backward()
    for grad in (q2.grad, k2.grad, v2.grad):
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------
# Model level
# ------------------------------------------------------------------------------------------------
VOCAB, MAX_POS = 50, 16
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
            max_position_embeddings=MAX_POS)
CONFIGS = {
    "bert": lambda **kw: M.BertConfig(**{**TINY, **kw}),
    "albert": lambda **kw: M.AlbertConfig(**{**TINY, "embedding_size": 16, **kw}),
    "roberta": lambda **kw: M.RobertaConfig(**{**TINY, **kw}),
    "electra": lambda **kw: M.ElectraConfig(**{**TINY, "embedding_size": 16, **kw}),
}
MODEL_CLASSES = {
    "BertModel": "bert", "BertForPreTraining": "bert",
    "AlbertModel": "albert", "AlbertForPreTraining": "albert", "AlbertForMaskedLM": "albert",
    "RobertaModel": "roberta", "RobertaForMaskedLM": "roberta",
    "ElectraModel": "electra", "ElectraForPreTraining": "electra", "ElectraForMaskedLM": "electra",
    "ElectraPretrainingModel": "electra",
}
JOINT = "ElectraPretrainingModel"  # forward(input_ids, labels, attention_mask, token_type_ids, seed)


def build(name: str, **config_kwargs):
    torch.manual_seed(0)
    return getattr(M, name)(CONFIGS[MODEL_CLASSES[name]](**config_kwargs))


@pytest.fixture(scope="module")
def built():
    return {name: build(name).eval() for name in MODEL_CLASSES}


def position_limit(name: str) -> int:
    """Longest sequence of default positions; RoBERTa's start at pad_token_id + 1."""
    config = CONFIGS[MODEL_CLASSES[name]]()
    return MAX_POS - config.pad_token_id - 1 if MODEL_CLASSES[name] == "roberta" else MAX_POS


def valid_ids(b=B, t=T):
    return torch.randint(2, VOCAB, (b, t), generator=torch.Generator().manual_seed(3))


def run_model(name, model, input_ids, **kwargs):
    """Call any model class; the joint ELECTRA model gets -100 labels on the ids' device unless given."""
    if name == JOINT:
        labels = kwargs.pop("labels", None)
        if labels is None and isinstance(input_ids, torch.Tensor):
            labels = torch.full(input_ids.shape[:2], -100, dtype=torch.long, device=input_ids.device)
        return model(input_ids, labels, **kwargs)
    return model(input_ids, **kwargs)


def assert_model_refuses(name, model, arg, input_ids, exc=BAD, **kwargs):
    with bertfast.record_backends() as trace:
        with pytest.raises(exc, match=names(arg)):
            run_model(name, model, input_ids, **kwargs)
    assert trace == [], f"{name}: backends ran before `{arg}` was refused: {trace}"


def _model_cases():
    ids = valid_ids()
    ones = torch.ones(B, T, dtype=torch.long)
    cases = [
        ("float-input_ids", "input_ids", ids.float(), {}),
        ("meta-input_ids", "input_ids", ids.to(META), {}),
        ("vocab-input_ids", "input_ids", torch.where(ids == ids[0, 0], VOCAB, ids), {}),
        ("negative-input_ids", "input_ids", torch.where(ids == ids[0, 0], -1, ids), {}),
        ("3d-input_ids", "input_ids", ids[..., None], {}),
        ("B=0", "input_ids", ids[:0], {}),
        ("T=0", "input_ids", ids[:, :0], {}),
        ("float-mask", "attention_mask", ids, dict(attention_mask=ones.float())),
        ("meta-mask", "attention_mask", ids, dict(attention_mask=ones.to(META))),
        ("short-mask", "attention_mask", ids, dict(attention_mask=ones[:, :-1])),
        ("4d-mask", "attention_mask", ids, dict(attention_mask=ones[:, None, None, :])),
        ("batch-mask", "attention_mask", ids, dict(attention_mask=ones[:1])),
        ("float-token_type_ids", "token_type_ids", ids, dict(token_type_ids=ones.float())),
        ("shape-token_type_ids", "token_type_ids", ids, dict(token_type_ids=ones[:, :-1])),
        ("meta-token_type_ids", "token_type_ids", ids, dict(token_type_ids=ones.to(META))),
        ("range-token_type_ids", "token_type_ids", ids, dict(token_type_ids=ones * 2)),
    ]
    return cases


MODEL_CASES = _model_cases()


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
@pytest.mark.parametrize("name", MODEL_CLASSES)
def test_model_bad_input_names_the_argument_before_any_backend(name, case, built):
    _, arg, input_ids, kwargs = case
    assert_model_refuses(name, built[name], arg, input_ids, **dict(kwargs))


@pytest.mark.parametrize("name", [n for n in MODEL_CLASSES if n != JOINT])
def test_model_position_ids_and_inputs_embeds_checked(name, built):
    model, ids = built[name], valid_ids()
    width = CONFIGS[MODEL_CLASSES[name]]().embedding_dim
    past_table = torch.arange(MAX_POS - T + 1, MAX_POS + 1)[None]
    assert_model_refuses(name, model, "position_ids", ids, position_ids=past_table)
    assert_model_refuses(name, model, "position_ids", ids, position_ids=torch.arange(T)[None].float())
    assert_model_refuses(name, model, "position_ids", ids, position_ids=torch.arange(T + 1)[None])
    assert_model_refuses(name, model, "inputs_embeds", None, inputs_embeds=torch.ones(B, T, width, dtype=torch.long))
    assert_model_refuses(name, model, "inputs_embeds", None, inputs_embeds=torch.randn(B, T, width + 1))
    assert_model_refuses(name, model, "inputs_embeds", None, inputs_embeds=torch.randn(B, position_limit(name) + 1,
                                                                                       width))
    assert_model_refuses(name, model, "inputs_embeds", ids, inputs_embeds=torch.randn(B, T, width))  # both given
    assert_model_refuses(name, model, "input_ids", None)  # neither given


@pytest.mark.parametrize("name", MODEL_CLASSES)
def test_sequence_longer_than_position_table_names_input_ids(name, built):
    model, limit = built[name], position_limit(name)
    if MODEL_CLASSES[name] == "roberta":
        assert limit == MAX_POS - 2  # pad_token_id = 1: positions 2 .. 15
    with torch.no_grad():
        run_model(name, model, valid_ids(t=limit))  # exactly the limit fits
    assert_model_refuses(name, model, "input_ids", valid_ids(t=limit + 1))


def test_roberta_position_limit_follows_pad_token_id():
    model = build("RobertaModel", pad_token_id=4).eval()
    limit = MAX_POS - 4 - 1
    ids = torch.randint(5, VOCAB, (2, limit))
    with torch.no_grad():
        model(ids)
    assert_model_refuses("RobertaModel", model, "input_ids", torch.randint(5, VOCAB, (2, limit + 1)))


def test_joint_electra_without_input_ids_names_it(built):
    labels = torch.full((B, T), -100)
    assert_model_refuses(JOINT, built[JOINT], "input_ids", None, labels=labels)


# --- labels ---------------------------------------------------------------------------------------
# (model, label argument, kind): "tokens" = vocab ids or -100; "class" = 0/1 per sequence; "rtd" = 0/1 per token.
LABEL_ARGS = [
    ("BertForPreTraining", "labels", "tokens"), ("BertForPreTraining", "next_sentence_label", "class"),
    ("AlbertForPreTraining", "labels", "tokens"), ("AlbertForPreTraining", "sentence_order_label", "class"),
    ("AlbertForMaskedLM", "labels", "tokens"), ("RobertaForMaskedLM", "labels", "tokens"),
    ("ElectraForMaskedLM", "labels", "tokens"), ("ElectraForPreTraining", "labels", "rtd"),
    (JOINT, "labels", "tokens"),
]
LABEL_IDS = [f"{m}-{a}" for m, a, _ in LABEL_ARGS]


def valid_label(kind: str) -> torch.Tensor:
    if kind == "class":
        return torch.tensor([0, 1])
    if kind == "rtd":
        return torch.randint(0, 2, (B, T), generator=torch.Generator().manual_seed(4))
    labels = torch.full((B, T), -100)
    labels[0, 1], labels[1, 3] = 7, VOCAB - 1
    return labels


@pytest.mark.parametrize("name,arg,kind", LABEL_ARGS, ids=LABEL_IDS)
def test_labels_of_wrong_shape_dtype_or_device_are_named(name, arg, kind, built):
    model, ids, good = built[name], valid_ids(), valid_label(kind)
    wrong_shape = good[:1] if kind == "class" else good[:, :-1]
    for bad in (wrong_shape, good[None], good.float(), good.to(META)):
        assert_model_refuses(name, model, arg, ids, **{arg: bad})


@pytest.mark.parametrize("name,arg,kind", LABEL_ARGS, ids=LABEL_IDS)
def test_valid_labels_run(name, arg, kind, built):
    with torch.no_grad():
        out = run_model(name, built[name], valid_ids(), **{arg: valid_label(kind)})
    assert torch.isfinite(out.loss)


def out_of_range_label(kind: str) -> torch.Tensor:
    good = valid_label(kind)
    return {"class": torch.tensor([0, 2]), "rtd": torch.where(good == 1, 2, good),
            "tokens": torch.where(good == 7, VOCAB, good)}[kind]


@pytest.mark.parametrize("name,arg,kind", LABEL_ARGS, ids=LABEL_IDS)
def test_label_values_out_of_range_name_the_argument(name, arg, kind, built):
    with torch.no_grad(), pytest.raises(ValueError, match=names(arg)):
        run_model(name, built[name], valid_ids(), **{arg: out_of_range_label(kind)})


@pytest.mark.parametrize("name,arg,kind", LABEL_ARGS, ids=LABEL_IDS)
def test_label_values_out_of_range_are_refused_before_any_backend(name, arg, kind, built):
    # DESIGN: a bad input is refused before any kernel launch. A label past the vocabulary (or
    # class 2, or RTD label 2) is as detectable at the boundary as a token id past it, which is
    # refused before the embedding runs.
    with bertfast.record_backends() as trace, torch.no_grad():
        with pytest.raises(ValueError):
            run_model(name, built[name], valid_ids(), **{arg: out_of_range_label(kind)})
    assert trace == [], f"{name}: backends ran before `{arg}` was refused: {trace}"


# --- configs and module constructors ---------------------------------------------------------------
@pytest.mark.parametrize("family", CONFIGS)
def test_config_head_dim_must_divide_hidden(family):
    with pytest.raises(ValueError, match=names("num_attention_heads")):
        CONFIGS[family](hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("act", ["relu", "swish", "gelu_fast", "tanh"])
def test_config_unsupported_activation_names_hidden_act(family, act):
    with pytest.raises(ValueError, match=names("hidden_act")):
        CONFIGS[family](hidden_act=act)


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("arg", ["hidden_dropout_prob", "attention_probs_dropout_prob"])
@pytest.mark.parametrize("p", [1.0, 1.5, -0.1])
def test_config_bad_dropout_names_the_field(family, arg, p):
    with pytest.raises(ValueError, match=names(arg)):
        CONFIGS[family](**{arg: p})


@pytest.mark.parametrize("kwargs,arg", [
    (dict(vocab_size=0), "vocab_size"), (dict(hidden_size=-32), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"), (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(type_vocab_size=0), "type_vocab_size"), (dict(pad_token_id=VOCAB), "pad_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"), (dict(layer_norm_eps=0.0), "layer_norm_eps"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_config_bad_sizes_name_the_field(kwargs, arg):
    with pytest.raises(ValueError, match=names(arg)):
        CONFIGS["bert"](**kwargs)


def test_roberta_config_position_table_must_fit_padding():
    with pytest.raises(ValueError, match=names("max_position_embeddings")):
        CONFIGS["roberta"](max_position_embeddings=2, pad_token_id=1)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(sharing="layers"), "sharing"),
    (dict(sharing="ALL"), "sharing"),
    (dict(num_hidden_groups=0), "num_hidden_groups"),
    (dict(num_hidden_groups=3), "num_hidden_groups"),  # more groups than the 2 layers
    (dict(num_hidden_layers=3, num_hidden_groups=2, sharing="none"), "num_hidden_groups"),
    (dict(inner_group_num=0), "inner_group_num"),
    (dict(embedding_size=0), "embedding_size"),
    (dict(classifier_dropout_prob=1.0), "classifier_dropout_prob"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_albert_config_sharing_and_groups(kwargs, arg):
    with pytest.raises(ValueError, match=names(arg)):
        CONFIGS["albert"](**kwargs)


@pytest.mark.parametrize("field,value", [("vocab_size", VOCAB + 1), ("embedding_size", 8), ("pad_token_id", 3)])
def test_electra_generator_must_share_the_embedding_table(field, value):
    discriminator = CONFIGS["electra"]()
    generator = dataclasses.replace(M.make_generator_config(discriminator), **{field: value})
    with pytest.raises(ValueError, match=names("generator_config")) as info:
        M.ElectraPretrainingModel(discriminator, generator)
    assert field in str(info.value)


def test_electra_joint_model_bad_temperature_and_fraction():
    with pytest.raises(ValueError, match=names("temperature")):
        M.ElectraPretrainingModel(CONFIGS["electra"](), temperature=0.0)
    with pytest.raises(ValueError, match=names("fraction")):
        M.make_generator_config(CONFIGS["electra"](), fraction=0.0)


def test_module_constructors_name_their_argument():
    with pytest.raises(ValueError, match=names("num_attention_heads")):
        bertfast.nn.SelfAttention(30, 4)
    with pytest.raises(ValueError, match=names("approximate")):
        bertfast.nn.LinearGELU(8, 8, approximate="fast")
    with pytest.raises(ValueError, match=names("normalized_shape")):
        bertfast.nn.LayerNorm((4, 8))


@pytest.mark.parametrize("p", [1.5, -0.1])
def test_module_dropout_probability_names_the_argument(p):
    # transformers builds these modules from a config that the user may not have validated; the
    # module's own argument should be named (torch's nn.Dropout says "dropout probability").
    with pytest.raises(ValueError, match=names("attention_probs_dropout_prob")):
        bertfast.nn.SelfAttention(32, 2, attention_probs_dropout_prob=p)
    with pytest.raises(ValueError, match=names("hidden_dropout_prob")):
        bertfast.nn.Embeddings(VOCAB, 16, MAX_POS, 2, hidden_dropout_prob=p)


def test_module_forward_bad_input_names_the_argument():
    ln = bertfast.nn.LayerNorm(8)
    with bertfast.record_backends() as trace:
        with pytest.raises(ValueError, match=names("x")):
            ln(torch.randn(3, 9))
        with pytest.raises(BAD, match=names("residual")):
            ln(torch.randn(3, 8), residual=torch.randn(3, 7))
        with pytest.raises(ValueError, match=names("dropout_p")):
            ln(torch.randn(3, 8), dropout_p=1.0)
        attn = bertfast.nn.SelfAttention(8, 2)
        with pytest.raises(ValueError, match=names("hidden_states")):
            attn(torch.randn(3, 8))
        with pytest.raises(BAD, match=names("key_padding_mask")):
            attn(torch.randn(2, 5, 8), key_padding_mask=torch.ones(2, 5))
        with pytest.raises(BAD, match=names("key_padding_mask")):
            attn(torch.randn(2, 5, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    assert trace == []


# --- Hugging Face interop ---------------------------------------------------------------------------
def test_from_hf_refuses_unsupported_class_naming_hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=MAX_POS)
    hf = transformers.BertForSequenceClassification(config)
    with pytest.raises(TypeError, match=names("hf_model")) as info:
        bertfast.from_hf(hf)
    assert "BertForSequenceClassification" in str(info.value)


def test_from_hf_refuses_decoder_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=MAX_POS, is_decoder=True)
    with pytest.raises(ValueError, match=names("is_decoder")):
        bertfast.from_hf(transformers.BertModel(config))


def test_to_hf_refuses_a_non_model():
    with pytest.raises(TypeError, match=names("model")):
        bertfast.to_hf(bertfast.nn.LayerNorm(8))


# --- all-padding sequences in every model ---------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_CLASSES)
def test_all_padding_sequence_is_finite_forward_and_backward(name):
    model = build(name, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    torch.manual_seed(5)
    config = model.config if name != JOINT else model.discriminator.config
    ids = valid_ids(b=3, t=6)
    ids[1] = config.pad_token_id
    ids[2, 4:] = config.pad_token_id
    mask = (ids != config.pad_token_id).long()  # row 1: all padding
    assert mask[1].sum() == 0
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[2, 1] = 7, 9
    if name == JOINT:
        out = model(ids, labels, attention_mask=mask, seed=0)
        outputs = [out.loss, out.logits]
    elif name in ("BertForPreTraining", "AlbertForPreTraining"):
        extra = "next_sentence_label" if name.startswith("Bert") else "sentence_order_label"
        out = model(ids, attention_mask=mask, labels=labels, return_logits=True, **{extra: torch.tensor([0, 1, 0])})
        outputs = [out.loss, out.prediction_logits, out[2]]
    elif name.endswith("MaskedLM"):
        out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
        outputs = [out.loss, out.logits]
    elif name == "ElectraForPreTraining":
        out = model(ids, attention_mask=mask, labels=torch.randint(0, 2, ids.shape))
        outputs = [out.loss, out.logits]
    else:
        out = model(ids, attention_mask=mask)
        outputs = [t for t in out.to_tuple()]
    for t in outputs:
        assert torch.isfinite(t).all(), f"{name}: non-finite output"
    sum(t.float().sum() for t in outputs).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, f"{name}: no gradient reached the parameters"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"
