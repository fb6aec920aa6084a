"""ALBERT: factorized embeddings (E -> H), cross-layer parameter sharing, MLM + sentence-order
prediction (SOP).

Sharing (``AlbertConfig.sharing``):
  "all"        transformers' ALBERT: ``num_hidden_groups`` groups of ``inner_group_num`` layers; layer
               step i of ``num_hidden_layers`` runs group int(i / (num_hidden_layers / groups)).
  "none"       no sharing: one group per layer step (the same as num_hidden_groups = num_hidden_layers).
  "attention"  the attention block is shared as in "all"; every layer step has its own feed-forward.
  "ffn"        the feed-forward block is shared as in "all"; every layer step has its own attention.
Module names and state_dict keys equal transformers' for "all" and "none"; the unshared halves of
"attention"/"ffn" live in ``encoder.unshared_layers`` (one per layer step and inner layer).

Training runs the layer steps as one autograd node (``bertfast.models.shared_loop``: one gradient
per parameter, float32 accumulation over the steps, optional recomputation); see
``AlbertTransformer`` and ``set_layer_loop``.

transformers' AlbertLayer applies no dropout to the feed-forward output before its LayerNorm
(ALBERT v2 configs use dropout 0 anyway); bertfast follows transformers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from bertfast import ops
from bertfast.models import inputs, shared_loop
from bertfast.models.bert import make_embeddings
from bertfast.models.config import EncoderConfig
from bertfast.models.layers import (MaskedLMModel, encode, init_weights, mlm_logits, mlm_loss, tie_mlm_decoder,
                                    wants_logits)
from bertfast.models.outputs import AlbertForPreTrainingOutput, BaseModelOutputWithPooling
from bertfast.nn import LayerNorm, LinearGELU, Packing, SelfAttention
from bertfast.ops.bias_gelu import approximate_of

SHARING_MODES = ("all", "none", "attention", "ffn")


@dataclass
class AlbertConfig(EncoderConfig):
    """ALBERT hyper-parameters; defaults are ALBERT-base v2 (12M parameters, E=128, dropout 0)."""

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    classifier_dropout_prob: float = 0.1
    sharing: str = "all"

    HF_MODEL_TYPE = "albert"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.embedding_size, int) or self.embedding_size <= 0:
            raise ValueError(f"embedding_size: must be a positive int, got {self.embedding_size!r}")
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"sharing: must be one of {SHARING_MODES}, got {self.sharing!r}")
        if not isinstance(self.inner_group_num, int) or self.inner_group_num <= 0:
            raise ValueError(f"inner_group_num: must be a positive int, got {self.inner_group_num!r}")
        if not isinstance(self.num_hidden_groups, int) or not 0 < self.num_hidden_groups <= self.num_hidden_layers:
            raise ValueError(f"num_hidden_groups: must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                             f"got {self.num_hidden_groups!r}")
        if self.sharing == "none" and self.num_hidden_groups not in (1, self.num_hidden_layers):
            raise ValueError(f"num_hidden_groups: sharing='none' uses one group per layer; leave it 1 or set it "
                             f"to num_hidden_layers={self.num_hidden_layers}, got {self.num_hidden_groups}")
        if not 0.0 <= self.classifier_dropout_prob < 1.0:
            raise ValueError(f"classifier_dropout_prob: must be in [0, 1), got {self.classifier_dropout_prob}")

    @property
    def groups(self) -> int:
        """Number of parameter groups actually built."""
        return self.num_hidden_layers if self.sharing == "none" else self.num_hidden_groups

    def group_of(self, step: int) -> int:
        """Group run at layer step ``step``: transformers' int(i / (L / G)), float division included."""
        return int(step / (self.num_hidden_layers / self.groups))

    def hf_kwargs(self) -> dict:
        if self.sharing in ("attention", "ffn"):
            raise ValueError(f"sharing: {self.sharing!r} has no transformers equivalent; only 'all' and 'none' "
                             f"convert to transformers' AlbertConfig")
        kwargs = self.to_dict()
        kwargs.pop("sharing")
        kwargs["num_hidden_groups"] = self.groups
        return kwargs


class AlbertAttention(SelfAttention):
    """Q, K, V, attention, then dense -> dropout -> LayerNorm(+ input), in one module as transformers has it."""

    def __init__(self, config: AlbertConfig):
        super().__init__(config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None = None) -> torch.Tensor:
        context = super().forward(hidden_states, key_padding_mask)
        p = self.output_dropout.p if self.training else 0.0
        return self.LayerNorm(self.dense(context), residual=hidden_states, dropout_p=p)


