"""``bertfast.patch`` / ``bertfast.unpatch`` on real transformers models (random weights built from tiny
configs, no downloads), float32 on the CPU, ragged right padding (lengths [T, T-3, 2]).

The patch swaps the class of recognized modules in place, so the patched model must compute what
transformers computes (DESIGN.md's tolerance rule against a float64 copy of the same model: outputs
at real tokens, the loss and every parameter's gradient), keep every tensor object and state_dict
entry, survive the usual model operations (``.to``, checkpointing, ``save_pretrained``,
``torch.compile``), leave unsupported models entirely alone, and be undone bit-exactly by ``unpatch``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import bertfast
from helpers import assert_grads_close, assert_rel_close, mlm_labels, randomize_
from triton_kernels.kernel_helpers import within_rule

transformers = pytest.importorskip("transformers")

T = 11
LENGTHS = [T, T - 3, 2]  # batch 3, right padding
SIZES = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
EXTRA = {  # per transformers model type
    "bert": dict(type_vocab_size=2),
    "albert": dict(type_vocab_size=2, embedding_size=16, classifier_dropout_prob=0.0),
    "roberta": dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=T + 2),
    "electra": dict(type_vocab_size=2, embedding_size=16),  # factorized: 16 -> 32
}
ALBERT_GROUPS = dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
           "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM", "AlbertForSequenceClassification",
           "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForSequenceClassification"]
# (class name, config overrides): every class, plus ALBERT with two groups of two inner layers
CASES = [pytest.param(c, {}, id=c) for c in CLASSES] + [
    pytest.param("AlbertModel", ALBERT_GROUPS, id="AlbertModel-groups"),
    pytest.param("AlbertForPreTraining", ALBERT_GROUPS, id="AlbertForPreTraining-groups")]
# The MLM logits a patched model with labels leaves out (None) unless patch(..., keep_logits=True).
MLM_LOGITS = {"BertForPreTraining": "prediction_logits", "AlbertForPreTraining": "prediction_logits",
              "BertForMaskedLM": "logits", "AlbertForMaskedLM": "logits", "RobertaForMaskedLM": "logits",
              "ElectraForMaskedLM": "logits"}
OUTPUTS = ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits",
           "sop_logits", "loss")


def model_type(class_name: str) -> str:
    return next(t for t in EXTRA if class_name.lower().startswith(t))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def build(class_name: str, cls: type | None = None, seed: int = 0, **overrides) -> nn.Module:
    """A transformers model at the test sizes with every parameter random (so no zero bias or unit
    norm scale can hide a missing term); ``cls`` overrides the class (a user subclass)."""
    mtype = model_type(class_name)
    labels = dict(num_labels=3) if class_name.endswith("SequenceClassification") else {}  # ALBERT's SOP reads it
    config = transformers.AutoConfig.for_model(mtype, **{**SIZES, **EXTRA[mtype], **labels, **overrides})
    torch.manual_seed(seed)
    model = (cls or getattr(transformers, class_name))._from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    return model


def make_inputs(class_name: str) -> dict[str, torch.Tensor]:
    """Tokenizer-like long tensors: ids (pad id at padding), the attention mask, token types that
    switch segment mid-row, and the labels of the class's head."""
    extra = EXTRA[model_type(class_name)]
    pad = extra.get("pad_token_id", 0)
    g = torch.Generator().manual_seed(0)
    real = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    ids = torch.randint(pad + 1, SIZES["vocab_size"], (len(LENGTHS), T), generator=g)
    ids = torch.where(real, ids, torch.full_like(ids, pad))
    kwargs = {"input_ids": ids, "attention_mask": real.long()}
    if extra["type_vocab_size"] > 1:
        kwargs["token_type_ids"] = (torch.arange(T)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2).long() * real
    if class_name.endswith("Model"):
        return kwargs
    if class_name.endswith("SequenceClassification"):
        kwargs["labels"] = torch.tensor([2, 0, 1])
    elif class_name == "ElectraForPreTraining":
        kwargs["labels"] = (torch.rand(ids.shape, generator=g) < 0.3).long()
    else:
        kwargs["labels"] = mlm_labels(ids, kwargs["attention_mask"])  # -100 at padding and most tokens
    if class_name == "BertForPreTraining":
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 1])
    if class_name == "AlbertForPreTraining":
        kwargs["sentence_order_label"] = torch.tensor([1, 0, 1])
    return kwargs


