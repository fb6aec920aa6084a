"""Training examples from a tokenized corpus, and the batches of every step, as pure functions of
(seed, step, rank): nothing about the data order lives in an iterator, so a resumed run sees exactly
the batches an uninterrupted one would, and every rank can compute its own shard.

Examples are either sentence pairs (BERT's NSP, ALBERT's SOP: ``build_sentence_pairs``, rebuilt per
duplicate) or full-sentence blocks (RoBERTa, ELECTRA: the documents' tokens concatenated with a
separator between documents, cut into rows of ``seq_len``, each ``[CLS] ... [SEP]``).

Order: epoch ``e`` visits its examples in a permutation drawn from (seed, e). Global step ``k`` takes
the next ``G = batch_size x accumulation x world_size`` of them (the last partial group of an epoch
is dropped); micro-batch ``j`` of rank ``r`` is the slice ``[(j * world + r) * batch_size, +batch_size)``
of that group. So a run on W processes with batch b sees the same examples per step as one process
with batch W x b.

Masks depend only on (seed, example, duplicate): static masking uses duplicate = epoch % duplicates
(the same mask every ``duplicates`` epochs, as BERT's offline data), dynamic masking duplicate = epoch
(a fresh mask every time an example is seen). Where an example lands (rank, row) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bertfast.data.masking import mask_tokens, static_row_keys
from bertfast.data.sentence_pairs import Documents, build_sentence_pairs
from bertfast.ops.rng import mix32_int
from bertfast.pretrain.recipes import Objective

PAD_MULTIPLE = 8  # batches are trimmed to their longest row, rounded up to this


@dataclass
class Examples:
    """Rows of one epoch's examples: input_ids (N, L) padded, lengths (N,), and for sentence pairs
    token_type_ids (N, L) and pair_labels (N,)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    pair_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def tokenize_documents(documents: list[list[str]], vocab) -> list[list[list[int]]]:
    """Token ids of every sentence (no special tokens), documents kept apart; empty sentences dropped."""
    sentences = [s for doc in documents for s in doc]
    ids = vocab.encode(sentences)
    out, k = [], 0
    for doc in documents:
        out.append([x for x in ids[k:k + len(doc)] if x])
        k += len(doc)
    return [d for d in out if d]


