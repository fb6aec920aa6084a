"""Drop-in for transformers' ``BertSelfAttention`` (and ALBERT/RoBERTa/ELECTRA's): Q, K, V and attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertfast import ops
from bertfast.nn.unpadding import Packing
from bertfast.ops import checks


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``bertfast.ops.attention``; no output projection.

    Parameters ``query``, ``key``, ``value`` are ``nn.Linear(hidden, hidden)`` as in transformers;
    the three projections run as one GEMM on the concatenated weights, and the attention op reads
    q, k and v as strided views of its output.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_probs_dropout_prob: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"num_attention_heads: hidden_size {hidden_size} is not divisible by "
                             f"num_attention_heads {num_attention_heads}")
        checks.probability(type(self).__name__, "attention_probs_dropout_prob", attention_probs_dropout_prob)
        factory = {"device": device, "dtype": dtype}
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.query = nn.Linear(hidden_size, hidden_size, **factory)
        self.key = nn.Linear(hidden_size, hidden_size, **factory)
        self.value = nn.Linear(hidden_size, hidden_size, **factory)
        self.dropout = nn.Dropout(attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | Packing | None = None) -> torch.Tensor:
        """(B, T, hidden) with a (B, T) bool mask (True = real token) -> (B, T, hidden) attention context;
        or packed (total_tokens, hidden) with its ``Packing`` -> (total_tokens, hidden) (varlen attention)."""
        packed = isinstance(key_padding_mask, Packing)
        if hidden_states.dim() != (2 if packed else 3):
            want = "(total_tokens, hidden) with a Packing" if packed else "(batch, seq_len, hidden)"
            raise ValueError(f"hidden_states: expected {want}, got {tuple(hidden_states.shape)}")
        p = self.dropout.p if self.training else 0.0
        return self_attention(hidden_states, self.query, self.key, self.value, self.num_attention_heads, p,
                              key_padding_mask)


def self_attention(hidden_states: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, heads: int,
                   dropout_p: float, key_padding_mask: torch.Tensor | Packing | None) -> torch.Tensor:
    """The math of ``SelfAttention.forward`` on any three biased ``nn.Linear`` projections (also
    those of a transformers model, which ``bertfast.patch`` runs this on): Q, K and V as one GEMM on
    the concatenated weights, then the attention op on strided views of its output."""
    lead = hidden_states.shape[:-1]
    weight = torch.cat([query.weight, key.weight, value.weight])  # (3*hidden, hidden)
    bias = torch.cat([query.bias, key.bias, value.bias])
    qkv = F.linear(hidden_states, weight, bias).view(*lead, 3, heads, query.out_features // heads)
    q, k, v = qkv.unbind(-3)  # each (*lead, heads, head_dim), strided views
    if isinstance(key_padding_mask, Packing):
        context = ops.attention(q, k, v, cu_seqlens=key_padding_mask.cu_seqlens,
                                max_seqlen=key_padding_mask.max_seqlen, dropout_p=dropout_p)
    else:
        context = ops.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return context.reshape(*lead, -1)
