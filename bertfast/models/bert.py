"""BERT: the encoder, and pretraining with masked LM + next-sentence prediction.

Module names and state_dict keys equal transformers' ``BertModel`` / ``BertForPreTraining``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertfast import ops
from bertfast.models import inputs
from bertfast.models.config import EncoderConfig
from bertfast.models.layers import (Encoder, Pooler, encode, init_weights, mlm_logits, mlm_loss, tie_mlm_decoder,
                                    wants_logits)
from bertfast.models.outputs import BaseModelOutputWithPooling, BertForPreTrainingOutput
from bertfast.nn import Embeddings, LayerNorm
from bertfast.ops.bias_gelu import approximate_of


@dataclass
class BertConfig(EncoderConfig):
    """BERT hyper-parameters; defaults are BERT-base (110M parameters)."""

    HF_MODEL_TYPE = "bert"


def make_embeddings(config: EncoderConfig, position_padding_idx: int | None = None) -> Embeddings:
    return Embeddings(config.vocab_size, config.embedding_dim, config.max_position_embeddings,
                      config.type_vocab_size, pad_token_id=config.pad_token_id,
                      layer_norm_eps=config.layer_norm_eps, hidden_dropout_prob=config.hidden_dropout_prob,
                      position_padding_idx=position_padding_idx)


class BertModel(nn.Module):
    """Embeddings -> L post-LN transformer layers -> optional tanh pooler over the first token.

    ``unpad`` (attribute; ``bertfast.models.set_unpad``): None = run CUDA batches with padding
    unpadded, True/False = always/never (see ``layers.encode``). Unpadded, ``last_hidden_state``
    is zero at padded positions; padded, it holds what the layers compute there.
    """

    # RoBERTa sets this: position ids count real tokens from pad_token_id + 1.
    padding_aware_positions = False

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = make_embeddings(config, config.pad_token_id if self.padding_aware_positions else None)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.unpad: bool | None = None
        init_weights(self, config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        """input_ids (B, T), attention_mask (B, T) 1 = real token -> last_hidden_state (B, T, H),
        pooler_output (B, H) or None."""
        mask = inputs.key_padding_mask(type(self).__name__, input_ids, inputs_embeds, attention_mask,
                                       token_type_ids, position_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        hidden = encode(self.encoder, hidden, mask, self.unpad)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = approximate_of(config.hidden_act)


class BertLMPredictionHead(nn.Module):
    """transform (dense, GELU, LayerNorm) -> decoder tied to the word embeddings, bias ``bias``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.transform
        return mlm_logits(hidden, t.dense, t.LayerNorm, self.decoder.weight, self.decoder.bias, t.approximate)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.transform
        return mlm_loss(hidden, labels, t.dense, t.LayerNorm, self.decoder.weight, self.decoder.bias, t.approximate)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(nn.Module):
    """BERT with the MLM head (tied to the word embeddings) and the NSP head.

    ``loss`` is the sum of the parts whose labels are given (transformers only returns it when
    both are); ``mlm_loss`` and ``nsp_loss`` are returned separately. The MLM head runs only at
    labelled positions; full ``prediction_logits`` are computed when no ``labels`` are given or
    ``return_logits=True``.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        init_weights(self.cls, config.initializer_range)
        tie_mlm_decoder(self.cls.predictions, self.bert.embeddings.word_embeddings, config.tie_word_embeddings)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None,
                return_logits: bool | None = None) -> BertForPreTrainingOutput:
        """labels (B, T): token ids at masked positions, -100 elsewhere; next_sentence_label (B,):
        0 = B follows A, 1 = B is random."""
        name, vocab = "BertForPreTraining", self.config.vocab_size
        inputs.labels(name, "labels", labels, input_ids, inputs_embeds, per_token=True, classes=vocab,
                      ignore_index=-100)
        inputs.labels(name, "next_sentence_label", next_sentence_label, input_ids, inputs_embeds, per_token=False,
                      classes=self.cls.seq_relationship.out_features)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        hidden, pooled = out.last_hidden_state, out.pooler_output
        head = self.cls.predictions
        nsp_logits, nsp_loss = ops.sentence_pair_loss(pooled, self.cls.seq_relationship.weight,
                                                      self.cls.seq_relationship.bias, next_sentence_label)
        mlm = head.loss(hidden, labels) if labels is not None else None
        parts = [p for p in (mlm, nsp_loss) if p is not None]
        return BertForPreTrainingOutput(
            loss=sum(parts) if parts else None,
            prediction_logits=head(hidden) if wants_logits(labels, return_logits) else None,
            seq_relationship_logits=nsp_logits,
            mlm_loss=mlm,
            nsp_loss=nsp_loss,
        )