def outputs_of(out, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The named output fields the model's output class has (None kept), per-token ones at real
    tokens only (padded positions are unspecified), and each hidden state."""
    found = {}
    for name in OUTPUTS:
        if name in type(out).__dataclass_fields__:
            value = getattr(out, name)
            per_token = value is not None and value.dim() >= 2 and value.shape[:2] == mask.shape
            found[name] = value[mask] if per_token else value
    for i, h in enumerate(out.get("hidden_states") or ()):
        found[f"hidden_states[{i}]"] = h[mask]
    return found


def run(model: nn.Module, inputs: dict, class_name: str, reference: bool = False, **call) -> dict:
    """Outputs and every parameter's gradient of the loss (with labels) or of the sum of squares
    of the outputs at real tokens (base models)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **call)
    mask = inputs["attention_mask"].bool()
    found = outputs_of(out, mask)
    found["output class"] = type(out)
    if reference and class_name == "ElectraForPreTraining":
        # transformers computes this BCE in float32 whatever the model dtype (labels.float()): take
        # its formula in the model's dtype, so the float64 reference is float64 throughout
        found["loss"] = nn.functional.binary_cross_entropy_with_logits(
            out.logits[mask], inputs["labels"][mask].to(out.logits.dtype))
    if "labels" in inputs:
        objective = found["loss"]
    else:
        objective = sum(found[n].square().sum() for n in ("last_hidden_state", "pooler_output") if n in found)
    objective.backward()
    module = getattr(model, "_orig_mod", model)  # a torch.compile'd model's parameters keep their names
    found.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return found


def assert_matches(actual: dict, ref32: dict, ref64: dict, what: str) -> None:
    """DESIGN.md's tolerance rule on each result: |patched - float64 copy| <= 2 |transformers float32
    - float64 copy| + a few float32 ulps of the largest value (max norms); gradients use the largest
    gradient of the model as their scale (one whose exact value is 0 is round-off on both sides)."""
    assert actual.keys() == ref32.keys(), f"{what}: results {sorted(actual)} != {sorted(ref32)}"
    assert actual.pop("output class") is ref32["output class"], what
    largest = max(g.abs().max().item() for n, g in ref64.items() if n.startswith("grad ") and g is not None)
    for name, value in actual.items():
        if ref32[name] is None:
            assert value is None, f"{what}: {name} is None in transformers only"
            continue
        assert value is not None, f"{what}: {name} is None in the patched model only"
        assert value.dtype == ref32[name].dtype, f"{what}: {name} dtype {value.dtype}"
        within_rule(value, ref32[name], ref64[name].double(), f"{what}: {name}",
                    floor=largest if name.startswith("grad ") else 0.0)


def patched_copy(model: nn.Module, **options):
    patched = copy.deepcopy(model)
    return patched, bertfast.patch(patched, **options)


def compare_with_transformers(class_name: str, model: nn.Module, patched: nn.Module, *, train: bool,
                              keep_logits: bool, device: str = "cpu", backends: tuple[str, ...] = (),
                              **call) -> list[tuple[str, str]]:
    """``patched`` (a patched copy of ``model``) against ``model`` and a float64 copy of it; returns
    the (op, backend) pairs the patched model's forward and backward ran."""
    inputs = {k: v.to(device) for k, v in make_inputs(class_name).items()}
    ref64 = copy.deepcopy(model).double()
    refs = [run(m.to(device).train(train), inputs, class_name, reference=True, **call) for m in (model, ref64)]
    patched.to(device).train(train)
    with bertfast.use_backend(*backends) if backends else contextlib.nullcontext(), \
            bertfast.record_backends() as ran:
        actual = run(patched, inputs, class_name, **call)
    dropped = MLM_LOGITS.get(class_name) if "labels" in inputs and not keep_logits else None
    if dropped:  # the fused MLM loss computes logits at labelled positions only
        assert actual[dropped] is None, f"{class_name}: {dropped} returned with labels and keep_logits=False"
        for result in (actual, *refs):
            del result[dropped]
    assert_matches(actual, *refs, what=class_name)
    return list(ran)


