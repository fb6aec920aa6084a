"""bertfast.patch on a CUDA device (run by benchmarks/gpu_check.sh; skipped without one).

float32: the patched model (Triton/CUDA kernels, unpadded varlen attention) against a float64
reference of the unpatched transformers model; its error may be at most 2x the error of the
unpatched float32 model (DESIGN.md's rule) plus a small floor. bfloat16 autocast: a training step
runs on the kernels with a finite loss close to the unpatched model's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import gpu

import bertfast

transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
         "intermediate_size": 1024, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "max_position_embeddings": 160}
CASES = {
    "BertForPreTraining": (transformers.BertConfig, {}),
    "AlbertForPreTraining": (transformers.AlbertConfig, {"embedding_size": 64, "classifier_dropout_prob": 0.0}),
    "ElectraForPreTraining": (transformers.ElectraConfig, {"embedding_size": 128}),
    "RobertaForMaskedLM": (transformers.RobertaConfig, {"pad_token_id": 1}),
}


def batch(name: str, device: torch.device, B: int = 8, T: int = 128):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, T + 1, (B,), generator=g)
    lengths[0] = T
    real = torch.arange(T)[None, :] < lengths[:, None]
    pad = 1 if name.startswith("Roberta") else 0
    ids = torch.where(real, torch.randint(5, SIZES["vocab_size"], (B, T), generator=g), torch.full((B, T), pad))
    kwargs = {"input_ids": ids, "attention_mask": real.long()}
    if name.startswith("Electra"):
        kwargs["labels"] = ((torch.rand(B, T, generator=g) < 0.2) & real).long()
    else:
        chosen = (torch.rand(B, T, generator=g) < 0.15) & real
        chosen[:, 1] = True
        kwargs["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
    if name.startswith("Bert"):
        kwargs["next_sentence_label"] = torch.randint(0, 2, (B,), generator=g)
    if name.startswith("Albert"):
        kwargs["sentence_order_label"] = torch.randint(0, 2, (B,), generator=g)
    return {k: v.to(device) for k, v in kwargs.items()}


def model(name: str) -> torch.nn.Module:
    config_class, extra = CASES[name]
    torch.manual_seed(0)
    return getattr(transformers, name)._from_config(config_class(**SIZES, **extra), attn_implementation="sdpa")


def loss_and_grads(m: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    loss = m(**kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_patched_float32_on_cuda_within_twice_the_unpatched_error(name):
    device = torch.device("cuda")
    base = model(name).train()
    kwargs = batch(name, device)
    exact = copy.deepcopy(base).double().to(device)
    loss64, grads64 = loss_and_grads(exact, kwargs)
    plain = copy.deepcopy(base).to(device)
    loss32, grads32 = loss_and_grads(plain, kwargs)
    patched = copy.deepcopy(base).to(device)
    report = bertfast.patch(patched)
    assert report.swapped and not report.left, str(report)
    with bertfast.record_backends() as trace:
        loss_p, grads_p = loss_and_grads(patched, kwargs)
    assert any(backend != "torch" for _, backend in trace), f"only the torch backend ran: {sorted(set(trace))}"

    def check(ours, theirs, exact_value, what):
        scale = exact_value.abs().max().clamp(min=1e-30)
        err_ours = ((ours.double() - exact_value).abs().max() / scale).item()
        err_theirs = ((theirs.double() - exact_value).abs().max() / scale).item()
        assert err_ours <= 2 * err_theirs + 1e-5, f"{name} {what}: {err_ours:.2e} > 2 x {err_theirs:.2e} + 1e-5"

    check(loss_p, loss32, loss64, "loss")
    assert set(grads_p) == set(grads64)
    largest = max(g.abs().max() for g in grads64.values())
    for key, g64 in grads64.items():
        # normwise against the largest gradient: a parameter whose exact gradient is ~0 is round-off
        check(grads_p[key] / largest, grads32[key] / largest, g64 / largest, f"grad {key}")


@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_patched_bfloat16_training_step_runs_on_kernels(name):
    device = torch.device("cuda")
    base = model(name).to(device).train()
    patched = copy.deepcopy(base)
    bertfast.patch(patched)
    kwargs = batch(name, device)
    losses = []
    for m in (base, patched):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-4)
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(**kwargs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.float().item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert abs(losses[1] - losses[0]) <= 0.02 * abs(losses[0]), f"bf16 losses {losses}"
