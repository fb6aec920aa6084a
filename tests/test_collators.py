"""MLMCollator: the C++ and Python paths give the same batches for a seed; dynamic / static / whole-
word / n-gram masking behave as documented; tokenizers and transformers models accept it; bad input
gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from bertfast.data.collate import pad_sequences
from bertfast.data.collators import MLMCollator
from bertfast.ops import compiled

NATIVE = pytest.mark.skipif(compiled.load("_C")[0] is None, reason="bertfast._C is not built")
VOCAB = 500
SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


def wordpiece(with_mask: bool = True) -> Tokenizer:
    vocab = {t: i for t, i in SPECIALS.items() if with_mask or t != "[MASK]"}
    vocab.update({f"w{i}": i for i in range(5, VOCAB)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in vocab if t.startswith("[")])
    return tok


def examples(n: int = 9, seed: int = 0, words: bool = False, types: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, 40))
        ids = [2, *rng.integers(5, VOCAB, length).tolist(), 3]
        e = {"input_ids": ids, "sequence_id": 1000 + i}
        if words:  # words of 1-3 pieces; None for [CLS]/[SEP]
            w, left, word_ids = 0, 0, []
            for _ in range(length):
                if left == 0:
                    w, left = w + 1, int(rng.integers(1, 4))
                word_ids.append(w)
                left -= 1
            e["word_ids"] = [None, *word_ids, None]
        if types:
            e["token_type_ids"] = [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2)
            e["sentence_order_label"] = i % 2
        out.append(e)
    return out


def collator(**kw) -> MLMCollator:
    return MLMCollator.from_tokenizer(wordpiece(), seed=7, **kw)


def assert_batches_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


CONFIGS = [
    {},
    {"masking": "static", "duplicates": 3},
    {"whole_word": True},
    {"max_ngram": 3},
    {"whole_word": True, "max_ngram": 3},
    {"probability": 0.5, "pad_to_multiple_of": 8, "dtype": torch.int32},
]


@NATIVE
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_native_and_python_paths_give_the_same_batches(config):
    batch_examples = examples(words=True, types=True)
    native, python = collator(native=True, **config), collator(native=False, **config)
    for _ in range(3):  # successive calls: dynamic masks change, identically on both paths
        assert_batches_equal(native(batch_examples), python(batch_examples))


def test_output_layout_matches_transformers_collator_keys():
    batch = collator()(examples(types=True))
    lengths = torch.tensor([len(e["input_ids"]) for e in examples(types=True)])
    L = int(lengths.max())
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids", "sentence_order_label"}
    assert batch["input_ids"].shape == batch["labels"].shape == (9, L)
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["labels"][pad] == -100).all()
    assert batch["labels"].dtype == torch.int64
    assert torch.equal(batch["sentence_order_label"], torch.arange(9) % 2)


def test_unmasked_positions_keep_their_ids_and_labels_hold_the_originals():
    ex = examples(n=30)
    batch = collator(probability=0.3)(ex)
    original, _ = pad_sequences([e["input_ids"] for e in ex], pad_value=0)
    chosen = batch["labels"] != -100
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert chosen.any()
    specials = original <= 4
    assert not (chosen & specials).any(), "a special or padding token was chosen"


def test_tensor_and_list_examples_give_the_same_batch():
    ex = examples()
    as_tensors = [torch.tensor(e["input_ids"]) for e in ex]
    assert_batches_equal(collator()([e["input_ids"] for e in ex]), collator()(as_tensors))


def test_dynamic_masks_change_per_call_and_static_masks_repeat_per_duplicate():
    ex = examples(n=20)
    dynamic = collator()
    assert not torch.equal(dynamic(ex)["labels"], dynamic(ex)["labels"])
    static = collator(masking="static", duplicates=2)
    first = static(ex)["labels"]
    assert torch.equal(static(ex)["labels"], first)  # same epoch: same mask
    static.set_epoch(1)
    assert not torch.equal(static(ex)["labels"], first)
    static.set_epoch(2)  # 2 % 2 == 0: the first duplicate again
    assert torch.equal(static(ex)["labels"], first)
    # a sequence keeps its mask wherever it sits in a batch
    static.set_epoch(0)
    reordered = static(ex[::-1])["labels"]
    assert torch.equal(reordered.flip(0)[:, : first.shape[1]], first)


def test_whole_word_masking_masks_words_all_or_nothing():
    ex = examples(n=40, words=True)
    batch = collator(whole_word=True, probability=0.4)(ex)
    for row, e in enumerate(ex):
        chosen = (batch["labels"][row, : len(e["input_ids"])] != -100).tolist()
        by_word: dict[int, set] = {}
        for c, w in zip(chosen, e["word_ids"]):
            if w is None:
                assert not c
            else:
                by_word.setdefault(w, set()).add(c)
        assert all(len(s) == 1 for s in by_word.values())


def test_trains_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    batch = collator()(examples())
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_from_transformers_tokenizer_reads_its_ids():
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=wordpiece(), pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    c = MLMCollator.from_tokenizer(fast)
    assert (c.vocab_size, c.mask_token_id, c.pad_token_id) == (VOCAB, 4, 0)
    assert set(c.special_token_ids) == {0, 1, 2, 3, 4}


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="tokenizer: has no mask token"):
        MLMCollator.from_tokenizer(wordpiece(with_mask=False))
    with pytest.raises(TypeError, match="tokenizer"):
        MLMCollator.from_tokenizer(object())
    with pytest.raises(ValueError, match="examples is empty"):
        collator()([])
    with pytest.raises(ValueError, match=r"examples\[1\].*: token id -7 is out of range"):
        collator()([[2, 5, 3], [2, -7, 3]])
    with pytest.raises(ValueError, match="input_ids"):
        collator()([[2, VOCAB + 3, 3]])
    with pytest.raises(ValueError, match=r"examples\[0\]: 3 tokens do not fit max_length 2"):
        collator(max_length=2)([[2, 5, 3]])
    with pytest.raises(ValueError, match="sequence_id"):
        collator(masking="static")([[2, 5, 3]])
    with pytest.raises(ValueError, match="word_ids"):
        collator(whole_word=True)([{"input_ids": [2, 5, 3]}])
    with pytest.raises(ValueError, match="masking must be"):
        collator(masking="sometimes")
    with pytest.raises(ValueError, match="mask_token_id 900 is outside the vocabulary"):
        MLMCollator(vocab_size=VOCAB, mask_token_id=900, pad_token_id=0)
    with pytest.raises(ValueError, match="probability"):
        collator(probability=1.5)
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        collator(native=False)([["a", "b"]])


def test_padding_then_the_mask_tokens_op_draws_the_collators_mask():
    """Masking moved out of the data loader (README): pad, then the op with the collator's row keys."""
    from bertfast import ops
    from bertfast.data.masking import dynamic_row_keys

    ex = [e["input_ids"] for e in examples(n=12)]
    c = collator(probability=0.3)
    c(ex)  # call 0
    expected = c(ex)  # call 1
    ids, _ = pad_sequences(ex, pad_value=0)
    masked, labels = ops.mask_tokens(ids, dynamic_row_keys(1, len(ex)), 7, vocab_size=VOCAB, mask_token_id=4,
                                     special_token_ids=c.special_token_ids, probability=0.3, backend="torch")
    assert torch.equal(masked, expected["input_ids"]) and torch.equal(labels, expected["labels"])
