"""The masking spec (bertfast/data/masking.py's docstring) as a plain per-token Python loop over
ints: no torch, no numpy, no vectorisation, nothing shared with the implementations under test
(the hash is written out again here). Slow; for small batches and the statistics tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SELECT, ACTION, RANDOM_TOKEN, ORDER, NGRAM = 0, 1, 2, 3, 4
M32 = 0xFFFFFFFF
ONE = 1 << 24


def mix32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def bits(seed: int, row_key: int, j: int, purpose: int) -> int:
    key = mix32(mix32(seed & M32) ^ row_key)
    return mix32(mix32(key ^ j) ^ purpose)


def threshold(p: float) -> int:
    return min(round(p * ONE), ONE)


def cdf(max_ngram: int) -> list[int]:
    total = sum(1.0 / m for m in range(1, max_ngram + 1))
    out = [round(ONE * sum(1.0 / m for m in range(1, i + 2)) / total) for i in range(max_ngram)]
    out[-1] = ONE
    return out


@dataclass
class RowRecord:
    """What the n-gram mode did in one row (for the statistics tests)."""

    budget: int = 0
    covered: int = 0
    drawn: list[int] = field(default_factory=list)  # n drawn at each visited unit, before truncation
    spans: list[int] = field(default_factory=list)  # units per chosen span


def reference_mask_tokens(input_ids, row_keys, seed, *, vocab_size, mask_token_id, special_token_ids,
                          probability=0.15, mask_fraction=0.8, random_fraction=0.1, word_ids=None, max_ngram=1):
    """input_ids: list of rows (lists of ints); row_keys: list of ints; word_ids: list of rows or None.
    Returns (masked rows, label rows, [RowRecord per row])."""
    special = set(special_token_ids)
    t_select = threshold(probability)
    t_mask = threshold(mask_fraction)
    t_random = threshold(mask_fraction + random_fraction)
    masked, labels, records = [], [], []
    for r, row in enumerate(input_ids):
        key = row_keys[r]
        words = None if word_ids is None else word_ids[r]
        maskable = [row[j] not in special and (words is None or words[j] >= 0) for j in range(len(row))]
        units = []  # lists of columns
        for j in range(len(row)):
            if not maskable[j]:
                continue
            if units and words is not None and j > 0 and maskable[j - 1] and words[j] == words[j - 1]:
                units[-1].append(j)
            else:
                units.append([j])
        chosen_units = [False] * len(units)
        record = RowRecord()
        if max_ngram == 1:
            for k, unit in enumerate(units):
                if (bits(seed, key, unit[0], SELECT) >> 8) < t_select:
                    chosen_units[k] = True
        else:
            n_maskable = sum(maskable)
            if n_maskable:
                record.budget = max(1, int(probability * n_maskable + 0.5))
                c = cdf(max_ngram)
                order = sorted(range(len(units)), key=lambda k: (bits(seed, key, units[k][0], ORDER), units[k][0]))
                for k in order:
                    if record.covered >= record.budget:
                        break
                    u = bits(seed, key, units[k][0], NGRAM) >> 8
                    n = 1
                    while not u < c[n - 1]:
                        n += 1
                    record.drawn.append(n)
                    n = min(n, len(units) - k)
                    span = sum(len(units[m]) for m in range(k, k + n))
                    if any(chosen_units[m] for m in range(k, k + n)) or record.covered + span > record.budget:
                        continue
                    for m in range(k, k + n):
                        chosen_units[m] = True
                    record.covered += span
                    record.spans.append(n)
        out = list(row)
        lab = [-100] * len(row)
        for k, unit in enumerate(units):
            if not chosen_units[k]:
                continue
            for j in unit:
                lab[j] = row[j]
                a = bits(seed, key, j, ACTION) >> 8
                if a < t_mask:
                    out[j] = mask_token_id
                elif a < t_random:
                    out[j] = (bits(seed, key, j, RANDOM_TOKEN) * vocab_size) >> 32
        masked.append(out)
        labels.append(lab)
        records.append(record)
    return masked, labels, records
