"""Whole encoders with attention on the Triton kernel equal their transformers counterparts
(float32, ragged padding), padded and unpadded (varlen): outputs at real tokens, losses and every
parameter's gradient. Ops without a Triton kernel yet fall back to the torch backend."""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import models
from helpers import assert_grads_close, assert_rel_close
from kernel_helpers import DEVICE
from test_hf_parity import build_hf, hf_inputs

CLASSES = ["BertForPreTraining", "AlbertForPreTraining", "RobertaForMaskedLM", "ElectraForPreTraining",
           "ElectraModel"]
TOLERANCE = 1e-5  # float32, normwise relative: the parity suite's bound for the torch backend


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_encoder_on_triton_attention_equals_transformers(class_name, unpad):
    hf = build_hf(class_name, torch.float32).to(DEVICE).train()  # dropout 0
    ours = models.set_unpad(bertfast.from_hf(hf), unpad)
    kwargs = {k: v.to(DEVICE) for k, v in hf_inputs(class_name, with_labels=True).items()}
    mask = kwargs["attention_mask"].bool()
    with bertfast.use_backend("triton", "torch"), bertfast.record_backends() as ran:
        out = ours(**kwargs)
    assert ("attention", "triton") in ran and ("attention", "torch") not in ran
    expected = hf(**kwargs)
    if class_name == "ElectraModel":
        actual_t, expected_t = out.last_hidden_state[mask], expected.last_hidden_state[mask]
        g = torch.Generator().manual_seed(7)
        proj = torch.randn(actual_t.shape, generator=g).to(DEVICE)
        loss_ours, loss_hf = (actual_t * proj).sum(), (expected_t * proj).sum()
        assert_rel_close(actual_t, expected_t, TOLERANCE, "last_hidden_state")
    else:
        if class_name == "ElectraForPreTraining":  # transformers' BCE is float32 anyway here
            assert_rel_close(out.logits[mask], expected.logits[mask], TOLERANCE, "logits")
        loss_ours, loss_hf = out.loss, expected.loss
        assert_rel_close(loss_ours, loss_hf, TOLERANCE, "loss")
    loss_ours.backward()  # the backward runs on the backend its forward ran on
    loss_hf.backward()
    assert_grads_close(ours, hf, TOLERANCE, class_name)
