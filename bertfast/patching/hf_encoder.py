"""The patched forward of transformers' BERT-family base models (BertModel, RobertaModel,
ElectraModel, AlbertModel): the fused embedding op (with ALBERT's and ELECTRA's E -> H projection
inside it), every layer as QKV GEMM + fused attention + bias-GELU + residual/dropout/LayerNorm ops,
ALBERT's shared layers through the one-node layer loop, and CUDA batches with padding unpadded
(``bertfast.models.layers.encode``).

Differences from transformers' own forward, by design: a sequence with no real token gets zeros
(eager attention averages its padded keys); unpadded (CUDA) runs leave zeros at padded positions.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bertfast import ops
from bertfast.models import inputs
from bertfast.models import shared_loop
from bertfast.models.layers import encode
from bertfast.nn.embeddings import default_position_ids
from bertfast.nn.self_attention import self_attention
from bertfast.ops.linear_gelu import linear_gelu
from bertfast.patching.core import original_forward, plan_of
from bertfast.patching.hf_structure import EncoderPlan

# Keyword arguments transformers' encoders take that change nothing here when None/False.
_INERT = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "past_key_value",
          "cache", "use_cache", "cache_position", "output_attentions")


def _p(dropout: nn.Dropout) -> float:
    return dropout.p if dropout.training else 0.0


def _residual_norm(x: torch.Tensor, dense: nn.Linear, norm: nn.LayerNorm, residual: torch.Tensor,
                   dropout_p: float) -> torch.Tensor:
    """LayerNorm(dropout(dense(x)) + residual): the tail of every sub-layer, as one op after the GEMM."""
    return ops.layer_norm(F.linear(x, dense.weight, dense.bias), norm.weight, norm.bias, norm.eps,
                          residual=residual, dropout_p=dropout_p)


def bert_layer(layer: nn.Module, approximate: str, hidden: torch.Tensor, mask) -> torch.Tensor:
    sa, so = layer.attention.self, layer.attention.output
    context = self_attention(hidden, sa.query, sa.key, sa.value, sa.num_attention_heads, _p(sa.dropout), mask)
    attended = _residual_norm(context, so.dense, so.LayerNorm, hidden, _p(so.dropout))
    up = layer.intermediate.dense
    inner = linear_gelu(attended, up.weight, up.bias, approximate)
    out = layer.output
    return _residual_norm(inner, out.dense, out.LayerNorm, attended, _p(out.dropout))


def albert_layer(layer: nn.Module, approximate: str, hidden: torch.Tensor, mask) -> torch.Tensor:
    at = layer.attention
    context = self_attention(hidden, at.query, at.key, at.value, at.num_attention_heads, _p(at.attention_dropout),
                             mask)
    attended = _residual_norm(context, at.dense, at.LayerNorm, hidden, _p(at.output_dropout))
    inner = linear_gelu(attended, layer.ffn.weight, layer.ffn.bias, approximate)
    # transformers' AlbertLayer applies no dropout after ffn_output
    return _residual_norm(inner, layer.ffn_output, layer.full_layer_layer_norm, attended, 0.0)


def layer_steps(model: nn.Module, plan: EncoderPlan) -> list[list[tuple[nn.Module, functools.partial]]]:
    """Per encoder step (what transformers counts as one hidden state: a layer; for ALBERT a layer
    call in transformers 5, a group step in 4.x), its (layer, run(h, mask)) list."""
    encoder = model.encoder
    if plan.kind == "bert":
        return [[(layer, functools.partial(bert_layer, layer, plan.approximate))] for layer in encoder.layer]
    layers, groups = model.config.num_hidden_layers, len(encoder.albert_layer_groups)
    steps = []
    for i in range(layers):
        group = encoder.albert_layer_groups[int(i / (layers / groups))]  # transformers' group index
        runs = [(layer, functools.partial(albert_layer, layer, plan.approximate)) for layer in group.albert_layers]
        if plan.state_per_layer:
            steps.extend([run] for run in runs)
        else:
            steps.append(runs)
    return steps


def checkpointing(encoder: nn.Module, layer: nn.Module):
    """transformers' gradient checkpointing as the user enabled it: on the layers (transformers 5:
    GradientCheckpointingLayer) or on the encoder (4.x); None when off."""
    for owner in (layer, encoder):
        if getattr(owner, "gradient_checkpointing", False) and owner.training:
            return getattr(owner, "_gradient_checkpointing_func", None) or functools.partial(checkpoint,
                                                                                              use_reentrant=False)
    return None


def run_encoder(model: nn.Module, plan: EncoderPlan, hidden: torch.Tensor, mask: torch.Tensor | None,
                states: list | None) -> torch.Tensor:
    steps = layer_steps(model, plan)
    encoder = model.encoder

    def run_all(h: torch.Tensor, m) -> torch.Tensor:
        flat = [(layer, run) for step in steps for layer, run in step]
        ckpt = [checkpointing(encoder, layer) for layer, _ in flat]
        if plan.kind == "albert" and torch.is_grad_enabled() and encoder.training \
                and not torch.compiler.is_compiling() and (all(ckpt) or not any(ckpt)):
            # ALBERT's shared layers as one autograd node: each shared parameter gets its gradient
            # once; with checkpointing on, each step's input is kept and the step recomputed.
            draws = encoder.training and any(isinstance(x, nn.Dropout) and x.p > 0 for x in encoder.modules())
            return shared_loop.run_layers(h, [(functools.partial(run, mask=m), list(layer.parameters()))
                                              for layer, run in flat], recompute=bool(ckpt and ckpt[0]),
                                          draws_random=draws)
        for (layer, run), c in zip(flat, ckpt):
            h = c(run, h, m) if c is not None else run(h, m)
        return h

    if states is None:
        return encode(run_all, hidden, mask, plan.unpad)
    states.append(hidden)  # hidden states are wanted at every step: padded, step by step
    for step in steps:
        for layer, run in step:
            c = checkpointing(encoder, layer)
            hidden = c(run, hidden, mask) if c is not None else run(hidden, mask)
        states.append(hidden)
    return hidden


def embed(model: nn.Module, plan: EncoderPlan, input_ids, token_type_ids, position_ids, inputs_embeds):
    emb = model.embeddings
    lead = input_ids if input_ids is not None else inputs_embeds
    B, T = lead.shape[:2]
    if position_ids is None:  # RoBERTa: embeddings.padding_idx is both the pad id and the padding position
        padding = emb.padding_idx if plan.roberta_positions else None
        position_ids = default_position_ids(input_ids, B, T, lead.device, padding, padding)
    if token_type_ids is None:
        token_type_ids = torch.zeros((1, T), dtype=torch.long, device=lead.device)
    projection = functools.reduce(getattr, plan.projection.split("."), model) if plan.projection else None
    return ops.embedding(
        input_ids, position_ids, token_type_ids, emb.word_embeddings.weight, emb.position_embeddings.weight,
        emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias, eps=emb.LayerNorm.eps,
        dropout_p=_p(emb.dropout), padding_idx=emb.word_embeddings.padding_idx,
        position_padding_idx=emb.position_embeddings.padding_idx,
        projection_weight=None if projection is None else projection.weight,
        projection_bias=None if projection is None else projection.bias, inputs_embeds=inputs_embeds)


def call_refusal(config, kwargs: dict, known: tuple[str, ...], attention_mask=None) -> str | None:
    """Why this call must run transformers' own forward, or None."""
    for key, value in kwargs.items():
        if key in known:
            continue
        if key in _INERT and (value is None or value is False):
            continue
        shown = f"{key}=..." if isinstance(value, torch.Tensor) else f"{key}={value!r}"
        return f"`{shown}`"
    if kwargs.get("output_attentions") is None and getattr(config, "output_attentions", False):
        return "config.output_attentions=True"
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) \
            and (attention_mask.dim() != 2 or attention_mask.is_floating_point()):
        return f"a {attention_mask.dim()}D {attention_mask.dtype} attention_mask"
    return None


