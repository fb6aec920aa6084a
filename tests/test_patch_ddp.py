"""A patched transformers model under DistributedDataParallel: two gloo processes (CPU), each with
half of every batch, train like one unpatched process on the whole batch.

Every row has exactly 2 labelled tokens, so each half has as many labelled tokens and rows: the mean
of the two ranks' mean losses (DDP averages gradients over ranks) is the whole batch's mean loss.
float64, so the comparison is the parity suite's 1e-10 (normwise relative) and not round-off noise."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import bertfast
from helpers import assert_rel_close, randomize_

transformers = pytest.importorskip("transformers")

ROWS, T, STEPS = 4, 10, 2
LENGTHS = [10, 7, 9, 4]
F64 = 1e-10


def _model() -> torch.nn.Module:
    """The same tiny BertForPreTraining in every process: built from a config, then seeded weights."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForPreTraining._from_config(config, attn_implementation="eager").double()
    randomize_(model, seed=3)
    return model.train()


def _batch(step: int) -> dict[str, torch.Tensor]:
    """4 ragged rows, exactly 2 labelled (real) tokens per row, one NSP label per row."""
    g = torch.Generator().manual_seed(100 + step)
    real = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    ids = torch.where(real, torch.randint(1, 100, (ROWS, T), generator=g), 0)
    types = (torch.arange(T)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2).long() * real
    labels = torch.full_like(ids, -100)
    for row, length in enumerate(LENGTHS):
        chosen = torch.randperm(length, generator=g)[:2]
        labels[row, chosen] = ids[row, chosen]
    nsp = torch.randint(0, 2, (ROWS,), generator=g)
    return {"input_ids": ids, "attention_mask": real.long(), "token_type_ids": types, "labels": labels,
            "next_sentence_label": nsp}


def _train(model: torch.nn.Module, rows: slice) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        batch = {k: v[rows] for k, v in _batch(step).items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        report = bertfast.patch(model)
        assert {s.path for s in report.swapped} == {"", "bert"}, str(report)
        ddp = DistributedDataParallel(model)
        half = ROWS // world
        with bertfast.record_backends() as ran:
            _train(ddp, slice(rank * half, (rank + 1) * half))
        assert ("attention", "torch") in ran  # the patched forward ran inside DDP
        assert bertfast.patching.is_patched(model.bert)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_patched_model_under_ddp_trains_like_one_unpatched_process_on_the_whole_batch():
    mp = pytest.importorskip("torch.multiprocessing")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    initial = {n: p.detach().clone() for n, p in _model().named_parameters()}
    expected_model = _model()
    _train(expected_model, slice(0, ROWS))
    expected = {n: p.detach() for n, p in expected_model.named_parameters()}
    largest = max(p.abs().max().item() for p in expected.values())
    for rank, actual in enumerate(ranks):
        assert set(actual) == set(expected)
        for name, e in expected.items():
            assert_rel_close(actual[name], e, F64, f"rank {rank} {name}", floor=largest)
    moved = max((expected[n] - initial[n]).abs().max().item() for n in expected)
    assert moved > 1e-2  # the two steps did change the parameters
