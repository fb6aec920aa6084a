"""Sentence pairs for next-sentence prediction (NSP, BERT) and sentence-order prediction (SOP,
ALBERT), built as BERT's and ALBERT's ``create_pretraining_data`` build them.

Every row is ``[CLS] A [SEP] B [SEP]`` followed by padding, at most ``max_tokens`` long. The
C++ kernel (``bertfast._C.build_sentence_pairs``) and the Python path here implement ONE spec and
give identical rows for a seed, on any thread count.

The spec
--------
Documents hold sentences; sentences hold token ids. Empty sentences are dropped before anything
else: "the sentences of a document" below means its non-empty sentences, in order, and a document
with none is empty (it gives no rows and is never picked as a random document). ``pool`` is the
list of non-empty documents in order; ``D = len(pool)``.

Random draws: document ``d`` (its index among ALL documents) has its own stream,
``key_d = stream_key(seed32, mix32(epoch32) ^ d)``, with ``seed32 = seed mod 2^32`` and
``epoch32 = epoch mod 2^32`` (csrc/common/rng.h). Its k-th draw is
``bits_k = element_bits(key_d, k, 0) = mix32(mix32(key_d ^ k))``, k = 0, 1, 2, ... in the order the
steps below make them. Each draw takes the next k:

    uniform_below(n) = floor(bits_k * n / 2^32)                  in [0, n)
    coin(threshold)  = (bits_k >> 8) < threshold                  threshold = round(p * 2^24)

``coin(p)`` below means ``coin(round(p * 2^24))`` (Python's ``round``; 0.5 gives 2^23).
``budget = max_tokens - 3`` (>= 2). Per document, with ``n`` sentences and walk position ``i = 0``:

1. Chunk. While ``i < n``: draw the chunk's target: ``target = budget``; if ``coin(short_seq_prob)``
   (always drawn): ``target = 2 + uniform_below(budget - 1)`` (in [2, budget]). Then append
   sentences ``i, i+1, ...`` to the chunk (advancing ``i``) until its token count is ``>= target`` or
   the document ends. ``m`` = the chunk's sentence count (>= 1).
2. NSP (label 0 = B continues A, 1 = B is random; transformers' ``next_sentence_label``):

   a. ``a_end = 1`` if ``m == 1`` else ``1 + uniform_below(m - 1)``; A = chunk sentences ``[:a_end]``.
   b. ``random = True`` if ``m == 1`` (no draw) else ``coin(0.5)``.
   c. If random and ``D >= 2``: ``r = uniform_below(D - 1)``; ``r += (r >= pos)`` (``pos`` = this
      document's index in ``pool``); ``start = uniform_below(#sentences of pool[r])``. B = that
      document's sentences from ``start``: take one, then more while B has fewer than
      ``target - len(A)`` tokens and sentences remain. The chunk's unused sentences go back:
      ``i = chunk start + a_end``. Label 1.
   d. If random, ``D == 1`` and ``m == 1`` (no other document): B = this document's actual
      continuation, sentences ``i, i+1, ...`` taken by the same rule as in (c), and consumed (the
      walk resumes after them); if ``i == n`` (nothing follows) skip the chunk. Label 0.
   e. Otherwise (not random, or ``D == 1`` with ``m >= 2``): B = chunk sentences ``[a_end:]``, label 0.
3. SOP (label 0 = original order, 1 = swapped; transformers' ``sentence_order_label``):

   a. If ``m == 1``: with ``L`` the sentence's token count, skip the chunk if ``L == 1``, else
      ``split = 1 + uniform_below(L - 1)``: A = its tokens ``[:split]``, B = ``[split:]``.
      If ``m >= 2``: ``a_end = 1 + uniform_below(m - 1)``; A = chunk ``[:a_end]``, B = chunk ``[a_end:]``.
   b. ``coin(0.5)``: swap A and B, label 1; else label 0.
4. Truncate (both objectives): while ``len(A) + len(B) > budget``: trim the longer (A on ties):
   ``coin(0.5)`` removes its first token, else its last. Skip the pair if A or B is empty (cannot
   happen once both start non-empty, kept as a guard).
5. Emit the row; continue at 1 with the walk position ``i``.

A and B are always contiguous runs of the token buffer, so a pair is four offsets
``(a0, a1, b0, b1)``; both backends compute those, then write the rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from bertfast.ops import compiled
from bertfast.ops.rng import mix32_int, mix32_numpy

_M32 = 0xFFFFFFFF
_HALF = 1 << 23  # coin(0.5)
_OBJECTIVES = ("nsp", "sop")
_TOKEN_DTYPES = (torch.int32, torch.int64)


def _as_cpu_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Documents: `{name}` must be a torch tensor or numpy array, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise ValueError(f"Documents: `{name}` must be on the CPU, got {value.device}")
    if value.dim() != 1:
        raise ValueError(f"Documents: `{name}` must be 1-D, got shape {tuple(value.shape)}")
    return value.contiguous()


def _check_offsets(offsets: torch.Tensor, name: str, end: int, end_name: str) -> None:
    if offsets.dtype != torch.int64:
        raise TypeError(f"Documents: `{name}` must be int64, got {offsets.dtype}")
    if offsets.numel() == 0:
        raise ValueError(f"Documents: `{name}` must hold at least one offset (0), got none")
    if offsets[0].item() != 0:
        raise ValueError(f"Documents: `{name}` must start at 0, got {offsets[0].item()}")
    if offsets[-1].item() != end:
        raise ValueError(f"Documents: `{name}` must end at {end} ({end_name}), got {offsets[-1].item()}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        at = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise ValueError(f"Documents: `{name}` must be non-decreasing, but [{at}] = {offsets[at].item()} > "
                         f"[{at + 1}] = {offsets[at + 1].item()}")


@dataclasses.dataclass(frozen=True)
class Documents:
    """A corpus as flat buffers (S sentences, D documents, N tokens).

    tokens            (N,)   int32 or int64 token ids >= 0, every sentence's concatenated
    sentence_offsets  (S+1,) int64: sentence s = tokens[sentence_offsets[s]:sentence_offsets[s+1]]
    document_offsets  (D+1,) int64 over sentences: document d = sentences
                      document_offsets[d] .. document_offsets[d+1] - 1

    Empty sentences and documents are allowed (they give nothing). Numpy arrays are taken as
    tensors; non-contiguous ones are copied.
    """

    tokens: torch.Tensor
    sentence_offsets: torch.Tensor
    document_offsets: torch.Tensor

    def __post_init__(self):
        tokens = _as_cpu_tensor(self.tokens, "tokens")
        sentence_offsets = _as_cpu_tensor(self.sentence_offsets, "sentence_offsets")
        document_offsets = _as_cpu_tensor(self.document_offsets, "document_offsets")
        if tokens.dtype not in _TOKEN_DTYPES:
            raise TypeError(f"Documents: `tokens` must be int32 or int64, got {tokens.dtype}")
        if tokens.numel() and tokens.min().item() < 0:
            raise ValueError(f"Documents: `tokens` must be non-negative ids, got {tokens.min().item()}")
        _check_offsets(sentence_offsets, "sentence_offsets", tokens.numel(), "len(tokens)")
        _check_offsets(document_offsets, "document_offsets", sentence_offsets.numel() - 1, "the sentence count")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "sentence_offsets", sentence_offsets)
        object.__setattr__(self, "document_offsets", document_offsets)

    @classmethod
    def from_lists(cls, docs: Sequence[Sequence[Sequence[int]]], dtype: torch.dtype = torch.int64) -> "Documents":
        """From ``docs[d][s]`` = the token ids of sentence s of document d."""
        sentence_lengths = [len(s) for doc in docs for s in doc]
        flat = [t for doc in docs for s in doc for t in s]
        if dtype not in _TOKEN_DTYPES:
            raise TypeError(f"Documents.from_lists: `dtype` must be torch.int32 or torch.int64, got {dtype}")
        tokens = torch.tensor(flat, dtype=torch.int64)
        if tokens.numel() and tokens.max().item() > torch.iinfo(dtype).max:
            raise ValueError(f"Documents.from_lists: token id {tokens.max().item()} does not fit {dtype}")
        return cls(tokens.to(dtype),
                   torch.tensor([0] + sentence_lengths, dtype=torch.int64).cumsum(0),
                   torch.tensor([0] + [len(doc) for doc in docs], dtype=torch.int64).cumsum(0))

    @property
    def num_documents(self) -> int:
        return self.document_offsets.numel() - 1

    @property
    def num_sentences(self) -> int:
        return self.sentence_offsets.numel() - 1


# ----------------------------------------------------------------------------------------------
# The random draws (plain Python ints: bit for bit csrc/common/rng.h)

def document_key(seed: int, epoch: int, document: int) -> int:
    """key_d = stream_key(seed32, mix32(epoch32) ^ d) = mix32(mix32(seed32) ^ mix32(epoch32) ^ d)."""
    return mix32_int(mix32_int(seed & _M32) ^ mix32_int(epoch & _M32) ^ (document & _M32))


class _Draws:
    """The draws of one document's stream, counting k up from 0."""

    __slots__ = ("key", "k")

    def __init__(self, key: int):
        self.key, self.k = key, 0

    def bits(self) -> int:
        b = mix32_int(mix32_int(self.key ^ (self.k & _M32)))
        self.k += 1
        return b

    def below(self, n: int) -> int:
        return (self.bits() * n) >> 32

    def coin(self, threshold: int) -> bool:
        return (self.bits() >> 8) < threshold

    def truncate(self, a0: int, a1: int, b0: int, b1: int, budget: int) -> tuple[int, int, int, int]:
        """Step 4 without a Python loop per removed token: the side each step trims depends only on
        the lengths (first |la - lb| steps trim the longer, then A, B, A, B, ...), so only the
        front/back coins need drawing, all at once."""
        la, lb = a1 - a0, b1 - b0
        excess = la + lb - budget
        if excess <= 0:
            return a0, a1, b0, b1
        step = np.arange(excess, dtype=np.int64)
        gap = abs(la - lb)
        trims_a = np.where(step < gap, la >= lb, (step - gap) % 2 == 0)
        k = ((self.k + step) & _M32).astype(np.uint32)
        front = (mix32_numpy(mix32_numpy(np.uint32(self.key) ^ k)) >> np.uint32(8)) < _HALF
        self.k += excess
        a_front = int(np.count_nonzero(trims_a & front))
        a_back = int(np.count_nonzero(trims_a & ~front))
        b_front = int(np.count_nonzero(~trims_a & front))
        b_back = excess - a_front - a_back - b_front
        return a0 + a_front, a1 - a_back, b0 + b_front, b1 - b_back


