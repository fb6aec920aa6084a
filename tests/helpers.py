"""Shared test helpers: tiny configs with odd sizes, ragged batches, randomized weights, comparisons."""

from __future__ import annotations

import pytest
import torch

from bertfast.ops import compiled

# Odd sizes on purpose (DESIGN: hidden 96 with 3 heads -> head_dim 32, vocab 1000, 3 layers).
SIZES = dict(vocab_size=1000, hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=160,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# Per transformers model type: the extra config fields of the test models.
EXTRA = {
    "bert": dict(type_vocab_size=2),
    "albert": dict(type_vocab_size=2, embedding_size=40, num_hidden_groups=2, inner_group_num=2,
                   classifier_dropout_prob=0.0),
    "roberta": dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=42),
    "electra": dict(type_vocab_size=2, embedding_size=40),
}


def ragged_batch(model_type: str, batch: int = 4, seq_len: int = 19, seed: int = 0):
    """ids (B, T) with padding after a ragged length (every row has >= 2 real tokens), the (B, T)
    int attention mask, and token types that switch from segment 0 to 1 inside each row."""
    g = torch.Generator().manual_seed(seed)
    extra = EXTRA[model_type]
    pad = extra.get("pad_token_id", 0)
    lengths = torch.randint(2, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    real = torch.arange(seq_len)[None, :] < lengths[:, None]
    ids = torch.randint(pad + 1, SIZES["vocab_size"], (batch, seq_len), generator=g)
    ids = torch.where(real, ids, torch.full_like(ids, pad))
    split = (lengths // 2)[:, None]
    types = (torch.arange(seq_len)[None, :] >= split).long() if extra["type_vocab_size"] > 1 else None
    if types is not None:
        types = types * real
    return ids, real.long(), types


def mlm_labels(ids: torch.Tensor, mask: torch.Tensor, seed: int = 1, rate: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=g) < rate) & mask.bool()
    chosen[0, 1] = True
    return torch.where(chosen, ids, torch.full_like(ids, -100))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorm scales near 1), so zero-initialised biases and unit norms
    cannot hide a missing or misplaced term. Tied parameters stay tied."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        is_norm_scale = ("LayerNorm" in name or "layer_norm" in name) and name.endswith("weight")
        p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "",
                     floor: float = 0.0) -> None:
    """max |actual - expected| <= rel * max(max |expected|, floor) (normwise relative error).

    ``floor`` is the scale of the surrounding quantity for tensors that are zero in exact
    arithmetic (e.g. the key bias gradient: softmax ignores a per-row shift), where both sides
    are pure round-off."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp(min=max(floor, torch.finfo(expected.dtype).tiny))
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}"


def assert_grads_close(actual: torch.nn.Module, expected: torch.nn.Module, rel: float, what: str = "",
                       every_parameter: bool = True) -> None:
    """Every parameter's gradient, matched by name: ``assert_rel_close`` with the largest expected
    gradient as the floor (a parameter whose exact gradient is 0 is pure round-off on both sides).
    ``every_parameter``: each must have a gradient; otherwise one on neither side is accepted."""
    ours, theirs = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert set(ours) == set(theirs), f"{what}: parameter names differ"
    largest = max(p.grad.abs().max().item() for p in theirs.values() if p.grad is not None)
    for name, p in theirs.items():
        if every_parameter:
            assert p.grad is not None, f"{what} {name}: no gradient on the expected side"
        assert (ours[name].grad is None) == (p.grad is None), f"{what} {name}: a gradient on one side only"
        if p.grad is not None:
            assert_rel_close(ours[name].grad, p.grad, rel, f"{what} grad {name}", floor=largest)


def base_encoder(model_type: str) -> torch.nn.Module:
    """The bertfast base encoder of ``model_type`` at the test sizes (float32, default init)."""
    from bertfast import models

    config_cls, model_cls = {"bert": (models.BertConfig, models.BertModel),
                             "albert": (models.AlbertConfig, models.AlbertModel),
                             "roberta": (models.RobertaConfig, models.RobertaModel),
                             "electra": (models.ElectraConfig, models.ElectraModel)}[model_type]
    return model_cls(config_cls(**{**SIZES, **EXTRA[model_type]}))


def mix32_python(x: int) -> int:
    """lowbias32 on Python ints (arbitrary precision: no overflow question), the independent form of
    the kernels' hash (bertfast.ops.rng.mix32, kernels/rng.py)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gpu(fn):
    """Marked ``gpu`` (run by the GPU check) and skipped, at test time, without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


def cuda_module():
    """The built bertfast._cuda; skips the test with the reason when it is missing."""
    module, why = compiled.load("_cuda")
    if module is None:
        pytest.skip(f"bertfast._cuda is not available: {why}")
    return module
