"""ELECTRA: a small MLM generator fills masked positions with sampled tokens; the discriminator
classifies every token as original or replaced (replaced-token detection, RTD).

``ElectraForMaskedLM`` (generator) and ``ElectraForPreTraining`` (discriminator with the RTD head)
have transformers' module names and state_dict keys; ``ElectraPretrainingModel`` joins them with
shared token embeddings and the loss  mlm_loss + rtd_weight * rtd_loss  (rtd_weight = 50).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from bertfast import ops
from bertfast.models import inputs
from bertfast.models.bert import make_embeddings
from bertfast.models.config import EncoderConfig
from bertfast.models.layers import Encoder, MaskedLMModel, encode, init_weights, mlm_logits, mlm_loss
from bertfast.models.outputs import BaseModelOutput, ElectraForPreTrainingOutput, ElectraPretrainingOutput
from bertfast.nn import LayerNorm
from bertfast.ops.bias_gelu import approximate_of
from bertfast.ops.generator_sample import generator_sample


@dataclass
class ElectraConfig(EncoderConfig):
    """ELECTRA hyper-parameters; defaults are the ELECTRA-small discriminator (E=128, H=256)."""

    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    HF_MODEL_TYPE = "electra"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.embedding_size, int) or self.embedding_size <= 0:
            raise ValueError(f"embedding_size: must be a positive int, got {self.embedding_size!r}")


def make_generator_config(discriminator: ElectraConfig, fraction: float = 1 / 3) -> ElectraConfig:
    """A generator ``fraction`` as wide as the discriminator: same depth, head size, embeddings and
    vocabulary; hidden rounded to whole heads; feed-forward 4x its hidden size."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    head_dim = discriminator.head_dim
    heads = max(1, round(discriminator.hidden_size * fraction / head_dim))
    hidden = heads * head_dim
    return dataclasses.replace(discriminator, hidden_size=hidden, num_attention_heads=heads,
                               intermediate_size=4 * hidden)


class ElectraModel(nn.Module):
    """Embeddings (E), ``embeddings_project`` E -> H when they differ, L post-LN layers; no pooler."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.embeddings = make_embeddings(config)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        else:
            self.embeddings_project = None
        self.encoder = Encoder(config)
        self.unpad: bool | None = None  # see BertModel
        init_weights(self, config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> BaseModelOutput:
        """input_ids (B, T) -> last_hidden_state (B, T, H)."""
        mask = inputs.key_padding_mask(type(self).__name__, input_ids, inputs_embeds, attention_mask,
                                       token_type_ids, position_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds,
                                 projection=self.embeddings_project)
        return BaseModelOutput(last_hidden_state=encode(self.encoder, hidden, mask, self.unpad))


class ElectraDiscriminatorPredictions(nn.Module):
    """dense -> hidden_act -> dense_prediction (H -> 1): one replaced-token score per token."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)
        self.approximate = approximate_of(config.hidden_act)


class ElectraForPreTraining(nn.Module):
    """The discriminator: ELECTRA + RTD head. ``labels`` (B, T): 1 = replaced, 0 = original;
    the loss averages BCE over real tokens (``attention_mask``), or all tokens without a mask."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
        init_weights(self.discriminator_predictions, config.initializer_range)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ElectraForPreTrainingOutput:
        inputs.labels("ElectraForPreTraining", "labels", labels, input_ids, inputs_embeds, per_token=True,
                      classes=2, kind="int_or_bool")
        hidden = self.electra(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds).last_hidden_state
        head = self.discriminator_predictions
        mask = attention_mask.bool() if attention_mask is not None else None
        logits, loss = ops.rtd_loss(hidden, head.dense.weight, head.dense.bias, head.dense_prediction.weight,
                                    head.dense_prediction.bias, labels, mask, approximate=head.approximate)
        return ElectraForPreTrainingOutput(loss=loss, logits=logits)


class ElectraGeneratorPredictions(nn.Module):
    """dense (H -> E) -> GELU (erf, as transformers) -> LayerNorm(E)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.LayerNorm = LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)


