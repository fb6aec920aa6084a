"""bertfast.pretrain.data: examples and batches as pure functions of (seed, step, rank)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from bertfast.pretrain.data import PretrainingData, full_sentence_blocks
from bertfast.pretrain.recipes import OBJECTIVES


@dataclass(frozen=True)
class FakeVocab:
    vocab_size: int = 100
    pad_token_id: int = 0
    unk_token_id: int = 1
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4

    @property
    def special_token_ids(self):
        return (0, 1, 2, 3, 4)


def documents(n_docs=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        sentences = int(torch.randint(1, 8, (1,), generator=g))
        docs.append([torch.randint(5, 100, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(sentences)])
    return docs


def test_full_sentence_blocks_keep_every_token_in_order():
    docs = documents()
    ex = full_sentence_blocks(docs, seq_len=16, cls_id=2, sep_id=3, pad_id=0)
    stream = []
    for d, doc in enumerate(docs):
        if d:
            stream.append(3)
        for s in doc:
            stream.extend(s)
    inner = []
    for row, n in zip(ex.input_ids.tolist(), ex.lengths.tolist()):
        assert row[0] == 2 and row[n - 1] == 3 and all(x == 0 for x in row[n:])
        inner.extend(row[1:n - 1])
    assert inner == stream
    assert (ex.lengths[:-1] == 16).all()


@pytest.mark.parametrize("model", ["roberta", "bert", "albert"])
def test_ranks_and_accumulation_see_the_combined_batch(model):
    """W ranks x batch b, or accumulation, give the examples and masks of one batch W x b."""
    docs, vocab = documents(60), FakeVocab()
    one = PretrainingData(docs, vocab, OBJECTIVES[model], seq_len=24, seed=5, batch_size=8)
    two = PretrainingData(docs, vocab, OBJECTIVES[model], seq_len=24, seed=5, batch_size=4, world_size=2)
    acc = PretrainingData(docs, vocab, OBJECTIVES[model], seq_len=24, seed=5, batch_size=2, accumulation=2,
                          world_size=2)
    for step in (0, 1, one.steps_in_epoch(0) + 1):
        (whole,) = one.micro_batches(step)
        parts = [b for r in range(2) for b in two.micro_batches(step, r)]
        # accumulation: micro j of rank r is slice (j * world + r): reorder to the combined order
        acc_parts = [acc.micro_batches(step, r)[j] for j in range(2) for r in range(2)]
        for split in (parts, acc_parts):
            for key in whole:
                if whole[key].dim() == 2:
                    width = whole[key].shape[1]
                    joined = torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]),
                                                                value=-100 if key == "labels" else 0)
                                        for b in split])
                else:
                    joined = torch.cat([b[key] for b in split])
                assert torch.equal(joined, whole[key]), key


def test_masks_follow_the_example_and_the_duplicate():
    docs, vocab = documents(60), FakeVocab()
    dynamic = PretrainingData(docs, vocab, OBJECTIVES["roberta"], seq_len=24, seed=5, batch_size=4)
    index = torch.tensor([3, 7, 11])
    a = dynamic.collate(0, index)
    b = dynamic.collate(0, index.flip(0))
    assert torch.equal(a["input_ids"], b["input_ids"].flip(0))  # the row it lands in changes nothing
    assert not torch.equal(dynamic.collate(1, index)["labels"], a["labels"])  # fresh mask each epoch
    static = PretrainingData(docs, vocab, OBJECTIVES["bert"], seq_len=24, seed=5, batch_size=4)
    dup = OBJECTIVES["bert"].duplicates
    assert torch.equal(static.collate(0, index)["input_ids"], static.collate(dup, index)["input_ids"])
    assert not torch.equal(static.collate(0, index)["input_ids"], static.collate(1, index)["input_ids"])


def test_labels_hold_the_original_ids_and_special_tokens_are_never_masked():
    docs, vocab = documents(60), FakeVocab()
    data = PretrainingData(docs, vocab, OBJECTIVES["albert"], seq_len=24, seed=1, batch_size=8)
    ex = data.examples(0)
    index = torch.arange(len(ex))
    batch = data.collate(0, index)
    original = ex.input_ids[:, :batch["input_ids"].shape[1]]
    chosen = batch["labels"] != -100
    assert chosen.any()
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert not chosen[original < 5].any()
    assert set(batch) == {"input_ids", "labels", "attention_mask", "token_type_ids", "pair_labels"}
    assert batch["input_ids"].shape[1] % 8 == 0 or batch["input_ids"].shape[1] == 24


def test_order_is_a_permutation_per_epoch_and_positions_walk_epochs():
    docs, vocab = documents(60), FakeVocab()
    data = PretrainingData(docs, vocab, OBJECTIVES["electra"], seq_len=24, seed=2, batch_size=4)
    n = data.num_examples
    assert sorted(data.order(0).tolist()) == list(range(n))
    assert not torch.equal(data.order(0), data.order(1))
    per = data.steps_in_epoch(0)
    assert data.position(0) == (0, 0) and data.position(per - 1) == (0, per - 1) and data.position(per) == (1, 0)


def test_bad_sizes_name_the_argument():
    docs, vocab = documents(5), FakeVocab()
    with pytest.raises(ValueError, match="--batch-size"):
        PretrainingData(docs, vocab, OBJECTIVES["roberta"], seq_len=24, seed=0, batch_size=10_000)
    with pytest.raises(ValueError, match="--accumulation"):
        PretrainingData(docs, vocab, OBJECTIVES["roberta"], seq_len=24, seed=0, batch_size=1, accumulation=0)
    with pytest.raises(ValueError, match="corpus"):
        PretrainingData([], vocab, OBJECTIVES["roberta"], seq_len=24, seed=0, batch_size=1)


def test_position_walks_epochs_of_different_lengths():
    """Sentence pairs are rebuilt per duplicate, so epochs differ in length: position() must agree
    with walking them one by one."""
    docs, vocab = documents(80), FakeVocab()
    data = PretrainingData(docs, vocab, OBJECTIVES["bert"], seq_len=24, seed=3, batch_size=4)
    lengths = [data.steps_in_epoch(e) for e in range(25)]
    assert len(set(lengths[:10])) > 1 and lengths[:10] == lengths[10:20]
    expected = [(e, k) for e, n in enumerate(lengths) for k in range(n)]
    assert [data.position(s) for s in range(len(expected))] == expected
