"""Patched forwards of transformers' pretraining and MLM models: the base model runs patched, the
MLM head and loss run fused at labelled positions only (``ops.mlm_loss``: no (B, T, vocab) logits),
NSP/SOP through ``ops.sentence_pair_loss``, ELECTRA's replaced-token detection through
``ops.rtd_loss``. Losses follow transformers' rules: the same means over the same positions, and
BertForPreTraining / AlbertForPreTraining return a loss only when both of their labels are given.

With the fused MLM loss the full prediction logits are not computed: ``prediction_logits`` /
``logits`` is None when the MLM loss is, unless the model was patched with ``keep_logits=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from bertfast import ops
from bertfast.models import inputs
from bertfast.models.layers import mlm_logits, mlm_loss
from bertfast.patching.core import original_forward, plan_of
from bertfast.patching.hf_encoder import call_refusal, finish, wants
from bertfast.patching.hf_structure import (dropout, gelu_of, layer_norm, linear, output_class_named,
                                            transformers_forward)


@dataclass(frozen=True)
class HeadPlan:
    kind: str             # see HEADS
    base: str             # attribute holding the base model
    approximate: str      # GELU of the MLM / RTD head
    output_class: type
    keep_logits: bool


@dataclass(frozen=True)
class MLMHead:
    dense: nn.Linear
    norm: nn.LayerNorm
    decoder: nn.Linear


def mlm_head(model: nn.Module, kind: str) -> MLMHead:
    """The MLM head's modules (dense -> GELU -> LayerNorm -> decoder) of each model family."""
    if kind in ("bert_pretraining", "bert_mlm"):
        p = model.cls.predictions
        return MLMHead(p.transform.dense, p.transform.LayerNorm, p.decoder)
    if kind in ("albert_pretraining", "albert_mlm"):
        return MLMHead(model.predictions.dense, model.predictions.LayerNorm, model.predictions.decoder)
    if kind == "roberta_mlm":
        return MLMHead(model.lm_head.dense, model.lm_head.layer_norm, model.lm_head.decoder)
    if kind == "electra_mlm":
        g = model.generator_predictions
        return MLMHead(g.dense, g.LayerNorm, model.generator_lm_head)
    raise AssertionError(kind)


def head_kind(model: nn.Module) -> str | None:
    """Which pretraining / MLM head ``model`` carries, by its attributes; None for other models."""
    name = type(model).__name__
    cls = getattr(model, "cls", None)
    if cls is not None and hasattr(cls, "predictions"):
        return "bert_pretraining" if hasattr(cls, "seq_relationship") else "bert_mlm"
    if hasattr(model, "predictions") and hasattr(model, "sop_classifier"):
        return "albert_pretraining"
    if hasattr(model, "predictions") and name.endswith("ForMaskedLM"):
        return "albert_mlm"
    if hasattr(model, "lm_head") and name.endswith("ForMaskedLM"):
        return "roberta_mlm"
    if hasattr(model, "discriminator_predictions"):
        return "electra_pretraining"
    if hasattr(model, "generator_predictions") and hasattr(model, "generator_lm_head"):
        return "electra_mlm"
    return None


_OUTPUTS = {"bert_pretraining": "BertForPreTrainingOutput", "albert_pretraining": "AlbertForPreTrainingOutput",
            "electra_pretraining": "ElectraForPreTrainingOutput"}


def head_plan(model: nn.Module, kind: str, base: str, base_hidden: int, keep_logits: bool) -> HeadPlan:
    """Checks the head's structure; raises ``Refused`` with the reason."""
    transformers_forward(model)
    if kind == "electra_pretraining":
        d = model.discriminator_predictions
        transformers_forward(d)
        linear(d, "dense", base_hidden, base_hidden)
        linear(d, "dense_prediction", base_hidden, 1)
        approximate = gelu_of(getattr(d, "activation", None), "discriminator head")
        output_class = output_class_named(model, _OUTPUTS[kind])
        return HeadPlan(kind, base, approximate, output_class, keep_logits)
    head = mlm_head(model, kind)
    linear(head, "dense", base_hidden, None)
    width = head.dense.out_features
    layer_norm(head, "norm", width)
    linear(head, "decoder", width, None, bias=False)
    if kind == "bert_pretraining" or kind == "bert_mlm":
        owner = model.cls.predictions.transform
        act = getattr(owner, "transform_act_fn", None)
    elif kind == "roberta_mlm":
        act = F.gelu  # transformers' RobertaLMHead.forward calls gelu (erf) directly
        transformers_forward(model.lm_head)
    elif kind == "albert_mlm" or kind == "albert_pretraining":
        act = getattr(model.predictions, "activation", None)
    else:
        act = getattr(model.generator_predictions, "activation", None)
    approximate = gelu_of(act, "MLM head")
    if kind == "bert_pretraining":
        linear(model.cls, "seq_relationship", base_hidden, None)
    if kind == "albert_pretraining":
        transformers_forward(model.sop_classifier)
        dropout(model.sop_classifier, "dropout")
        linear(model.sop_classifier, "classifier", base_hidden, None)
    if kind in _OUTPUTS:
        output_class = output_class_named(model, _OUTPUTS[kind])
    else:
        from transformers.modeling_outputs import MaskedLMOutput as output_class
    return HeadPlan(kind, base, approximate, output_class, keep_logits)