def module_classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def assert_unchanged(model: nn.Module, before: dict[str, type]) -> None:
    """Every module is of the very class it had before (nothing swapped, nothing added)."""
    now = module_classes(model)
    assert now.keys() == before.keys()
    changed = [name for name, cls in now.items() if cls is not before[name]]
    assert not changed, f"modules whose class changed: {changed}"


def assert_bit_identical(model: nn.Module, twin: nn.Module, inputs: dict, **call) -> None:
    """Forward and backward of ``model`` equal to the last bit those of ``twin``, padding included."""
    for m in (model, twin):
        m.eval()
        m.zero_grad(set_to_none=True)
    outs = [m(**inputs, **call) for m in (model, twin)]
    assert outs[0].keys() == outs[1].keys()
    for key in outs[1].keys():
        a, b = outs[0][key], outs[1][key]
        pairs = zip(a, b, strict=True) if isinstance(b, tuple) else [(a, b)]
        assert all(torch.equal(x, y) for x, y in pairs), key
    for out in outs:
        (out[0].square().sum() if out.get("loss") is None else out.loss).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name


# 1. every class against transformers, train (dropout 0) and eval


@pytest.mark.parametrize("mode", ["train", "eval-keep_logits"])
@pytest.mark.parametrize("class_name, overrides", CASES)
def test_patched_model_matches_transformers(class_name, overrides, mode):
    model = build(class_name, **overrides)
    keep = mode == "eval-keep_logits"
    patched, report = patched_copy(model, keep_logits=keep)
    assert report.swapped and not report.left, str(report)
    ran = {op for op, _ in compare_with_transformers(class_name, model, patched, train=mode == "train",
                                                     keep_logits=keep)}
    assert {"embedding", "attention", "layer_norm"} <= ran, ran  # bertfast's ops did the work
    assert "mlm_loss" in ran or class_name not in MLM_LOGITS, ran


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("class_name", ["BertForPreTraining", "ElectraModel"])
def test_unpad_option_matches_transformers(class_name, unpad):
    model = build(class_name)
    patched, _ = patched_copy(model, unpad=unpad)
    compare_with_transformers(class_name, model, patched, train=True, keep_logits=False)


@pytest.mark.parametrize("class_name", ["BertForSequenceClassification", "RobertaForSequenceClassification",
                                        "AlbertForSequenceClassification", "ElectraForSequenceClassification"])
def test_sequence_classification_patches_only_the_base_model(class_name):
    model = build(class_name)
    before = module_classes(model)
    report = bertfast.patch(model)
    base = model.base_model_prefix
    assert report.swapped and all(s.path == base or s.path.startswith(base + ".") for s in report.swapped), \
        str(report)
    outside = {n: c for n, c in module_classes(model).items() if n != base and not n.startswith(base + ".")}
    assert all(cls is before[name] for name, cls in outside.items()), str(report)


def test_report_lists_what_was_swapped():
    model = build("BertForPreTraining")
    before = module_classes(model)
    report = bertfast.patch(model)
    text = str(report)
    for entry in report.swapped:
        assert type(model.get_submodule(entry.path)) is not before[entry.path]
        assert entry.original == before[entry.path].__name__ and entry.what
        assert entry.original in text and (entry.path or "<model>") in text
    swapped = {name for name, cls in module_classes(model).items() if cls is not before[name]}
    assert swapped == {entry.path for entry in report.swapped}
    assert all(type(model.get_submodule(p)).__name__ == before[p].__name__ for p in swapped)  # same names


# 2. the Triton backend (interpreted on the CPU, compiled on a GPU)

TRITON_CLASSES = ["BertForPreTraining", "AlbertForPreTraining", "ElectraForPreTraining"]


