"""MLM masking in the data loader: one spec, bit-identical in the C++ kernel (``bertfast._C``), the
Python path here, the op's torch and cuda backends (``bertfast.ops.mask_tokens``), and the tests'
plain-loop reference.

The spec (uint32 arithmetic; mix32 = lowbias32, csrc/common/rng.h):

    key(r)          = stream_key(seed32, row_key[r]) = mix32(mix32(seed32) ^ row_key[r])
    bits(j, purpose) = mix32(mix32(key(r) ^ j) ^ purpose)   j = column; SELECT=0 ACTION=1 RANDOM_TOKEN=2
                                                            ORDER=3 NGRAM=4
    top24(b) = b >> 8;   T(p) = min(round(p * 2^24), 2^24)  (integers, computed once in Python)

- maskable(j): input_ids[j] not in ``special_token_ids`` (padding included by the caller) and, when
  ``word_ids`` is given, word_ids[j] >= 0.
- units: without word_ids each maskable token; with word_ids a maximal run of consecutive maskable
  tokens with equal word id. A unit's start is its first column.
- max_ngram == 1 (Bernoulli: BERT, RoBERTa, Hugging Face): a unit is chosen iff
  top24(bits(start, SELECT)) < T(probability); all its tokens are chosen.
- max_ngram >= 2 (ALBERT's n-gram masking, budget based): with n_maskable the row's maskable tokens
  (none: nothing is chosen), budget = max(1, floor(probability * n_maskable + 0.5)) tokens. Units are
  visited in ascending (bits(start, ORDER), start). Visiting unit k (its index in the row's list):
  stop if covered >= budget; n = the smallest n in 1..max_ngram with top24(bits(start_k, NGRAM)) <
  cdf[n-1] (``ngram_cdf``: P(n) proportional to 1/n), n = min(n, units left from k); the span is the
  tokens of units k..k+n-1; skip it if one of those units is chosen already or covered + len(span) >
  budget; else choose it, covered += len(span). (The budget is at least one token even when
  probability is 0.)
- chosen token j: labels[j] = its id; a = top24(bits(j, ACTION)); a < T(mask_fraction) -> mask_token_id;
  a < T(mask_fraction + random_fraction) -> below(bits(j, RANDOM_TOKEN), vocab_size) = (bits *
  vocab_size) >> 32, uniform over [0, vocab_size); else unchanged. labels = -100 everywhere else.

Row keys say which mask a row gets: ``dynamic_row_keys`` gives a fresh mask per call (RoBERTa's
dynamic masking), ``static_row_keys`` a fixed one per (sequence, duplicate) (BERT's static masking
with its dupe factor).
"""

from __future__ import annotations

import numpy as np
import torch

from bertfast.ops import compiled
from bertfast.ops.rng import mix32_int
from bertfast.ops.rng import mix32_numpy as mix32
from bertfast.ops.mask_tokens import (ACTION, IGNORE_INDEX, NGRAM, ORDER, RANDOM_TOKEN, as_int, mask_tokens_torch,
                                      ngram_cdf, special_table, validate)

_NAME = "bertfast.data.mask_tokens"
_U32 = 0xFFFFFFFF


def _u32(name: str, arg: str, value) -> int:
    return as_int(name, arg, value, 0, 1 << 32)


def dynamic_row_keys(call_index: int, rows: int, worker: int = 0) -> torch.Tensor:
    """(rows,) int64 keys mix32(mix32(mix32(call_index & 0xFFFFFFFF) ^ worker) ^ r): a fresh mask
    each call (RoBERTa's dynamic masking); ``worker`` keeps DataLoader workers apart."""
    name = "dynamic_row_keys"
    call_index = as_int(name, "call_index", call_index, 0, 1 << 63) & _U32
    rows = as_int(name, "rows", rows, 0, 1 << 31)
    worker = _u32(name, "worker", worker)
    base = mix32_int(mix32_int(call_index) ^ worker)
    keys = mix32(np.arange(rows, dtype=np.uint32) ^ np.uint32(base))
    return torch.from_numpy(keys.astype(np.int64))


