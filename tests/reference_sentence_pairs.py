"""A plain, slow reading of the sentence-pair spec (bertfast/data/sentence_pairs.py docstring):
lists of token lists, one draw at a time, one removed token per truncation step. Shares no code with
the library, so the library's fast paths (token offsets, vectorized truncation, C++) are checked
against the spec itself.
"""

from __future__ import annotations

M32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


class Stream:
    """Document d's draws: key = mix32(mix32(seed) ^ (mix32(epoch) ^ d)) (stream_key), and
    bits_k = element_bits(key, k, 0) = mix32(mix32(key ^ k) ^ 0)."""

    def __init__(self, seed: int, epoch: int, document: int):
        self.key = mix32(mix32(seed & M32) ^ (mix32(epoch & M32) ^ document))
        self.k = 0

    def bits(self) -> int:
        b = mix32(mix32(self.key ^ self.k) ^ 0)
        self.k += 1
        return b

    def uniform_below(self, n: int) -> int:
        return (self.bits() * n) >> 32

    def coin(self, p: float) -> bool:
        return (self.bits() >> 8) < min(round(p * 2**24), 2**24)


def take_sentences(sentences: list[list[int]], first: int, need: int) -> tuple[list[int], int]:
    """Sentences from `first`: one, then more while fewer than `need` tokens and some remain.
    Returns (tokens, the index after the last taken)."""
    out = list(sentences[first])
    j = first + 1
    while len(out) < need and j < len(sentences):
        out += sentences[j]
        j += 1
    return out, j


def reference_pairs(docs: list[list[list[int]]], objective: str, max_tokens: int, seed: int, epoch: int = 0,
                    short_seq_prob: float = 0.1) -> list[tuple[list[int], list[int], int, int]]:
    """[(A tokens, B tokens, label, document index)] in document order."""
    budget = max_tokens - 3
    cleaned = [[list(s) for s in doc if len(s) > 0] for doc in docs]  # empty sentences dropped
    pool = [d for d, doc in enumerate(cleaned) if doc]
    out = []
    for d in pool:
        sentences = cleaned[d]
        rng = Stream(seed, epoch, d)
        i = 0
        while i < len(sentences):
            target = budget
            if rng.coin(short_seq_prob):
                target = 2 + rng.uniform_below(budget - 1)
            chunk = []
            start = i
            while i < len(sentences):
                chunk.append(sentences[i])
                i += 1
                if sum(len(s) for s in chunk) >= target:
                    break
            if objective == "sop":
                if len(chunk) == 1:
                    if len(chunk[0]) == 1:
                        continue
                    split = 1 + rng.uniform_below(len(chunk[0]) - 1)
                    a, b = chunk[0][:split], chunk[0][split:]
                else:
                    a_end = 1 + rng.uniform_below(len(chunk) - 1)
                    a = [t for s in chunk[:a_end] for t in s]
                    b = [t for s in chunk[a_end:] for t in s]
                label = 0
                if rng.coin(0.5):
                    a, b, label = b, a, 1
            else:
                a_end = 1 if len(chunk) == 1 else 1 + rng.uniform_below(len(chunk) - 1)
                a = [t for s in chunk[:a_end] for t in s]
                is_random = True if len(chunk) == 1 else rng.coin(0.5)
                if is_random and len(pool) >= 2:
                    r = rng.uniform_below(len(pool) - 1)
                    if r >= pool.index(d):
                        r += 1
                    other = cleaned[pool[r]]
                    first = rng.uniform_below(len(other))
                    b, _ = take_sentences(other, first, target - len(a))
                    i = start + a_end
                    label = 1
                elif is_random and len(chunk) == 1:
                    if i == len(sentences):
                        continue
                    b, i = take_sentences(sentences, i, target - len(a))
                    label = 0
                else:
                    b = [t for s in chunk[a_end:] for t in s]
                    label = 0
            a, b = list(a), list(b)
            while len(a) + len(b) > budget:
                longer = a if len(a) >= len(b) else b
                if rng.coin(0.5):
                    del longer[0]
                else:
                    longer.pop()
            if a and b:
                out.append((a, b, label, d))
    return out


def reference_rows(pairs, max_tokens: int, cls: int, sep: int, pad: int):
    """Rows as plain lists: (input_ids, token_type_ids, attention_mask, labels, document_index)."""
    ids, types, mask, labels, documents = [], [], [], [], []
    for a, b, label, d in pairs:
        row = [cls] + a + [sep] + b + [sep]
        used = len(row)
        ids.append(row + [pad] * (max_tokens - used))
        types.append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (max_tokens - used))
        mask.append([1] * used + [0] * (max_tokens - used))
        labels.append(label)
        documents.append(d)
    return ids, types, mask, labels, documents