@pytest.mark.parametrize("class_name", TRITON_CLASSES)
def test_patched_model_on_triton_matches_transformers(class_name):
    """Run by ``test_triton_cases_pass_under_the_triton_interpreter`` in a process of its own with
    TRITON_INTERPRET=1 (the interpreter is read when a kernel is decorated), or on a GPU."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
    if device == "cpu" and not interpreted():
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (its own process: see the test below)")
    model = build(class_name)
    patched, _ = patched_copy(model, keep_logits=True)
    ran = compare_with_transformers(class_name, model, patched, train=True, keep_logits=True, device=device,
                                    backends=("triton", "torch"))
    assert ("attention", "triton") in ran and ("attention", "torch") not in ran, ran


def test_triton_cases_pass_under_the_triton_interpreter():
    pytest.importorskip("triton")
    if interpreted():
        pytest.skip("this process is interpreted: the Triton cases run directly")
    node = f"{__file__}::test_patched_model_on_triton_matches_transformers"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                            cwd=os.path.dirname(__file__), env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-12000:]
    assert result.returncode == 0, f"the Triton cases failed under the interpreter:\n{tail}"
    assert f"{len(TRITON_CLASSES)} passed" in tail and "skipped" not in tail, tail


# 3. the same tensors before and after


@pytest.mark.parametrize("class_name", ["BertForPreTraining", "AlbertForPreTraining", "ElectraForMaskedLM"])
def test_patch_keeps_every_tensor_and_the_optimizer_works(class_name):
    model = build(class_name)
    twin = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    state = model.state_dict()
    snapshot = {k: (v.data_ptr(), v.clone()) for k, v in state.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # created before patching
    optimizer_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)

    def assert_same_state():
        now = model.state_dict()
        assert list(now) == list(snapshot)
        for key, value in now.items():
            assert value.data_ptr() == snapshot[key][0] and torch.equal(value, snapshot[key][1]), key
        assert [id(p) for p in model.parameters()] == params

    bertfast.patch(model)
    assert_same_state()
    bertfast.unpatch(model)
    assert_same_state()
    bertfast.patch(model)
    inputs = make_inputs(class_name)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()
        # The same AdamW step on the unpatched twin, given the same gradients (the gradients
        # themselves are compared with transformers' above; AdamW's first steps are ~lr * sign(grad),
        # which would turn round-off in an exactly-zero gradient into a whole step).
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        optimizer_twin.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k][1])]
    assert set(moved) >= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}


# 4. unpatch


@pytest.mark.parametrize("class_name, overrides", [pytest.param("BertForPreTraining", {}, id="BertForPreTraining"),
                                                   pytest.param("AlbertForPreTraining", ALBERT_GROUPS,
                                                                id="AlbertForPreTraining-groups"),
                                                   pytest.param("RobertaForSequenceClassification", {},
                                                                id="RobertaForSequenceClassification")])
def test_unpatch_restores_the_model_bit_exactly(class_name, overrides):
    model = build(class_name, **overrides)
    twin = copy.deepcopy(model)
    before = module_classes(model)
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    report = bertfast.patch(model)
    swapped = {name for name, cls in module_classes(model).items() if cls is not before[name]}
    assert swapped and swapped == {s.path for s in report.swapped}
    again = bertfast.patch(model)  # idempotent: nothing new, no subclass of a patched class
    assert not again.swapped, str(again)
    for name, cls in module_classes(model).items():
        assert cls is before[name] or cls.__bases__ == (before[name],), f"{name}: {cls.__mro__}"
    model.train()
    model(**make_inputs(class_name)).loss.backward()  # whatever a patched forward caches, it has run
    assert bertfast.unpatch(model) == len(swapped)
    assert_unchanged(model, before)
    assert all(cls.__module__.startswith(("transformers.", "torch.")) for cls in module_classes(model).values())
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    assert bertfast.unpatch(model) == 0
    assert_bit_identical(model, twin, make_inputs(class_name))


# 5. unsupported models: left alone, all of them


class OverridingBert(transformers.BertModel):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def _extra_parameter(model):
    model.bert.encoder.layer[0].attention.self.scale = nn.Parameter(torch.ones(4))


def _extra_submodule(model):
    model.bert.encoder.layer[0].attention.self.gate = nn.Linear(32, 4)


REFUSALS = {  # name: (class name, config overrides, user class, edit, what the reason says)
    "relative_key": ("BertModel", dict(position_embedding_type="relative_key"), None, None, "relative"),
    "decoder": ("BertModel", dict(is_decoder=True, use_cache=False), None, None, "decoder"),
    "cross_attention": ("BertModel", dict(is_decoder=True, add_cross_attention=True, use_cache=False), None, None,
                        "cross|decoder"),  # transformers allows cross-attention in decoders only
    "attention_parameter": ("BertForPreTraining", {}, None, _extra_parameter, "attention"),
    "attention_submodule": ("BertForPreTraining", {}, None, _extra_submodule, "attention"),
    "user_forward": ("BertModel", {}, OverridingBert, None, "forward|overrid|subclass"),
}


def unsupported(name: str) -> tuple[nn.Module, str, str]:
    class_name, overrides, cls, edit, cause = REFUSALS[name]
    model = build(class_name, cls=cls, **overrides)
    if edit:
        edit(model)
    return model, class_name, cause


@pytest.mark.parametrize("name", list(REFUSALS))
def test_unsupported_model_is_left_entirely_alone(name):
    model, class_name, cause = unsupported(name)
    twin = copy.deepcopy(model)
    before = module_classes(model)
    report = bertfast.patch(model)
    assert not report.swapped, str(report)
    assert report.left and any(re.search(cause, entry.reason, re.IGNORECASE) for entry in report.left), str(report)
    for entry in report.left:
        assert entry.original == type(model.get_submodule(entry.path)).__name__, str(report)
    assert_unchanged(model, before)
    assert bertfast.unpatch(model) == 0
    assert_bit_identical(model, twin, make_inputs(class_name))


def test_unsupported_model_next_to_a_supported_one():
    """In one container the supported model is patched, the unsupported one left whole."""
    bad, _, cause = unsupported("relative_key")
    container = nn.ModuleDict({"good": build("BertModel"), "bad": bad})
    before = module_classes(container)
    report = bertfast.patch(container)
    assert report.swapped and all(s.path.startswith("good") for s in report.swapped), str(report)
    assert any(e.path.startswith("bad") and re.search(cause, e.reason, re.IGNORECASE) for e in report.left), \
        str(report)
    assert all(cls is before[n] for n, cls in module_classes(container).items() if n.startswith("bad")), str(report)


# 6., 7. calls a patched model serves with transformers' own forward; hidden states, tuples


def _per_query_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask with a row per query: transformers 5 takes an additive (B, 1, T, T) float mask,
    4.x BertModel a (B, T, T) 0/1 mask (it refuses 4D masks)."""
    keep = mask[:, None, :].bool().expand(-1, mask.shape[1], -1)  # (B, T, T)
    if int(transformers.__version__.split(".")[0]) < 5:
        return keep.long()
    return torch.zeros(keep[:, None].shape).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)


