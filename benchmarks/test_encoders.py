"""Encoder training step, bertfast vs transformers (eager attention), on whatever device is here.

    python -m pytest benchmarks --benchmark-only

One forward + backward of a BERT-style encoder on a ragged batch; both models hold the same
weights. On a CPU bertfast runs its torch reference path, so this measures what dispatch,
validation and the reference's NaN-safe masking (zeroing padded keys/values) cost against
transformers; the GPU kernels change the comparison once they land.
"""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import models

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BATCH, SEQ_LEN = 8, 128


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (BATCH,), generator=g)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, CONFIG["vocab_size"], (BATCH, SEQ_LEN), generator=g) * mask
    return ids, mask


def _step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    out.last_hidden_state.float().square().mean().backward()


@pytest.mark.parametrize("impl", ["bertfast", "transformers-eager", "transformers-sdpa"])
def test_bert_encoder_train_step(benchmark, impl):
    ours = models.BertModel(models.BertConfig(**CONFIG))
    if impl == "bertfast":
        model = ours
    else:
        model = bertfast.to_hf(ours, attn_implementation=impl.split("-")[1])
    ids, mask = _batch()
    benchmark.extra_info.update(tokens=int(mask.sum()), device="cpu", impl=impl)
    benchmark.pedantic(_step, args=(model.train(), ids, mask), rounds=5, warmup_rounds=1)
