"""Sampling replacement tokens from generator logits (ELECTRA), by the Gumbel-max trick.

    token = argmax_v (logits[v] / temperature - log(-log(u[v]))),   u ~ Uniform(0, 1) i.i.d.

which draws ``token`` with probability softmax(logits / temperature). Seeded: the same seed and
the same logits give the same tokens. No gradient flows through sampling (ELECTRA stops it).
"""

from __future__ import annotations

import torch

from bertfast.ops import checks
from bertfast.ops.dispatch import Op

OP = Op("sample_tokens")


def sample_tokens(
    logits: torch.Tensor,
    *,
    seed: int | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """One token per row of ``logits``.

    Args:
        logits: (N, vocab) unnormalised scores.
        seed: makes the draw reproducible; None uses torch's global generator.
        temperature: > 0; the scores are divided by it.

    Returns:
        (N,) int64 token ids.
    """
    name = OP.name
    checks.tensor(name, "logits", logits, ndim=2, kind="float")
    checks.nonempty(name, "logits", logits, (1,), "the vocabulary dim")
    if not float(temperature) > 0:
        raise ValueError(f"{name}: `temperature` must be positive, got {temperature}")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"{name}: `seed` must be an int or None, got {type(seed).__name__}")

    facts = {"device": logits.device.type, "dtype": logits.dtype}
    impl = OP.select(backend, facts).impl
    with torch.no_grad():
        return impl(logits, seed, float(temperature))


def gumbel_uniforms(shape, device, seed: int | None) -> torch.Tensor:
    """The float32 uniforms of the torch backend, shared with the tests' independent formula."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


@OP.register("torch")
def sample_tokens_torch(logits, seed, temperature):
    u = gumbel_uniforms(logits.shape, logits.device, seed)
    # u == 0 gives -inf noise: that token is never drawn, which is the right limit.
    gumbel = -torch.log(-torch.log(u))
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.argmax(scores + gumbel, dim=-1)