@pytest.mark.filterwarnings("ignore:bertfast.patch")
@pytest.mark.parametrize("call", ["output_attentions", "per_query_mask"])
def test_unserved_calls_run_transformers_forward(call):
    model = build("BertModel")
    twin = copy.deepcopy(model)
    bertfast.patch(model)
    inputs = make_inputs("BertModel")
    if call == "per_query_mask":
        inputs["attention_mask"] = _per_query_mask(inputs["attention_mask"])
    extra = {"output_attentions": True} if call == "output_attentions" else {}
    with bertfast.record_backends() as ran:
        assert_bit_identical(model, twin, inputs, **extra)
    assert not ran, ran
    if call == "output_attentions":
        assert len(model(**inputs, **extra).attentions) == SIZES["num_hidden_layers"]


@pytest.mark.parametrize("class_name, overrides", [pytest.param("BertModel", {}, id="BertModel"),
                                                   pytest.param("AlbertModel", ALBERT_GROUPS, id="AlbertModel-groups"),
                                                   pytest.param("ElectraForPreTraining", {},
                                                                id="ElectraForPreTraining")])
def test_hidden_states_match_transformers(class_name, overrides):
    model = build(class_name, **overrides)
    patched, _ = patched_copy(model)
    compare_with_transformers(class_name, model, patched, train=False, keep_logits=False, output_hidden_states=True)


