"""MLM masking: the C++ kernel (bertfast._C), the data layer's Python path, the op's torch backend and
the plain-loop reference (tests/reference_masking.py) agree bit for bit; the masks have the right
statistics; row keys behave; bad input gets an error naming the argument.

Statistics run at fixed seeds on large batches with 5-sigma bounds: binomial counts against
n q +- 5 sqrt(n q (1 - q)) with q the exact probability of the integer threshold (T(p) / 2^24), and
chi-square statistics against the Wilson-Hilferty 5-sigma quantile.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import re

import numpy as np
import pytest
import torch
from reference_masking import bits, cdf, mix32, reference_mask_tokens

from bertfast.data import masking as dm
from bertfast.ops import compiled, dispatch

mt = importlib.import_module("bertfast.ops.mask_tokens")  # the module (bertfast.ops.mask_tokens may be the function)

NATIVE, WHY_NOT = dm.native_kernel()
needs_native = pytest.mark.skipif(NATIVE is None, reason=f"bertfast._C unavailable: {WHY_NOT}")

V = 1000  # vocabulary of the tests
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
SEEDS = (0, 123456789, 2**32 - 1)

MODES = {  # name -> (word ids?, max_ngram)
    "token": (False, 1),
    "word": (True, 1),
    "ngram2": (False, 2),
    "ngram3": (False, 3),
    "ngram3-word": (True, 3),
}


def batch(B: int, T: int, dtype=torch.int64, seed: int = 0, vocab: int = V):
    """ids (B, T): [CLS] ... [SEP] then padding after a ragged length, row 1 all padding when B > 1;
    word_ids (B, T) int32: words of 1-4 tokens, -1 on special tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), vocab, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    if B > 1:
        ids[1] = PAD
    word_lengths = torch.randint(1, 5, (T,), generator=g)
    words = torch.repeat_interleave(torch.arange(T), word_lengths)[:T].to(torch.int32).repeat(B, 1)
    words[torch.isin(ids, torch.tensor(SPECIAL))] = -1
    return ids.to(dtype), words


def call(ids, keys, seed, words, max_ngram, probability=0.3, **kw):
    return dict(row_keys=keys, seed=seed, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL,
                probability=probability, word_ids=words, max_ngram=max_ngram, **kw)


def reference(ids, keys, seed, words, max_ngram, probability=0.3, **kw):
    masked, labels, records = reference_mask_tokens(
        ids.tolist(), keys.tolist(), seed, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL,
        probability=probability, word_ids=None if words is None else words.tolist(), max_ngram=max_ngram, **kw)
    return torch.tensor(masked, dtype=ids.dtype), torch.tensor(labels), records


def assert_same(got, want):
    assert got[0].dtype == want[0].dtype and got[1].dtype == torch.int64
    assert torch.equal(got[0], want[0]), (got[0] != want[0]).nonzero()[:5]
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]


def binomial_ok(count: int, n: int, q: float) -> bool:
    return abs(count - n * q) <= 5 * math.sqrt(n * q * (1 - q)) + 1e-9