def coin_threshold(p: float) -> int:
    """round(p * 2^24): coin(p) is true for the draws whose top 24 bits are below this."""
    return min(round(p * (1 << 24)), 1 << 24)


# ----------------------------------------------------------------------------------------------
# The Python path

def _pairs_python(docs: Documents, sop: bool, max_tokens: int, seed: int, epoch: int,
                  short_threshold: int) -> np.ndarray:
    """(P, 6) int64 rows (a0, a1, b0, b1, label, document) in document order: the spec, one
    document at a time."""
    starts_all = docs.sentence_offsets.numpy()
    lengths = np.diff(starts_all)
    nonempty = np.flatnonzero(lengths > 0)  # sentence ids of the non-empty sentences
    doc_offsets = docs.document_offsets.numpy()
    # Per document: its non-empty sentences are nonempty[ne_off[d]:ne_off[d+1]].
    ne_off = np.searchsorted(nonempty, doc_offsets)
    ne_count = np.diff(ne_off)
    pool = np.flatnonzero(ne_count > 0).tolist()
    pool_pos = {d: j for j, d in enumerate(pool)}
    # Python lists: scalar indexing of lists is much faster than of numpy arrays.
    sent_start = starts_all[nonempty].tolist()
    sent_end = starts_all[nonempty + 1].tolist()
    ne_off = ne_off.tolist()
    budget = max_tokens - 3
    out: list[tuple[int, int, int, int, int, int]] = []

    def take_from(first: int, last: int, need: int) -> int:
        """Sentences first, first+1, ... (global non-empty indices, < last): one, then more while
        fewer than `need` tokens. Returns the index after the last one taken."""
        j = first + 1
        while sent_end[j - 1] - sent_start[first] < need and j < last:
            j += 1
        return j

    for d in pool:
        rng = _Draws(document_key(seed, epoch, d))
        base, n = ne_off[d], ne_off[d + 1] - ne_off[d]
        i = 0
        while i < n:
            target = budget
            if rng.coin(short_threshold):
                target = 2 + rng.below(budget - 1)
            c, length = i, 0
            while i < n:
                length += sent_end[base + i] - sent_start[base + i]
                i += 1
                if length >= target:
                    break
            m = i - c
            if sop:
                if m == 1:
                    if length == 1:
                        continue
                    a0 = sent_start[base + c]
                    a1 = b0 = a0 + 1 + rng.below(length - 1)
                    b1 = sent_end[base + c]
                else:
                    a_end = 1 + rng.below(m - 1)
                    a0, a1 = sent_start[base + c], sent_end[base + c + a_end - 1]
                    b0, b1 = sent_start[base + c + a_end], sent_end[base + i - 1]
                label = 1 if rng.coin(_HALF) else 0
                if label:
                    a0, a1, b0, b1 = b0, b1, a0, a1
            else:
                a_end = 1 if m == 1 else 1 + rng.below(m - 1)
                is_random = m == 1 or rng.coin(_HALF)
                a0, a1 = sent_start[base + c], sent_end[base + c + a_end - 1]
                if is_random and len(pool) >= 2:
                    r = rng.below(len(pool) - 1)
                    r += r >= pool_pos[d]
                    rd = pool[r]
                    first = ne_off[rd] + rng.below(ne_off[rd + 1] - ne_off[rd])
                    stop = take_from(first, ne_off[rd + 1], target - (a1 - a0))
                    b0, b1 = sent_start[first], sent_end[stop - 1]
                    i = c + a_end  # the unused sentences go back
                    label = 1
                elif is_random and m == 1:  # one document only: its actual continuation
                    if i == n:
                        continue
                    stop = take_from(base + i, base + n, target - (a1 - a0))
                    b0, b1 = sent_start[base + i], sent_end[stop - 1]
                    i = stop - base
                    label = 0
                else:
                    b0, b1 = sent_start[base + c + a_end], sent_end[base + i - 1]
                    label = 0
            a0, a1, b0, b1 = rng.truncate(a0, a1, b0, b1, budget)
            if a1 > a0 and b1 > b0:
                out.append((a0, a1, b0, b1, label, d))
    return np.array(out, dtype=np.int64).reshape(-1, 6)