class ElectraForMaskedLM(MaskedLMModel):
    """The generator: ELECTRA + MLM head whose ``generator_lm_head`` is tied to the word embeddings."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config)
        self.generator_predictions = ElectraGeneratorPredictions(config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        init_weights(self.generator_predictions, config.initializer_range)
        init_weights(self.generator_lm_head, config.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.generator_lm_head.weight = self.electra.embeddings.word_embeddings.weight

    def encoder_model(self) -> ElectraModel:
        return self.electra

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., vocab)."""
        p = self.generator_predictions
        return mlm_logits(hidden, p.dense, p.LayerNorm, self.generator_lm_head.weight, self.generator_lm_head.bias,
                          "none")

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.generator_predictions
        return mlm_loss(hidden, labels, p.dense, p.LayerNorm, self.generator_lm_head.weight,
                        self.generator_lm_head.bias, "none")


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator trained jointly: the ELECTRA objective.

    The two share their token embeddings (one ``nn.Embedding`` object, so one gradient); they
    must therefore agree on vocab_size, embedding_size and pad_token_id.
    """

    def __init__(self, discriminator_config: ElectraConfig, generator_config: ElectraConfig | None = None,
                 rtd_weight: float = 50.0, temperature: float = 1.0):
        super().__init__()
        generator_config = generator_config or make_generator_config(discriminator_config)
        for name in ("vocab_size", "embedding_size", "pad_token_id"):
            if getattr(generator_config, name) != getattr(discriminator_config, name):
                raise ValueError(f"generator_config: {name}={getattr(generator_config, name)} differs from the "
                                 f"discriminator's {getattr(discriminator_config, name)}; shared token embeddings "
                                 f"need them equal")
        if not temperature > 0:
            raise ValueError(f"temperature: must be positive, got {temperature}")
        self.generator = ElectraForMaskedLM(generator_config)
        self.discriminator = ElectraForPreTraining(discriminator_config)
        self.generator.electra.embeddings.word_embeddings = self.discriminator.electra.embeddings.word_embeddings
        self.generator.tie_weights()
        self.rtd_weight = float(rtd_weight)
        self.temperature = float(temperature)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                seed: int | torch.Tensor | None = None) -> ElectraPretrainingOutput:
        """One ELECTRA step.

        Args:
            input_ids: (B, T) masked input (masked positions hold [MASK] or the MLM corruption).
            labels: (B, T) original token ids at masked positions, -100 elsewhere.
            attention_mask: (B, T) 1 = real token.
            seed: seeds the generator's sampling (int or int64 tensor; None = drawn from torch's generator).
        """
        inputs.labels("ElectraPretrainingModel", "labels", labels, input_ids, None, per_token=True,
                      classes=self.generator.config.vocab_size, ignore_index=-100)
        gen = self.generator
        gen_hidden = gen.electra(input_ids, attention_mask, token_type_ids).last_hidden_state
        head, decoder = gen.generator_predictions, gen.generator_lm_head
        # One pass over the vocabulary: the MLM loss and a sampled token per masked position (no
        # gradient through sampling: the generator learns from its MLM loss only).
        mlm, corrupted, replaced = generator_sample(
            gen_hidden, labels, input_ids, head.dense.weight, head.dense.bias, head.LayerNorm.weight,
            head.LayerNorm.bias, decoder.weight, decoder.bias, attention_mask=attention_mask, approximate="none",
            eps=head.LayerNorm.eps, seed=seed, temperature=self.temperature)
        disc = self.discriminator(corrupted, attention_mask, token_type_ids, labels=replaced)
        return ElectraPretrainingOutput(loss=mlm + self.rtd_weight * disc.loss, mlm_loss=mlm, rtd_loss=disc.loss,
                                        logits=disc.logits, corrupted_ids=corrupted, replaced=replaced)