class AlbertLayer(nn.Module):
    """attention, then LayerNorm(x + ffn_output(gelu(ffn(x)))). Built with only one half when the
    other half comes from elsewhere (partial sharing)."""

    def __init__(self, config: AlbertConfig, attention: bool = True, feed_forward: bool = True):
        super().__init__()
        if feed_forward:
            self.full_layer_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if attention:
            self.attention = AlbertAttention(config)
        if feed_forward:
            self.ffn = LinearGELU(config.hidden_size, config.intermediate_size,
                                  approximate=approximate_of(config.hidden_act))
            self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)

    def feed_forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.full_layer_layer_norm(self.ffn_output(self.ffn(attention_output)), residual=attention_output)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None,
                attention_from: "AlbertLayer | None" = None, feed_forward_from: "AlbertLayer | None" = None):
        attention_output = (attention_from or self).attention(hidden_states, key_padding_mask)
        return (feed_forward_from or self).feed_forward(attention_output)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        shared_attention = config.sharing in ("all", "none", "attention")
        shared_ffn = config.sharing in ("all", "none", "ffn")
        self.albert_layers = nn.ModuleList(
            [AlbertLayer(config, shared_attention, shared_ffn) for _ in range(config.inner_group_num)])


class AlbertTransformer(nn.Module):
    """The E -> H projection and the shared layer groups, run ``num_hidden_layers`` times.

    How the layer steps run (attributes, not config fields: they change speed, memory and the
    rounding of summed gradients, not the model; set them on a whole model with ``set_layer_loop``):

    ``loop``  "auto" (default): the fused loop while training with grad enabled, the plain loop
              otherwise (eval, no_grad, inference); "fused": the fused loop whenever a gradient is
              needed; "autograd": always the plain Python loop. The fused loop
              (``bertfast.models.shared_loop``) is one autograd node over all layer steps: each
              parameter gets its gradient once (DDP-safe), summed over the steps in a float32
              buffer. While ``torch.compile`` traces, the plain loop always runs.
    ``recompute``  with the fused loop: keep only each layer step's input and recompute the step in
              the backward (dropout masks are redrawn from the saved generator state).
    """

    LOOPS = ("auto", "fused", "autograd")

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList([AlbertLayerGroup(config) for _ in range(config.groups)])
        if config.sharing in ("attention", "ffn"):
            # The unshared half of every (layer step, inner layer).
            own_attention = config.sharing == "ffn"
            self.unshared_layers = nn.ModuleList(
                [AlbertLayer(config, attention=own_attention, feed_forward=not own_attention)
                 for _ in range(config.num_hidden_layers * config.inner_group_num)])
        self.loop = "auto"
        self.recompute = False

    def schedule(self):
        """(layer, attention_from, feed_forward_from) of every layer application, in order."""
        cfg = self.config
        for step in range(cfg.num_hidden_layers):
            group = self.albert_layer_groups[cfg.group_of(step)]
            for j, layer in enumerate(group.albert_layers):
                own = self.unshared_layers[step * cfg.inner_group_num + j] if cfg.sharing in ("attention", "ffn") \
                    else None
                yield layer, (own if cfg.sharing == "ffn" else None), (own if cfg.sharing == "attention" else None)

    def uses_fused_loop(self) -> bool:
        """Whether the next forward runs the fused loop (see the class docstring)."""
        if self.loop not in self.LOOPS:
            raise ValueError(f"loop: must be one of {self.LOOPS}, got {self.loop!r}")
        if self.loop == "autograd" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return self.loop == "fused" or self.training

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        """(B, T, H) already projected (the embedding op applies ``embedding_hidden_mapping_in``), or
        packed (total_tokens, H) with its ``Packing``."""
        if not self.uses_fused_loop():
            for layer, attention_from, feed_forward_from in self.schedule():
                hidden_states = layer(hidden_states, key_padding_mask, attention_from=attention_from,
                                      feed_forward_from=feed_forward_from)
            return hidden_states
        steps = []
        for layer, attention_from, feed_forward_from in self.schedule():
            run = functools.partial(layer, key_padding_mask=key_padding_mask, attention_from=attention_from,
                                    feed_forward_from=feed_forward_from)
            own = attention_from or feed_forward_from
            steps.append((run, [*layer.parameters(), *(own.parameters() if own is not None else ())]))
        return shared_loop.run_layers(hidden_states, steps, recompute=bool(self.recompute),
                                      draws_random=self._draws_random())

    def _draws_random(self) -> bool:
        """Whether a layer step draws dropout seeds from torch's generator (what recomputation must replay)."""
        return any(m.training and (m.dropout.p > 0 or m.output_dropout.p > 0)
                   for m in self.modules() if isinstance(m, AlbertAttention))