def test_return_dict_false_gives_the_same_tuple():
    model = build("BertModel")
    twin = copy.deepcopy(model)
    bertfast.patch(model)
    inputs = make_inputs("BertModel")
    as_dict = model.eval()(**inputs)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(twin.eval()(**inputs, return_dict=False))
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert torch.equal(as_tuple[1], as_dict.pooler_output)


# 8. gradient checkpointing


def _op_calls(model: nn.Module, inputs: dict) -> int:
    with bertfast.record_backends() as ran:
        model(**inputs).loss.backward()
    return len(ran)


@pytest.mark.parametrize("enable", ["after_patch", "before_patch"])
@pytest.mark.parametrize("class_name", ["BertForPreTraining", "ElectraForPreTraining"])
def test_gradient_checkpointing(class_name, enable):
    model = build(class_name)
    patched = copy.deepcopy(model)
    plain_patched, _ = patched_copy(model)
    if enable == "before_patch":
        patched.gradient_checkpointing_enable()
    bertfast.patch(patched)
    if enable == "after_patch":
        patched.gradient_checkpointing_enable()
    assert patched.is_gradient_checkpointing
    compare_with_transformers(class_name, model, patched, train=True, keep_logits=False)  # refs: no checkpointing
    inputs = make_inputs(class_name)
    # checkpointing recomputes the layers' forward ops during backward
    assert _op_calls(patched.train(), inputs) > _op_calls(plain_patched.train(), inputs)


def test_gradient_checkpointing_refusal_is_transformers_own():
    """transformers' ALBERT has no gradient checkpointing: patched or not, the same error."""
    model = build("AlbertForPreTraining")
    patched, _ = patched_copy(model)
    errors = []
    for m in (model, patched):
        with pytest.raises(ValueError) as error:
            m.gradient_checkpointing_enable()
        errors.append(str(error.value))
    assert errors[0] == errors[1]


# 9. dtype and device moves


def test_to_float64_keeps_the_patch():
    model = build("BertForPreTraining")
    twin = copy.deepcopy(model).double()
    bertfast.patch(model)
    patched_classes = module_classes(model)
    assert model.to("cpu") is model and module_classes(model) == patched_classes
    model.to(torch.float64)
    assert module_classes(model) == patched_classes
    assert next(model.parameters()).dtype == torch.float64
    inputs = make_inputs("BertForPreTraining")
    actual, expected = run(model.train(), inputs, "BertForPreTraining"), run(twin.train(), inputs, "BertForPreTraining")
    assert actual["prediction_logits"] is None  # labels, keep_logits=False
    for name in ("loss", "seq_relationship_logits"):  # float64: the parity suite's bound (test_hf_parity.py)
        assert actual[name].dtype == torch.float64
        assert_rel_close(actual[name], expected[name], 1e-10, name)
    assert_grads_close(model, twin, 1e-10, "float64")


# 10. save_pretrained / from_pretrained


def test_save_pretrained_round_trip(tmp_path):
    class_name = "AlbertForPreTraining"
    model = build(class_name)
    twin = copy.deepcopy(model)
    first = bertfast.patch(model)
    model.save_pretrained(tmp_path / "patched")
    assert json.loads((tmp_path / "patched" / "config.json").read_text())["architectures"] == [class_name]
    loaded = getattr(transformers, class_name).from_pretrained(tmp_path / "patched", attn_implementation="eager")
    assert type(loaded) is getattr(transformers, class_name)
    # The same round trip of the unpatched twin: transformers 4.x re-ties ALBERT's decoder bias on
    # load, so those entries change in both round trips alike; every other entry must survive.
    twin.save_pretrained(tmp_path / "plain")
    plain = getattr(transformers, class_name).from_pretrained(tmp_path / "plain", attn_implementation="eager")
    ours, theirs, reference = model.state_dict(), loaded.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) == list(reference)
    assert all(torch.equal(theirs[k], reference[k]) for k in ours)
    retied = {k for k in ours if not torch.equal(twin.state_dict()[k], reference[k])}
    assert retied <= {"predictions.bias", "predictions.decoder.bias"}, retied
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in retied)
    if retied:
        model = plain  # compare outputs from the same (re-tied) weights
        first = bertfast.patch(model)
    compare_with_transformers(class_name, loaded, model, train=False, keep_logits=False)
    repatched = copy.deepcopy(loaded)
    again = bertfast.patch(repatched)
    assert [s.path for s in again.swapped] == [s.path for s in first.swapped]
    inputs = make_inputs(class_name)
    for name in ("loss", "sop_logits"):
        assert torch.equal(repatched.eval()(**inputs)[name], model.eval()(**inputs)[name]), name


