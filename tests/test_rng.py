"""The counter-based random bits every backend shares (bertfast.ops.rng), against plain Python."""

from __future__ import annotations

import pytest
import torch

from bertfast.ops import rng
from helpers import mix32_python


@pytest.mark.parametrize("seed", [0, 3, 2**31 - 1])
def test_bits_and_uniforms_equal_a_pure_python_hash(seed):
    rows, cols = 3, 5
    bits = rng.bits(torch.tensor([seed]), 2, rows, cols)
    u = rng.uniforms(torch.tensor([seed]), rows, cols)
    for stream in range(2):
        key = mix32_python(mix32_python(seed) ^ stream)
        for i in range(rows):
            for j in range(cols):
                expected = mix32_python(mix32_python(key ^ i) ^ j)
                assert bits[stream, i, j].item() & 0xFFFFFFFF == expected
                if stream == 0:
                    assert u[i, j].item() == ((expected >> 9) + 0.5) / 2**23


def test_uniforms_are_never_0_or_1():
    """The extreme bit patterns give 2^-24 and 1 - 2^-24 exactly (a 24-bit form rounds to 1.0,
    whose Gumbel noise -log(-log(1)) is +inf and would force that token)."""
    extremes = rng.uniforms_of_bits(torch.tensor([0, -1], dtype=torch.int32))
    assert extremes.tolist() == [2.0**-24, 1.0 - 2.0**-24]
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()


def test_dropout_keeps_the_expected_fraction():
    keep = rng.keep_mask(torch.tensor([11]), 1, 200, 500, 0.3)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - 0.7) < 5 * (0.3 * 0.7 / n) ** 0.5  # within 5 binomial standard deviations
