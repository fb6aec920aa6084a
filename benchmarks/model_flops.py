"""Model FLOPs of one pretraining step (forward + backward), for tokens/s -> TFLOP/s -> MFU.

Convention ("model FLOPs", as in the PaLM paper's MFU): the matrix products the model needs on the
REAL tokens of a step, 2 FLOPs per multiply-add, the backward counted as twice the forward (input
and weight gradients), so training = 3 x forward. Work an implementation adds (padding, activation
recomputation, the MLM head on unmasked tokens) is never counted, and work it skips is never
subtracted: every implementation of a case is charged the same FLOPs, so MFU ratios are exactly
inverse step-time ratios. Embedding lookups, LayerNorm, GELU, softmax, dropout, the losses and the
optimizer step are not matrix products and are left out (a few percent of the step at base size).

With N = sum_b L_b real tokens of a batch of sequences of lengths L_b, H hidden, I intermediate,
E embedding width, V vocabulary, M masked (labelled) tokens, B sequences:

    encoder linear   6 * N * layers * (4 H^2 + 2 H I)
                     Q, K, V and output projections (4 H^2) and the feed-forward (2 H I) per layer;
                     6 = 2 (multiply-add) x 3 (forward + backward)
    attention        12 * layers * sum_b(L_b^2) * H
                     S = Q K^T and O = P V, 2 L^2 D per head each, H = heads x D, x3 for training
                     (no recompute charged: a backward that recomputes S does more than the model needs)
    projection       6 * N * E * H           when E != H (ALBERT; ELECTRA's generator)
    MLM head         6 * M * (H * E' + E' * V)   dense H -> E' then the vocabulary decoder E' -> V,
                     at the M MASKED positions only (E' = E for ALBERT and the ELECTRA generator, H for
                     RoBERTa). transformers computes the head on every token and bertfast on the
                     masked ones only; both are charged the masked-position head (the useful work).
    pooler + SOP     6 * B * (H^2 + 2 H)      ALBERT: tanh pooler and the 2-way sentence-order head on
                     the first token of each sequence
    RTD head         6 * N * (H^2 + H)        ELECTRA's discriminator: dense H -> H, then H -> 1, on
                     every real token

    ALBERT   = encoder + attention with layers = num_hidden_layers x inner_group_num applications
               (the shared layer counts once per application) + projection + MLM head + pooler/SOP
    RoBERTa  = encoder + attention + MLM head (RobertaForMaskedLM: no pooler)
    ELECTRA  = generator (encoder + attention + projection if E != H_g + MLM head at the masked
               positions) + discriminator (encoder + attention + projection if E != H + RTD head on all
               real tokens). Sampling the generator's tokens is not a matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence

# Training FLOPs per multiply-add of a forward matrix product: 2 (multiply-add) x 3 (fwd + bwd).
TRAIN = 6


def _width(config, name: str) -> int:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config: {name} must be a positive int, got {value!r}")
    return value


def _lengths(seqlens: Sequence[int]) -> list[int]:
    lengths = [int(n) for n in seqlens]
    if not lengths or min(lengths) < 0:
        raise ValueError(f"seqlens: need a non-empty list of non-negative lengths, got {list(seqlens)[:8]}")
    return lengths


def encoder_flops(config, seqlens: Sequence[int], applications: int | None = None) -> dict[str, int]:
    """Training FLOPs of the transformer layers: {"encoder_linear": ..., "attention": ...}.

    ``applications``: layer applications (default ``num_hidden_layers``); the embedding projection
    E -> H is added as "projection" when the config's embedding width differs from its hidden size."""
    lengths = _lengths(seqlens)
    hidden, inter = _width(config, "hidden_size"), _width(config, "intermediate_size")
    layers = applications if applications is not None else _width(config, "num_hidden_layers")
    tokens = sum(lengths)
    parts = {"encoder_linear": TRAIN * tokens * layers * (4 * hidden * hidden + 2 * hidden * inter),
             "attention": 2 * TRAIN * layers * sum(n * n for n in lengths) * hidden}
    embedding = getattr(config, "embedding_size", hidden)
    if embedding != hidden:
        parts["projection"] = TRAIN * tokens * embedding * hidden
    return parts


def mlm_head_flops(masked: int, hidden: int, head_width: int, vocab: int) -> int:
    """6 * M * (H * E' + E' * V): the MLM head's dense and vocabulary decoder at the masked tokens."""
    if masked < 0:
        raise ValueError(f"masked: must be >= 0, got {masked}")
    return TRAIN * masked * (hidden * head_width + head_width * vocab)


def _prefixed(prefix: str, parts: dict[str, int]) -> dict[str, int]:
    return {f"{prefix}{name}": value for name, value in parts.items()}


def albert_pretraining_flops(config, seqlens: Sequence[int], masked: int) -> dict[str, int]:
    """AlbertForPreTraining (MLM at ``masked`` tokens + SOP): FLOPs by part (see the module docstring)."""
    lengths = _lengths(seqlens)
    hidden, vocab = _width(config, "hidden_size"), _width(config, "vocab_size")
    embedding = _width(config, "embedding_size")
    applications = _width(config, "num_hidden_layers") * getattr(config, "inner_group_num", 1)
    parts = encoder_flops(config, lengths, applications)
    parts["mlm_head"] = mlm_head_flops(masked, hidden, embedding, vocab)
    parts["pooler_sop"] = TRAIN * len(lengths) * (hidden * hidden + 2 * hidden)
    return parts


def roberta_mlm_flops(config, seqlens: Sequence[int], masked: int) -> dict[str, int]:
    """RobertaForMaskedLM (MLM at ``masked`` tokens): FLOPs by part."""
    hidden, vocab = _width(config, "hidden_size"), _width(config, "vocab_size")
    parts = encoder_flops(config, seqlens)
    parts["mlm_head"] = mlm_head_flops(masked, hidden, hidden, vocab)
    return parts


def electra_pretraining_flops(discriminator, generator, seqlens: Sequence[int], masked: int) -> dict[str, int]:
    """ELECTRA's joint step (generator MLM at ``masked`` tokens, discriminator RTD on every real
    token): FLOPs by part, "generator_*" and "discriminator_*"."""
    lengths = _lengths(seqlens)
    tokens = sum(lengths)
    gen_hidden, disc_hidden = _width(generator, "hidden_size"), _width(discriminator, "hidden_size")
    gen = encoder_flops(generator, lengths)
    gen["mlm_head"] = mlm_head_flops(masked, gen_hidden, _width(generator, "embedding_size"),
                                     _width(generator, "vocab_size"))
    disc = encoder_flops(discriminator, lengths)
    disc["rtd_head"] = TRAIN * tokens * (disc_hidden * disc_hidden + disc_hidden)
    return {**_prefixed("generator_", gen), **_prefixed("discriminator_", disc)}


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())