_LABELS = {"bert_pretraining": ("labels", "next_sentence_label"), "albert_pretraining": ("labels", "sentence_order_label"),
           "electra_pretraining": ("labels",)}


def _base_outputs(self, plan: HeadPlan, input_ids, attention_mask, token_type_ids, position_ids, kwargs):
    base = getattr(self, plan.base)
    return base(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=kwargs.get("inputs_embeds"),
                output_hidden_states=wants(kwargs, "output_hidden_states", self.config, False), return_dict=True)


def head_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args, **kwargs):
    """Patched forward of the pretraining / MLM models (see the module docstring)."""
    plan: HeadPlan | None = plan_of(self)
    label_names = _LABELS.get(plan.kind, ("labels",)) if plan is not None else ()
    reason = ("positional arguments after position_ids" if args else None) or \
        call_refusal(self.config, kwargs, ("inputs_embeds", "output_hidden_states", "return_dict", *label_names),
                     attention_mask)
    labels = kwargs.get("labels")
    if reason is None and plan is not None and plan.kind == "electra_pretraining" and labels is not None \
            and labels.is_floating_point():
        reason = "float `labels` (bertfast's RTD loss takes 0/1 integer or bool labels)"
    if plan is None or reason:
        return original_forward(self, reason or "no patch plan", input_ids, attention_mask, token_type_ids,
                                position_ids, *args, **kwargs)
    name, embeds = type(self).__name__, kwargs.get("inputs_embeds")
    if plan.kind != "electra_pretraining":
        inputs.labels(name, "labels", labels, input_ids, embeds, per_token=True, classes=self.config.vocab_size,
                      ignore_index=-100)
    else:
        inputs.labels(name, "labels", labels, input_ids, embeds, per_token=True, classes=2, kind="int_or_bool")
    pair_name = label_names[1] if len(label_names) > 1 else None
    pair_labels = kwargs.get(pair_name) if pair_name else None
    if pair_name:
        inputs.labels(name, pair_name, pair_labels, input_ids, embeds, per_token=False, classes=2)
    out = _base_outputs(self, plan, input_ids, attention_mask, token_type_ids, position_ids, kwargs)
    hidden = out.last_hidden_state
    extra = {"hidden_states": out.hidden_states}

    if plan.kind == "electra_pretraining":
        d = self.discriminator_predictions
        mask = attention_mask.bool() if attention_mask is not None else None
        logits, loss = ops.rtd_loss(hidden, d.dense.weight, d.dense.bias, d.dense_prediction.weight,
                                    d.dense_prediction.bias, labels, mask, approximate=plan.approximate)
        return finish(plan.output_class(loss=loss, logits=logits, **extra), kwargs, self.config)

    head = mlm_head(self, plan.kind)
    mlm = None
    if labels is not None:
        mlm = mlm_loss(hidden, labels, head.dense, head.norm, head.decoder.weight, head.decoder.bias,
                       plan.approximate)
    if plan.kind in ("bert_pretraining", "albert_pretraining"):
        if plan.kind == "bert_pretraining":
            pooled, classifier = out.pooler_output, self.cls.seq_relationship
        else:
            pooled, classifier = self.sop_classifier.dropout(out.pooler_output), self.sop_classifier.classifier
        pair_logits, pair_loss = ops.sentence_pair_loss(pooled, classifier.weight, classifier.bias, pair_labels)
        loss = mlm + pair_loss if mlm is not None and pair_loss is not None else None
    else:
        loss = mlm
    # The fused loss made no logits; make them when the loss is not returned or when asked to.
    logits = None
    if loss is None or plan.keep_logits:
        logits = mlm_logits(hidden, head.dense, head.norm, head.decoder.weight, head.decoder.bias, plan.approximate)
    if plan.kind == "bert_pretraining":
        result = plan.output_class(loss=loss, prediction_logits=logits, seq_relationship_logits=pair_logits, **extra)
    elif plan.kind == "albert_pretraining":
        result = plan.output_class(loss=loss, prediction_logits=logits, sop_logits=pair_logits, **extra)
    else:
        result = plan.output_class(loss=loss, logits=logits, **extra)
    return finish(result, kwargs, self.config)



