"""bertfast.pretrain.tokenizer: trained WordPiece / byte-level BPE tokenizers (special ids, determinism
across processes, vocabulary bounds), tokenizer.json round trips and errors, the transformers export,
and the MLM collator's view of a trained vocabulary."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from bertfast.data.collators import MLMCollator
from bertfast.pretrain import tokenizer as T
from bertfast.pretrain.tokenizer import (
    BPE_SPECIALS,
    WORDPIECE_SPECIALS,
    Vocab,
    kind_for,
    load_tokenizer,
    to_transformers,
    train_tokenizer,
)

_WORDS = ("the a of to and in is it for on with as by be this that function value return object "
          "list string file name class module error type default argument number data time path "
          "method call new set get line first used when if not or all each which from an are").split()


def corpus_texts(n: int = 400) -> list[str]:
    """Fixed pseudo-random sentences (a linear congruential generator: no dependence on random's
    implementation), with a few accents, digits and symbols."""
    x, out = 12345, []
    for i in range(n):
        words = []
        for _ in range(4 + i % 9):
            x = (1103515245 * x + 12345) % 2**31
            words.append(_WORDS[x % len(_WORDS)])
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + (".", "?", "!", " (x=3.14).", " caf\u00e9, na\u00efve #1.")[i % 5])
    return out


TEXTS = corpus_texts()
SAMPLES = ["The value of this function is returned.", "Caf\u00e9 na\u00efve \u2603 snowman, UNSEEN-word 42!", ""]


@pytest.fixture(scope="module")
def wordpiece() -> Vocab:
    return train_tokenizer("wordpiece", TEXTS, 600)


@pytest.fixture(scope="module")
def bpe() -> Vocab:
    return train_tokenizer("bpe", TEXTS, 600)


def test_kind_for():
    assert [kind_for(m) for m in ("bert", "albert", "electra", "roberta")] == ["wordpiece"] * 3 + ["bpe"]
    with pytest.raises(ValueError, match="model: .*'gpt2'"):
        kind_for("gpt2")


def test_wordpiece_specials_and_post_processing(wordpiece):
    v, tok = wordpiece, wordpiece.tokenizer
    assert v.kind == "wordpiece"
    assert [tok.token_to_id(t) for t in WORDPIECE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (v.pad_token_id, v.unk_token_id, v.cls_token_id, v.sep_token_id, v.mask_token_id) == (0, 1, 2, 3, 4)
    assert (v.pad_token, v.unk_token, v.cls_token, v.sep_token, v.mask_token) == WORDPIECE_SPECIALS
    assert v.special_token_ids == (0, 1, 2, 3, 4)
    assert v.vocab_size == tok.get_vocab_size() <= 600
    # Only the five specials are added (special) tokens: the alphabet is ordinary vocabulary.
    assert sorted(tok.get_added_tokens_decoder()) == [0, 1, 2, 3, 4]
    assert all(t.special for t in tok.get_added_tokens_decoder().values())
    # Characters sorted by code point, then the ## forms (of those seen inside words) in the same order.
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    chars = [t for t in vocab[5:] if len(t) == 1]
    continuations = [t for t in vocab if t.startswith("##") and len(t) == 3]
    assert vocab[5:5 + len(chars)] == sorted(chars)
    assert vocab[5 + len(chars):5 + len(chars) + len(continuations)] == sorted(continuations)
    assert {c[2] for c in continuations} < set(chars)
    a, b = v.encode(["the value is returned.", "a new list"])
    assert a and b and not set(a + b) & set(v.special_token_ids)
    assert tok.encode("the value is returned.").ids == [2, *a, 3]
    pair = tok.encode("the value is returned.", "a new list")
    assert pair.ids == [2, *a, 3, *b, 3]
    assert pair.type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok.decode(a) == "the value is returned."
    assert v.encode(["THE Value"]) == v.encode(["the value"])  # lowercased
    assert v.encode(["caf\u00e9"]) == v.encode(["cafe"])  # accents stripped with lowercasing
    assert v.encode(["\u2603"]) == [[1]]  # unseen character -> [UNK]


def test_bpe_specials_and_post_processing(bpe):
    v, tok = bpe, bpe.tokenizer
    assert v.kind == "bpe"
    assert [tok.token_to_id(t) for t in BPE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (v.cls_token_id, v.pad_token_id, v.sep_token_id, v.unk_token_id, v.mask_token_id) == (0, 1, 2, 3, 4)
    assert (v.cls_token, v.pad_token, v.sep_token, v.unk_token, v.mask_token) == BPE_SPECIALS
    assert v.special_token_ids == (0, 1, 2, 3, 4)
    assert 5 + 256 < v.vocab_size == tok.get_vocab_size() <= 600
    a, b = v.encode(["the value is returned.", "a new list"])
    assert tok.encode("the value is returned.").ids == [0, *a, 2]
    assert tok.encode("the value is returned.", "a new list").ids == [0, *a, 2, 2, *b, 2]
    assert tok.decode(a) == " the value is returned."  # the prefix space ByteLevel adds
    snow = v.encode(["\u2603"])[0]  # unseen character: its UTF-8 bytes, never an unknown token
    assert snow and 3 not in snow and tok.decode(snow).strip() == "\u2603"


def _digest(vocab: Vocab) -> str:
    return hashlib.sha256(vocab.tokenizer.to_str().encode()).hexdigest()


_CHILD = """
import hashlib, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("tok", sys.argv[1])
tok = sys.modules["tok"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(tok)
texts = json.load(sys.stdin)
for kind in ("wordpiece", "bpe"):
    print(hashlib.sha256(tok.train_tokenizer(kind, texts, 600).tokenizer.to_str().encode()).hexdigest())
"""


def test_training_is_deterministic(wordpiece, bpe):
    """Same texts -> same tokenizer.json, in this process (hash maps get fresh keys each time) and in
    another one (fresh hash seeds). Plain tokenizers WordPiece training fails this."""
    assert _digest(train_tokenizer("wordpiece", iter(TEXTS), 600)) == _digest(wordpiece)
    assert _digest(train_tokenizer("bpe", iter(TEXTS), 600)) == _digest(bpe)
    # A fresh interpreter that loads tokenizer.py on its own (no torch import: fast).
    done = subprocess.run([sys.executable, "-c", _CHILD, T.__file__], input=json.dumps(TEXTS),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [_digest(wordpiece), _digest(bpe)]


def test_vocab_size_bounds():
    small = train_tokenizer("wordpiece", ["tiny text here."] * 3, 5000)
    assert small.vocab_size == small.tokenizer.get_vocab_size() < 5000
    with pytest.raises(ValueError, match="vocab_size: 20 is smaller than the 5 special tokens plus the"):
        train_tokenizer("wordpiece", TEXTS, 20)
    with pytest.raises(ValueError, match="vocab_size: 260 .* use at least 261"):
        train_tokenizer("bpe", TEXTS, 260)
    assert train_tokenizer("bpe", TEXTS, 261).vocab_size == 261
    fixed = len(load_tokenizer_alphabet(TEXTS)) + 5
    assert train_tokenizer("wordpiece", TEXTS, fixed).vocab_size == fixed


def load_tokenizer_alphabet(texts):
    """Characters and ## forms a WordPiece of ``texts`` holds (from a large-vocabulary training)."""
    v = train_tokenizer("wordpiece", texts, 100_000)
    return [t for t in v.tokenizer.get_vocab() if t not in WORDPIECE_SPECIALS
            and (len(t) == 1 or (t.startswith("##") and len(t) == 3))]


def test_train_bad_arguments():
    with pytest.raises(ValueError, match="kind: expected 'wordpiece' or 'bpe', got 'unigram'"):
        train_tokenizer("unigram", TEXTS)
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer("wordpiece", "a single string")
    with pytest.raises(TypeError, match="texts: item 1"):
        train_tokenizer("wordpiece", ["ok", 3])
    with pytest.raises(TypeError, match="vocab_size"):
        train_tokenizer("bpe", TEXTS, 600.0)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer("bpe", TEXTS, 600, min_frequency=-1)
    with pytest.raises(ValueError, match="texts: no text"):
        train_tokenizer("bpe", ["", "  "], 600)


def test_encode_rejects_bad_texts(wordpiece):
    with pytest.raises(TypeError, match="texts: expected a list of str, got str"):
        wordpiece.encode("a string")
    with pytest.raises(TypeError, match="texts: item 0"):
        wordpiece.encode([b"bytes"])
    assert wordpiece.encode([]) == []


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_save_load_round_trip(kind, wordpiece, bpe, tmp_path):
    v = wordpiece if kind == "wordpiece" else bpe
    file = tmp_path / "tokenizer.json"
    v.save(file)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = load_tokenizer(file)
    assert loaded.tokenizer.to_str() == v.tokenizer.to_str()
    assert [getattr(loaded, f) for f in Vocab.__dataclass_fields__ if f != "tokenizer"] == \
           [getattr(v, f) for f in Vocab.__dataclass_fields__ if f != "tokenizer"]
    assert loaded.encode(TEXTS[:50] + SAMPLES) == v.encode(TEXTS[:50] + SAMPLES)
    folder = tmp_path / "dir"
    folder.mkdir()
    v.save(folder)  # a folder: tokenizer.json inside it
    assert load_tokenizer(folder).encode(SAMPLES) == v.encode(SAMPLES)
    v.save(str(file))  # overwrite in place
    assert load_tokenizer(str(file)).vocab_size == v.vocab_size


def _save_wordpiece(path: Path, tokens: list[str]) -> Path:
    tok = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=tokens[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in tokens if t.startswith(("[", "<"))])
    tok.save(str(path))
    return path


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer: .*missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot a tokenizer{")
    with pytest.raises(ValueError, match=f"--tokenizer: {garbage} is not a readable tokenizer.json"):
        load_tokenizer(garbage)
    (tmp_path / "wrong.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match="--tokenizer: .*wrong.json"):
        load_tokenizer(tmp_path / "wrong.json")
    no_mask = _save_wordpiece(tmp_path / "no_mask.json", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "word"])
    with pytest.raises(ValueError) as e:
        load_tokenizer(no_mask)
    assert str(e.value) == f"--tokenizer: {no_mask} has no mask token ([MASK] or <mask>); MLM needs one"
    for missing, role in (("[PAD]", "pad"), ("[CLS]", "cls"), ("[SEP]", "sep")):
        tokens = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word") if t != missing]
        f = _save_wordpiece(tmp_path / f"no_{role}.json", tokens)
        with pytest.raises(ValueError, match=rf"--tokenizer: .*no_{role}.json has no {role} token"):
            load_tokenizer(f)


def test_load_mixed_family_and_no_unk(tmp_path):
    # ALBERT's convention: <pad>/<unk> with [CLS]/[SEP]/[MASK].
    f = _save_wordpiece(tmp_path / "albert.json", ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]", "word"])
    v = load_tokenizer(f)
    assert (v.kind, v.pad_token, v.unk_token, v.cls_token, v.mask_token) == \
           ("wordpiece", "<pad>", "<unk>", "[CLS]", "[MASK]")
    assert (v.pad_token_id, v.unk_token_id, v.cls_token_id, v.sep_token_id, v.mask_token_id) == (0, 1, 2, 3, 4)
    # A byte-level BPE without <unk>: unk is None and left out of the special ids.
    bpe = tokenizers.Tokenizer(models.BPE({"<s>": 0, "<pad>": 1, "</s>": 2, "<mask>": 3, "a": 4}, []))
    bpe.add_special_tokens(["<s>", "<pad>", "</s>", "<mask>"])
    bpe.save(str(tmp_path / "bpe.json"))
    v = load_tokenizer(tmp_path / "bpe.json")
    assert (v.kind, v.unk_token, v.unk_token_id, v.special_token_ids) == ("bpe", None, None, (0, 1, 2, 3))


def test_load_drops_padding_and_truncation(wordpiece, tmp_path):
    tok = tokenizers.Tokenizer.from_str(wordpiece.tokenizer.to_str())
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=64)
    tok.enable_truncation(max_length=3)
    tok.save(str(tmp_path / "padded.json"))
    assert load_tokenizer(tmp_path / "padded.json").encode(SAMPLES) == wordpiece.encode(SAMPLES)


