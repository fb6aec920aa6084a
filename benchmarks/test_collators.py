"""Dynamic-masking collation on the CPU, side by side: ``transformers.DataCollatorForLanguageModeling``
vs bertfast's ``MLMCollator`` (C++ ``_C`` with ``num_threads=1`` and with the default 0 = the kernels
decide: they split rows over cores only past ~16k tokens per thread, so at this size both run one
thread and differ by noise; and its Python path).

    python -m pytest benchmarks/test_collators.py --benchmark-only

Each call turns a batch of 32 examples of 512 token ids (Python lists in dicts, what a tokenized
dataset hands a DataLoader) into padded input_ids, attention_mask and labels with 15% of the
tokens chosen, 80/10/10 [MASK]/random/unchanged. Both collators get the same examples and a real
``tokenizers`` WordPiece tokenizer wrapped by transformers (BERT's 30522-id vocabulary and specials).
``extra_info``: sequences/s and, after the transformers case of the same run, ``speedup_vs_transformers``
(its median / this median). Goal of the issue: bertfast >= 20x transformers' sequences/s. Nothing
is asserted about time; the outputs are checked for shape and masking rate only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertfast.data.collators import MLMCollator
from bertfast.ops import compiled

BATCH, LENGTH, VOCAB = 32, 512, 30522
SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_medians: dict[str, float] = {}


def _tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    for token, i in SPECIALS.items():
        del vocab[f"w{i}"]
        vocab[token] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _examples() -> list[dict]:
    rng = np.random.default_rng(0)
    body = rng.integers(1000, VOCAB, size=(BATCH, LENGTH - 2))
    return [{"input_ids": [101, *row.tolist(), 102]} for row in body]


IMPLS = ("transformers", "bertfast-python", "bertfast-cpp-1-thread", "bertfast-cpp")


@pytest.mark.parametrize("impl", IMPLS)
def test_dynamic_masking_collation(benchmark, impl):
    tokenizer = _tokenizer()
    examples = _examples()
    if impl == "transformers":
        from transformers import DataCollatorForLanguageModeling

        collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    else:
        if impl.startswith("bertfast-cpp") and compiled.load("_C")[0] is None:
            pytest.skip(compiled.load("_C")[1])
        collate = MLMCollator.from_tokenizer(tokenizer, seed=0, native=impl != "bertfast-python",
                                             num_threads=1 if impl.endswith("1-thread") else 0)
    benchmark.group = "collation: dynamic masking, 32 x 512 tokens"
    if benchmark.disabled:
        batch = benchmark(collate, examples)
    else:
        batch = benchmark.pedantic(collate, args=(examples,), rounds=30, warmup_rounds=2)
    assert batch["input_ids"].shape == (BATCH, LENGTH)
    chosen = (batch["labels"] != -100).float().mean().item()
    assert 0.1 < chosen < 0.2, f"{impl}: masked share {chosen} (a sanity check, not a timing assertion)"
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    _medians[impl] = median
    benchmark.extra_info.update({"impl": impl, "sequences_per_s": round(BATCH / median, 1),
                                 "torch_threads": torch.get_num_threads(), "goal_speedup": 20.0})
    if impl != "transformers" and "transformers" in _medians:
        speedup = _medians["transformers"] / median
        benchmark.extra_info["speedup_vs_transformers"] = round(speedup, 1)
        benchmark.extra_info["goal_met"] = speedup >= 20.0
