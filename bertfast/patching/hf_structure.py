"""Recognizing transformers' BERT-family encoders by structure: attribute names, parameter names,
shapes, activations, and that the forward is transformers' own. Anything unexpected is a refusal
with the reason, never a guess. Works across transformers 4.48 - 5.x, whose classes differ in
signatures and mask handling but not in these structures."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from bertfast.patching.core import defined_in_library


class Refused(Exception):
    """A module bertfast cannot run exactly; the message is the reason shown in the report."""


def approximate_of_activation(act) -> str | None:
    """The bias_gelu ``approximate`` mode of a transformers/torch activation object, None if it is
    not a GELU bertfast computes (read from the object, not from config names)."""
    if isinstance(act, nn.GELU):
        return act.approximate
    if act is F.gelu:
        return "none"
    name = type(act).__name__
    if name == "GELUActivation":  # transformers' "gelu" (erf)
        return "none"
    if name in ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh"):  # "gelu_new", "gelu_pytorch_tanh"
        return "tanh"
    return None


def _param_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters()}


def expect_params(module: nn.Module, expected: set[str], what: str) -> None:
    actual = _param_names(module)
    if actual != expected:
        extra, missing = sorted(actual - expected), sorted(expected - actual)
        raise Refused(f"unknown {what} variant: parameters {'+' + str(extra) if extra else ''}"
                      f"{' -' + str(missing) if missing else ''} differ from BERT's")


def linear(module, name: str, n_in: int | None, n_out: int | None, bias: bool = True) -> nn.Linear:
    m = getattr(module, name, None)
    if not isinstance(m, nn.Linear):
        raise Refused(f"`{name}` is {type(m).__name__}, expected nn.Linear")
    if (n_in is not None and m.in_features != n_in) or (n_out is not None and m.out_features != n_out):
        raise Refused(f"`{name}` is {m.in_features}->{m.out_features}, expected {n_in}->{n_out}")
    if bias and m.bias is None:
        raise Refused(f"`{name}` has no bias")
    return m


def layer_norm(module, name: str, n: int) -> nn.LayerNorm:
    m = getattr(module, name, None)
    if not isinstance(m, nn.LayerNorm) or tuple(m.normalized_shape) != (n,) or m.weight is None or m.bias is None:
        raise Refused(f"`{name}` is not an affine nn.LayerNorm over {n} features")
    return m


def dropout(module, name: str) -> nn.Dropout:
    m = getattr(module, name, None)
    if not isinstance(m, nn.Dropout):
        raise Refused(f"`{name}` is {type(m).__name__}, expected nn.Dropout")
    return m


def gelu_of(act, where: str) -> str:
    mode = approximate_of_activation(act)
    if mode is None:
        raise Refused(f"{where} activation {type(act).__name__} is not a GELU (bertfast fuses GELU only)")
    return mode


def transformers_forward(module: nn.Module) -> None:
    if not defined_in_library(type(module)):
        raise Refused(f"{type(module).__name__}.forward is not transformers' own "
                      f"(defined in {type(module).forward.__module__}): its computation is unknown")


def _absolute_positions(owner, what: str) -> None:
    kind = getattr(owner, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise Refused(f"relative position embeddings ({what} position_embedding_type={kind!r})")


@dataclass(frozen=True)
class EncoderPlan:
    """What the patched forward of an encoder base model needs, found once at patch time."""

    kind: str                 # "bert" (a ``layer`` list) or "albert" (shared layer groups)
    roberta_positions: bool   # positions count real tokens from padding_idx + 1
    projection: str | None    # attribute path of the E -> H projection fused into the embedding op
    approximate: str          # GELU of the feed-forward
    pooler: str | None        # "bert" (pooler module), "albert" (pooler + pooler_activation), None
    output_class: type
    pooler_output: bool       # whether output_class has the field (read at patch time: dynamo cannot)
    unpad: bool | None
    state_per_layer: bool     # ALBERT hidden states: one per layer call (transformers 5) or per group step (4.x)


def _output_class(model: nn.Module, kind: str) -> type:
    from transformers import modeling_outputs as mo

    if kind == "albert":
        return mo.BaseModelOutputWithPooling
    if hasattr(model, "pooler"):
        return mo.BaseModelOutputWithPoolingAndCrossAttentions
    return mo.BaseModelOutputWithPastAndCrossAttentions  # ElectraModel returns its encoder's output


def output_class_named(model: nn.Module, name: str) -> type:
    """A ``*Output`` dataclass defined next to the model's class or the transformers class it
    derives from (e.g. BertForPreTrainingOutput)."""
    for klass in type(model).__mro__:
        cls = getattr(sys.modules.get(klass.__module__), name, None)
        if cls is not None:
            return cls
    raise Refused(f"transformers' {name} not found next to {type(model).__name__}")


def output_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_bert_layer(layer: nn.Module, hidden: int, i: int) -> str:
    """Checks one BERT/RoBERTa/ELECTRA layer; returns its GELU mode."""
    where = f"layer {i}"
    if hasattr(layer, "crossattention") or getattr(layer, "add_cross_attention", False):
        raise Refused(f"{where} has cross-attention")
    if getattr(layer, "is_decoder", False):
        raise Refused(f"{where} is a decoder layer (causal self-attention)")
    transformers_forward(layer)
    attention = getattr(layer, "attention", None)
    sa, so = getattr(attention, "self", None), getattr(attention, "output", None)
    if sa is None or so is None:
        raise Refused(f"{where}: no attention.self / attention.output")
    for m in (attention, sa, so):
        transformers_forward(m)
    heads = getattr(sa, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise Refused(f"{where}: num_attention_heads {heads!r} does not divide hidden size {hidden}")
    if getattr(sa, "is_decoder", False) or getattr(sa, "is_causal", False):
        raise Refused(f"{where}: causal self-attention (a decoder)")
    _absolute_positions(sa, f"{where} attention")
    scaling = getattr(sa, "scaling", None)
    if scaling is not None and abs(scaling - (hidden // heads) ** -0.5) > 1e-12:
        raise Refused(f"{where}: attention scaling {scaling} is not head_dim ** -0.5")
    for name in ("query", "key", "value"):
        linear(sa, name, hidden, hidden)
    dropout(sa, "dropout")
    intermediate = getattr(layer, "intermediate", None)
    dense = linear(intermediate, "dense", hidden, None)
    inner = dense.out_features
    approximate = gelu_of(getattr(intermediate, "intermediate_act_fn", None), f"{where} feed-forward")
    for owner, n_in in ((so, hidden), (getattr(layer, "output", None), inner)):
        linear(owner, "dense", n_in, hidden)
        layer_norm(owner, "LayerNorm", hidden)
        dropout(owner, "dropout")
    for m in (intermediate, layer.output):
        transformers_forward(m)
    expect_params(layer, {f"{p}.{w}" for p in ("attention.self.query", "attention.self.key", "attention.self.value",
                                               "attention.output.dense", "attention.output.LayerNorm",
                                               "intermediate.dense", "output.dense", "output.LayerNorm")
                          for w in ("weight", "bias")}, f"{where} (attention or feed-forward)")
    return approximate


def check_albert_layer(layer: nn.Module, hidden: int, where: str) -> str:
    transformers_forward(layer)
    attention = getattr(layer, "attention", None)
    transformers_forward(attention)
    heads = getattr(attention, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise Refused(f"{where}: num_attention_heads {heads!r} does not divide hidden size {hidden}")
    _absolute_positions(attention, f"{where} attention")
    for name in ("query", "key", "value", "dense"):
        linear(attention, name, hidden, hidden)
    layer_norm(attention, "LayerNorm", hidden)
    dropout(attention, "attention_dropout")
    dropout(attention, "output_dropout")
    ffn = linear(layer, "ffn", hidden, None)
    linear(layer, "ffn_output", ffn.out_features, hidden)
    layer_norm(layer, "full_layer_layer_norm", hidden)
    approximate = gelu_of(getattr(layer, "activation", None), f"{where} feed-forward")
    expect_params(layer, {f"{p}.{w}" for p in ("attention.query", "attention.key", "attention.value",
                                               "attention.dense", "attention.LayerNorm", "ffn", "ffn_output",
                                               "full_layer_layer_norm") for w in ("weight", "bias")},
                  f"{where} (attention or feed-forward)")
    return approximate


def is_encoder_model(module: nn.Module) -> bool:
    """Shaped like a transformers BERT-family base model (then it is patched or refused with a reason)."""
    return (getattr(module, "config", None) is not None and isinstance(getattr(module, "embeddings", None), nn.Module)
            and isinstance(getattr(module, "encoder", None), nn.Module)
            and hasattr(module.embeddings, "word_embeddings"))


def encoder_plan(model: nn.Module, unpad: bool | None) -> EncoderPlan:
    """The plan of a base model (BertModel, RobertaModel, ElectraModel, AlbertModel, or one shaped
    like them); raises ``Refused`` with the reason otherwise."""
    config = model.config
    transformers_forward(model)
    if getattr(config, "is_decoder", False):
        raise Refused("a decoder (config.is_decoder=True: causal self-attention)")
    if getattr(config, "add_cross_attention", False):
        raise Refused("cross-attention layers (config.add_cross_attention=True)")
    _absolute_positions(config, "config")
    emb, encoder = model.embeddings, model.encoder
    transformers_forward(emb)
    _absolute_positions(emb, "embeddings")
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if not isinstance(getattr(emb, name, None), nn.Embedding):
            raise Refused(f"embeddings.{name} is missing or not an nn.Embedding")
    width = emb.word_embeddings.embedding_dim
    layer_norm(emb, "LayerNorm", width)
    dropout(emb, "dropout")
    expect_params(emb, {"word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
                        "LayerNorm.weight", "LayerNorm.bias"}, "embeddings")
    padding_idx = getattr(emb, "padding_idx", None)
    roberta = padding_idx is not None
    if roberta and emb.position_embeddings.padding_idx != padding_idx:
        raise Refused("embeddings.padding_idx differs from position_embeddings.padding_idx: unknown position scheme")
    if not roberta and "roberta" in type(emb).__name__.lower():
        raise Refused(f"{type(emb).__name__} without `padding_idx`: unknown position scheme")

    if hasattr(encoder, "albert_layer_groups"):
        kind, projection = "albert", "encoder.embedding_hidden_mapping_in"
        hidden = linear(encoder, "embedding_hidden_mapping_in", width, None).out_features
        groups = encoder.albert_layer_groups
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(groups, nn.ModuleList) or not groups or not isinstance(layers, int) or layers < 1 \
                or getattr(config, "num_hidden_groups", len(groups)) != len(groups):
            raise Refused("ALBERT layer groups do not match config.num_hidden_layers / num_hidden_groups")
        transformers_forward(encoder)
        modes = set()
        for g, group in enumerate(groups):
            transformers_forward(group)
            for j, layer in enumerate(group.albert_layers):
                modes.add(check_albert_layer(layer, hidden, f"group {g} layer {j}"))
    elif isinstance(getattr(encoder, "layer", None), nn.ModuleList) and len(encoder.layer):
        kind = "bert"
        transformers_forward(encoder)
        project = getattr(model, "embeddings_project", None)
        projection = "embeddings_project" if project is not None else None
        hidden = linear(model, "embeddings_project", width, None).out_features if project is not None else width
        modes = {check_bert_layer(layer, hidden, i) for i, layer in enumerate(encoder.layer)}
        if set(_param_names(encoder)) != {f"layer.{i}.{n}" for i, layer in enumerate(encoder.layer)
                                          for n in _param_names(layer)}:
            raise Refused("the encoder holds parameters outside its layers")
    else:
        raise Refused(f"unknown encoder layout ({type(encoder).__name__} has neither `layer` nor "
                      f"`albert_layer_groups`)")
    if len(modes) != 1:
        raise Refused(f"layers use different activations ({sorted(modes)})")

    pooler = None
    if kind == "albert" and getattr(model, "pooler", None) is not None:
        linear(model, "pooler", hidden, hidden)
        if not isinstance(getattr(model, "pooler_activation", None), nn.Tanh):
            raise Refused("pooler_activation is not nn.Tanh")
        pooler = "albert"
    elif kind == "bert" and getattr(model, "pooler", None) is not None:
        transformers_forward(model.pooler)
        linear(model.pooler, "dense", hidden, hidden)
        pooler = "bert"
    import transformers

    state_per_layer = int(transformers.__version__.split(".")[0]) >= 5
    output_class = _output_class(model, kind)
    return EncoderPlan(kind, roberta, projection, modes.pop(), pooler, output_class,
                       "pooler_output" in output_fields(output_class), unpad, state_per_layer)
