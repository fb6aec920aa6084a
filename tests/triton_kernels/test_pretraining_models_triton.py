"""Whole pretraining models on the Triton backends equal the same models on the torch backend:
ALBERT (MLM + SOP), RoBERTa (MLM), ELECTRA (generator MLM + sampling + RTD), float32, ragged
padding, dropout ON (every backend draws the same counter-based masks from the same seeds),
padded and unpadded. Losses, the generator's samples and every parameter's gradient.

The torch backend is itself checked against transformers (tests/test_hf_parity.py), so this closes
the chain kernel -> torch backend -> transformers for whole models."""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import models
from bertfast.ops import ALL_OPS
from helpers import EXTRA, SIZES, assert_grads_close, assert_rel_close, mlm_labels, ragged_batch, randomize_
from kernel_helpers import DEVICE

TOLERANCE = 1e-5  # float32, normwise relative (the parity suite's bound)
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _albert():
    config = models.AlbertConfig(**{**SIZES, **EXTRA["albert"], **DROPOUT})
    return models.AlbertForPreTraining(config), "albert"


def _roberta():
    return models.RobertaForMaskedLM(models.RobertaConfig(**{**SIZES, **EXTRA["roberta"], **DROPOUT})), "roberta"


def _electra():
    config = models.ElectraConfig(**{**SIZES, **EXTRA["electra"], **DROPOUT})
    return models.ElectraPretrainingModel(config), "electra"


def _step(model, model_type: str, backends: tuple[str, ...]):
    ids, mask, types = ragged_batch(model_type, batch=3, seq_len=17)
    labels = mlm_labels(ids, mask)
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if types is not None:
        kwargs["token_type_ids"] = types
    if model_type == "albert":
        kwargs["sentence_order_label"] = torch.tensor([0, 1, 1])
    kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # every dropout seed is drawn from torch's generator, in op order
    with bertfast.use_backend(*backends), bertfast.record_backends() as ran:
        out = model(**kwargs)
        out.loss.backward()
    return out, set(ran)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("build", [_albert, _roberta, _electra], ids=["albert", "roberta", "electra"])
def test_pretraining_model_on_triton_equals_torch_backend(build, unpad, monkeypatch):
    # the fused FFN GEMM too (by default it waits for a GPU measurement; see bertfast.ops.linear_gelu)
    monkeypatch.setenv("BERTFAST_FUSED_GEMM", "1")
    model, model_type = build()
    randomize_(model, seed=5)
    model = models.set_unpad(model.to(DEVICE).train(), unpad)
    expected, ran_torch = _step(model, model_type, ("torch",))
    expected_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    actual, ran_triton = _step(model, model_type, ("triton", "torch"))

    # every op that has a triton backend ran on it (refusals would be silent fallbacks otherwise)
    with_kernel = {name for name, op in ALL_OPS.items() if "triton" in op.backends}
    used = {op for op, _ in ran_triton}
    assert {(op, "triton") for op in used & with_kernel} <= ran_triton, sorted(ran_triton)
    assert not {(op, "torch") for op in with_kernel} & ran_triton, sorted(ran_triton)
    assert all(b == "torch" for _, b in ran_torch)

    assert_rel_close(actual.loss, expected.loss, TOLERANCE, "loss")
    if model_type == "electra":  # the generator drew the same replacements from the same seed
        assert torch.equal(actual.corrupted_ids, expected.corrupted_ids)
        assert_rel_close(actual.rtd_loss, expected.rtd_loss, TOLERANCE, "rtd_loss")
    reference = _Grads(expected_grads)
    assert_grads_close(model, reference, TOLERANCE, model_type, every_parameter=False)


class _Grads(torch.nn.Module):
    """The torch backend's gradients, dressed as a module for ``assert_grads_close``."""

    def __init__(self, grads: dict[str, torch.Tensor]):
        super().__init__()
        self._params = {}
        for name, g in grads.items():
            p = torch.nn.Parameter(torch.empty(0) if g is None else torch.empty_like(g), requires_grad=False)
            p.grad = g
            self._params[name] = p

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())
