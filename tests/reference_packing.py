"""Plain-Python statement of the packing spec (bertfast/data/packing.py), written for clarity, not
speed: lists in, lists out, a linear scan for the best-fitting row. The tests hold the C++ kernel
and the Python fallback to it exactly."""

from __future__ import annotations


def pack_reference(tokens: list[int], offsets: list[int], row_length: int, pad_token_id: int,
                   position_start: int = 0, pad_position: int | None = None, sort_by_length: bool = True) -> dict:
    """Same keys as ``pack_sequences``; every value is a list (rows as lists of lists) or an int."""
    L = row_length
    if pad_position is None:
        pad_position = position_start - 1 if position_start > 0 else 0

    # 1. Pieces (sequence, start, length) in input order; empty sequences give none.
    pieces = []
    for s in range(len(offsets) - 1):
        n = offsets[s + 1] - offsets[s]
        for start in range(0, n, L):
            pieces.append((s, start, min(L, n - start)))

    # 2. Placement order: length descending, ties by (sequence, piece index) ascending.
    if sort_by_length:
        pieces = sorted(pieces, key=lambda p: (-p[2], p[0], p[1]))

    # 3. Best fit: scan every row; keep the smallest free space that fits (strict <, so the lowest
    #    row wins a tie); open a new row when none fits.
    rows: list[list[tuple[int, int, int]]] = []  # pieces of each row, in placement order
    free: list[int] = []
    for piece in pieces:
        best = None
        for r in range(len(rows)):
            if free[r] >= piece[2] and (best is None or free[r] < free[best]):
                best = r
        if best is None:
            rows.append([])
            free.append(L)
            best = len(rows) - 1
        rows[best].append(piece)
        free[best] -= piece[2]

    # 4. Lay out each row: its pieces left to right, then padding.
    out = {k: [] for k in ("input_ids", "position_ids", "segment_ids", "attention_mask", "piece_sequence",
                           "piece_start")}
    cu_seqlens = [0]
    for row in rows:
        ids, pos, seg, mask = [], [], [], []
        for k, (s, start, n) in enumerate(row, start=1):
            ids += tokens[offsets[s] + start: offsets[s] + start + n]
            pos += [position_start + j for j in range(n)]
            seg += [k] * n
            mask += [1] * n
            cu_seqlens.append(cu_seqlens[-1] + n)
            out["piece_sequence"].append(s)
            out["piece_start"].append(start)
        pad = L - len(ids)
        out["input_ids"].append(ids + [pad_token_id] * pad)
        out["position_ids"].append(pos + [pad_position] * pad)
        out["segment_ids"].append(seg + [0] * pad)
        out["attention_mask"].append(mask + [0] * pad)
    out["cu_seqlens"] = cu_seqlens
    out["max_seqlen"] = max((p[2] for p in pieces), default=0)
    return out
