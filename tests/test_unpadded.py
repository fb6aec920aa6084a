"""Unpadded execution (padding removed once, every layer on (total_tokens, H), varlen attention):
real-token outputs, losses and every gradient equal the padded path's; padded positions hold zeros.
Also the Packing helper itself, the default policy, and torch.compile of the padded path."""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import models
from bertfast.models.layers import wants_unpadding
from bertfast.nn import Packing
from helpers import assert_grads_close, assert_rel_close, base_encoder, ragged_batch, randomize_
from test_hf_parity import CLASSES, build_hf, hf_inputs

POSITIONAL = ("last_hidden_state", "logits", "prediction_logits")  # (B, T, ...) outputs
PER_SEQUENCE = ("pooler_output", "seq_relationship_logits", "sop_logits", "loss")


def real_token_outputs(out, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    found = {n: out[n][mask] for n in POSITIONAL if n in out.keys() and out[n] is not None}
    found.update({n: out[n] for n in PER_SEQUENCE if n in out.keys() and out[n] is not None})
    return found


def objective(out, mask: torch.Tensor) -> torch.Tensor:
    """The loss when there is one, else a fixed random projection of the real-token outputs."""
    if "loss" in out.keys() and out["loss"] is not None:
        return out["loss"]
    g = torch.Generator().manual_seed(7)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
               for t in real_token_outputs(out, mask).values())


@pytest.mark.parametrize("class_name", CLASSES)
def test_unpadded_equals_padded_outputs_and_gradients(class_name):
    padded = bertfast.from_hf(build_hf(class_name, torch.float64)).train()  # dropout 0: same numbers
    unpadded = bertfast.from_hf(build_hf(class_name, torch.float64)).train()
    models.set_unpad(padded, False)
    models.set_unpad(unpadded, True)
    kwargs = hf_inputs(class_name, with_labels=True)
    mask = kwargs["attention_mask"].bool()
    assert not mask.all()
    with bertfast.record_backends() as ran:
        out_u = unpadded(**kwargs)
    out_p = padded(**kwargs)
    expected, actual = real_token_outputs(out_p, mask), real_token_outputs(out_u, mask)
    assert set(actual) == set(expected)
    for name in expected:
        assert_rel_close(actual[name], expected[name], 1e-12, f"{class_name}.{name}")
    if "last_hidden_state" in out_u.keys():
        assert (out_u.last_hidden_state[~mask] == 0).all()  # documented: zeros at padded positions
    assert ("attention", "torch") in ran
    objective(out_p, mask).backward()
    objective(out_u, mask).backward()
    assert_grads_close(unpadded, padded, 1e-12, class_name, every_parameter=False)


@pytest.mark.parametrize("mtype", ["bert", "albert", "roberta", "electra"])
def test_unpadded_handles_left_padding_holes_and_an_all_padding_row(mtype):
    model = base_encoder(mtype).double().eval()
    randomize_(model)
    ids, _, types = ragged_batch(mtype, batch=4, seq_len=11)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 3:6] = False  # a hole
    mask[2] = False  # nothing real
    models.set_unpad(model, False)
    padded = model(ids, mask, types).last_hidden_state
    models.set_unpad(model, True)
    unpadded = model(ids, mask, types).last_hidden_state
    assert torch.isfinite(unpadded).all()
    assert_rel_close(unpadded[mask], padded[mask], 1e-12, mtype)
    assert (unpadded[~mask] == 0).all()


def test_packing_round_trip_and_offsets():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    packing = Packing.of(mask)
    assert packing.cu_seqlens.tolist() == [0, 2, 2, 5] and packing.cu_seqlens.dtype == torch.int32
    assert packing.max_seqlen == 3 and packing.indices.tolist() == [0, 1, 8, 10, 11]
    x = torch.arange(3 * 4 * 2, dtype=torch.float64).view(3, 4, 2).requires_grad_()
    packed = packing.pack(x)
    assert packed.shape == (5, 2)
    back = packing.unpack(packed)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None].double().expand(3, 4, 2))


def test_default_policy_unpads_only_cuda_batches():
    mask = torch.tensor([[True, False]])
    cpu = torch.zeros(1, 2, 4)
    assert not wants_unpadding(None, mask, cpu)  # CPU: padded (no varlen kernel to gain from)
    assert wants_unpadding(True, mask, cpu)
    assert not wants_unpadding(False, mask, cpu)
    assert not wants_unpadding(True, None, cpu)  # nothing to remove
    meta = torch.zeros(1, 2, 4, device="meta")
    assert not wants_unpadding(None, mask, meta)


@pytest.mark.parametrize("mtype", ["bert", "albert", "roberta", "electra"])
def test_compiled_encoder_does_not_recompile_for_each_batch_shape(mtype):
    """fullgraph compile of each encoder (torch backend: plain ops; the kernels' custom op is
    compiled in test_attention_op.py); new (batch, seq_len) shapes reuse one dynamic graph after
    the first recompilation instead of compiling per shape."""
    model = base_encoder(mtype).eval()
    models.set_unpad(model, True)  # ignored while compiling: the padded path traces
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=count_graphs, fullgraph=True)
    for batch, seq_len in [(2, 9), (3, 13), (4, 17), (5, 19), (3, 7)]:
        ids, mask, types = ragged_batch(mtype, batch=batch, seq_len=seq_len, seed=batch)
        models.set_unpad(model, False)
        reference = model(ids, mask, types).last_hidden_state
        models.set_unpad(model, True)
        assert_rel_close(compiled(ids, mask, types).last_hidden_state, reference, 1e-5, f"{mtype} {batch}x{seq_len}")
    assert len(graphs) <= 2, f"{len(graphs)} graphs compiled for 5 batch shapes"