def set_layer_loop(model: nn.Module, loop: str = "auto", recompute: bool = False) -> nn.Module:
    """Set ``loop`` and ``recompute`` (see ``AlbertTransformer``) of every ALBERT encoder inside ``model``."""
    if loop not in AlbertTransformer.LOOPS:
        raise ValueError(f"loop: must be one of {AlbertTransformer.LOOPS}, got {loop!r}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute: must be a bool, got {type(recompute).__name__}")
    for module in model.modules():
        if isinstance(module, AlbertTransformer):
            module.loop, module.recompute = loop, recompute
    return model


class AlbertModel(nn.Module):
    """Factorized embeddings (E) projected to H, the shared layers, an optional tanh pooler."""

    def __init__(self, config: AlbertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = make_embeddings(config)
        self.encoder = AlbertTransformer(config)
        if add_pooling_layer:
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
            self.pooler_activation = nn.Tanh()
        else:
            self.pooler = None
            self.pooler_activation = None
        self.unpad: bool | None = None  # see BertModel
        init_weights(self, config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        """input_ids (B, T) -> last_hidden_state (B, T, H), pooler_output (B, H) or None.
        ``inputs_embeds`` are (B, T, embedding_size)."""
        mask = inputs.key_padding_mask(type(self).__name__, input_ids, inputs_embeds, attention_mask,
                                       token_type_ids, position_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds,
                                 projection=self.encoder.embedding_hidden_mapping_in)
        hidden = encode(self.encoder, hidden, mask, self.unpad)
        pooled = self.pooler_activation(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class AlbertMLMHead(nn.Module):
    """dense (H -> E) -> activation -> LayerNorm -> decoder (E -> vocab) tied to the word embeddings."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.LayerNorm = LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size)
        self.approximate = approximate_of(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return mlm_logits(hidden, self.dense, self.LayerNorm, self.decoder.weight, self.decoder.bias, self.approximate)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mlm_loss(hidden, labels, self.dense, self.LayerNorm, self.decoder.weight, self.decoder.bias,
                        self.approximate)


class AlbertSOPHead(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 2)


def _init_and_tie(head: AlbertMLMHead, base: AlbertModel, config: AlbertConfig) -> None:
    init_weights(head, config.initializer_range)
    tie_mlm_decoder(head, base.embeddings.word_embeddings, config.tie_word_embeddings)


class AlbertForPreTraining(nn.Module):
    """ALBERT with the MLM head and the sentence-order head (SOP).

    ``loss`` = sum of the parts whose labels are given; ``mlm_loss``/``sop_loss`` returned apart.
    Full ``prediction_logits`` only without ``labels`` or with ``return_logits=True``.
    """

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config)
        self.predictions = AlbertMLMHead(config)
        self.sop_classifier = AlbertSOPHead(config)
        init_weights(self.sop_classifier, config.initializer_range)
        _init_and_tie(self.predictions, self.albert, config)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                sentence_order_label: torch.Tensor | None = None,
                return_logits: bool | None = None) -> AlbertForPreTrainingOutput:
        """labels (B, T): ids at masked positions, -100 elsewhere; sentence_order_label (B,): 0 = in
        order, 1 = swapped."""
        name, vocab = "AlbertForPreTraining", self.config.vocab_size
        inputs.labels(name, "labels", labels, input_ids, inputs_embeds, per_token=True, classes=vocab,
                      ignore_index=-100)
        inputs.labels(name, "sentence_order_label", sentence_order_label, input_ids, inputs_embeds, per_token=False,
                      classes=self.sop_classifier.classifier.out_features)
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        hidden, pooled = out.last_hidden_state, out.pooler_output
        sop = self.sop_classifier
        pooled = sop.dropout(pooled)
        sop_logits, sop_loss = ops.sentence_pair_loss(pooled, sop.classifier.weight, sop.classifier.bias,
                                                      sentence_order_label)
        mlm = self.predictions.loss(hidden, labels) if labels is not None else None
        parts = [p for p in (mlm, sop_loss) if p is not None]
        return AlbertForPreTrainingOutput(
            loss=sum(parts) if parts else None,
            prediction_logits=self.predictions(hidden) if wants_logits(labels, return_logits) else None,
            sop_logits=sop_logits,
            mlm_loss=mlm,
            sop_loss=sop_loss,
        )


class AlbertForMaskedLM(MaskedLMModel):
    """ALBERT (no pooler) with the MLM head."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config, add_pooling_layer=False)
        self.predictions = AlbertMLMHead(config)
        _init_and_tie(self.predictions, self.albert, config)

    def encoder_model(self) -> AlbertModel:
        return self.albert

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.predictions.loss(hidden, labels)
