"""Tokenizers for pretraining: train one on a corpus (WordPiece for BERT, ALBERT and ELECTRA; byte-level
BPE for RoBERTa), load any ``tokenizer.json``, and hand it to ``transformers``.

A trained WordPiece holds ``WORDPIECE_SPECIALS`` at ids 0..4, then the corpus's characters (sorted
by code point), their ``##`` continuation forms (same order), then the learned word pieces; its
post-processor wraps sequences as ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` (type ids 0/1).
A trained byte-level BPE holds ``BPE_SPECIALS`` at ids 0..4 (RoBERTa's order: <pad> = 1), the 256
byte symbols, then the merges; it wraps sequences as ``<s> A </s>`` and ``<s> A </s></s> B </s>``.
Training is deterministic: the same texts and arguments give the same ``tokenizer.json`` bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import (
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = ["BPE_SPECIALS", "WORDPIECE_SPECIALS", "Vocab", "kind_for", "load_tokenizer", "to_transformers",
           "train_tokenizer"]

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a trained WordPiece
BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4 in a trained byte-level BPE

_ROLES = ("pad", "unk", "cls", "sep", "mask")
# The token of each role in each family, as (BERT's, RoBERTa's).
_CANDIDATES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
               "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class Vocab:
    """A ``tokenizers.Tokenizer`` with its special tokens resolved.

    kind: "wordpiece" (BERT's [CLS]/[SEP]/[MASK] family) or "bpe" (RoBERTa's <s>/</s>/<mask> family);
        for a loaded tokenizer, the family of its mask token.
    vocab_size: ``tokenizer.get_vocab_size()`` (added tokens included): ids are in [0, vocab_size).
    unk_token / unk_token_id: None when the vocabulary has no unknown token (byte-level BPE needs none).
    """

    tokenizer: tokenizers.Tokenizer
    kind: str
    vocab_size: int
    pad_token_id: int
    unk_token_id: int | None
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    pad_token: str
    unk_token: str | None
    cls_token: str
    sep_token: str
    mask_token: str

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """pad, unk, cls, sep and mask ids, sorted and unique (unk left out when absent)."""
        ids = (self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        return tuple(sorted({i for i in ids if i is not None}))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (no post-processing), in one batched call."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts: item {i} is a {type(t).__name__}, not a str")
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as ``tokenizer.json`` at ``path`` (a file path, or an existing folder to
        write ``tokenizer.json`` into), atomically: temp file in the same folder, then os.replace."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a path, got {type(path).__name__}")
        file = Path(os.fspath(path))
        if file.is_dir():
            file = file / "tokenizer.json"
        text = self.tokenizer.to_str()
        fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def kind_for(model: str) -> str:
    """The tokenizer kind a model is pretrained with: "bpe" for roberta, "wordpiece" for bert, albert
    and electra."""
    kinds = {"bert": "wordpiece", "albert": "wordpiece", "electra": "wordpiece", "roberta": "bpe"}
    if model not in kinds:
        raise ValueError(f"model: expected one of {', '.join(sorted(kinds))}, got {model!r}")
    return kinds[model]


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 8192, *, lowercase: bool = True,
                    min_frequency: int = 2) -> Vocab:
    """Train a tokenizer of ``kind`` ("wordpiece" or "bpe") on ``texts`` (e.g. ``Corpus.texts()``).

    WordPiece: BertNormalizer (lowercase and accent stripping iff ``lowercase``), BertPreTokenizer,
    "##" continuations. BPE: byte-level (prefix space added), lowercased iff ``lowercase``.
    ``vocab_size`` is an upper bound: a small corpus may give fewer tokens (``Vocab.vocab_size`` is the
    actual size); pieces seen fewer than ``min_frequency`` times are not learned. The 5 special tokens
    plus the alphabet (256 bytes for BPE; every character of the texts and its ## form for WordPiece)
    must fit in ``vocab_size``, else ValueError.
    """
    if kind not in ("wordpiece", "bpe"):
        raise ValueError(f"kind: expected 'wordpiece' or 'bpe', got {kind!r}")
    for name, value in (("vocab_size", vocab_size), ("min_frequency", min_frequency)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if min_frequency < 0:
        raise ValueError(f"min_frequency: must be >= 0, got {min_frequency}")
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of str, got a single str")
    texts = list(texts)  # WordPiece reads them twice; Corpus holds them in memory anyway
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts: item {i} is a {type(t).__name__}, not a str")
    if not any(t.strip() for t in texts):
        raise ValueError("texts: no text to train a tokenizer on")
    if kind == "bpe":
        return _train_bpe(texts, vocab_size, lowercase, min_frequency)
    return _train_wordpiece(texts, vocab_size, lowercase, min_frequency)


def _wordpiece_tokenizer(lowercase: bool) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=lowercase, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _train_wordpiece(texts: list[str], vocab_size: int, lowercase: bool, min_frequency: int) -> Vocab:
    # tokenizers numbers the "##x" continuation symbols in hash-map order, which differs from run to
    # run, and breaks ties between equally frequent merges by symbol id: the learned vocabulary would
    # change between runs. So a first pass (no merges) finds the alphabet, and the second pass gets
    # the alphabet and its ## forms, sorted, as extra "special" tokens: fixed ids, fixed tie-breaks.
    # They are made ordinary vocabulary entries again afterwards.
    probe = _wordpiece_tokenizer(lowercase)
    probe.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=0, special_tokens=list(WORDPIECE_SPECIALS), show_progress=False), length=len(texts))
    symbols = [t for t in probe.get_vocab(with_added_tokens=False) if t not in WORDPIECE_SPECIALS]
    chars = sorted((t for t in symbols if not t.startswith("##")), key=_code_points)
    continuations = sorted((t for t in symbols if t.startswith("##")), key=_code_points)
    fixed = len(WORDPIECE_SPECIALS) + len(chars) + len(continuations)
    if vocab_size < fixed:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the {len(WORDPIECE_SPECIALS)} special tokens "
                         f"plus the {fixed - len(WORDPIECE_SPECIALS)} symbols (characters and their ## forms) "
                         f"of these texts; use at least {fixed}")
    tok = _wordpiece_tokenizer(lowercase)
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False, continuing_subword_prefix="##",
        special_tokens=[*WORDPIECE_SPECIALS, *chars, *continuations]), length=len(texts))
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in WORDPIECE_SPECIALS]
    tok = tokenizers.Tokenizer.from_str(json.dumps(state))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _resolve(tok, "training", expected=WORDPIECE_SPECIALS)


def _code_points(token: str) -> tuple[int, ...]:
    return tuple(map(ord, token))


def _train_bpe(texts: list[str], vocab_size: int, lowercase: bool, min_frequency: int) -> Vocab:
    fixed = len(BPE_SPECIALS) + _BYTE_ALPHABET
    if vocab_size < fixed:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the {len(BPE_SPECIALS)} special tokens plus "
                         f"the {_BYTE_ALPHABET} byte symbols of a byte-level BPE; use at least {fixed}")
    # Byte-level BPE numbers its alphabet in code-point order and needs no hash order: deterministic.
    tok = tokenizers.Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False), length=len(texts))
    # Arguments by position: (sep, cls, trim_offsets, add_prefix_space); keywords are refused.
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), True, True)
    return _resolve(tok, "training", expected=BPE_SPECIALS)


def load_tokenizer(path: str | os.PathLike) -> Vocab:
    """A ``tokenizer.json`` (ours, or any transformers one), or a folder holding one.

    The special tokens are found by name: for each role the BERT token ([PAD], [UNK], [CLS], [SEP],
    [MASK]) or the RoBERTa one (<pad>, <unk>, <s>, </s>, <mask>), preferring the family of the mask
    token. Padding and truncation settings stored in the file are dropped, so ``encode`` returns
    whole, unpadded sequences. Errors name ``--tokenizer``: FileNotFoundError for a missing file,
    ValueError for an unparseable one or one without a mask, padding, [CLS]/<s> or [SEP]/</s> token.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"--tokenizer: expected a path, got {type(path).__name__}")
    file = Path(os.fspath(path))
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"--tokenizer: {file} does not exist")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"--tokenizer: {file} is not a readable tokenizer.json ({e})") from None
    tok.no_padding()
    tok.no_truncation()
    return _resolve(tok, str(file))