def wants(kwargs: dict, key: str, config, default: bool) -> bool:
    value = kwargs.get(key)
    return bool(getattr(config, key, default) if value is None else value)


def returns_dict(kwargs: dict, config) -> bool:
    value = kwargs.get("return_dict")
    return bool(getattr(config, "return_dict", True) if value is None else value)


def finish(output, kwargs: dict, config):
    return output if returns_dict(kwargs, config) else output.to_tuple()


_BASE_KWARGS = ("inputs_embeds", "output_hidden_states", "return_dict")


def encoder_model_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                          *args, **kwargs):
    """Patched forward of a BERT-family base model (see the module docstring)."""
    plan = plan_of(self)
    reason = ("positional arguments after position_ids" if args else None) or \
        call_refusal(self.config, kwargs, _BASE_KWARGS, attention_mask)
    if plan is None or reason:
        return original_forward(self, reason or "no patch plan", input_ids, attention_mask, token_type_ids,
                                position_ids, *args, **kwargs)
    inputs_embeds = kwargs.get("inputs_embeds")
    name = type(self).__name__
    mask = inputs.key_padding_mask(name, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids)
    hidden = embed(self, plan, input_ids, token_type_ids, position_ids, inputs_embeds)
    states = [] if wants(kwargs, "output_hidden_states", self.config, False) else None
    hidden = run_encoder(self, plan, hidden, mask, states)
    fields = {"last_hidden_state": hidden, "hidden_states": tuple(states) if states is not None else None}
    if plan.pooler_output:
        pooled = None
        if plan.pooler == "bert":
            pooled = self.pooler(hidden)
        elif plan.pooler == "albert":
            pooled = self.pooler_activation(self.pooler(hidden[:, 0]))
        fields["pooler_output"] = pooled
    return finish(plan.output_class(**fields), kwargs, self.config)
