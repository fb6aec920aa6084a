"""Unpadded execution: remove the padding of a (B, T) batch once, run every layer on the
(total_tokens, hidden) real tokens with varlen attention, restore the padded layout at the end.

Token-wise layers (projections, LayerNorm, GELU) do not care where a row came from, and attention
only needs to know which rows form one sequence: ``cu_seqlens``. Real tokens keep their order
inside each sequence, so any mask works (right or left padding, holes): a sequence's keys are
its real tokens, exactly the keys the padded path attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, T) batch sit in the packed (total_tokens, ...) layout.

    indices: (total_tokens,) int64 flat positions ``b * T + t`` of the real tokens, in order.
    cu_seqlens: (B + 1,) int32; sequence b is packed rows cu_seqlens[b]:cu_seqlens[b + 1].
    max_seqlen: the longest sequence (a Python int: read once, here).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.indices.numel()

    @staticmethod
    def of(key_padding_mask: torch.Tensor) -> Packing:
        """The packing of a (B, T) bool mask (True = real token). On a GPU it reads the mask twice
        (the longest sequence, and the positions through ``nonzero``, whose size is data)."""
        B, T = key_padding_mask.shape
        lengths = key_padding_mask.sum(1, dtype=torch.int32)
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=key_padding_mask.device)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        indices = key_padding_mask.reshape(-1).nonzero().squeeze(1)
        return Packing(indices, cu_seqlens, int(lengths.max()), B, T)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (total_tokens, ...): the real tokens, in order."""
        return padded.reshape(self.batch * self.seq_len, *padded.shape[2:]).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(total_tokens, ...) -> (B, T, ...) with zeros at padded positions."""
        out = packed.new_zeros(self.batch * self.seq_len, *packed.shape[1:])
        return out.index_copy(0, self.indices, packed).view(self.batch, self.seq_len, *packed.shape[1:])
