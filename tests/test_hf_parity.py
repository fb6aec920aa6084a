"""The torch backend of every model equals transformers (the real library, random weights built from
configs, no downloads): outputs, losses and every parameter's gradient, with ragged padding and
token types; float64 to 1e-10 and float32 to 1e-5 (normwise relative); strict round trips."""

from __future__ import annotations

import pytest
import torch

import bertfast
from helpers import EXTRA, SIZES, assert_grads_close, assert_rel_close, mlm_labels, ragged_batch, randomize_

transformers = pytest.importorskip("transformers")

CLASSES = ["BertModel", "BertForPreTraining", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
           "RobertaModel", "RobertaForMaskedLM", "ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def model_type(class_name: str) -> str:
    return next(t for t in EXTRA if class_name.lower().startswith(t))


def build_hf(class_name: str, dtype: torch.dtype, seed: int = 0):
    mtype = model_type(class_name)
    config = transformers.AutoConfig.for_model(mtype, **{**SIZES, **EXTRA[mtype]})
    model = getattr(transformers, class_name)._from_config(config, attn_implementation="eager")
    model.to(dtype)
    randomize_(model, seed)
    return model


def hf_inputs(class_name: str, with_labels: bool):
    mtype = model_type(class_name)
    ids, mask, types = ragged_batch(mtype)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        kwargs["token_type_ids"] = types
    if not with_labels or class_name.endswith("Model"):
        return kwargs
    if class_name == "ElectraForPreTraining":
        g = torch.Generator().manual_seed(3)
        kwargs["labels"] = (torch.rand(ids.shape, generator=g) < 0.3).long()
        return kwargs
    kwargs["labels"] = mlm_labels(ids, mask)
    if class_name == "BertForPreTraining":
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    if class_name == "AlbertForPreTraining":
        kwargs["sentence_order_label"] = torch.tensor([1, 0, 1, 0])
    return kwargs


def tensor_outputs(out) -> dict[str, torch.Tensor]:
    """The tensor fields both libraries return (bertfast adds loss parts transformers lacks)."""
    names = ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits",
             "sop_logits", "loss")
    return {n: out[n] for n in names if n in out.keys() and out[n] is not None}


def pair(class_name: str, dtype: torch.dtype, mode: str):
    hf = build_hf(class_name, dtype)
    ours = bertfast.from_hf(hf)
    hf.train(mode == "train")
    ours.train(mode == "train")
    return hf, ours


@pytest.mark.parametrize("mode", ["eval", "train"])  # train with dropout 0: same numbers
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_outputs_match_transformers(class_name, dtype, mode):
    hf, ours = pair(class_name, dtype, mode)
    kwargs = hf_inputs(class_name, with_labels=False)
    expected = tensor_outputs(hf(**kwargs))
    actual = tensor_outputs(ours(**kwargs))
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == dtype
        assert_rel_close(actual[name], expected[name], TOLERANCE[dtype], f"{class_name}.{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_gradients_match_transformers(class_name, dtype):
    """Every parameter's gradient of the loss (pretraining classes, with labels) or of a fixed
    random projection of all outputs (base models)."""
    hf, ours = pair(class_name, dtype, "train")
    kwargs = hf_inputs(class_name, with_labels=True)

    def objective(out):
        if "labels" in kwargs:
            return out["loss"]
        g = torch.Generator().manual_seed(7)
        total = 0.0
        for t in tensor_outputs(out).values():
            total = total + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
        return total

    out_hf, out_ours = hf(**kwargs), ours(**kwargs)
    if class_name == "ElectraForPreTraining":
        # transformers computes this BCE in float32 whatever the model dtype (labels.float() sets the
        # result dtype), so take its logits (equal to 1e-10) and the loss formula in the model dtype.
        active = kwargs["attention_mask"].bool()
        out_hf.loss = torch.nn.functional.binary_cross_entropy_with_logits(
            out_hf.logits[active], kwargs["labels"][active].to(dtype))
    if "labels" in kwargs:
        assert_rel_close(out_ours.loss, out_hf.loss, TOLERANCE[dtype], f"{class_name}.loss")
    objective(out_hf).backward()
    objective(out_ours).backward()
    assert_grads_close(ours, hf, TOLERANCE[dtype], class_name)


@pytest.mark.parametrize("class_name", CLASSES)
def test_round_trip_state_dict_is_bit_identical(class_name):
    hf = build_hf(class_name, torch.float32)
    back = bertfast.to_hf(bertfast.from_hf(hf))
    assert type(back) is type(hf)
    a, b = hf.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("class_name", CLASSES)
def test_state_dict_keys_equal_transformers(class_name):
    """A bertfast model built from our own config has transformers' keys and shapes, so a
    transformers checkpoint loads strictly into it."""
    hf = build_hf(class_name, torch.float32)
    ours = bertfast.from_hf(hf)
    fresh = type(ours)(ours.config) if not class_name.endswith("Model") or class_name == "ElectraModel" \
        else type(ours)(ours.config, add_pooling_layer=True)
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    fresh.load_state_dict(hf.state_dict(), strict=True)


@pytest.mark.parametrize("mtype", list(EXTRA))
def test_config_round_trip(mtype):
    hf_config = transformers.AutoConfig.for_model(mtype, **{**SIZES, **EXTRA[mtype]})
    cls = {"bert": bertfast.models.BertConfig, "albert": bertfast.models.AlbertConfig,
           "roberta": bertfast.models.RobertaConfig, "electra": bertfast.models.ElectraConfig}[mtype]
    ours = cls.from_hf(hf_config)
    back = ours.to_hf()
    assert back.model_type == mtype
    for field, value in ours.to_dict().items():
        if field != "sharing":
            assert getattr(back, field) == value, field
    assert cls.from_dict(ours.to_dict()) == ours


def test_albert_without_sharing_is_transformers_with_one_group_per_layer():
    config = bertfast.models.AlbertConfig(**SIZES, **{**EXTRA["albert"], "num_hidden_groups": 1}, sharing="none")
    ours = bertfast.models.AlbertModel(config).double().eval()
    randomize_(ours)
    hf = bertfast.to_hf(ours, attn_implementation="eager").eval()
    assert hf.config.num_hidden_groups == SIZES["num_hidden_layers"]
    ids, mask, types = ragged_batch("albert")
    expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert_rel_close(ours(ids, mask, types).last_hidden_state, expected, 1e-10)


def test_untied_decoder_round_trips():
    """tie_word_embeddings=False keeps two parameters; tied configs refuse unequal values."""
    config = transformers.BertConfig(**SIZES, tie_word_embeddings=False)
    hf = transformers.BertForPreTraining(config)
    randomize_(hf)
    ours = bertfast.from_hf(hf)
    assert ours.cls.predictions.decoder.weight is not ours.bert.embeddings.word_embeddings.weight
    assert torch.equal(ours.cls.predictions.decoder.weight, hf.cls.predictions.decoder.weight)
    tied = bertfast.models.BertForPreTraining(bertfast.models.BertConfig(**SIZES))
    with pytest.raises(ValueError, match="tied"):
        bertfast.hf._load_strict(tied, hf.state_dict(), "BertForPreTraining", "hf_model")
