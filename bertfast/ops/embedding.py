"""Token embeddings: word + position + token-type gather, LayerNorm, dropout, optional projection.

    e = LayerNorm(W_word[ids] + W_type[type_ids] + W_pos[pos_ids]) -> dropout -> (e @ P^T + p)

The projection is ALBERT's / ELECTRA's factorized embedding (E -> H); BERT/RoBERTa pass none.
Rows at ``padding_idx`` (and ``position_padding_idx``) get no gradient, as in ``nn.Embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("embedding")


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_weight: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    *,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
    projection_weight: torch.Tensor | None = None,
    projection_bias: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embed token ids (or add positions/types to given ``inputs_embeds``).

    Args:
        input_ids: (B, T) ids in [0, vocab); or None when ``inputs_embeds`` is given.
        position_ids: (B, T) or (1, T) ids in [0, max_positions).
        token_type_ids: (B, T) or (1, T) ids in [0, type_vocab).
        word_weight: (vocab, E); position_weight: (max_positions, E); token_type_weight: (types, E).
        norm_weight, norm_bias: (E,) LayerNorm parameters.
        eps, dropout_p: LayerNorm epsilon; dropout after the norm (0.0 in eval mode).
        padding_idx / position_padding_idx: rows of the word / position table that get no gradient.
        projection_weight: (H, E) and projection_bias (H,): factorized E -> H projection, or None.
        inputs_embeds: (B, T, E) precomputed word embeddings instead of ``input_ids``.

    Returns:
        (B, T, H) with projection, else (B, T, E); dtype of ``word_weight``.
    """
    name = OP.name
    for arg, w in (("word_weight", word_weight), ("position_weight", position_weight),
                   ("token_type_weight", token_type_weight)):
        checks.tensor(name, arg, w, ndim=2, kind="float")
    E = word_weight.shape[1]
    for arg, w in (("position_weight", position_weight), ("token_type_weight", token_type_weight)):
        checks.shape(name, arg, w, (None, E), f"(rows, embedding_size={E})")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{name}: give exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        checks.tensor(name, "input_ids", input_ids, ndim=2, kind="int")
        checks.same_device(name, "input_ids", input_ids, "word_weight", word_weight)
        B, T = input_ids.shape
        lead = "input_ids"
    else:
        checks.tensor(name, "inputs_embeds", inputs_embeds, ndim=3, kind="float")
        checks.shape(name, "inputs_embeds", inputs_embeds, (None, None, E), f"(batch, seq_len, {E})")
        B, T = inputs_embeds.shape[:2]
        lead = "inputs_embeds"
    if B == 0:
        raise ValueError(f"{name}: `{lead}` is an empty batch (shape {(B, T)})")
    if T == 0:
        raise ValueError(f"{name}: `{lead}` has sequence length 0")
    for arg, ids in (("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        checks.tensor(name, arg, ids, ndim=2, kind="int")
        if ids.shape[1] != T or ids.shape[0] not in (1, B):
            raise ValueError(f"{name}: `{arg}` must have shape ({B}, {T}) or (1, {T}), got {tuple(ids.shape)}")
        checks.same_device(name, arg, ids, "word_weight", word_weight)
    for arg, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        checks.tensor(name, arg, p, ndim=1, kind="float")
        checks.shape(name, arg, p, (E,), f"(embedding_size={E},)")
    if projection_weight is not None:
        checks.tensor(name, "projection_weight", projection_weight, ndim=2, kind="float")
        checks.shape(name, "projection_weight", projection_weight, (None, E), f"(hidden, embedding_size={E})")
        if projection_bias is not None:
            checks.tensor(name, "projection_bias", projection_bias, ndim=1, kind="float")
            checks.shape(name, "projection_bias", projection_bias, (projection_weight.shape[0],), "(hidden,)")
    elif projection_bias is not None:
        raise ValueError(f"{name}: `projection_bias` given without `projection_weight`")
    # Every float tensor on the word table's device and, outside autocast, of its dtype.
    for arg, t in (("position_weight", position_weight), ("token_type_weight", token_type_weight),
                   ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("projection_weight", projection_weight),
                   ("projection_bias", projection_bias), ("inputs_embeds", inputs_embeds)):
        if t is not None:
            checks.same_device(name, arg, t, "word_weight", word_weight)
            checks.same_dtype_unless_autocast(name, arg, t, "word_weight", word_weight)
    checks.probability(name, "dropout_p", dropout_p)
    if input_ids is not None:
        checks.index_range(name, "input_ids", input_ids, word_weight.shape[0],
                           f"token ids must be below the vocabulary size {word_weight.shape[0]}")
    checks.index_range(name, "position_ids", position_ids, position_weight.shape[0],
                       f"the sequence is longer than the position table ({position_weight.shape[0]} positions)")
    checks.index_range(name, "token_type_ids", token_type_ids, token_type_weight.shape[0],
                       f"token types must be below type_vocab_size {token_type_weight.shape[0]}")

    facts = {"device": word_weight.device.type, "dtype": word_weight.dtype, "embedding_size": E,
             "projection": projection_weight is not None}
    impl = OP.select(backend, facts).impl
    return impl(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                norm_weight, norm_bias, float(eps), float(dropout_p), padding_idx, position_padding_idx,
                projection_weight, projection_bias, inputs_embeds)


@OP.register("torch")
def embedding_torch(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                    norm_weight, norm_bias, eps, dropout_p, padding_idx, position_padding_idx,
                    projection_weight, projection_bias, inputs_embeds):
    """Reference: transformers' BertEmbeddings order of operations (word + type, then + position)."""
    words = inputs_embeds if inputs_embeds is not None else F.embedding(input_ids, word_weight, padding_idx)
    x = words + F.embedding(token_type_ids, token_type_weight)
    x = x + F.embedding(position_ids, position_weight, position_padding_idx)  # (B, T, E)
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    if projection_weight is not None:
        x = F.linear(x, projection_weight, projection_bias)  # (B, T, H)
    return x