def _rows_python(tokens: np.ndarray, pairs: np.ndarray, max_tokens: int, cls: int, sep: int,
                 pad: int) -> tuple[np.ndarray, ...]:
    """Rows from pairs (P, 6): [CLS] A [SEP] B [SEP] pad..., vectorized over (P, max_tokens)."""
    p = pairs.shape[0]
    a0, a1, b0, b1 = (pairs[:, j:j + 1] for j in range(4))  # each (P, 1)
    la, lb = a1 - a0, b1 - b0
    col = np.arange(max_tokens, dtype=np.int64)[None, :]  # (1, T)
    in_a = (col >= 1) & (col <= la)
    in_b = (col >= la + 2) & (col < la + lb + 2)
    source = np.where(in_a, a0 + col - 1, np.where(in_b, b0 + col - la - 2, 0))  # (P, T) token index
    ids = np.full((p, max_tokens), pad, dtype=tokens.dtype)
    if tokens.size:
        ids = np.where(in_a | in_b, tokens[source], ids).astype(tokens.dtype)
    ids[:, 0] = cls
    ids[np.arange(p), la[:, 0] + 1] = sep
    ids[np.arange(p), la[:, 0] + lb[:, 0] + 2] = sep
    real = col < la + lb + 3
    types = ((col >= la + 2) & real).astype(np.int64)
    return ids, types, real.astype(np.int64), pairs[:, 4].copy(), pairs[:, 5].copy()


