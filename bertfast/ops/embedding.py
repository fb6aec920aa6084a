"""Token embeddings: word + position + token-type gather, LayerNorm, dropout, optional projection.

    e = LayerNorm(W_word[ids] + W_type[type_ids] + W_pos[pos_ids]) -> dropout -> (e @ P^T + p)

The projection is ALBERT's / ELECTRA's factorized embedding (E -> H); BERT/RoBERTa pass none.
Rows at ``padding_idx`` (and ``position_padding_idx``) get no gradient, as in ``nn.Embedding``.
Dropout draws the shared counter-based bits (``bertfast.ops.rng``, stream 0, element (token, j) of
the (B * T, E) normalized rows), so every backend drops the same elements for the same seed.

The GPU backends run through the ``torch.library`` custom op ``bertfast::embedding_forward``
(returns the output and the per-token mean and rstd) with its backward
``bertfast::embedding_backward`` and fake implementations, so ``torch.compile`` traces through it.
The torch backend runs as plain PyTorch ops under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.ops import checks, rng, triton_support
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
    seed: int | torch.Tensor | None = None,
    deterministic: bool = False,
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
        seed: dropout seed (int or int64 tensor of one element), read only when dropout_p > 0;
            default: drawn from torch's generator, so ``torch.manual_seed`` makes runs repeatable.
        deterministic: table gradients without atomics (bitwise repeatable on a GPU; a little slower).
        backend: force a backend ("torch", "triton"); see ``bertfast.ops.dispatch``.

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

    padding_idx = _row_index(name, "padding_idx", padding_idx, word_weight.shape[0])
    position_padding_idx = _row_index(name, "position_padding_idx", position_padding_idx, position_weight.shape[0])
    seed_tensor = rng.seed_tensor(name, seed, word_weight.device) if dropout_p > 0 else None

    floats = [t for t in (word_weight, position_weight, token_type_weight, norm_weight, norm_bias, projection_weight,
                          projection_bias, inputs_embeds) if t is not None]
    facts = {"device": word_weight.device.type, "dtype": word_weight.dtype, "embedding_size": E,
             "projection": projection_weight is not None, "type_vocab_size": token_type_weight.shape[0],
             "mixed_dtypes": len({t.dtype for t in floats}) > 1}
    chosen = OP.select(backend, facts).name
    args = (input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, norm_weight,
            norm_bias)
    if chosen == "torch":
        return OP.backends["torch"].impl(*args, float(eps), float(dropout_p), padding_idx, position_padding_idx,
                                         projection_weight, projection_bias, inputs_embeds, seed_tensor)
    # The kernels read rows with a unit last stride (any row stride); copy only where it is not.
    args = tuple(t if t is None or t.stride(-1) == 1 else t.contiguous() for t in args)
    projection_weight, projection_bias, inputs_embeds = (
        t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (projection_weight, projection_bias,
                                                                          inputs_embeds))
    out, _, _ = embedding_forward(*args, projection_weight, projection_bias, inputs_embeds, seed_tensor, float(eps),
                                  float(dropout_p), _or_minus_one(padding_idx), _or_minus_one(position_padding_idx),
                                  _out_dtype(word_weight, projection_weight), chosen, bool(deterministic))
    return out.view(B, T, out.shape[-1])


def _row_index(name: str, arg: str, index: int | None, rows: int) -> int | None:
    """A padding index in [-rows, rows) as nn.Embedding takes it, made non-negative."""
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, int) or not -rows <= index < rows:
        raise ValueError(f"{name}: `{arg}` must be an int in [-{rows}, {rows}) (the table has {rows} rows), "
                         f"got {index!r}")
    return index % rows


def _or_minus_one(index: int | None) -> int:
    return -1 if index is None else index


def _out_dtype(word_weight: torch.Tensor, projection_weight: torch.Tensor | None) -> torch.dtype:
    """The torch backend's output dtype: under autocast the projection (F.linear) runs in the
    autocast dtype; otherwise (and without a projection: LayerNorm is a float32 op under autocast)
    the tables' dtype."""
    device = word_weight.device.type
    if projection_weight is not None and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return word_weight.dtype


