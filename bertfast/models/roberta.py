"""RoBERTa: BERT's architecture with padding-aware positions (starting at padding_idx + 1),
one token type, and masked-LM pretraining only (dynamic masking lives in the data pipeline).

Module names and state_dict keys equal transformers' ``RobertaModel`` / ``RobertaForMaskedLM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertfast.models.bert import BertModel
from bertfast.models.config import EncoderConfig
from bertfast.models.layers import MaskedLMModel, init_weights, mlm_logits, mlm_loss, tie_mlm_decoder
from bertfast.nn import LayerNorm


@dataclass
class RobertaConfig(EncoderConfig):
    """RoBERTa hyper-parameters; defaults are RoBERTa-base (byte-level BPE vocabulary of 50265)."""

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    HF_MODEL_TYPE = "roberta"

    def __post_init__(self):
        super().__post_init__()
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(f"max_position_embeddings: {self.max_position_embeddings} leaves no position after "
                             f"pad_token_id + 1 = {self.pad_token_id + 1}")


class RobertaModel(BertModel):
    """BERT encoder whose position ids count real tokens from ``pad_token_id + 1``."""

    padding_aware_positions = True


class RobertaLMHead(nn.Module):
    """dense -> GELU (erf, whatever hidden_act says, as in transformers) -> layer_norm -> decoder."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return mlm_logits(hidden, self.dense, self.layer_norm, self.decoder.weight, self.decoder.bias, "none")

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return mlm_loss(hidden, labels, self.dense, self.layer_norm, self.decoder.weight, self.decoder.bias, "none")


class RobertaForMaskedLM(MaskedLMModel):
    """RoBERTa with its MLM head (decoder tied to the word embeddings); no pooler, no NSP."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(config)
        init_weights(self.lm_head, config.initializer_range)
        tie_mlm_decoder(self.lm_head, self.roberta.embeddings.word_embeddings, config.tie_word_embeddings)

    def encoder_model(self) -> RobertaModel:
        return self.roberta

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm_head.loss(hidden, labels)
