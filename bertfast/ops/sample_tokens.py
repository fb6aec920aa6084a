"""Sampling replacement tokens from generator logits (ELECTRA), by the Gumbel-max trick.

    token = argmax_v (logits[v] / temperature - log(-log(u[v]))),   u ~ Uniform(0, 1) i.i.d.

which draws ``token`` with probability softmax(logits / temperature). The uniforms come from the
shared counter-based RNG (``bertfast.ops.rng.uniforms``: element (row, vocab id) of stream 0), so a
kernel draws the same noise without storing it (``generator_sample``'s fused kernel does). Seeded:
the same seed and the same logits give the same tokens. No gradient flows through sampling
(ELECTRA stops it).
"""

from __future__ import annotations

import torch

from bertfast.ops import checks, rng
from bertfast.ops.dispatch import Op

OP = Op("sample_tokens")


def sample_tokens(
    logits: torch.Tensor,
    *,
    seed: int | torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """One token per row of ``logits``.

    Args:
        logits: (N, vocab) unnormalised scores.
        seed: int or int64 tensor of one element; makes the draw reproducible. None draws a seed
            from torch's global generator (so ``torch.manual_seed`` makes runs repeatable).
        temperature: > 0; the scores are divided by it.

    Returns:
        (N,) int64 token ids.
    """
    name = OP.name
    checks.tensor(name, "logits", logits, ndim=2, kind="float")
    checks.nonempty(name, "logits", logits, (1,), "the vocabulary dim")
    if not float(temperature) > 0:
        raise ValueError(f"{name}: `temperature` must be positive, got {temperature}")
    seed_tensor = rng.seed_tensor(name, seed, logits.device)

    facts = {"device": logits.device.type, "dtype": logits.dtype}
    impl = OP.select(backend, facts).impl
    with torch.no_grad():
        return impl(logits, seed_tensor, float(temperature))


def gumbel_uniforms(shape, device, seed: int | torch.Tensor | None) -> torch.Tensor:
    """The (rows, vocab) float32 uniforms the torch backend draws for ``seed`` (shared with the tests'
    independent formula): element (row, v) of the counter-based RNG's stream 0, never 0 or 1."""
    rows, vocab = shape
    return rng.uniforms(rng.seed_tensor(OP.name, seed, device), rows, vocab)


@OP.register("torch")
def sample_tokens_torch(logits, seed, temperature):
    """seed: the int64 tensor (1,) of ``bertfast.ops.rng.seed_tensor``."""
    u = rng.uniforms(seed, logits.shape[0], logits.shape[1])  # (N, V) in (0, 1)
    gumbel = -torch.log(-torch.log(u))
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.argmax(scores + gumbel, dim=-1)