def _resolve(tok: tokenizers.Tokenizer, where: str, expected: tuple[str, ...] | None = None) -> Vocab:
    """The Vocab of ``tok``: special tokens looked up by name (see ``load_tokenizer``)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if "[MASK]" in vocab:
        family = 0
    elif "<mask>" in vocab:
        family = 1
    else:
        raise ValueError(f"--tokenizer: {where} has no mask token ([MASK] or <mask>); MLM needs one")
    found: dict[str, str | None] = {}
    for role in _ROLES:
        preferred = _CANDIDATES[role][family], _CANDIDATES[role][1 - family]
        found[role] = next((t for t in preferred if t in vocab), None)
        if found[role] is None and role != "unk":
            raise ValueError(f"--tokenizer: {where} has no {role} token ({' or '.join(_CANDIDATES[role])}); "
                             "pretraining needs one")
    if expected is not None:  # freshly trained: the documented ids 0..4
        actual = tuple(vocab.get(t) for t in expected)
        if actual != tuple(range(len(expected))):
            raise RuntimeError(f"train_tokenizer: special tokens {expected} got ids {actual}, not 0..4")
    ids = {role: (vocab[t] if t is not None else None) for role, t in found.items()}
    return Vocab(tokenizer=tok, kind=("wordpiece", "bpe")[family],
                 vocab_size=tok.get_vocab_size(with_added_tokens=True),
                 pad_token_id=ids["pad"], unk_token_id=ids["unk"], cls_token_id=ids["cls"],
                 sep_token_id=ids["sep"], mask_token_id=ids["mask"], pad_token=found["pad"],
                 unk_token=found["unk"], cls_token=found["cls"], sep_token=found["sep"], mask_token=found["mask"])


def to_transformers(vocab: Vocab, model_max_length: int):
    """A ``transformers.PreTrainedTokenizerFast`` over (a copy of) ``vocab.tokenizer`` with its special
    tokens and ``model_max_length``; a "wordpiece" vocab returns input_ids, token_type_ids and
    attention_mask, a "bpe" vocab adds bos=<s> / eos=</s> and returns no token_type_ids (RoBERTa). Its
    ``save_pretrained(folder)`` reloads with ``transformers.AutoTokenizer.from_pretrained(folder)``."""
    if not isinstance(vocab, Vocab):
        raise TypeError(f"vocab: expected a Vocab, got {type(vocab).__name__}")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise ValueError(f"model_max_length: expected a positive int, got {model_max_length!r}")
    from transformers import PreTrainedTokenizerFast

    kwargs = {"pad_token": vocab.pad_token, "cls_token": vocab.cls_token, "sep_token": vocab.sep_token,
              "mask_token": vocab.mask_token, "model_max_length": model_max_length}
    if vocab.unk_token is not None:
        kwargs["unk_token"] = vocab.unk_token
    if vocab.kind == "bpe":  # RoBERTa: <s>/</s> double as bos/eos; one segment type, so no type ids
        kwargs.update(bos_token=vocab.cls_token, eos_token=vocab.sep_token,
                      model_input_names=["input_ids", "attention_mask"])
    else:  # BERT family: sentence pairs (NSP/SOP) need the type ids, which transformers 5 omits by default
        kwargs.update(model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    # A copy: transformers may switch padding/truncation on in the tokenizer it is given.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(vocab.tokenizer.to_str()), **kwargs)
