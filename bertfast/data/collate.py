"""Padding a batch of token sequences into one (B, L) tensor: ``_C.pad_lists`` reads Python lists
without building an int object array per token; the Python path copies row by row. Both give the
same tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bertfast.ops import compiled


def padded_length(lengths: Sequence[int], max_length: int | None, multiple_of: int | None) -> int:
    """The batch's row length: ``max_length`` when given (every sequence must fit), else the
    longest sequence rounded up to ``multiple_of``."""
    longest = max(lengths, default=0)
    if max_length is not None:
        if longest > max_length:
            i = max(range(len(lengths)), key=lambda k: lengths[k])
            raise ValueError(f"examples[{i}]: {longest} tokens do not fit max_length {max_length}")
        return max_length
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    return longest


def pad_sequences(sequences: Sequence, *, pad_value: int, max_length: int | None = None,
                  multiple_of: int | None = None, dtype: torch.dtype = torch.int64, none_as: int | None = None,
                  native: bool | None = None, what: str = "examples") -> tuple[torch.Tensor, torch.Tensor]:
    """(padded (B, L) tensor, lengths (B,) int64) of a list of 1-D sequences.

    Each sequence is a list/tuple of ints, a 1-D integer numpy array or a 1-D integer tensor. With
    ``none_as``, None entries (the word id of a special token) become that value.
    """
    if dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: dtype must be torch.int64 or torch.int32, got {dtype}")
    lengths = [len(s) for s in sequences]
    L = padded_length(lengths, max_length, multiple_of)
    np_dtype = np.int64 if dtype == torch.int64 else np.int32
    out = np.full((len(sequences), L), pad_value, dtype=np_dtype)
    native_module = _native(native)
    if native_module is not None and all(isinstance(s, (list, tuple)) for s in sequences):
        native_module.pad_lists(list(sequences), out, none_as=none_as)
    else:
        for i, s in enumerate(sequences):
            out[i, : lengths[i]] = _row(s, i, none_as, what)
    return torch.from_numpy(out), torch.tensor(lengths, dtype=torch.int64)


def _row(sequence, i: int, none_as: int | None, what: str) -> np.ndarray:
    if isinstance(sequence, torch.Tensor):
        sequence = sequence.numpy(force=True)
    if isinstance(sequence, np.ndarray):
        if sequence.ndim != 1 or sequence.dtype.kind not in "iu":
            raise TypeError(f"{what}[{i}]: expected a 1-D integer sequence, got {sequence.dtype} of shape {sequence.shape}")
        row = sequence.astype(np.int64)
    else:
        given = [v for v in sequence if v is not None] if none_as is not None else sequence
        try:
            row = np.asarray(given, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"{what}[{i}]: expected a list of token ids ({e})") from None
        _check_range(row, i, what)
        if none_as is not None:
            row = np.asarray([none_as if v is None else v for v in sequence], dtype=np.int64)
        return row
    _check_range(row, i, what)
    return row


def _check_range(row: np.ndarray, i: int, what: str) -> None:
    if row.size and (row.min() < 0 or row.max() > np.iinfo(np.int32).max):
        bad = int(row.min() if row.min() < 0 else row.max())
        raise ValueError(f"{what}[{i}]: token id {bad} is out of range")


def _native(native: bool | None):
    """``_C`` when it should be used: None = when built, True = required, False = never."""
    if native is False:
        return None
    module, why = compiled.load("_C")
    if module is None and native:
        raise RuntimeError(f"native=True but the C++ data pipeline is unavailable: {why}")
    return module