def chi2_bound(df: int) -> float:
    """The chi-square quantile 5 sigma out (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + 5 * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def q(p: float) -> float:
    return mt.threshold(p) / 2**24


# ------------------------------------------------------------------------------------------------
# Exact agreement


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("T", [1, 7, 130])
def test_every_implementation_agrees(mode, dtype, B, T):
    with_words, max_ngram = MODES[mode]
    ids, words = batch(B, T, dtype, seed=B * 1000 + T)
    words = words if with_words else None
    keys = dm.dynamic_row_keys(B + T, B, worker=3)
    for seed in SEEDS:
        want = reference(ids, keys, seed, words, max_ngram)[:2]
        assert_same(dm.mask_tokens(ids, native=False, **call(ids, keys, seed, words, max_ngram)), want)
        if NATIVE is not None:
            assert_same(dm.mask_tokens(ids, native=True, **call(ids, keys, seed, words, max_ngram)), want)
        if max_ngram == 1:
            got = mt.mask_tokens(ids, keys, seed, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL,
                                 probability=0.3, word_ids=words, backend="torch")
            assert_same(got, want)
        # Special tokens and padding (row 1 is all padding) are never chosen nor changed.
        special = torch.isin(ids, torch.tensor(SPECIAL))
        assert (want[1][special] == -100).all() and torch.equal(want[0][special], ids[special])


@pytest.mark.parametrize("mode", ["token", "word"])
def test_default_fractions_and_probability_edges(mode):
    """0 and 1 as probability and fractions, default 80/10/10: still bit-identical."""
    ids, words = batch(5, 40, seed=7)
    words = words if MODES[mode][0] else None
    keys = dm.static_row_keys(torch.arange(5) * 7919)
    for probability, mask_fraction, random_fraction in ((0.15, 0.8, 0.1), (0.0, 0.8, 0.1), (1.0, 0.5, 0.5),
                                                         (1.0, 0.0, 0.0), (0.5, 1.0, 0.0), (0.5, 0.7, 0.3)):
        kw = dict(mask_fraction=mask_fraction, random_fraction=random_fraction)
        want = reference(ids, keys, 42, words, 1, probability, **kw)[:2]
        for native in (False, True) if NATIVE is not None else (False,):
            got = dm.mask_tokens(ids, native=native, **call(ids, keys, 42, words, 1, probability, **kw))
            assert_same(got, want)
        maskable = ~torch.isin(ids, torch.tensor(SPECIAL))
        if probability == 1.0:
            assert (want[1][maskable] == ids[maskable]).all()
        if probability == 0.0:
            assert (want[1] == -100).all()


@needs_native
@pytest.mark.parametrize("max_ngram", [1, 3])
@pytest.mark.parametrize("with_words", [False, True])
def test_thread_count_does_not_change_the_result(max_ngram, with_words):
    # 600 rows of 130: enough work for the kernel to split the rows over several threads.
    ids, words = batch(600, 130, torch.int32, seed=11)
    words = words if with_words else None
    keys = dm.dynamic_row_keys(5, 600)
    runs = [dm.mask_tokens(ids, native=True, num_threads=n, **call(ids, keys, 9, words, max_ngram))
            for n in (1, 2, 3, 0)]
    for other in runs[1:]:
        assert_same(other, runs[0])
    if max_ngram == 1:
        assert_same(dm.mask_tokens(ids, native=False, **call(ids, keys, 9, words, max_ngram)), runs[0])


def test_non_contiguous_input_gives_the_same_result():
    ids, words = batch(6, 33, seed=3)
    keys = dm.dynamic_row_keys(0, 6)
    strided_ids = ids.t().contiguous().t()
    strided_words = words.t().contiguous().t()
    assert not strided_ids.is_contiguous()
    for native in (False, True) if NATIVE is not None else (False,):
        for max_ngram in (1, 2):
            want = dm.mask_tokens(ids, native=native, **call(ids, keys, 1, words, max_ngram))
            got = dm.mask_tokens(strided_ids, native=native, **call(ids, keys, 1, strided_words, max_ngram))
            assert_same(got, want)
    got = mt.mask_tokens(strided_ids, keys, 1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL,
                         probability=0.3, word_ids=strided_words)
    assert_same(got, dm.mask_tokens(ids, native=False, **call(ids, keys, 1, words, 1)))


def test_random_replacement_is_the_multiply_shift_of_the_spec():
    """One token by hand: the spec's formulas written out once more for a chosen token."""
    ids = torch.tensor([[CLS, 500, SEP]])
    keys = torch.tensor([77])
    masked, labels = dm.mask_tokens(ids, native=False, row_keys=keys, seed=5, vocab_size=V, mask_token_id=MASK,
                                    special_token_ids=SPECIAL, probability=1.0, mask_fraction=0.0,
                                    random_fraction=1.0)
    key = mix32(mix32(5) ^ 77)
    h = mix32(key ^ 1)
    assert bits(5, 77, 1, 2) == mix32(h ^ 2)
    assert labels.tolist() == [[-100, 500, -100]]
    assert masked.tolist() == [[CLS, (mix32(h ^ 2) * V) >> 32, SEP]]