def static_row_keys(sequence_ids, duplicate: int = 0) -> torch.Tensor:
    """(N,) int64 keys mix32(mix32(mix32(low32(id)) ^ high32(id)) ^ duplicate) of N int64 sequence
    ids: a fixed mask per (sequence, duplicate) (BERT's static masking with a dupe factor)."""
    name = "static_row_keys"
    duplicate = _u32(name, "duplicate", duplicate)
    if isinstance(sequence_ids, torch.Tensor):
        if sequence_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: `sequence_ids` must hold integers, got {sequence_ids.dtype}")
        ids = sequence_ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
    else:
        ids = np.asarray(sequence_ids)
        if ids.dtype.kind not in "iu" and ids.size:
            raise TypeError(f"{name}: `sequence_ids` must hold integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64).reshape(-1)
    bits = ids.view(np.uint64)  # two's complement: negative ids get distinct keys too
    low = (bits & np.uint64(_U32)).astype(np.uint32)
    high = (bits >> np.uint64(32)).astype(np.uint32)
    keys = mix32(mix32(mix32(low) ^ high) ^ np.uint32(duplicate))
    return torch.from_numpy(keys.astype(np.int64))


def native_kernel():
    """(bertfast._C.mask_tokens, None) when built, else (None, why not)."""
    mod, why = compiled.load("_C")
    return (None, why) if mod is None else (mod.mask_tokens, None)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    row_keys: torch.Tensor,
    seed: int,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    word_ids: torch.Tensor | None = None,
    max_ngram: int = 1,
    num_threads: int = 0,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a CPU batch for MLM by the module's spec.

    Args:
        input_ids: (B, T) int32 or int64 CPU tensor, ids in [0, vocab_size).
        row_keys: (B,) int64 uint32 keys (``dynamic_row_keys`` / ``static_row_keys``).
        seed: int in [0, 2^32).
        special_token_ids: ids never masked (include the padding id).
        word_ids: None, or (B, T) int32 word index per token (< 0: never masked): whole-word masking.
        max_ngram: 1 = Bernoulli; >= 2 = ALBERT n-gram spans of up to ``max_ngram`` units.
        num_threads: threads of the C++ kernel (0 = every core); results do not depend on it.
        native: None = the C++ kernel when built, else the Python path; True = require the kernel;
            False = the Python path.

    Returns:
        (masked_ids (B, T) like input_ids, labels (B, T) int64, -100 where not chosen).
    """
    name = _NAME
    if native not in (None, True, False):
        raise ValueError(f"{name}: `native` must be None, True or False, got {native!r}")
    max_ngram = as_int(name, "max_ngram", max_ngram, 1, 1 << 16)
    num_threads = as_int(name, "num_threads", num_threads, 0, 1 << 16)
    kernel, why = (None, "native=False") if native is False else native_kernel()
    if native is True and kernel is None:
        raise ValueError(f"{name}: `native=True` but the C++ kernel is unavailable: {why}")
    # The C++ kernel range-checks the ids and row keys during its own pass: no separate read here.
    c = validate(name, input_ids, row_keys, seed, vocab_size, mask_token_id, special_token_ids, probability,
                    mask_fraction, random_fraction, word_ids, read_values=kernel is None)
    for arg, t in (("input_ids", input_ids), ("row_keys", row_keys), ("word_ids", word_ids)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name}: `{arg}` must be a CPU tensor (got {t.device}); on a GPU use "
                             "bertfast.ops.mask_tokens.mask_tokens")
    table = special_table(c.special, c.vocab_size)
    cdf = ngram_cdf(max_ngram)
    if kernel is not None:
        out, labels = kernel(
            input_ids.contiguous().numpy(), row_keys.contiguous().numpy(),
            None if word_ids is None else word_ids.contiguous().numpy(), table.numpy(), c.seed, c.vocab_size,
            c.mask_token_id, c.select_threshold, c.mask_threshold, c.random_threshold,
            np.asarray(cdf, dtype=np.int64), float(probability), num_threads)
        return torch.from_numpy(out), torch.from_numpy(labels)
    if max_ngram == 1:
        with torch.no_grad():
            return mask_tokens_torch(input_ids, row_keys, word_ids, table, c.seed, c.vocab_size,
                                        c.mask_token_id, c.select_threshold, c.mask_threshold, c.random_threshold)
    return _ngram_python(input_ids, row_keys, word_ids, table, c, cdf, float(probability))


def _ngram_python(input_ids, row_keys, word_ids, table, c, cdf, probability):
    """The n-gram mode row by row: numpy for the per-token hashes, a Python loop over the units."""
    ids = input_ids.contiguous().numpy()
    words = None if word_ids is None else word_ids.contiguous().numpy()
    keys = row_keys.contiguous().numpy().astype(np.uint32)
    special = table.numpy()
    out = ids.copy()
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    cdf = np.asarray(cdf, dtype=np.int64)
    seed_mix = mix32(np.uint32(c.seed))
    cols = np.arange(ids.shape[1], dtype=np.uint32)
    for r in range(ids.shape[0]):
        maskable = special[ids[r]] == 0
        continues = np.zeros_like(maskable)
        if words is not None:
            maskable &= words[r] >= 0
            continues[1:] = maskable[:-1] & (words[r, 1:] == words[r, :-1])
        n_maskable = int(maskable.sum())
        if n_maskable == 0:
            continue
        starts = np.flatnonzero(maskable & ~continues)  # (units,)
        unit_of = np.cumsum(maskable & ~continues) - 1  # unit index of each maskable token
        lengths = np.bincount(unit_of[maskable], minlength=len(starts))
        budget = max(1, int(np.floor(probability * n_maskable + 0.5)))
        key = mix32(seed_mix ^ keys[r])
        h = mix32(key ^ cols[starts])
        order = np.lexsort((starts, mix32(h ^ np.uint32(ORDER))))
        draws = (mix32(h ^ np.uint32(NGRAM)) >> np.uint32(8)).astype(np.int64)
        drawn_n = np.searchsorted(cdf, draws, side="right") + 1  # smallest n with draw < cdf[n-1]
        units = len(starts)
        chosen = [False] * units
        covered = 0
        for k in order.tolist():
            if covered >= budget:
                break
            n = min(int(drawn_n[k]), units - k)
            span = int(lengths[k:k + n].sum())
            if any(chosen[k:k + n]) or covered + span > budget:
                continue
            chosen[k:k + n] = [True] * n
            covered += span
        token_chosen = maskable & np.asarray(chosen)[np.maximum(unit_of, 0)]
        j = np.flatnonzero(token_chosen)
        labels[r, j] = ids[r, j]
        hj = mix32(key ^ cols[j])
        action = mix32(hj ^ np.uint32(ACTION)) >> np.uint32(8)
        random_ids = (mix32(hj ^ np.uint32(RANDOM_TOKEN)).astype(np.uint64) * np.uint64(c.vocab_size)) >> 32
        new = np.where(action < c.random_threshold, random_ids.astype(ids.dtype), ids[r, j])
        out[r, j] = np.where(action < c.mask_threshold, c.mask_token_id, new)
    return torch.from_numpy(out), torch.from_numpy(labels)
