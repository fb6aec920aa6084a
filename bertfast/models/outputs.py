"""Model outputs with transformers' field names; attribute, key and index access like ModelOutput."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class ModelOutput:
    """Base of the output dataclasses: ``out.loss``, ``out["loss"]``, ``out[0]`` (first non-None)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


Tensor = torch.Tensor | None


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Tensor = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor = None
    pooler_output: Tensor = None


@dataclass
class MaskedLMOutput(ModelOutput):
    """``logits`` (B, T, vocab) are computed when no labels are given or ``return_logits=True``."""

    loss: Tensor = None
    logits: Tensor = None


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Tensor = None
    prediction_logits: Tensor = None
    seq_relationship_logits: Tensor = None
    mlm_loss: Tensor = None
    nsp_loss: Tensor = None


@dataclass
class AlbertForPreTrainingOutput(ModelOutput):
    loss: Tensor = None
    prediction_logits: Tensor = None
    sop_logits: Tensor = None
    mlm_loss: Tensor = None
    sop_loss: Tensor = None


@dataclass
class ElectraForPreTrainingOutput(ModelOutput):
    """Discriminator output: ``logits`` (B, T) replaced-token scores."""

    loss: Tensor = None
    logits: Tensor = None


@dataclass
class ElectraPretrainingOutput(ModelOutput):
    """Generator + discriminator step: loss = mlm_loss + rtd_weight * rtd_loss.

    ``corrupted_ids`` (B, T) is the discriminator's input (masked positions filled with generator
    samples); ``replaced`` (B, T) bool marks where it differs from the original tokens.
    """

    loss: Tensor = None
    mlm_loss: Tensor = None
    rtd_loss: Tensor = None
    logits: Tensor = None
    corrupted_ids: Tensor = None
    replaced: Tensor = None
