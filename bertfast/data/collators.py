"""Collators for masked-language-model pretraining: pad a list of examples into a batch and mask it.

``MLMCollator`` is a drop-in for ``transformers.DataCollatorForLanguageModeling`` (same output
keys: input_ids, attention_mask, labels with -100 where nothing is predicted) with the masking of
all four models:

- dynamic masking (RoBERTa): a fresh mask every call, keyed by (seed, call index, DataLoader worker);
- static masking (BERT): a fixed mask per (example's ``sequence_id``, duplicate), ``duplicate =
  epoch % duplicates`` (BERT's dupe factor), so an example looks the same every ``duplicates`` epochs;
- whole-word masking from the examples' ``word_ids`` (a fast tokenizer's ``encoding.word_ids``);
- ALBERT's n-gram masking (``max_ngram=3``: spans of n words, P(n) proportional to 1/n).

Padding and masking run in the C++ ``bertfast._C`` when it is built and in a vectorized Python path
when it is not, with the same result for the same seed (``native=`` forces one). Examples are
lists/tuples of ids, 1-D tensors or arrays, or dicts with ``input_ids`` and optionally
``word_ids``, ``sequence_id``, ``token_type_ids`` and a sentence label (``next_sentence_label`` or
``sentence_order_label``), which are padded / stacked into the batch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from bertfast.data import masking
from bertfast.data.collate import pad_sequences

_SENTENCE_LABELS = ("next_sentence_label", "sentence_order_label")
_MASK_TOKENS = ("[MASK]", "<mask>")


class MLMCollator:
    """Pads examples into (B, L) tensors and masks them for MLM.

    Args:
        vocab_size: ids are in [0, vocab_size); random replacements are drawn from this range.
        mask_token_id, pad_token_id: the [MASK] and padding ids.
        special_token_ids: ids never masked ([CLS], [SEP], ...); the padding id is added.
        probability: share of maskable tokens predicted (0.15); mask_fraction / random_fraction of
            those become [MASK] / a random token (0.8 / 0.1), the rest stay unchanged.
        masking: "dynamic" (fresh every call) or "static" (fixed per ``sequence_id`` and duplicate).
        duplicates: static masking's number of distinct masks per sequence (BERT's dupe factor).
        whole_word: mask whole words (needs ``word_ids`` in the examples).
        max_ngram: 1 = independent choice per token/word; >= 2 = ALBERT's n-gram spans.
        seed: the masking seed; with the call index and worker it fixes every mask.
        max_length / pad_to_multiple_of: fixed row length, or the longest example rounded up.
        dtype: of input_ids (int64 like transformers, or int32); labels are always int64.
        num_threads: C++ threads (0 = all cores). native: None = C++ when built, True/False = force.
    """

    def __init__(self, *, vocab_size: int, mask_token_id: int, pad_token_id: int,
                 special_token_ids: Iterable[int] = (), probability: float = 0.15, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1, masking: str = "dynamic", duplicates: int = 10,
                 whole_word: bool = False, max_ngram: int = 1, seed: int = 0, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, dtype: torch.dtype = torch.int64, num_threads: int = 0,
                 native: bool | None = None):
        name = type(self).__name__
        if masking not in ("dynamic", "static"):
            raise ValueError(f"{name}: masking must be 'dynamic' or 'static', got {masking!r}")
        if isinstance(duplicates, bool) or not isinstance(duplicates, int) or duplicates < 1:
            raise ValueError(f"{name}: duplicates must be a positive int, got {duplicates!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"{name}: max_ngram must be a positive int, got {max_ngram!r}")
        for arg, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: {arg} must be a positive int or None, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{name}: seed must be an int in [0, 2**32), got {seed!r}")
        for arg, value in (("vocab_size", vocab_size), ("mask_token_id", mask_token_id),
                           ("pad_token_id", pad_token_id)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg} must be a non-negative int, got {value!r}")
        for arg, value in (("mask_token_id", mask_token_id), ("pad_token_id", pad_token_id)):
            if value >= vocab_size:
                raise ValueError(f"{name}: {arg} {value} is outside the vocabulary (vocab_size={vocab_size})")
        self.vocab_size, self.mask_token_id, self.pad_token_id = vocab_size, mask_token_id, pad_token_id
        self.special_token_ids = sorted(set(int(i) for i in special_token_ids) | {pad_token_id})
        self.probability, self.mask_fraction, self.random_fraction = probability, mask_fraction, random_fraction
        self.masking, self.duplicates = masking, duplicates
        self.whole_word, self.max_ngram, self.seed = whole_word, max_ngram, seed
        self.max_length, self.pad_to_multiple_of, self.dtype = max_length, pad_to_multiple_of, dtype
        self.num_threads, self.native = num_threads, native
        self.calls = 0  # dynamic masking: each call draws a fresh mask
        self.epoch = 0  # static masking: which duplicate
        # Check the masking arguments once, on a one-token batch, before the first real call.
        self._mask(torch.full((1, 1), pad_token_id, dtype=dtype), torch.zeros(1, dtype=torch.int64), None)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> MLMCollator:
        """From a ``tokenizers.Tokenizer`` or a transformers tokenizer: its vocabulary size, [MASK]
        (or <mask>), padding and special ids. A tokenizer without a mask token is an error."""
        ids = _tokenizer_ids(tokenizer)
        return cls(**ids, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Static masking: epoch e uses duplicate e % duplicates."""
        self.epoch = int(epoch)

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError(f"{type(self).__name__}: examples is empty")
        dicts = isinstance(examples[0], Mapping)
        ids_list = [e["input_ids"] for e in examples] if dicts else list(examples)
        input_ids, lengths = pad_sequences(ids_list, pad_value=self.pad_token_id, max_length=self.max_length,
                                           multiple_of=self.pad_to_multiple_of, dtype=self.dtype,
                                           native=self.native)
        L = input_ids.shape[1]
        word_ids = None
        if self.whole_word:
            if not dicts or "word_ids" not in examples[0]:
                raise ValueError(f"{type(self).__name__}: whole_word=True needs each example's `word_ids`")
            word_ids, _ = pad_sequences([e["word_ids"] for e in examples], pad_value=-1, max_length=L,
                                        dtype=torch.int32, none_as=-1, native=self.native, what="word_ids")
        attention_mask = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.int64)
        masked, labels = self._mask(input_ids, self._row_keys(examples, dicts), word_ids)
        batch = {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
        if dicts:
            batch.update(_passthrough(examples, L, self.native))
        return batch

    def _row_keys(self, examples, dicts: bool) -> torch.Tensor:
        if self.masking == "static":
            if not dicts or "sequence_id" not in examples[0]:
                raise ValueError(f"{type(self).__name__}: static masking needs each example's `sequence_id`")
            ids = torch.tensor([int(e["sequence_id"]) for e in examples], dtype=torch.int64)
            return masking.static_row_keys(ids, self.epoch % self.duplicates)
        info = torch.utils.data.get_worker_info()
        keys = masking.dynamic_row_keys(self.calls, len(examples), worker=0 if info is None else info.id)
        self.calls += 1
        return keys

    def _mask(self, input_ids, row_keys, word_ids):
        return masking.mask_tokens(
            input_ids, row_keys=row_keys, seed=self.seed, vocab_size=self.vocab_size,
            mask_token_id=self.mask_token_id, special_token_ids=self.special_token_ids,
            probability=self.probability, mask_fraction=self.mask_fraction, random_fraction=self.random_fraction,
            word_ids=word_ids, max_ngram=self.max_ngram, num_threads=self.num_threads, native=self.native)


def _passthrough(examples, L: int, native) -> dict[str, torch.Tensor]:
    """token_type_ids padded with 0, and a sentence label stacked, when the examples carry them."""
    out = {}
    if "token_type_ids" in examples[0]:
        out["token_type_ids"], _ = pad_sequences([e["token_type_ids"] for e in examples], pad_value=0,
                                                 max_length=L, native=native, what="token_type_ids")
    for key in _SENTENCE_LABELS:
        if key in examples[0]:
            out[key] = torch.tensor([int(e[key]) for e in examples], dtype=torch.int64)
    return out


def _tokenizer_ids(tokenizer) -> dict[str, Any]:
    """vocab_size, mask/pad/special ids of a tokenizers.Tokenizer or a transformers tokenizer."""
    if hasattr(tokenizer, "get_vocab_size") and hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        mask = next((tokenizer.token_to_id(t) for t in _MASK_TOKENS if tokenizer.token_to_id(t) is not None), None)
        specials = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
        pad = tokenizer.padding["pad_id"] if tokenizer.padding else next(
            (tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
    elif hasattr(tokenizer, "all_special_ids"):  # transformers
        vocab_size, mask, pad = len(tokenizer), tokenizer.mask_token_id, tokenizer.pad_token_id
        specials = list(tokenizer.all_special_ids)
    else:
        raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer or a transformers tokenizer, "
                        f"got {type(tokenizer).__name__}")
    if mask is None:
        raise ValueError(f"tokenizer: has no mask token (looked for {' and '.join(_MASK_TOKENS)}); "
                         "MLM needs one: add it as a special token when training the tokenizer")
    if pad is None:
        raise ValueError("tokenizer: has no padding token ([PAD] or <pad>)")
    return {"vocab_size": vocab_size, "mask_token_id": mask, "pad_token_id": pad, "special_token_ids": specials}
