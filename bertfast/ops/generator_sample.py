"""The ELECTRA generator step: MLM loss at the masked positions and one sampled replacement per masked
position, from one pass over the vocabulary.

    m         = positions where labels != ignore_index        (M of the B*T tokens, row-major)
    logits    = decoder(LayerNorm(gelu(dense(hidden[m]))))     (M, vocab)
    mlm_loss  = mean cross_entropy(logits, labels[m])          (0, with a graph, when M = 0)
    sample_i  = argmax_v (logits_iv / temperature - log(-log u_iv))     ~ softmax(logits_i / temperature)
    corrupted = input_ids with sample_i at the i-th masked position
    replaced  = corrupted != original  (original = labels at masked positions, input_ids elsewhere),
                False at padding

u is element (i, v) of the shared counter-based RNG (``bertfast.ops.rng.uniforms``), i the masked
token's index in row-major order of (B, T): the torch backend (the MLM loss and
``sample_tokens``' math composed) and the triton backend (``bertfast.kernels.vocab_loss``'s forward,
which tracks the Gumbel argmax while it streams the vocabulary for the loss) draw the same tokens for a
seed. No gradient flows through sampling (ELECTRA stops it); the loss' backward is ``mlm_loss``'s.
"""

from __future__ import annotations

import torch

from bertfast.ops import checks, rng, triton_support
from bertfast.ops.dispatch import Op
from bertfast.ops.mlm_loss import (check_head, cross_entropy_torch, decoder_cross_entropy, head_hidden,
                                   head_logits_torch, reduce_losses)
from bertfast.ops.sample_tokens import sample_tokens_torch

OP = Op("generator_sample")


def generator_sample(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    decoder_weight: torch.Tensor,
    decoder_bias: torch.Tensor | None,
    *,
    attention_mask: torch.Tensor | None = None,
    approximate: str = "none",
    eps: float = 1e-12,
    ignore_index: int = -100,
    seed: int | torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLM loss and sampled corruption of an ELECTRA generator.

    Args:
        hidden: (B, T, H) generator encoder output.
        labels: (B, T) original token ids at masked positions, ``ignore_index`` elsewhere.
        input_ids: (B, T) int ids the generator saw (masked positions hold [MASK] or the MLM corruption).
        dense_weight (E, H), dense_bias (E,), norm_weight, norm_bias (E,): the generator's head.
        decoder_weight: (vocab, E), usually the tied word embeddings; decoder_bias: (vocab,).
        attention_mask: (B, T) bool or 0/1 ints, True/1 = real token; None = no padding.
        approximate: GELU form of the head ("none" = erf, "tanh"); eps: its LayerNorm epsilon.
        seed: int or int64 tensor of one element; None draws one from torch's generator.
        temperature: > 0; tokens are drawn from softmax(logits / temperature).
        backend: force a backend ("torch", "triton"); see ``bertfast.ops.dispatch``.

    Returns:
        mlm_loss: scalar, mean over masked tokens (float32 for half inputs);
        corrupted_ids: (B, T) in input_ids' dtype; replaced: (B, T) bool.
    """
    name = OP.name
    E, V = check_head(name, hidden, labels, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                      decoder_bias, approximate, ignore_index)
    B, T, _ = hidden.shape
    checks.tensor(name, "input_ids", input_ids, ndim=2, kind="int")
    checks.shape(name, "input_ids", input_ids, (B, T), "(batch, seq_len) of hidden")
    checks.same_device(name, "input_ids", input_ids, "hidden", hidden)
    if attention_mask is not None:
        checks.tensor(name, "attention_mask", attention_mask, ndim=2, kind="int_or_bool")
        checks.shape(name, "attention_mask", attention_mask, (B, T), "(batch, seq_len) of hidden")
        checks.same_device(name, "attention_mask", attention_mask, "hidden", hidden)
    if not float(temperature) > 0:
        raise ValueError(f"{name}: `temperature` must be positive, got {temperature}")
    seed_tensor = rng.seed_tensor(name, seed, hidden.device)

    facts = {"device": hidden.device.type, "dtype": hidden.dtype, "vocab": V, "head_size": E}
    impl = OP.select(backend, facts).impl
    return impl(hidden, labels, input_ids, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                decoder_bias, attention_mask, approximate, float(eps), int(ignore_index), seed_tensor,
                float(temperature))


def corrupt(input_ids, labels, selected, sampled, attention_mask):
    """(corrupted (B, T), replaced (B, T) bool) from the samples (M,) of the selected positions."""
    corrupted = input_ids.masked_scatter(selected, sampled.to(input_ids.dtype))
    original = torch.where(selected, labels.to(input_ids.dtype), input_ids)
    replaced = corrupted != original
    if attention_mask is not None:
        replaced &= attention_mask.bool()
    return corrupted, replaced


@OP.register("torch")
def generator_sample_torch(hidden, labels, input_ids, dense_weight, dense_bias, norm_weight, norm_bias,
                           decoder_weight, decoder_bias, attention_mask, approximate, eps, ignore_index, seed,
                           temperature):
    selected = labels != ignore_index  # (B, T)
    logits = head_logits_torch(hidden[selected], dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                               decoder_bias, approximate, eps)  # (M, V)
    loss = cross_entropy_torch(logits, labels[selected], "mean", 0.0)
    with torch.no_grad():  # ELECTRA stops the gradient at sampling
        sampled = sample_tokens_torch(logits.detach(), seed, temperature)
    return (loss, *corrupt(input_ids, labels, selected, sampled, attention_mask))


@OP.register("triton", refuse=triton_support.refusal)
def generator_sample_triton(hidden, labels, input_ids, dense_weight, dense_bias, norm_weight, norm_bias,
                            decoder_weight, decoder_bias, attention_mask, approximate, eps, ignore_index, seed,
                            temperature):
    selected = labels != ignore_index  # (B, T)
    h = head_hidden(hidden[selected], dense_weight, dense_bias, norm_weight, norm_bias, approximate, eps)  # (M, E)
    losses, _, sampled = decoder_cross_entropy(h, labels[selected], decoder_weight, decoder_bias, 0.0, "triton",
                                               seed=seed, temperature=temperature)
    return (reduce_losses(losses, "mean"), *corrupt(input_ids, labels, selected, sampled, attention_mask))