# ------------------------------------------------------------------------------------------------
# Statistics (fixed seeds, large batches)


def big_batch(B=256, T=128, vocab=V, seed=0):
    ids, words = batch(B, T, seed=seed, vocab=vocab)
    return ids, words, dm.dynamic_row_keys(seed, B)


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_selection_rate_and_action_split(p):
    ids, _, keys = big_batch()
    masked, labels = dm.mask_tokens(ids, **call(ids, keys, 2024, None, 1, p))
    maskable = ~torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != -100
    assert not (chosen & ~maskable).any(), "a special or padding token was chosen"
    assert torch.equal(masked[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    n = int(maskable.sum())
    assert n > 10000
    assert binomial_ok(int(chosen.sum()), n, q(p)), (int(chosen.sum()), n * p)
    # Among chosen tokens: [MASK] 80%, random 10% (which hits the original or [MASK] with 1/V each), kept 10%.
    m = int(chosen.sum())
    out, orig = masked[chosen], ids[chosen]
    q_mask, q_keep = q(0.8), q(0.9) - q(0.8)
    assert binomial_ok(int((out == MASK).sum()), m, q_mask + q_keep / V)
    assert binomial_ok(int((out == orig).sum()), m, q_keep + q_keep / V)
    assert binomial_ok(int(((out != MASK) & (out != orig)).sum()), m, q_keep * (1 - 2 / V))


def test_random_tokens_are_uniform_over_the_vocabulary():
    vocab = 64
    ids, _, keys = big_batch(vocab=vocab)
    masked, labels = dm.mask_tokens(ids, row_keys=keys, seed=99, vocab_size=vocab, mask_token_id=MASK,
                                    special_token_ids=SPECIAL, probability=0.5, mask_fraction=0.0,
                                    random_fraction=1.0)
    drawn = masked[labels != -100]
    counts = np.bincount(drawn.numpy(), minlength=vocab)
    assert counts.sum() > 5000 and counts.min() > 0
    assert chi2(counts, np.full(vocab, 1 / vocab)) < chi2_bound(vocab - 1)


def test_whole_words_are_all_or_nothing():
    ids, words, keys = big_batch()
    p = 0.3
    _, labels = dm.mask_tokens(ids, **call(ids, keys, 7, words, 1, p))
    chosen = labels != -100
    maskable = words >= 0
    assert not (chosen & ~maskable).any()
    # Units: maximal runs of maskable tokens with one word id.
    starts = maskable.clone()
    starts[:, 1:] &= ~(maskable[:, :-1] & (words[:, 1:] == words[:, :-1]))
    unit = torch.cumsum(starts.flatten().long(), 0) - 1  # unit index of every token (row-major)
    flat_unit, flat_chosen = unit[maskable.flatten()], chosen.flatten()[maskable.flatten()].long()
    units = int(starts.sum())
    per_unit = torch.zeros(units, dtype=torch.long).index_add_(0, flat_unit, flat_chosen)
    size = torch.zeros(units, dtype=torch.long).index_add_(0, flat_unit, torch.ones_like(flat_chosen))
    assert ((per_unit == 0) | (per_unit == size)).all(), "a word was partly masked"
    assert (size > 1).sum() > 1000  # the test has multi-token words
    assert binomial_ok(int((per_unit > 0).sum()), units, q(p))


@pytest.mark.parametrize("with_words", [False, True])
def test_ngram_spans_and_budget(with_words):
    """n-gram mode: the drawn span lengths follow P(n) ∝ 1/n; each row covers at most its budget and
    exactly it in the typical case. The drawn n is tested (recorded by the reference, which equals the
    kernel exactly here): the accepted spans are biased towards short ones by the overlap and budget
    rules, by design."""
    max_ngram = 3
    ids, words, keys = big_batch(B=512, T=128, seed=5)
    words = words if with_words else None
    masked, labels, records = reference(ids, keys, 31, words, max_ngram, probability=0.15)
    got = dm.mask_tokens(ids, **call(ids, keys, 31, words, max_ngram, 0.15))
    assert_same(got, (masked, labels))
    maskable = ~torch.isin(ids, torch.tensor(SPECIAL))
    covered = (labels != -100).sum(1)
    budgets = torch.tensor([r.budget for r in records])
    n_maskable = maskable.sum(1)
    expected_budget = torch.where(n_maskable > 0, torch.clamp((0.15 * n_maskable.double() + 0.5).floor().long(), min=1),
                                  0)
    assert torch.equal(budgets, expected_budget)
    assert torch.equal(covered, torch.tensor([r.covered for r in records]))
    assert (covered <= budgets).all()
    full = (covered == budgets).float().mean()
    assert full >= (0.9 if with_words else 0.99), full  # a whole word may not fit the rest of a budget
    drawn = np.bincount(np.concatenate([r.drawn for r in records if r.drawn]), minlength=max_ngram + 1)[1:]
    c = np.array([0] + cdf(max_ngram)) / 2**24
    probs = np.diff(c)
    harmonic = np.array([1 / n for n in range(1, max_ngram + 1)])
    assert np.allclose(probs, harmonic / harmonic.sum(), atol=1e-6)
    assert drawn.sum() > 3000
    assert chi2(drawn, probs) < chi2_bound(max_ngram - 1)
    spans = np.concatenate([r.spans for r in records if r.spans])
    assert set(spans.tolist()) == {1, 2, 3}


def test_ngram_cdf_and_thresholds():
    assert mt.ngram_cdf(1) == (2**24,)
    assert list(mt.ngram_cdf(3)) == cdf(3)
    assert mt.ngram_cdf(3) == (round(2**24 * 1 / (11 / 6)), round(2**24 * 1.5 / (11 / 6)), 2**24)
    assert mt.thresholds(0.15, 0.8, 0.1) == (round(0.15 * 2**24), round(0.8 * 2**24), round(0.9 * 2**24))
    assert mt.thresholds(1.0, 1.0, 0.0) == (2**24, 2**24, 2**24)


def test_ngram_with_zero_probability_masks_one_token():
    """The spec's budget is at least one token (ALBERT's max(1, round(p n)))."""
    ids, _ = batch(4, 30, seed=2)
    keys = dm.dynamic_row_keys(0, 4)
    _, labels = dm.mask_tokens(ids, **call(ids, keys, 1, None, 2, 0.0))
    chosen = (labels != -100).sum(1)
    has_maskable = (~torch.isin(ids, torch.tensor(SPECIAL))).any(1)
    assert torch.equal(chosen, has_maskable.long())


# ------------------------------------------------------------------------------------------------
# Row keys


def test_dynamic_row_keys_formula_and_freshness():
    keys = dm.dynamic_row_keys(2**32 + 5, 4, worker=9)
    assert keys.dtype == torch.int64 and keys.shape == (4,)
    assert keys.tolist() == [mix32(mix32(mix32(5) ^ 9) ^ r) for r in range(4)]
    assert keys.tolist() == dm.dynamic_row_keys(5, 4, worker=9).tolist()
    assert dm.dynamic_row_keys(5, 4, worker=8).tolist() != keys.tolist()
    ids, _ = batch(8, 64, seed=4)
    first = dm.mask_tokens(ids, **call(ids, dm.dynamic_row_keys(0, 8), 3, None, 1))[1]
    second = dm.mask_tokens(ids, **call(ids, dm.dynamic_row_keys(1, 8), 3, None, 1))[1]
    again = dm.mask_tokens(ids, **call(ids, dm.dynamic_row_keys(0, 8), 3, None, 1))[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert all(not torch.equal(first[r], second[r]) for r in (0, 2, 3))  # row 1 is all padding


def test_static_row_keys_formula_and_repeatability():
    seq = torch.tensor([0, 1, 2**40 + 3, -1])
    keys = dm.static_row_keys(seq, duplicate=2)
    want = [mix32(mix32(mix32(s & 0xFFFFFFFF) ^ ((s >> 32) & 0xFFFFFFFF)) ^ 2) for s in seq.tolist()]
    assert keys.tolist() == want
    assert torch.equal(dm.static_row_keys(seq.tolist(), 2), keys)
    assert torch.equal(dm.static_row_keys(seq.numpy(), 2), keys)
    ids, _ = batch(6, 64, seed=8)
    order = torch.tensor([5, 0, 3, 2, 4, 1])
    ids_id = torch.arange(6) * 1000 + 17
    base = dm.mask_tokens(ids, **call(ids, dm.static_row_keys(ids_id, 0), 3, None, 1))[1]
    # Same sequence and duplicate in another batch position: same mask.
    shuffled = dm.mask_tokens(ids[order], **call(ids, dm.static_row_keys(ids_id[order], 0), 3, None, 1))[1]
    assert torch.equal(shuffled, base[order])
    other = dm.mask_tokens(ids, **call(ids, dm.static_row_keys(ids_id, 1), 3, None, 1))[1]
    long_rows = (~torch.isin(ids, torch.tensor(SPECIAL))).sum(1) >= 20
    assert long_rows.sum() >= 3
    assert all(not torch.equal(base[r], other[r]) for r in range(6) if long_rows[r])


# ------------------------------------------------------------------------------------------------
# The op: dispatch, and the cuda backend's launch arguments (run here through a stand-in kernel)


def test_op_dispatch_on_cpu():
    ids, words = batch(3, 9)
    keys = dm.dynamic_row_keys(0, 3)
    with dispatch.record_backends() as trace:
        mt.mask_tokens(ids, keys, 1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL)
    assert trace == [("mask_tokens", "torch")]
    assert mt.OP.refusal("cuda", {"device": "cpu", "dtype": torch.int64}).startswith("needs CUDA tensors")
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda: needs CUDA tensors"):
        mt.mask_tokens(ids, keys, 1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL, backend="cuda")


@pytest.fixture
def stand_in_cuda_kernel(monkeypatch):
    """Swap _cuda.mask_tokens for a stand-in that reads the raw pointers (CPU memory here) and runs the
    C++ kernel; the launch's device context and stream too. Returns the list of calls' scalars."""
    calls = []

    def array(ptr, ctype, shape):
        return np.ctypeslib.as_array((ctype * math.prod(shape)).from_address(ptr)).reshape(shape)

    def fake_kernel(ids_ptr, out_ptr, labels_ptr, keys_ptr, words_ptr, special_ptr, rows, cols, ids_is_int32, seed,
                    vocab_size, mask_token_id, select_threshold, mask_threshold, random_threshold, stream):
        calls.append((rows, cols, ids_is_int32, seed, stream, words_ptr == 0))
        ctype = ctypes.c_int32 if ids_is_int32 else ctypes.c_int64
        ids_np = array(ids_ptr, ctype, (rows, cols))
        words_np = None if words_ptr == 0 else array(words_ptr, ctypes.c_int32, (rows, cols))
        special = array(special_ptr, ctypes.c_uint8, (vocab_size,))
        out, labels = NATIVE(ids_np.copy(), array(keys_ptr, ctypes.c_int64, (rows,)).copy(),
                             None if words_np is None else words_np.copy(), special.copy(), seed, vocab_size,
                             mask_token_id, select_threshold, mask_threshold, random_threshold,
                             np.array([2**24], dtype=np.int64), 0.0, 1)
        array(out_ptr, ctype, (rows, cols))[:] = out
        array(labels_ptr, ctypes.c_int64, (rows, cols))[:] = labels

    class FakeModule:
        mask_tokens = staticmethod(fake_kernel)

    monkeypatch.setattr(mt.cuda_support, "module", lambda: FakeModule)
    monkeypatch.setattr(mt, "_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(mt, "_stream", lambda device: 1234)
    return calls


def cuda_backend_args(dtype, with_words):
    ids, words = batch(5, 21, dtype, seed=6)
    words = words if with_words else None
    keys = dm.dynamic_row_keys(3, 5)
    c = mt.validate("t", ids, keys, 2**32 - 2, V, MASK, SPECIAL, 0.4, 0.8, 0.1, words)
    table = mt.special_table(c.special, V)
    return ids, keys, words, table, c.seed, V, MASK, c.select_threshold, c.mask_threshold, c.random_threshold


@needs_native
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_words", [False, True])
def test_cuda_backend_passes_the_kernels_signature(stand_in_cuda_kernel, dtype, with_words):
    """The cuda backend's launch, run through the stand-in: proves the argument order of
    _cuda.mask_tokens and the buffers' layout."""
    args = cuda_backend_args(dtype, with_words)
    got = mt.mask_tokens_cuda(*args)
    assert stand_in_cuda_kernel == [(5, 21, dtype == torch.int32, 2**32 - 2, 1234, not with_words)]
    assert_same(got, mt.mask_tokens_torch(*args))


@needs_native
def test_cuda_custom_op_traces(stand_in_cuda_kernel):
    """The torch.library op around the launch: schema, fake implementation, tracing (opcheck)."""
    torch.library.opcheck(mt.mask_tokens_cuda_op, cuda_backend_args(torch.int64, True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("with_words", [False, True])
def test_torch_backend_on_the_gpu_equals_the_cpu(with_words):
    ids, words = batch(17, 130, torch.int32, seed=12)
    words = words if with_words else None
    keys = dm.dynamic_row_keys(1, 17)
    kw = dict(vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL, probability=0.3, backend="torch")
    want = mt.mask_tokens(ids, keys, 5, word_ids=words, **kw)
    got = mt.mask_tokens(ids.cuda(), keys.cuda(), 5, word_ids=None if words is None else words.cuda(), **kw)
    assert_same(tuple(t.cpu() for t in got), want)


# ------------------------------------------------------------------------------------------------
# Bad input


def names(arg: str) -> str:
    return rf"(?<!\w){re.escape(arg)}(?!\w)"


IDS, WORDS = batch(3, 7)
KEYS = dm.dynamic_row_keys(0, 3)


def bad_cases():
    """(argument named, changes to a valid data-layer call)."""
    bad_ids = IDS.clone()
    bad_ids[2, 5] = -1
    big_ids = IDS.clone()
    big_ids[0, 3] = V
    return [
        ("input_ids", dict(input_ids=IDS.float())),
        ("input_ids", dict(input_ids=IDS.to(torch.int16))),
        ("input_ids", dict(input_ids=IDS[0])),
        ("input_ids", dict(input_ids=IDS[:0])),
        ("input_ids", dict(input_ids=bad_ids)),
        ("input_ids", dict(input_ids=big_ids)),
        ("input_ids", dict(input_ids=IDS.tolist())),
        ("row_keys", dict(row_keys=KEYS[:2])),
        ("row_keys", dict(row_keys=KEYS.to(torch.int32))),
        ("row_keys", dict(row_keys=torch.tensor([0, 2**32, 1]))),
        ("row_keys", dict(row_keys=torch.tensor([0, -1, 1]))),
        ("word_ids", dict(word_ids=WORDS[:, :6])),
        ("word_ids", dict(word_ids=WORDS.long())),
        ("probability", dict(probability=1.5)),
        ("probability", dict(probability=-0.1)),
        ("probability", dict(probability=float("nan"))),
        ("mask_fraction", dict(mask_fraction=0.9, random_fraction=0.2)),
        ("random_fraction", dict(random_fraction=1.2)),
        ("vocab_size", dict(vocab_size=0)),
        ("mask_token_id", dict(mask_token_id=V)),
        ("special_token_ids", dict(special_token_ids=[0, V])),
        ("special_token_ids", dict(special_token_ids=5)),
        ("special_token_ids", dict(special_token_ids=[0, 1.5])),
        ("seed", dict(seed=-1)),
        ("seed", dict(seed=2**32)),
        ("seed", dict(seed=1.5)),
        ("seed", dict(seed=True)),
    ]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_names_the_argument(native, case):
    if native and NATIVE is None:
        pytest.skip(WHY_NOT)
    arg, changes = bad_cases()[case]
    kwargs = dict(input_ids=IDS, row_keys=KEYS, seed=1, vocab_size=V, mask_token_id=MASK,
                  special_token_ids=SPECIAL, word_ids=WORDS, native=native)
    kwargs.update(changes)
    with pytest.raises((ValueError, TypeError), match=names(arg)):
        dm.mask_tokens(**kwargs)
    # The op: the same checks (it has no native switch).
    del kwargs["native"]
    ids = kwargs.pop("input_ids")
    keys, seed = kwargs.pop("row_keys"), kwargs.pop("seed")
    with pytest.raises((ValueError, TypeError), match=names(arg)):
        mt.mask_tokens(ids, keys, seed, **kwargs)


@pytest.mark.parametrize("arg, changes", [("max_ngram", dict(max_ngram=0)), ("num_threads", dict(num_threads=-1)),
                                          ("native", dict(native="yes")),
                                          ("input_ids", dict(input_ids=IDS.to("meta")))])
def test_bad_data_layer_arguments(arg, changes):
    kwargs = dict(input_ids=IDS, row_keys=KEYS, seed=1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL)
    kwargs.update(changes)
    with pytest.raises((ValueError, TypeError), match=names(arg)):
        dm.mask_tokens(**kwargs)


def test_op_refuses_row_keys_on_another_device():
    with pytest.raises(ValueError, match=names("row_keys")):
        mt.mask_tokens(IDS, KEYS.to("meta"), 1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL)


def test_native_true_without_the_kernel(monkeypatch):
    monkeypatch.setattr(compiled, "load", lambda name: (None, f"bertfast.{name} is not built (test)"))
    with pytest.raises(ValueError, match=r"`native=True`.*not built \(test\)"):
        dm.mask_tokens(IDS, row_keys=KEYS, seed=1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL,
                       native=True)
    # native=None falls back to the Python path.
    got = dm.mask_tokens(IDS, row_keys=KEYS, seed=1, vocab_size=V, mask_token_id=MASK, special_token_ids=SPECIAL)
    assert_same(got, reference(IDS, KEYS, 1, None, 1, 0.15)[:2])


@needs_native
def test_kernel_refuses_to_convert():
    """The C++ entry point takes exact dtypes and C-contiguous arrays only; it never converts."""
    table = mt.special_table(SPECIAL, V).numpy()
    cdf1 = np.array([2**24], dtype=np.int64)
    ids, keys, words = IDS.numpy(), KEYS.numpy(), WORDS.numpy()

    def run(**changes):
        kw = dict(input_ids=ids, row_keys=keys, word_ids=words, special=table, seed=1, vocab_size=V,
                  mask_token_id=MASK, select_threshold=2**23, mask_threshold=2**23, random_threshold=2**24,
                  ngram_cdf=cdf1, probability=0.5, num_threads=1)
        kw.update(changes)
        return NATIVE(**kw)

    run()
    for arg, changes in [("input_ids", dict(input_ids=ids.astype(np.int16))),
                         ("input_ids", dict(input_ids=ids.astype(np.float64))),
                         ("input_ids", dict(input_ids=np.asfortranarray(np.tile(ids, (1, 2))))),
                         ("input_ids", dict(input_ids=ids.tolist())),
                         ("row_keys", dict(row_keys=keys.astype(np.int32))),
                         ("word_ids", dict(word_ids=words.astype(np.int64))),
                         ("word_ids", dict(word_ids=words[:, :3].copy())),
                         ("special", dict(special=table.astype(np.int32))),
                         ("special", dict(special=table[:-1])),
                         ("ngram_cdf", dict(ngram_cdf=np.array([5], dtype=np.int64))),
                         ("ngram_cdf", dict(ngram_cdf=cdf1.astype(np.int32))),
                         ("row_keys", dict(row_keys=keys[:2].copy())),
                         ("seed", dict(seed=2**32)),
                         ("mask_token_id", dict(mask_token_id=V)),
                         ("select_threshold", dict(select_threshold=2**24 + 1))]:
        with pytest.raises((ValueError, TypeError), match=names(arg)):
            run(**changes)

