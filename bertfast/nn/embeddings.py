"""Drop-in for the embedding block of transformers' BERT, ALBERT, RoBERTa and ELECTRA."""

from __future__ import annotations

import torch
from torch import nn

from bertfast import ops
from bertfast.ops import checks
from bertfast.nn.layer_norm import LayerNorm


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout; optionally projected E -> H.

    Attribute names (``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``,
    ``LayerNorm``) are those of transformers' ``*Embeddings``, so state_dicts load unchanged.

    ``position_padding_idx`` selects RoBERTa's positions: when given, default position ids count
    real tokens from ``position_padding_idx + 1`` and padding tokens get ``position_padding_idx``.
    """

    def __init__(self, vocab_size: int, embedding_size: int, max_position_embeddings: int, type_vocab_size: int,
                 pad_token_id: int | None = None, layer_norm_eps: float = 1e-12, hidden_dropout_prob: float = 0.0,
                 position_padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        checks.probability(type(self).__name__, "hidden_dropout_prob", hidden_dropout_prob)
        factory = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(max_position_embeddings, embedding_size,
                                                padding_idx=position_padding_idx, **factory)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, embedding_size, **factory)
        self.LayerNorm = LayerNorm(embedding_size, eps=layer_norm_eps, **factory)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.position_padding_idx = position_padding_idx

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the default positions fit (RoBERTa's start after the padding index)."""
        n = self.position_embeddings.num_embeddings
        return n if self.position_padding_idx is None else n - self.position_padding_idx - 1

    def default_position_ids(self, input_ids: torch.Tensor | None, batch: int, seq_len: int,
                             device: torch.device) -> torch.Tensor:
        """(1, T) positions 0..T-1, or RoBERTa's (B, T) padding-aware positions."""
        return default_position_ids(input_ids, batch, seq_len, device, self.position_padding_idx,
                                    self.word_embeddings.padding_idx)

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                projection: nn.Linear | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, E), or (B, T, H) through ``projection`` (ALBERT/ELECTRA E -> H)."""
        lead = input_ids if input_ids is not None else inputs_embeds
        if lead is None:
            raise ValueError("input_ids: give `input_ids` or `inputs_embeds`")
        which = "input_ids" if input_ids is not None else "inputs_embeds"
        if lead.dim() < 2:
            raise ValueError(f"{which}: expected (batch, seq_len{'' if input_ids is not None else ', dim'}), "
                             f"got shape {tuple(lead.shape)}")
        B, T = lead.shape[:2]
        if position_ids is None and T > self.max_sequence_length:
            raise ValueError(f"{which}: sequence length {T} is longer than the position table allows "
                             f"({self.max_sequence_length} tokens; max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings})")
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, B, T, lead.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros((1, T), dtype=torch.long, device=lead.device)
        return ops.embedding(
            input_ids, position_ids, token_type_ids,
            self.word_embeddings.weight, self.position_embeddings.weight, self.token_type_embeddings.weight,
            self.LayerNorm.weight, self.LayerNorm.bias,
            eps=self.LayerNorm.eps,
            dropout_p=self.dropout.p if self.training else 0.0,
            padding_idx=self.word_embeddings.padding_idx,
            position_padding_idx=self.position_embeddings.padding_idx,
            projection_weight=None if projection is None else projection.weight,
            projection_bias=None if projection is None else projection.bias,
            inputs_embeds=inputs_embeds,
        )


def default_position_ids(input_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device,
                         position_padding_idx: int | None, pad_token_id: int | None) -> torch.Tensor:
    """(1, T) positions 0..T-1; with ``position_padding_idx`` (RoBERTa) (B, T) positions counting
    real tokens (ids != ``pad_token_id``) from position_padding_idx + 1, padding at
    position_padding_idx (without ids: sequential from position_padding_idx + 1)."""
    if position_padding_idx is None:
        return torch.arange(seq_len, device=device)[None, :]
    start = position_padding_idx
    if input_ids is None:  # no ids: padding is unknown, positions are sequential
        return torch.arange(start + 1, start + 1 + seq_len, device=device)[None, :].expand(batch, seq_len)
    real = input_ids.ne(pad_token_id).long()
    return torch.cumsum(real, dim=1) * real + start  # (B, T)