# 11. torch.compile


@pytest.mark.parametrize("class_name", ["BertModel", "ElectraForPreTraining"])
def test_torch_compile_of_a_patched_model(class_name):
    """backend="eager" (dynamo's tracing through the patched forward and bertfast's custom ops);
    inductor's C++ compile takes ~50 s on this 2-core machine, more than this file's budget.
    fullgraph: the patched forwards trace without a graph break (the MLM heads' loss op selects
    the labelled rows by data, which breaks the graph by design, so they are not in this list)."""
    model = build(class_name)
    patched, _ = patched_copy(model)
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    compare_with_transformers(class_name, model, compiled, train=False, keep_logits=False)


# 12. bad input


def _names(arg: str) -> str:
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


def _bad_labels(inputs, value):
    inputs["labels"][0, 1] = value


BAD_INPUTS = {  # name: (class name, edit, argument the error must name)
    "label_past_vocab": ("BertForMaskedLM", lambda i: _bad_labels(i, SIZES["vocab_size"]), "labels"),
    "negative_label": ("RobertaForMaskedLM", lambda i: _bad_labels(i, -5), "labels"),
    "mask_shape": ("BertForPreTraining", lambda i: i.update(attention_mask=i["attention_mask"][:, :-1]),
                   "attention_mask"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_the_argument_before_any_op_runs(name):
    class_name, edit, argument = BAD_INPUTS[name]
    model = build(class_name)
    bertfast.patch(model)
    inputs = make_inputs(class_name)
    edit(inputs)
    with bertfast.record_backends() as ran, pytest.raises((ValueError, TypeError), match=_names(argument)):
        model(**inputs)
    assert not ran, ran


def test_patching_the_head_after_its_base_model_does_not_patch_the_base_twice():
    model = build("BertForPreTraining")
    twin = copy.deepcopy(model)
    first = bertfast.patch(model.bert)
    second = bertfast.patch(model)
    assert [s.path for s in first.swapped] == [""]
    assert [s.path for s in second.swapped] == [""]  # the head only: its base model was patched already
    assert bertfast.unpatch(model) == 2
    assert all(type(a) is type(b) for a, b in zip(model.modules(), twin.modules()))


def test_a_sequence_of_padding_only_gives_finite_outputs():
    """A row with no real token: the fused attention gives zeros there (never NaN); the other
    rows are unaffected."""
    model = build("BertModel").eval()
    twin = copy.deepcopy(model)
    bertfast.patch(model)
    inputs = make_inputs("BertModel")
    inputs["attention_mask"][-1] = 0
    out = model(**inputs).last_hidden_state
    assert torch.isfinite(out).all()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        exact = copy.deepcopy(twin).double()(**inputs).last_hidden_state
        plain = twin(**inputs).last_hidden_state
    within_rule(out.detach()[real], plain[real], exact[real], "real tokens beside a padding-only row")


def test_a_user_subclass_that_keeps_transformers_forward_is_patched():
    class MyPreTraining(transformers.BertForPreTraining):  # e.g. to add a method; forward is transformers'
        pass

    model = build("BertForPreTraining", cls=MyPreTraining)
    report = bertfast.patch(model)
    assert [s.path for s in report.swapped] == ["", "bert"] and not report.left, str(report)
    assert type(model).__name__ == "MyPreTraining" and isinstance(model, MyPreTraining)
