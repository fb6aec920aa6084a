"""ALBERT's shared-layer loop: one training step of bertfast's AlbertForPreTraining with the fused
loop (one autograd node over all layer steps, each shared weight's gradient summed in one float32
buffer) vs the same model with the plain Python loop (autograd keeps one gradient per layer step
and sums them).

    python -m pytest benchmarks/test_albert_loop.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds and its output
is finite). ``--benchmark-json=FILE`` keeps ``extra_info``.

The loop is chosen by the ``loop`` / ``recompute`` attributes of ``bertfast.models.albert.
AlbertTransformer`` (the cases skip, saying so, if this bertfast has no such switch):

  bertfast-autograd          loop = "autograd": the plain per-layer loop
  bertfast-fused             loop = "fused"
  bertfast-fused-recompute   loop = "fused", recompute = True: each layer step recomputed in the
                             backward from its saved input (less memory, more time)

Cases: mode (bwd | fwd+bwd: the backward alone after an untimed forward, and the whole step) of
AlbertForPreTraining (MLM over 15% of the tokens + sentence-order prediction) on full-length
sequences of two segments. On a GPU: ALBERT-base (vocab 30000, E 128, H 768, 12 layers sharing one
layer, 12 heads, FFN 3072, dropout 0 as ALBERT v2), batch x seq 32 x 128, float32 parameters under
bfloat16 autocast (the forward inside ``torch.autocast``), as mixed-precision training runs it. On
a CPU: a tiny ALBERT (vocab 1000, E 32, H 128, 4 layers, 4 heads, FFN 256), 4 x 32, float32. The
step's gradients are taken with ``torch.autograd.grad`` w.r.t. every parameter.

Timing, rounds and peak memory as in test_attention.py (``flops.run_case``). ``extra_info``:
tokens/s, peak memory, ``speedup_vs_bertfast-autograd`` / ``memory_ratio_vs_bertfast-autograd``,
the bertfast backends that ran, the card and versions. The issue's goal, recorded (never
asserted) in ``goal`` / ``goal_speed_met``: the fused loop >= 1.3x faster than the autograd loop.
The loss and gradients are checked to be finite, nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import pytest
import torch
from flops import run_case

from bertfast import models

CONFIG = {
    "cuda": {"vocab_size": 30000, "embedding_size": 128, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "cpu": {"vocab_size": 1000, "embedding_size": 32, "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64},
}
BATCH = {"cuda": (32, 128), "cpu": (4, 32)}  # (B, T)
PRECISION = {"cuda": "bfloat16 autocast, float32 parameters", "cpu": "float32"}
MASK_RATE = 0.15
MODES = ("bwd", "fwd+bwd")  # under no_grad (a "fwd" case) every loop is the plain one: nothing to compare
IMPLS = {"bertfast-autograd": ("autograd", False), "bertfast-fused": ("fused", False),
         "bertfast-fused-recompute": ("fused", True)}  # impl -> (loop, recompute)
BASELINES = ("bertfast-autograd",)
GOAL = (1.3, None)  # times faster than the autograd loop; no memory goal


@functools.lru_cache(maxsize=1)
def built(kind: str, device: torch.device) -> models.AlbertForPreTraining:
    """The seeded model, kept for the following cases (only its loop attributes change)."""
    torch.manual_seed(0)
    return models.AlbertForPreTraining(models.AlbertConfig(**CONFIG[kind])).to(device).train()


def batch(config: dict, shape: tuple[int, int], device: torch.device) -> dict:
    """input_ids, attention_mask (all real), token_type_ids (two segments), MLM labels (15% of the
    tokens), sentence_order_label; seeded."""
    B, T = shape
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config["vocab_size"], (B, T), generator=g)
    chosen = torch.rand(B, T, generator=g) < MASK_RATE
    chosen[:, 1] = True  # every row has a masked token
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
            "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T).contiguous().to(device),
            "labels": torch.where(chosen, ids, torch.full_like(ids, -100)).to(device),
            "sentence_order_label": torch.randint(0, 2, (B,), generator=g).to(device)}


CASES = [pytest.param(mode, impl, id=f"{mode}-{impl}") for mode, impl in itertools.product(MODES, IMPLS)]


@pytest.mark.parametrize("mode, impl", CASES)
def test_albert_loop(benchmark, device, env_info, mode, impl):
    kind = device.type
    model = built(kind, device)
    loop, recompute = IMPLS[impl]
    models.set_layer_loop(model, loop, recompute)
    B, T = BATCH[kind]
    inputs = batch(CONFIG[kind], (B, T), device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if kind == "cuda" else contextlib.nullcontext

    def forward():
        with autocast():
            return model(**inputs).loss

    cfg = CONFIG[kind]
    run_case(benchmark, device, env_info,
             group=f"albert_loop {mode} L={cfg['num_hidden_layers']} H={cfg['hidden_size']} B={B} T={T} "
                   f"{PRECISION[kind]}",
             impl=impl, mode=mode, forward=forward, leaves=list(model.parameters()), tokens=B * T,
             baselines=BASELINES, goal=GOAL,
             info={"dtype": PRECISION[kind], "loop": loop, "recompute": recompute, "batch": B, "seq_len": T,
                   "masked_tokens": int((inputs["labels"] != -100).sum()), **cfg})
