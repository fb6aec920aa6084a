"""Counter-based random bits shared by every kernel with dropout or sampling.

    bits(seed, stream, row, col) = mix32(mix32(mix32(mix32(seed) ^ stream) ^ row) ^ col)

mix32 is the lowbias32 integer hash (a bijection with full avalanche). Nothing is stored: a
backward regenerates the forward's bits from the seed and the element's coordinates, and
``bertfast.ops.rng`` computes the same bits in PyTorch, so every backend draws the same numbers.
A dropout keeps an element when its top 24 bits are >= ``dropout_threshold(p)``; a uniform in
(0, 1) is (top 24 bits + 0.5) / 2^24.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """lowbias32 integer hash of uint32 values."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def stream_key(SEED, stream):
    """The key of one stream (an attention (batch, head), or 0 for a plain tensor) from the int64 seed."""
    seed = tl.load(SEED).to(tl.uint32)
    return mix32(mix32(seed) ^ stream.to(tl.uint32))


@triton.jit
def row_bits(key, rows, cols):
    """(len(rows), len(cols)) uint32 bits of elements (row, col) of one stream."""
    row_key = mix32(key ^ rows.to(tl.uint32))
    return mix32(row_key[:, None] ^ cols.to(tl.uint32)[None, :])


@triton.jit
def keep(key, rows, cols, threshold):
    """(len(rows), len(cols)) bool: dropout keeps element (row, col)."""
    return (row_bits(key, rows, cols) >> 8) >= threshold


@triton.jit
def keep_t(key, rows, cols, threshold):
    """(len(cols), len(rows)) bool: the transpose of ``keep``."""
    row_key = mix32(key ^ rows.to(tl.uint32))
    bits = mix32(row_key[None, :] ^ cols.to(tl.uint32)[:, None])
    return (bits >> 8) >= threshold


@triton.jit
def uniform(key, rows, cols):
    """(len(rows), len(cols)) float32 uniforms in [2^-24, 1 - 2^-24]: never 0 or 1."""
    return ((row_bits(key, rows, cols) >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


def dropout_threshold(dropout_p: float) -> int:
    """Keep when the 24 hash bits are >= this: P(keep) = 1 - dropout_p (to 2^-24)."""
    return min(round(dropout_p * (1 << 24)), 1 << 24)


def dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, 1 / (1 - p)) for a kernel's dropout; the scale is 0 when everything drops."""
    return dropout_threshold(dropout_p), (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))
