"""Sequence packing for varlen attention: variable-length token sequences into fixed-length rows.

Each row holds several documents side by side, so almost no compute is spent on padding; attention
must then stay inside each document (``segment_ids`` / ``cu_seqlens`` say where they are).

The algorithm, best-fit decreasing (BFD):

1. Sequence s is ``tokens[offsets[s]:offsets[s+1]]``. A sequence longer than L = ``row_length`` is
   cut into pieces of L tokens (the last one shorter); empty sequences are dropped.
2. With ``sort_by_length=True`` the pieces are placed by length descending, ties by
   (sequence index, piece index) ascending; otherwise in that input order.
3. Each piece goes whole into the open row whose free space is the smallest that still holds it
   (ties: the lowest row index); when none has room, a new row is opened (rows are numbered in the
   order they were opened).
4. A row lays its pieces out in placement order from column 0; padding fills the rest.

Two implementations give identical outputs: ``bertfast._C.pack_sequences`` (C++: O(P log R)
placement with a balanced tree of (free, row), rows filled in parallel) and a Python fallback
(``bisect`` on a sorted list, rows assembled with vectorized torch indexing).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Iterable, Sequence

import numpy as np
import torch

from bertfast.ops import compiled

_OP = "pack_sequences"
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1


def flatten(sequences: Iterable[Sequence[int]], dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """``[[a, b], [], [c]]`` -> ``tokens`` (N,) of ``dtype`` and ``offsets`` (S+1,) int64, the input of
    :func:`pack_sequences`: sequence s is ``tokens[offsets[s]:offsets[s+1]]``."""
    if dtype not in (torch.int32, torch.int64):
        raise TypeError(f"flatten: `dtype` must be torch.int32 or torch.int64, got {dtype}")
    if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Iterable):
        raise TypeError(f"flatten: `sequences` must be a list of lists of ints, got {type(sequences).__name__}")
    sequences = [list(s) for s in sequences]
    lengths = [len(s) for s in sequences]
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    if sequences:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    tokens = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=dtype)
    return tokens, offsets


def efficiency(packed: dict) -> float:
    """Packing efficiency: real tokens / (R * L), the share of the rows' compute spent on real tokens
    (1.0 for an empty packing, R = 0: nothing is spent on padding).

    Measured (tests/test_packing.py::test_efficiency_long_tailed): 4000 documents with lognormal
    lengths (median 120 tokens, sigma 1.0, mean ~ 172, capped at L = 512) pack at 99.97% with
    best-fit decreasing (1343 rows: ceil(tokens / L), the optimum), 99.2% with best fit in input
    order, against 33.6% for one document per row padded to 512. Longer documents pack less
    tightly (median 300, sigma 0.7: 99.2%).
    """
    mask = packed["attention_mask"]
    return 1.0 if mask.numel() == 0 else mask.sum().item() / mask.numel()


def pack_sequences(tokens: torch.Tensor, offsets: torch.Tensor, *, row_length: int, pad_token_id: int,
                   position_start: int = 0, pad_position: int | None = None, sort_by_length: bool = True,
                   num_threads: int = 0, native: bool | None = None) -> dict:
    """Pack the sequences ``tokens[offsets[s]:offsets[s+1]]`` into rows of ``row_length`` tokens by best-fit
    decreasing (module docstring). Use :func:`flatten` to build ``tokens``/``offsets`` from lists.

    Args:
        tokens: (N,) int32 or int64 CPU tensor, ids >= 0, the sequences concatenated (N < 2**31).
        offsets: (S+1,) int64 CPU tensor, ``offsets[0] = 0``, non-decreasing, ``offsets[S] = N``.
        row_length: L >= 1, the length of each packed row.
        pad_token_id: >= 0, the id written on padding.
        position_start: >= 0, the position of each piece's first token (BERT 0; RoBERTa passes
            padding_idx + 1).
        pad_position: the position id written on padding. Default: ``position_start - 1`` when
            ``position_start > 0`` (RoBERTa's padding_idx, where Hugging Face puts padding), else 0
            (BERT's convention; the value is masked out anyway).
        sort_by_length: best-fit *decreasing* (True) or best fit in input order (False).
        num_threads: threads filling the rows in C++ (0: all cores); the output does not depend on it.
        native: None: ``bertfast._C`` when built, else Python; True: require ``bertfast._C``;
            False: the Python path.

    Returns a dict of CPU tensors, with R rows and P pieces:
        input_ids (R, L) dtype of ``tokens``: the pieces, then ``pad_token_id``.
        position_ids (R, L) int64: ``position_start + j`` at token j of each piece, ``pad_position`` on padding.
        segment_ids (R, L) int32: 1..k for the k pieces of a row in layout order, 0 on padding; the
            block-diagonal mask is ``(seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)``.
        attention_mask (R, L) int64: 1 on real tokens, 0 on padding (real tokens of a row are
            contiguous from column 0).
        cu_seqlens (P+1,) int32: piece p is ``input_ids[attention_mask.bool()][cu_seqlens[p]:cu_seqlens[p+1]]``
            (pieces row by row, each row in layout order): what varlen attention takes after unpadding.
        max_seqlen (int): the longest piece (0 when P = 0).
        piece_sequence (P,) int64: the input sequence each piece came from, in cu_seqlens order.
        piece_start (P,) int64: the offset of each piece inside its sequence.
    """
    tokens, offsets = _check(tokens, offsets, row_length, pad_token_id, position_start, pad_position,
                             sort_by_length, num_threads, native)
    if pad_position is None:
        pad_position = position_start - 1 if position_start > 0 else 0
    module = None
    if native is not False:
        module, reason = compiled.load("_C")
        if module is None and native:
            raise RuntimeError(f"{_OP}(native=True) needs bertfast._C: {reason}")
    if module is not None:
        out = module.pack_sequences(tokens.numpy(), offsets.numpy(), int(row_length), int(pad_token_id),
                                    int(position_start), int(pad_position), bool(sort_by_length), int(num_threads))
        return {k: (v if k == "max_seqlen" else torch.from_numpy(v)) for k, v in out.items()}
    return _pack_python(tokens, offsets, int(row_length), int(pad_token_id), int(position_start), int(pad_position),
                        bool(sort_by_length))


def _integer(name: str, value, low: int, high: int = _INT64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_OP}: `{name}` must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{_OP}: `{name}` must be in [{low}, {high}], got {value}")


def _tensor(name: str, t, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: `{name}` must be a torch.Tensor, got {type(t).__name__} "
                        f"(build tokens/offsets from lists with bertfast.data.packing.flatten)")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{_OP}: `{name}` must be {names}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{_OP}: `{name}` must be 1-D, got shape {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{_OP}: `{name}` must be on the CPU (packing is data-pipeline work), got {t.device}")
    return t.contiguous()


def _check(tokens, offsets, row_length, pad_token_id, position_start, pad_position, sort_by_length, num_threads,
           native) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = _tensor("tokens", tokens, (torch.int32, torch.int64))
    offsets = _tensor("offsets", offsets, (torch.int64,))
    _integer("row_length", row_length, 1)
    dtype_max = _INT32_MAX if tokens.dtype == torch.int32 else _INT64_MAX
    _integer("pad_token_id", pad_token_id, 0, dtype_max)
    _integer("position_start", position_start, 0, _INT64_MAX - row_length)
    if pad_position is not None:
        _integer("pad_position", pad_position, 0)
    _integer("num_threads", num_threads, 0, _INT32_MAX)
    if not isinstance(sort_by_length, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `sort_by_length` must be a bool, got {type(sort_by_length).__name__}")
    if native not in (None, True, False):
        raise ValueError(f"{_OP}: `native` must be None, True or False, got {native!r}")
    n = tokens.numel()
    if n > _INT32_MAX:
        raise ValueError(f"{_OP}: `tokens` holds {n} tokens; cu_seqlens is int32, so at most 2**31 - 1")
    if n and tokens.min().item() < 0:
        raise ValueError(f"{_OP}: `tokens` must hold ids >= 0, found {tokens.min().item()}")
    if offsets.numel() < 1:
        raise ValueError(f"{_OP}: `offsets` must hold S + 1 >= 1 elements, got none")
    if offsets[0].item() != 0:
        raise ValueError(f"{_OP}: `offsets` must start at 0, got {offsets[0].item()}")
    if offsets.numel() > 1 and (offsets[1:] < offsets[:-1]).any():
        bad = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0]) + 1
        raise ValueError(f"{_OP}: `offsets` must be non-decreasing; offsets[{bad}] < offsets[{bad - 1}]")
    if offsets[-1].item() != n:
        raise ValueError(f"{_OP}: `offsets` must end at len(tokens) = {n}, got {offsets[-1].item()}")
    return tokens, offsets


def _pack_python(tokens: torch.Tensor, offsets: torch.Tensor, L: int, pad_token_id: int, position_start: int,
                 pad_position: int, sort_by_length: bool) -> dict:
    """The fallback: the same placement as the C++ kernel (a Python loop), rows assembled by torch indexing."""
    # Pieces in input order, by (sequence, piece index).
    lengths = offsets[1:] - offsets[:-1]  # (S,)
    count = (lengths + L - 1) // L  # (S,) pieces per sequence; 0 for an empty one
    P = int(count.sum())
    sequence = torch.repeat_interleave(torch.arange(lengths.numel()), count)  # (P,)
    first = torch.cumsum(count, 0) - count  # (S,) index of each sequence's first piece
    start = (torch.arange(P) - first[sequence]) * L  # (P,)
    length = (lengths[sequence] - start).clamp(max=L)  # (P,)

    # Placement order; stable, so ties keep input order.
    order = torch.argsort(-length, stable=True) if sort_by_length else torch.arange(P)
    # Best fit: `open` is sorted (free, row); the first entry >= (length, -1) has the least free
    # space that fits, ties to the lowest row. Rows without free space leave the list.
    open_rows: list[tuple[int, int]] = []
    row = [0] * P
    column = [0] * P
    rows = 0
    for i, n in zip(order.tolist(), length[order].tolist()):
        at = bisect.bisect_left(open_rows, (n, -1))
        if at == len(open_rows):
            r, free = rows, L
            rows += 1
        else:
            free, r = open_rows.pop(at)
        row[i], column[i] = r, L - free
        if free > n:
            bisect.insort(open_rows, (free - n, r))

    # Output order: row by row, each row left to right (= placement order within the row).
    row_t, column_t = torch.tensor(row, dtype=torch.int64), torch.tensor(column, dtype=torch.int64)
    out_order = torch.argsort(row_t * L + column_t)
    row_t, column_t = row_t[out_order], column_t[out_order]
    sequence, start, length = sequence[out_order], start[out_order], length[out_order]
    row_first = torch.cumsum(torch.bincount(row_t, minlength=rows), 0) - torch.bincount(row_t, minlength=rows)
    segment = (torch.arange(P) - row_first[row_t] + 1).to(torch.int32)  # (P,) 1..k within each row

    cu_seqlens = torch.zeros(P + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(length, 0)  # N < 2**31 (checked), so int32 holds every prefix
    # The real tokens of a row fill its first columns, and pieces are in output order: the (R, L)
    # cells under `real`, read row-major, are the pieces' tokens concatenated.
    fill = torch.zeros(rows, dtype=torch.int64).index_add_(0, row_t, length)  # (R,) real tokens per row
    real = torch.arange(L)[None, :] < fill[:, None]  # (R, L)
    first = cu_seqlens[:-1].to(torch.int64)  # (P,) each piece's first token among the real ones
    n = int(fill.sum())
    j = torch.arange(n) - torch.repeat_interleave(first, length)  # (N,) index inside its piece
    src = torch.arange(n) + torch.repeat_interleave(offsets[sequence] + start - first, length)  # (N,) into tokens

    input_ids = torch.full((rows, L), pad_token_id, dtype=tokens.dtype)
    input_ids[real] = tokens[src]
    position_ids = torch.full((rows, L), pad_position, dtype=torch.int64)
    position_ids[real] = position_start + j
    segment_ids = torch.zeros((rows, L), dtype=torch.int32)
    segment_ids[real] = torch.repeat_interleave(segment, length)
    attention_mask = real.to(torch.int64)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "attention_mask": attention_mask,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(length.max()) if P else 0,
        "piece_sequence": sequence,
        "piece_start": start,
    }