def test_load_transformers_bert_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "value", "is", "return", "##ed", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    hf = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    hf.save_pretrained(tmp_path / "bert")
    v = load_tokenizer(tmp_path / "bert")
    assert (v.kind, v.pad_token_id, v.unk_token_id, v.cls_token_id, v.sep_token_id, v.mask_token_id) == \
           ("wordpiece", 0, 1, 2, 3, 4)
    assert v.encode(["the value is returned."]) == [[5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_to_transformers_round_trip(kind, wordpiece, bpe, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    v = wordpiece if kind == "wordpiece" else bpe
    to_transformers(v, 128).save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 128
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == \
           (v.pad_token_id, v.unk_token_id, v.cls_token_id, v.sep_token_id, v.mask_token_id)
    if kind == "bpe":
        assert (hf.bos_token_id, hf.eos_token_id) == (v.cls_token_id, v.sep_token_id)
    for text in TEXTS[:20] + SAMPLES:
        assert hf(text)["input_ids"] == v.tokenizer.encode(text).ids
    pair = hf(SAMPLES[0], SAMPLES[1])
    expected = v.tokenizer.encode(SAMPLES[0], SAMPLES[1])
    assert pair["input_ids"] == expected.ids
    assert ("token_type_ids" in pair) == (kind == "wordpiece")
    if kind == "wordpiece":
        assert pair["token_type_ids"] == expected.type_ids
    batch = hf([SAMPLES[0], SAMPLES[1]], padding=True)
    assert batch["input_ids"][1] == v.tokenizer.encode(SAMPLES[1]).ids
    assert batch["input_ids"][0][-1] == v.pad_token_id  # padded with our pad id
    assert v.encode(SAMPLES) == [v.tokenizer.encode(s, add_special_tokens=False).ids for s in SAMPLES]  # untouched


def test_to_transformers_bad_arguments(wordpiece):
    with pytest.raises(ValueError, match="model_max_length"):
        to_transformers(wordpiece, 0)
    with pytest.raises(TypeError, match="vocab"):
        to_transformers(wordpiece.tokenizer, 128)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_mlm_collator_from_trained_tokenizer(kind, wordpiece, bpe):
    v = wordpiece if kind == "wordpiece" else bpe
    c = MLMCollator.from_tokenizer(v.tokenizer)
    assert (c.mask_token_id, c.pad_token_id, c.vocab_size) == (v.mask_token_id, v.pad_token_id, v.vocab_size)
    assert tuple(c.special_token_ids) == v.special_token_ids
    ids = [[v.cls_token_id, *x, v.sep_token_id] for x in v.encode(TEXTS[:8])]
    batch = c(ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, max(map(len, ids)))


def test_path_types(wordpiece):
    with pytest.raises(TypeError, match="--tokenizer"):
        load_tokenizer(3)
    with pytest.raises(TypeError, match="path"):
        wordpiece.save(None)