@OP.register("torch")
def embedding_torch(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                    norm_weight, norm_bias, eps, dropout_p, padding_idx, position_padding_idx,
                    projection_weight, projection_bias, inputs_embeds, seed):
    """Reference: transformers' BertEmbeddings order of operations (word + type, then + position);
    dropout with the kernels' bits (``rng.dropout`` of the (B * T, E) rows, stream 0)."""
    words = inputs_embeds if inputs_embeds is not None else F.embedding(input_ids, word_weight, padding_idx)
    x = words + F.embedding(token_type_ids, token_type_weight)
    x = x + F.embedding(position_ids, position_weight, position_padding_idx)  # (B, T, E)
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    if dropout_p > 0.0:
        x = rng.dropout(x, seed, dropout_p)
    if projection_weight is not None:
        x = F.linear(x, projection_weight, projection_bias)  # (B, T, H)
    return x


# ------------------------------------------------------------------------------------------------
# The custom ops: the backend name travels as an argument, chosen before tracing reaches them.
# Padding indices travel as ints, -1 = none. Gradients of absent inputs travel as empty tensors.


def _tokens(input_ids, inputs_embeds) -> int:
    lead = input_ids if input_ids is not None else inputs_embeds
    return lead.shape[0] * lead.shape[1]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token mean and rstd: float32, or float64 for float64 tables."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("bertfast::embedding_forward", mutates_args=())
