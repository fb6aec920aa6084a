"""NSP / SOP sentence pairs (bertfast.data.sentence_pairs): the C++ kernel, the Python path and the
plain reference (tests/reference_sentence_pairs.py) give the same rows; the rows have the right
structure; the random choices have the right rates; bad input is refused naming the argument."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from bertfast.data import sentence_pairs as sp
from bertfast.data.sentence_pairs import Documents, build_sentence_pairs
from bertfast.ops import compiled
from reference_sentence_pairs import reference_pairs, reference_rows

NAMES = ("input_ids", "token_type_ids", "attention_mask", "labels", "document_index")
CLS, SEP, PAD = 1, 2, 0
FIRST_ID = 100  # token ids are FIRST_ID + position in the token buffer: rows show where tokens came from


def native_module():
    module, why = compiled.load("_C")
    if module is None:
        if "was built" in why:
            pytest.fail(why)  # a broken build is a failure, not a skip
        pytest.skip(why)
    return module


def numbered(shape_docs: list[list[int]]) -> list[list[list[int]]]:
    """Documents of sentences with the given lengths, ids FIRST_ID + global token position."""
    docs, position = [], FIRST_ID
    for lengths in shape_docs:
        doc = []
        for n in lengths:
            doc.append(list(range(position, position + n)))
            position += n
        docs.append(doc)
    return docs


def random_shapes(n_docs: int, seed: int, lengths=(0, 1, 2, 3, 5, 8, 13, 40), max_sentences: int = 12):
    rnd = random.Random(seed)
    return [[rnd.choice(lengths) for _ in range(rnd.randrange(0, max_sentences))] for _ in range(n_docs)]


CORPORA = {
    "one_document": [[3, 5, 2, 8, 1, 4, 6, 9, 2, 2]],
    "one_document_one_sentence": [[9]],
    "one_token": [[1]],
    "empty": [],
    "only_empty": [[], [0, 0], []],
    "empty_docs_and_sentences": [[], [0, 4, 0, 0, 3], [0], [6, 0, 2, 5], [], [1], [0, 0, 7]],
    "single_sentence_documents": [[7], [1], [12], [3], [2]],
    "long_sentences": [[300, 2, 150], [1, 260], [500]],
    "mixed": random_shapes(23, seed=5),
}


def expected(docs, objective, max_tokens, seed, epoch, short_seq_prob):
    rows = reference_rows(reference_pairs(docs, objective, max_tokens, seed, epoch, short_seq_prob),
                          max_tokens, CLS, SEP, PAD)
    return {name: torch.tensor(r, dtype=torch.int64).reshape((-1, max_tokens) if j < 3 else (-1,))
            for j, (name, r) in enumerate(zip(NAMES, rows))}


def build(documents, objective, max_tokens, seed=0, epoch=0, short_seq_prob=0.1, **kw):
    return build_sentence_pairs(documents, objective=objective, max_tokens=max_tokens, cls_token_id=CLS,
                                sep_token_id=SEP, pad_token_id=PAD, seed=seed, epoch=epoch,
                                short_seq_prob=short_seq_prob, **kw)


def assert_same(got: dict, want: dict, what: str):
    for name in NAMES:
        assert got[name].dtype == want[name].dtype or name == "input_ids", (what, name)
        assert torch.equal(got[name].long(), want[name].long()), f"{what}: {name} differs"


@pytest.mark.parametrize("corpus", list(CORPORA))
@pytest.mark.parametrize("objective", ["nsp", "sop"])
@pytest.mark.parametrize("max_tokens", [5, 7, 128])
@pytest.mark.parametrize("seed,epoch,short_seq_prob", [(0, 0, 0.1), (12345, 3, 0.5)])
def test_native_python_and_reference_agree(corpus, objective, max_tokens, seed, epoch, short_seq_prob):
    docs = numbered(CORPORA[corpus])
    want = expected(docs, objective, max_tokens, seed, epoch, short_seq_prob)
    documents = Documents.from_lists(docs)
    python = build(documents, objective, max_tokens, seed, epoch, short_seq_prob, native=False)
    assert_same(python, want, "python path")
    native_module()
    native = build(documents, objective, max_tokens, seed, epoch, short_seq_prob, native=True)
    assert_same(native, want, "_C")


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_many_random_corpora_agree(objective):
    """Small random corpora (1-4 documents too, where the one-document rule and put-back matter)."""
    native_module()
    for trial in range(40):
        docs = numbered(random_shapes(1 + trial % 4 if trial % 2 else 9, seed=100 + trial))
        max_tokens = (5, 6, 9, 16, 33)[trial % 5]
        want = expected(docs, objective, max_tokens, trial, trial % 3, 0.3)
        documents = Documents.from_lists(docs)
        assert_same(build(documents, objective, max_tokens, trial, trial % 3, 0.3, native=False), want, f"python {trial}")
        assert_same(build(documents, objective, max_tokens, trial, trial % 3, 0.3, native=True), want, f"_C {trial}")


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_thread_count_changes_nothing(objective):
    """Enough tokens (~70k) that the kernel really splits the documents over threads."""
    native_module()
    docs = numbered(random_shapes(400, seed=9, lengths=(0, 4, 9, 17, 30, 70), max_sentences=25))
    documents = Documents.from_lists(docs, dtype=torch.int32)
    assert documents.tokens.numel() > 50_000
    runs = {t: build(documents, objective, 64, seed=3, num_threads=t, native=True) for t in (1, 2, 0, 7)}
    for t in (2, 0, 7):
        assert_same(runs[t], runs[1], f"num_threads={t}")
    assert runs[1]["input_ids"].dtype == torch.int32
    assert_same(build(documents, objective, 64, seed=3, native=False), runs[1], "python path")


def test_inputs_as_numpy_and_strided_give_the_same_rows():
    docs = numbered(CORPORA["mixed"])
    base = Documents.from_lists(docs)
    strided = torch.zeros(2 * base.tokens.numel(), dtype=torch.int64)
    strided[::2] = base.tokens
    variants = [Documents(base.tokens.numpy(), base.sentence_offsets.numpy(), base.document_offsets.numpy()),
                Documents(strided[::2], base.sentence_offsets, base.document_offsets)]
    want = build(base, "nsp", 16, native=False)
    for documents in variants:
        assert_same(build(documents, "nsp", 16, native=False), want, "variant")
        if compiled.load("_C")[0] is not None:
            assert_same(build(documents, "nsp", 16, native=True), want, "variant _C")


def test_seed_and_epoch_change_the_pairs():
    documents = Documents.from_lists(numbered(random_shapes(30, seed=1)))
    a = build(documents, "nsp", 32, seed=1, epoch=0)["input_ids"]
    assert torch.equal(a, build(documents, "nsp", 32, seed=1, epoch=0)["input_ids"])
    assert not torch.equal(a, build(documents, "nsp", 32, seed=1, epoch=1)["input_ids"])
    assert not torch.equal(a, build(documents, "nsp", 32, seed=2, epoch=0)["input_ids"])
    assert torch.equal(a, build(documents, "nsp", 32, seed=1 + 2**32, epoch=0)["input_ids"])  # seed mod 2^32


# ----------------------------------------------------------------------------------------------
# Structure

def split_row(ids: list[int], types: list[int], mask: list[int], max_tokens: int):
    """A, B token lists of one row, after checking [CLS] A [SEP] B [SEP] pad... and its types/mask."""
    used = sum(mask)
    assert 5 <= used <= max_tokens
    assert mask == [1] * used + [0] * (max_tokens - used)
    la = types.index(1) - 2 if 1 in types else None
    assert la is not None and la >= 1
    lb = used - la - 3
    assert lb >= 1
    assert types == [0] * (la + 2) + [1] * (lb + 1) + [0] * (max_tokens - used)
    assert ids[0] == CLS and ids[la + 1] == SEP and ids[used - 1] == SEP
    assert ids[used:] == [PAD] * (max_tokens - used)
    a, b = ids[1:la + 1], ids[la + 2:used - 1]
    assert min(a + b) >= FIRST_ID  # no special token inside a segment
    return a, b


@pytest.mark.parametrize("objective", ["nsp", "sop"])
@pytest.mark.parametrize("max_tokens", [5, 7, 40])
def test_rows_are_well_formed_pairs(objective, max_tokens):
    shapes = random_shapes(60, seed=21)
    docs = numbered(shapes)
    documents = Documents.from_lists(docs)
    doc_of = {}  # token id -> document
    for d, doc in enumerate(docs):
        for s in doc:
            for t in s:
                doc_of[t] = d
    out = build(documents, objective, max_tokens, seed=4, short_seq_prob=0.3)
    assert out["input_ids"].shape[1] == max_tokens and out["input_ids"].shape[0] > 50
    assert all(out[name].dtype == torch.int64 for name in NAMES)
    assert out["document_index"].tolist() == sorted(out["document_index"].tolist())  # document order
    for ids, types, mask, label, d in zip(*(out[n].tolist() for n in NAMES)):
        a, b = split_row(ids, types, mask, max_tokens)
        # each segment is a contiguous run of the buffer (whole sentences, or a truncated run)
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
        assert all(doc_of[t] == d for t in a)
        assert label in (0, 1)
        if objective == "nsp" and label == 0:
            assert doc_of[b[0]] == d and b[0] > a[-1]  # B continues A in its document
        elif objective == "nsp":
            assert doc_of[b[0]] != d  # random next from another document
        elif label == 0:
            assert doc_of[b[0]] == d and a[-1] < b[0]  # SOP: original order
        else:
            assert doc_of[b[0]] == d and b[-1] < a[0]  # SOP: swapped


def test_one_document_nsp_uses_the_actual_continuation():
    docs = numbered([[2, 20, 3, 4, 30, 1, 5]])
    out = build(Documents.from_lists(docs), "nsp", 12, seed=0, short_seq_prob=0.0)
    assert out["labels"].tolist() == [0] * len(out["labels"]) and len(out["labels"]) >= 2


# ----------------------------------------------------------------------------------------------
# Statistics (fixed seeds; 5 binomial standard deviations)

def within_5_sigma(hits: int, n: int, p: float):
    assert n > 500, n
    assert abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (hits, n, p)


def uniform_corpus():
    """1500 documents of 8 sentences of 8 tokens; with max_tokens 35 (budget 32) and no short
    targets, nothing is ever truncated, so rows hold whole sentences."""
    return numbered([[8] * 8] * 1500)


def test_nsp_random_next_rate():
    docs = uniform_corpus()
    out = build(Documents.from_lists(docs), "nsp", 35, seed=17, short_seq_prob=0.0)
    assert int(out["attention_mask"].sum(1).max()) <= 35
    doc_last = {d: doc[-1][-1] for d, doc in enumerate(docs)}
    free = hits = forced = 0
    for ids, mask, label, d in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(),
                                   out["labels"].tolist(), out["document_index"].tolist()):
        a_last = ids[ids.index(SEP) - 1]
        # A ends the document only when its chunk was one sentence (forced random next);
        # otherwise the chunk's last sentence is B's, and the coin decided.
        if a_last == doc_last[d]:
            forced += 1
            assert label == 1
            continue
        free += 1
        hits += label
    assert forced > 0
    within_5_sigma(hits, free, 0.5)


def test_sop_swap_rate():
    out = build(Documents.from_lists(uniform_corpus()), "sop", 35, seed=23, short_seq_prob=0.0)
    labels = out["labels"]
    within_5_sigma(int(labels.sum()), labels.numel(), 0.5)


def test_short_sequence_rate():
    """1-token sentences: a chunk holds exactly `target` tokens unless its document ends, and SOP
    keeps the whole chunk (A + B = target). P(target < budget) = p * (budget - 2) / (budget - 1);
    short targets are uniform on [2, budget - 1]."""
    p, max_tokens = 0.2, 35
    budget = max_tokens - 3
    docs = numbered([[1] * 5000] * 20)
    out = build(Documents.from_lists(docs), "sop", max_tokens, seed=29, short_seq_prob=p)
    doc_last = {d: doc[-1][-1] for d, doc in enumerate(docs)}
    lengths = []
    for ids, mask, d in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), out["document_index"].tolist()):
        used = sum(mask)
        if max(ids[:used]) != doc_last[d]:  # chunks that ended by reaching their target
            lengths.append(used - 3)
    lengths = np.array(lengths)
    assert lengths.min() >= 2 and lengths.max() <= budget
    short = lengths[lengths < budget]
    within_5_sigma(short.size, lengths.size, p * (budget - 2) / (budget - 1))
    values = np.arange(2, budget)  # uniform on [2, budget - 1]
    assert abs(short.mean() - values.mean()) <= 5 * values.std() / math.sqrt(short.size)
    # short_seq_prob = 0: every chunk but a document's last fills the budget
    never = build(Documents.from_lists(docs[:3]), "sop", max_tokens, seed=29, short_seq_prob=0.0)
    used = never["attention_mask"].sum(1)
    last_of_document = torch.ones_like(used, dtype=torch.bool)
    last_of_document[:-1] = never["document_index"][1:] != never["document_index"][:-1]
    assert bool((used[~last_of_document] == max_tokens).all())


# ----------------------------------------------------------------------------------------------
# Bad input

def ok_documents():
    return Documents.from_lists(numbered([[3, 4], [5]]))


GOOD = dict(objective="nsp", max_tokens=16, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD, seed=0)


@pytest.mark.parametrize("change,error,name", [
    (dict(objective="mlm"), ValueError, "objective"),
    (dict(max_tokens=4), ValueError, "max_tokens"),
    (dict(max_tokens=16.0), TypeError, "max_tokens"),
    (dict(cls_token_id=-1), ValueError, "cls_token_id"),
    (dict(sep_token_id=-5), ValueError, "sep_token_id"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(pad_token_id=None), TypeError, "pad_token_id"),
    (dict(short_seq_prob=-0.1), ValueError, "short_seq_prob"),
    (dict(short_seq_prob=1.5), ValueError, "short_seq_prob"),
    (dict(short_seq_prob=float("nan")), ValueError, "short_seq_prob"),
    (dict(short_seq_prob="0.1"), TypeError, "short_seq_prob"),
    (dict(epoch=-1), ValueError, "epoch"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(num_threads=-1), ValueError, "num_threads"),
    (dict(native="yes"), TypeError, "native"),
])
def test_bad_arguments_name_themselves(change, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        build_sentence_pairs(ok_documents(), **{**GOOD, **change})


def test_max_tokens_below_the_special_tokens_says_so():
    with pytest.raises(ValueError, match="budget smaller than the special tokens"):
        build_sentence_pairs(ok_documents(), **{**GOOD, "max_tokens": 3})


def test_ids_must_fit_the_token_dtype():
    documents = Documents.from_lists(numbered([[3, 4]]), dtype=torch.int32)
    with pytest.raises(ValueError, match="`cls_token_id`"):
        build_sentence_pairs(documents, **{**GOOD, "cls_token_id": 2**31})


def test_documents_must_be_documents():
    with pytest.raises(TypeError, match="`documents`"):
        build_sentence_pairs([[[1, 2]]], **GOOD)


I64 = torch.int64


@pytest.mark.parametrize("tokens,sentences,documents,error,name", [
    (torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), torch.tensor([0, 1]), TypeError, "tokens"),
    (torch.tensor([[1, 2]]), torch.tensor([0, 2]), torch.tensor([0, 1]), ValueError, "tokens"),
    (torch.tensor([1, -2]), torch.tensor([0, 2]), torch.tensor([0, 1]), ValueError, "tokens"),
    ([1, 2], torch.tensor([0, 2]), torch.tensor([0, 1]), TypeError, "tokens"),
    (torch.tensor([1, 2]), torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 1]), TypeError, "sentence_offsets"),
    (torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([0, 1]), ValueError, "sentence_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 1]), ValueError, "sentence_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 2, 1, 2]), torch.tensor([0, 3]), ValueError, "sentence_offsets"),
    (torch.tensor([1, 2]), torch.tensor([], dtype=I64), torch.tensor([0]), ValueError, "sentence_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0.0, 1.0]), TypeError, "document_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([1, 2]), ValueError, "document_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), ValueError, "document_offsets"),
    (torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1, 2]), ValueError, "document_offsets"),
])
def test_bad_documents_name_the_buffer(tokens, sentences, documents, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        Documents(tokens, sentences, documents)


def test_bad_dtype_for_from_lists():
    with pytest.raises(TypeError, match="`dtype`"):
        Documents.from_lists([[[1]]], dtype=torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        Documents.from_lists([[[2**31]]], dtype=torch.int32)


def test_native_required_but_missing_gives_the_reason(monkeypatch):
    monkeypatch.setattr(sp.compiled, "load", lambda name: (None, "bertfast._C is not built (test)"))
    with pytest.raises(RuntimeError, match="is not built"):
        build_sentence_pairs(ok_documents(), **GOOD, native=True)
    out = build_sentence_pairs(ok_documents(), **GOOD)  # None falls back to the Python path
    assert out["input_ids"].shape[1] == 16


def test_kernel_called_directly_refuses_bad_offsets_without_crashing():
    module = native_module()
    tokens = np.arange(4, dtype=np.int64)
    good_s, good_d = np.array([0, 2, 4], dtype=np.int64), np.array([0, 2], dtype=np.int64)
    args = (True, 8, CLS, SEP, PAD, 0, 0, 0, 1)
    module.build_sentence_pairs(tokens, good_s, good_d, *args)
    for s, d in [(np.array([0, 3, 2, 4]), good_d), (np.array([0, 2, 5]), good_d), (good_s, np.array([0, 3])),
                 (good_s, np.array([1, 2])), (np.array([], dtype=np.int64), np.array([0]))]:
        with pytest.raises(ValueError, match="offsets"):
            module.build_sentence_pairs(tokens, s.astype(np.int64), d.astype(np.int64), *args)
    with pytest.raises((ValueError, TypeError)):
        module.build_sentence_pairs(tokens.astype(np.float32), good_s, good_d, *args)