def full_sentence_blocks(documents: list[list[list[int]]], *, seq_len: int, cls_id: int, sep_id: int,
                         pad_id: int) -> Examples:
    """RoBERTa's FULL-SENTENCES rows: every document's tokens in order, ``sep_id`` between documents,
    cut into pieces of ``seq_len - 2`` and wrapped as [CLS] piece [SEP]."""
    if seq_len < 3:
        raise ValueError(f"--seq-len: must be >= 3 ([CLS] a token [SEP]), got {seq_len}")
    parts = []
    for d, doc in enumerate(documents):
        if d:
            parts.append(np.array([sep_id], dtype=np.int64))
        parts.extend(np.asarray(s, dtype=np.int64) for s in doc)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    piece = seq_len - 2
    n = -(-len(stream) // piece)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        chunk = stream[i * piece:(i + 1) * piece]
        ids[i, 0], ids[i, 1:1 + len(chunk)], ids[i, 1 + len(chunk)] = cls_id, chunk, sep_id
        lengths[i] = len(chunk) + 2
    return Examples(torch.from_numpy(ids), torch.from_numpy(lengths))


class PretrainingData:
    """The examples and batches of one run (see the module docstring for the order and masks)."""

    def __init__(self, documents: list[list[list[int]]], vocab, objective: Objective, *, seq_len: int, seed: int,
                 batch_size: int, accumulation: int = 1, world_size: int = 1, probability: float = 0.15):
        if not documents:
            raise ValueError("corpus: no document has any token after tokenization")
        for name, value in (("--batch-size", batch_size), ("--accumulation", accumulation),
                            ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        self.vocab, self.objective, self.seq_len, self.seed = vocab, objective, seq_len, int(seed) & 0xFFFFFFFF
        self.batch_size, self.accumulation, self.world_size = batch_size, accumulation, world_size
        self.group = batch_size * accumulation * world_size
        self.probability = probability
        # One epoch's examples and order are kept (a step needs only its own); example counts of
        # every pairing variant are kept to map steps to epochs.
        self._examples: tuple[int, Examples] | None = None
        self._order: tuple[int, torch.Tensor] | None = None
        self._counts: dict[int, int] = {}
        if objective.pairs is None:
            self._blocks = full_sentence_blocks(documents, seq_len=seq_len, cls_id=vocab.cls_token_id,
                                                sep_id=vocab.sep_token_id, pad_id=vocab.pad_token_id)
        else:
            self._pair_documents = Documents.from_lists(documents)
        first = self.examples(0)
        if len(first) < self.group:
            raise ValueError(f"--batch-size: a step takes batch_size x accumulation x world_size = {self.group} "
                             f"examples, but the corpus gives only {len(first)} at --seq-len {seq_len}; lower them "
                             "or use a larger corpus")

    # --- examples ----------------------------------------------------------------------------
    def duplicate(self, epoch: int) -> int:
        """The mask (and, for pairs, pairing) variant of an epoch."""
        return epoch % self.objective.duplicates if self.objective.masking == "static" else epoch

    def examples(self, epoch: int) -> Examples:
        if self.objective.pairs is None:
            return self._blocks
        key = epoch % self.objective.duplicates
        if self._examples is None or self._examples[0] != key:
            v = self.vocab
            rows = build_sentence_pairs(self._pair_documents, objective=self.objective.pairs, max_tokens=self.seq_len,
                                        cls_token_id=v.cls_token_id, sep_token_id=v.sep_token_id,
                                        pad_token_id=v.pad_token_id, seed=self.seed, epoch=key)
            self._examples = key, Examples(rows["input_ids"].to(torch.int64), rows["attention_mask"].sum(1),
                                           rows["token_type_ids"], rows["labels"])
            self._counts[key] = len(self._examples[1])
        return self._examples[1]

    @property
    def num_examples(self) -> int:
        return len(self.examples(0))

    def steps_in_epoch(self, epoch: int) -> int:
        if self.objective.pairs is None:
            return len(self._blocks) // self.group
        key = epoch % self.objective.duplicates
        if key not in self._counts:
            self.examples(epoch)
        return self._counts[key] // self.group

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global step ``step`` (0-based)."""
        # Epoch lengths repeat with the pairing variant (period `duplicates`; 1 for blocks).
        period = self.objective.duplicates if self.objective.pairs is not None else 1
        lengths = [self.steps_in_epoch(e) for e in range(period)]
        cycles, step = divmod(step, sum(lengths))
        epoch = cycles * period
        for length in lengths:
            if step < length:
                break
            step -= length
            epoch += 1
        return epoch, step

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(mix32_int(mix32_int(self.seed) ^ (epoch & 0xFFFFFFFF)))
            self._order = epoch, torch.randperm(len(self.examples(epoch)), generator=g)
        return self._order[1]

    # --- batches ----------------------------------------------------------------------------
    def micro_batches(self, step: int, rank: int = 0) -> list[dict[str, torch.Tensor]]:
        """The ``accumulation`` micro-batches of ``rank`` at global step ``step`` (CPU tensors)."""
        epoch, k = self.position(step)
        order = self.order(epoch)[k * self.group:(k + 1) * self.group]
        out = []
        for j in range(self.accumulation):
            start = (j * self.world_size + rank) * self.batch_size
            out.append(self.collate(epoch, order[start:start + self.batch_size]))
        return out

    def collate(self, epoch: int, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` of epoch ``epoch``'s examples, trimmed and masked."""
        ex = self.examples(epoch)
        lengths = ex.lengths[index]
        width = min(ex.input_ids.shape[1], -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
        ids = ex.input_ids[index, :width].contiguous()
        v = self.vocab
        masked, labels = mask_tokens(ids, row_keys=static_row_keys(index, self.duplicate(epoch)), seed=self.seed,
                                     vocab_size=v.vocab_size, mask_token_id=v.mask_token_id,
                                     special_token_ids=v.special_token_ids, probability=self.probability,
                                     max_ngram=self.objective.max_ngram)
        batch = {"input_ids": masked, "labels": labels,
                 "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).to(torch.int64)}
        if ex.token_type_ids is not None:
            batch["token_type_ids"] = ex.token_type_ids[index, :width].contiguous()
            batch["pair_labels"] = ex.pair_labels[index]
        return batch