def embedding_forward(input_ids: torch.Tensor | None, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      word_weight: torch.Tensor, position_weight: torch.Tensor, token_type_weight: torch.Tensor,
                      norm_weight: torch.Tensor, norm_bias: torch.Tensor, projection_weight: torch.Tensor | None,
                      projection_bias: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      seed: torch.Tensor | None, eps: float, dropout_p: float, padding_idx: int,
                      position_padding_idx: int, out_dtype: torch.dtype, backend: str,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B * T, H or E) in ``out_dtype``, mean, rstd (B * T,) float32 (float64 for float64))."""
    return _FORWARD[backend](input_ids, position_ids, token_type_ids, word_weight, position_weight,
                             token_type_weight, norm_weight, norm_bias, projection_weight, projection_bias,
                             inputs_embeds, seed, eps, dropout_p, padding_idx, position_padding_idx, out_dtype)


@embedding_forward.register_fake
def _(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, norm_weight,
      norm_bias, projection_weight, projection_bias, inputs_embeds, seed, eps, dropout_p, padding_idx,
      position_padding_idx, out_dtype, backend, deterministic):
    n = _tokens(input_ids, inputs_embeds)
    width = projection_weight.shape[0] if projection_weight is not None else word_weight.shape[1]
    stats = _stats_dtype(word_weight.dtype)
    return (word_weight.new_empty((n, width), dtype=out_dtype), word_weight.new_empty((n,), dtype=stats),
            word_weight.new_empty((n,), dtype=stats))


@torch.library.custom_op("bertfast::embedding_backward", mutates_args=())
def embedding_backward(dout: torch.Tensor, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                       token_type_ids: torch.Tensor, word_weight: torch.Tensor, position_weight: torch.Tensor,
                       token_type_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                       projection_weight: torch.Tensor | None, projection_bias: torch.Tensor | None,
                       inputs_embeds: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                       seed: torch.Tensor | None, dropout_p: float, padding_idx: int, position_padding_idx: int,
                       backend: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor]:
    """Gradients of (word, position, type tables, norm weight, norm bias, projection weight, projection
    bias, inputs_embeds), each like its input; an empty tensor for an absent one."""
    grads = _BACKWARD[backend](dout, input_ids, position_ids, token_type_ids, word_weight, position_weight,
                               token_type_weight, norm_weight, norm_bias, projection_weight, projection_bias,
                               inputs_embeds, mean, rstd, seed, dropout_p, padding_idx, position_padding_idx,
                               deterministic)
    return tuple(dout.new_empty((0,)) if g is None else g for g in grads)


@embedding_backward.register_fake
def _(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, norm_weight,
      norm_bias, projection_weight, projection_bias, inputs_embeds, mean, rstd, seed, dropout_p, padding_idx,
      position_padding_idx, backend, deterministic):
    like = (None if input_ids is None else word_weight, position_weight, token_type_weight, norm_weight, norm_bias,
            projection_weight, projection_bias, inputs_embeds)
    return tuple(dout.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in like)


def _setup_context(ctx, inputs, output):
    (input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, norm_weight, norm_bias,
     projection_weight, projection_bias, inputs_embeds, seed, _, dropout_p, padding_idx, position_padding_idx,
     _, backend, deterministic) = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                          norm_weight, norm_bias, projection_weight, projection_bias, inputs_embeds, mean, rstd, seed)
    ctx.args = (dropout_p, padding_idx, position_padding_idx, backend, deterministic)
    ctx.present = (input_ids is not None, True, True, True, True, projection_weight is not None,
                   projection_bias is not None, inputs_embeds is not None)


def _backward(ctx, dout, dmean, drstd):
    saved = ctx.saved_tensors
    grads = embedding_backward(dout, *saved, *ctx.args)
    (d_word, d_pos, d_type, d_norm_w, d_norm_b, d_proj_w, d_proj_b, d_embeds) = (
        g if present else None for g, present in zip(grads, ctx.present, strict=True))
    return (None, None, None, d_word, d_pos, d_type, d_norm_w, d_norm_b, d_proj_w, d_proj_b, d_embeds,
            None, None, None, None, None, None, None, None)


embedding_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# The custom op's torch implementation: the kernels' formulas in PyTorch, any dtype (float64 too),
# so the op's registration and its written-out backward are checked on any machine.


def _index(index: int) -> int | None:
    return None if index < 0 else index


def _rows(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, inputs_embeds,
          compute):
    """x = (word + type) + position (B * T, E) in ``compute``, and the flat (word, position, type) ids."""
    lead = input_ids if input_ids is not None else inputs_embeds
    B, T = lead.shape[:2]
    pos = position_ids.expand(B, T).reshape(-1)
    typ = token_type_ids.expand(B, T).reshape(-1)
    ids = input_ids.reshape(-1) if input_ids is not None else None
    words = word_weight[ids] if ids is not None else inputs_embeds.reshape(B * T, -1)
    x = (words.to(compute) + token_type_weight[typ].to(compute)) + position_weight[pos].to(compute)
    return x, ids, pos, typ


def embedding_torch_forward(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                            norm_weight, norm_bias, projection_weight, projection_bias, inputs_embeds, seed, eps,
                            dropout_p, padding_idx, position_padding_idx, out_dtype):
    compute = _stats_dtype(word_weight.dtype)
    x, _, _, _ = _rows(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                       inputs_embeds, compute)
    mean = x.mean(-1)
    rstd = torch.rsqrt(x.var(-1, unbiased=False) + eps)
    e = (x - mean[:, None]) * rstd[:, None] * norm_weight.to(compute) + norm_bias.to(compute)
    if dropout_p > 0.0:
        e = rng.dropout(e, seed, dropout_p)
    if projection_weight is None:
        return e.to(out_dtype), mean, rstd
    bias = None if projection_bias is None else projection_bias.to(out_dtype)
    return F.linear(e.to(out_dtype), projection_weight.to(out_dtype), bias), mean, rstd


def embedding_torch_backward(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight,
                             token_type_weight, norm_weight, norm_bias, projection_weight, projection_bias,
                             inputs_embeds, mean, rstd, seed, dropout_p, padding_idx, position_padding_idx,
                             deterministic):
    """The backward the kernels compute (kernels/embedding.py), in the stats' dtype; ``index_add_``
    scatters the table rows (deterministic on a CPU)."""
    compute = mean.dtype
    x, ids, pos, typ = _rows(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                             token_type_weight, inputs_embeds, compute)
    xhat = (x - mean[:, None]) * rstd[:, None]
    w = norm_weight.to(compute)
    z = rng.dropout(torch.ones_like(xhat), seed, dropout_p) if dropout_p > 0.0 else None  # keep / (1 - p)
    dy = dout.to(compute)
    d_proj_w = d_proj_b = None
    if projection_weight is not None:
        e = xhat * w + norm_bias.to(compute)
        e = e if z is None else e * z
        g = dy @ projection_weight.to(compute)
        d_proj_w = (dy.T @ e).to(projection_weight.dtype)
        if projection_bias is not None:
            d_proj_b = dy.sum(0).to(projection_bias.dtype)
    else:
        g = dy
    if z is not None:
        g = g * z
    dxhat = g * w
    dx = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))

    def scatter(table, index, skip):
        grad = torch.zeros(table.shape, dtype=compute, device=dx.device).index_add_(0, index, dx)
        if skip >= 0:
            grad[skip] = 0.0
        return grad.to(table.dtype)

    d_word = scatter(word_weight, ids, padding_idx) if ids is not None else None
    d_embeds = dx.view(inputs_embeds.shape).to(inputs_embeds.dtype) if inputs_embeds is not None else None
    return (d_word, scatter(position_weight, pos, position_padding_idx), scatter(token_type_weight, typ, -1),
            (g * xhat).sum(0).to(norm_weight.dtype), g.sum(0).to(norm_bias.dtype), d_proj_w, d_proj_b, d_embeds)


# ------------------------------------------------------------------------------------------------
# triton backend


# The kernels' limits (kernels/embedding.py MAX_E, MAX_E_PROJECTED, MAX_TYPES; not imported here:
# importing the kernel module imports triton).
_MAX_E, _MAX_E_PROJECTED, _MAX_TYPES = 1024, 256, 16


def _triton_refusal(facts) -> str | None:
    reason = triton_support.refusal(facts)
    if reason is not None:
        return reason
    # .get: `bertfast info` asks with the facts of a typical call, which may omit these two.
    if facts.get("mixed_dtypes", False):
        return "tables, LayerNorm and projection parameters (and inputs_embeds) must share one dtype"
    E = facts["embedding_size"]
    if facts["projection"] and E > _MAX_E_PROJECTED:
        return f"embedding_size must be <= {_MAX_E_PROJECTED} with a projection (got {E})"
    if E > _MAX_E:
        return f"embedding_size must be <= {_MAX_E} (got {E})"
    if facts.get("type_vocab_size", 2) > _MAX_TYPES:
        return f"type_vocab_size must be <= {_MAX_TYPES} (got {facts['type_vocab_size']})"
    return None


@OP.register("triton", refuse=_triton_refusal)
def embedding_triton(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                     norm_weight, norm_bias, projection_weight, projection_bias, inputs_embeds, seed, eps, dropout_p,
                     padding_idx, position_padding_idx, out_dtype):
    from bertfast.kernels.embedding import embedding_fwd

    return embedding_fwd(input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight,
                         norm_weight, norm_bias, eps, dropout_p, seed, projection_weight, projection_bias,
                         inputs_embeds, out_dtype)


def embedding_triton_backward(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight,
                              token_type_weight, norm_weight, norm_bias, projection_weight, projection_bias,
                              inputs_embeds, mean, rstd, seed, dropout_p, padding_idx, position_padding_idx,
                              deterministic):
    from bertfast.kernels.embedding import embedding_bwd

    return embedding_bwd(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight,
                         token_type_weight, norm_weight, norm_bias, mean, rstd, dropout_p, seed, _index(padding_idx),
                         _index(position_padding_idx), projection_weight, projection_bias, inputs_embeds,
                         deterministic)


# Each backend's custom-op forward and backward ("torch": the written-out reference above).
_FORWARD = {"torch": embedding_torch_forward, "triton": embedding_triton}
_BACKWARD = {"torch": embedding_torch_backward, "triton": embedding_triton_backward}
