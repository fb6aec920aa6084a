"""The kernels' counter-based random bits (``bertfast.kernels.rng``) in PyTorch, bit for bit.

    bits(seed, stream, row, col) = mix32(mix32(mix32(mix32(seed) ^ stream) ^ row) ^ col)

The torch backends draw dropout masks and sampling noise from these bits, so a seed gives the same
result on every backend, and a backward regenerates its forward's mask instead of storing it.
Computed on int32 tensors holding the uint32 patterns (about 14x faster on a CPU than int64).
"""

from __future__ import annotations

import numpy as np
import torch

_U32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (csrc/common/rng.h's mix32), for keys computed once per call."""
    x &= _U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def mix32_numpy(x) -> np.ndarray:
    """lowbias32 on a uint32 numpy array (uint32 products wrap modulo 2^32, as C's do)."""
    x = np.asarray(x, dtype=np.uint32)
    shape = x.shape
    x = x.reshape(-1)  # arrays, not numpy scalars: scalar products warn when they wrap
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return (x ^ (x >> np.uint32(16))).reshape(shape)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding uint32 bit patterns: products wrap modulo 2^32 as uint32
    products do (two's complement), and each right shift is made logical by masking the sign bits."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - (1 << 32))  # the uint32 constant as int32
    return x ^ ((x >> 16) & 0xFFFF)


def dropout_threshold(dropout_p: float) -> int:
    """Keep when the 24 hash bits are >= this: P(keep) = 1 - dropout_p (to 2^-24)."""
    return min(round(dropout_p * (1 << 24)), 1 << 24)


def dropout_scale(dropout_p: float) -> float:
    """1 / (1 - p) for the kept elements; 0 when everything drops."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def seed_tensor(op: str, seed, device: torch.device) -> torch.Tensor:
    """The seed as an int64 tensor (1,) on ``device``. None draws one from torch's generator, so
    ``torch.manual_seed`` makes runs repeatable (and tracing under torch.compile works)."""
    if seed is None:
        return torch.randint(0, 2**31, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"{op}: `seed` tensor must hold one int64, got shape {tuple(seed.shape)} {seed.dtype}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: `seed` must be an int or an int64 tensor, got {type(seed).__name__}")
    return torch.tensor([seed % 2**31], dtype=torch.int64, device=device)


def stream_keys(seed: torch.Tensor, streams: int) -> torch.Tensor:
    """(streams,) int32 keys mix32(mix32(seed) ^ s)."""
    seed32 = seed.reshape(()).to(torch.int64) & 0xFFFFFFFF
    seed32 = torch.where(seed32 >= 2**31, seed32 - 2**32, seed32).to(torch.int32)  # same bits, as int32
    return mix32(mix32(seed32) ^ torch.arange(streams, device=seed.device, dtype=torch.int32))


def bits(seed: torch.Tensor, streams: int, rows: int, cols: int) -> torch.Tensor:
    """(streams, rows, cols) int32 random bits of the kernels."""
    device = seed.device
    i = torch.arange(rows, device=device, dtype=torch.int32)
    j = torch.arange(cols, device=device, dtype=torch.int32)
    row_key = mix32(stream_keys(seed, streams)[:, None] ^ i[None, :])  # (streams, rows)
    return mix32(row_key[:, :, None] ^ j[None, None, :])


def keep_mask(seed: torch.Tensor, streams: int, rows: int, cols: int, dropout_p: float) -> torch.Tensor:
    """(streams, rows, cols) bool: the elements a kernel's dropout keeps."""
    return ((bits(seed, streams, rows, cols) >> 8) & 0xFFFFFF) >= dropout_threshold(dropout_p)


def uniforms(seed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) float32 uniforms of stream 0: (top 23 bits + 0.5) / 2^23, exact in float32, in
    [2^-24, 1 - 2^-24]: never 0 or 1 (with 24 bits the largest would round to 1.0)."""
    return uniforms_of_bits(bits(seed, 1, rows, cols)[0])


def uniforms_of_bits(b: torch.Tensor) -> torch.Tensor:
    """float32 uniforms from int32 random bits: (top 23 bits + 0.5) / 2^23."""
    top = (b >> 9) & 0x7FFFFF
    return (top.to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def dropout(x: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Dropout of a (..., N) tensor viewed as (rows, N), stream 0: the mask the kernels draw."""
    if dropout_p == 0.0:
        return x
    n = x.shape[-1]
    keep = keep_mask(seed, 1, x.numel() // n, n, dropout_p).view(x.shape)
    scale = dropout_scale(dropout_p)
    return x * keep.to(x.dtype) * scale