# ----------------------------------------------------------------------------------------------
# The public function

def _check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"build_sentence_pairs: `{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"build_sentence_pairs: `{name}` must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"build_sentence_pairs: `{name}` must be <= {high}, got {value}")
    return value


def build_sentence_pairs(documents: Documents, *, objective: str, max_tokens: int, cls_token_id: int,
                         sep_token_id: int, pad_token_id: int, seed: int, epoch: int = 0,
                         short_seq_prob: float = 0.1, num_threads: int = 0,
                         native: bool | None = None) -> dict[str, torch.Tensor]:
    """NSP or SOP sentence pairs of ``documents``, as the module docstring specifies.

    Returns CPU tensors, P rows in document order:
      input_ids       (P, max_tokens) tokens' dtype: [CLS] A [SEP] B [SEP], then pad_token_id
      token_type_ids  (P, max_tokens) int64: 0 on [CLS] A [SEP], 1 on B [SEP], 0 on padding
      attention_mask  (P, max_tokens) int64: 1 on the len(A) + len(B) + 3 real tokens
      labels          (P,) int64: NSP 1 = B is random; SOP 1 = A and B swapped
      document_index  (P,) int64: the document A came from

    ``seed`` (any int, taken mod 2^32) and ``epoch`` (>= 0) pick the draws: a new epoch gives new
    pairs. ``num_threads`` (0: all cores) changes nothing but speed. ``native``: None uses
    ``bertfast._C`` when it is built, True requires it, False runs the Python path.
    """
    if not isinstance(documents, Documents):
        raise TypeError(f"build_sentence_pairs: `documents` must be a Documents, got {type(documents).__name__}")
    if objective not in _OBJECTIVES:
        raise ValueError(f"build_sentence_pairs: `objective` must be 'nsp' or 'sop', got {objective!r}")
    max_tokens = _check_int(max_tokens, "max_tokens")
    if max_tokens < 5:
        raise ValueError(f"build_sentence_pairs: `max_tokens` = {max_tokens} leaves a budget smaller than the "
                         "special tokens: [CLS] A [SEP] B [SEP] needs at least 5 (one token of A and of B)")
    id_max = torch.iinfo(documents.tokens.dtype).max
    cls = _check_int(cls_token_id, "cls_token_id", 0, id_max)
    sep = _check_int(sep_token_id, "sep_token_id", 0, id_max)
    pad = _check_int(pad_token_id, "pad_token_id", 0, id_max)
    seed = _check_int(seed, "seed") & _M32
    epoch = _check_int(epoch, "epoch", 0) & _M32
    num_threads = _check_int(num_threads, "num_threads", 0)
    if isinstance(short_seq_prob, bool) or not isinstance(short_seq_prob, (int, float, np.floating)):
        raise TypeError(f"build_sentence_pairs: `short_seq_prob` must be a float, got {type(short_seq_prob).__name__}")
    if not (math.isfinite(short_seq_prob) and 0.0 <= short_seq_prob <= 1.0):
        raise ValueError(f"build_sentence_pairs: `short_seq_prob` must be in [0, 1], got {short_seq_prob}")
    if native not in (None, True, False):
        raise TypeError(f"build_sentence_pairs: `native` must be None, True or False, got {native!r}")
    if documents.num_documents >= 2**32:
        raise ValueError("build_sentence_pairs: `documents` holds 2^32 documents or more (the streams are 32-bit)")
    threshold = coin_threshold(float(short_seq_prob))
    sop = objective == "sop"

    module = None
    if native is not False:
        module, why = compiled.load("_C")
        if module is None and native:
            raise RuntimeError(f"build_sentence_pairs: native=True but {why}")
    tokens = documents.tokens.numpy()
    if module is not None:
        arrays = module.build_sentence_pairs(tokens, documents.sentence_offsets.numpy(),
                                             documents.document_offsets.numpy(), sop, max_tokens, cls, sep, pad,
                                             seed, epoch, threshold, num_threads)
    else:
        pairs = _pairs_python(documents, sop, max_tokens, seed, epoch, threshold)
        arrays = _rows_python(tokens, pairs, max_tokens, cls, sep, pad)
    names = ("input_ids", "token_type_ids", "attention_mask", "labels", "document_index")
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in zip(names, arrays)}
