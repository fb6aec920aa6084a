"""Model behaviour beyond transformers parity: ALBERT's sharing modes, ELECTRA's joint
generator/discriminator step, logits on demand, backends at model level (torch.compile: test_unpadded.py)."""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import models
from helpers import EXTRA, SIZES, assert_rel_close, mlm_labels, ragged_batch, randomize_

ALBERT = {**SIZES, **EXTRA["albert"], "num_hidden_groups": 1}
ELECTRA = {**SIZES, **EXTRA["electra"]}


# --- ALBERT sharing ---------------------------------------------------------------------------
def _albert(sharing: str) -> models.AlbertModel:
    model = models.AlbertModel(models.AlbertConfig(**ALBERT, sharing=sharing)).double()
    randomize_(model, seed=hash(sharing) % 1000)
    return model


def _halves(layer) -> tuple[dict, dict]:
    sd = layer.state_dict()
    attention = {k: v for k, v in sd.items() if k.startswith("attention.")}
    return attention, {k: v for k, v in sd.items() if not k.startswith("attention.")}


def _unshared_equivalent(partial: models.AlbertModel) -> models.AlbertModel:
    """A sharing='none' model whose every layer step holds the partial model's weights for it."""
    cfg = partial.config
    full = models.AlbertModel(models.AlbertConfig(**ALBERT, sharing="none")).double()
    shared = {k: v for k, v in partial.state_dict().items() if "albert_layer" not in k and "unshared" not in k}
    full.load_state_dict(shared, strict=False)
    for step in range(cfg.num_hidden_layers):
        for j in range(cfg.inner_group_num):
            shared_layer = partial.encoder.albert_layer_groups[cfg.group_of(step)].albert_layers[j]
            own_layer = partial.encoder.unshared_layers[step * cfg.inner_group_num + j]
            target = full.encoder.albert_layer_groups[step].albert_layers[j]
            target.load_state_dict({**shared_layer.state_dict(), **own_layer.state_dict()}, strict=True)
    return full


@pytest.mark.parametrize("sharing", ["attention", "ffn"])
def test_partial_sharing_equals_unshared_model_with_copied_weights(sharing):
    partial = _albert(sharing)
    full = _unshared_equivalent(partial)
    ids, mask, types = ragged_batch("albert")
    out_partial = partial(ids, mask, types)
    out_full = full(ids, mask, types)
    assert_rel_close(out_partial.last_hidden_state, out_full.last_hidden_state, 1e-12)
    # The shared half's gradient is the sum of the per-step gradients of the unshared model.
    (out_partial.last_hidden_state.sum() + out_partial.pooler_output.sum()).backward()
    (out_full.last_hidden_state.sum() + out_full.pooler_output.sum()).backward()
    cfg = partial.config
    for j in range(cfg.inner_group_num):
        shared_layer = partial.encoder.albert_layer_groups[0].albert_layers[j]
        for name, p in shared_layer.named_parameters():
            summed = sum(dict(full.encoder.albert_layer_groups[s].albert_layers[j].named_parameters())[name].grad
                         for s in range(cfg.num_hidden_layers))
            assert_rel_close(p.grad, summed, 1e-10, f"shared {name}")


def test_sharing_modes_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.encoder.parameters())

    L, inner = ALBERT["num_hidden_layers"], ALBERT["inner_group_num"]
    probe = models.albert.AlbertLayer(models.AlbertConfig(**ALBERT))
    attention = sum(p.numel() for p in probe.attention.parameters())
    ffn = sum(p.numel() for p in probe.parameters()) - attention
    mapping = _albert("all").encoder.embedding_hidden_mapping_in.weight.numel() + SIZES["hidden_size"]
    assert count(_albert("all")) == mapping + inner * (attention + ffn)
    assert count(_albert("none")) == mapping + L * inner * (attention + ffn)
    assert count(_albert("attention")) == mapping + inner * attention + L * inner * ffn
    assert count(_albert("ffn")) == mapping + inner * ffn + L * inner * attention


def test_partial_sharing_has_no_transformers_equivalent():
    with pytest.raises(ValueError, match="sharing"):
        models.AlbertConfig(**ALBERT, sharing="ffn").to_hf()


# --- ELECTRA joint pretraining ----------------------------------------------------------------
def _electra() -> models.ElectraPretrainingModel:
    model = models.ElectraPretrainingModel(models.ElectraConfig(**ELECTRA))
    randomize_(model)
    return model


def test_generator_config_is_a_fraction_of_the_discriminator():
    base = models.ElectraConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    gen = models.make_generator_config(base)
    assert (gen.hidden_size, gen.num_attention_heads, gen.intermediate_size) == (256, 4, 1024)
    assert gen.head_dim == base.head_dim and gen.num_hidden_layers == base.num_hidden_layers
    small = models.make_generator_config(models.ElectraConfig(), fraction=0.25)  # ELECTRA-small: H 256
    assert (small.hidden_size, small.num_attention_heads) == (64, 1)


def test_generator_and_discriminator_share_one_token_embedding():
    model = _electra()
    gen_emb = model.generator.electra.embeddings.word_embeddings
    assert gen_emb is model.discriminator.electra.embeddings.word_embeddings
    assert model.generator.generator_lm_head.weight is gen_emb.weight
    names = [n for n, p in model.named_parameters() if p is gen_emb.weight]
    assert len(names) == 1  # parameters() yields it once: one gradient, one optimizer slot


def test_electra_step_builds_corruption_and_labels_consistently():
    model = _electra().train()
    ids, mask, types = ragged_batch("electra")
    labels = mlm_labels(ids, mask)
    masked = torch.where(labels != -100, torch.full_like(ids, 3), ids)  # 3 plays [MASK]
    out = model(masked, labels, attention_mask=mask, token_type_ids=types, seed=11)
    selected = labels != -100
    assert torch.equal(out.corrupted_ids[~selected], masked[~selected])
    original = torch.where(selected, labels, masked)
    assert torch.equal(out.replaced, (out.corrupted_ids != original) & mask.bool())
    assert not out.replaced[~selected].any()
    assert torch.allclose(out.loss, out.mlm_loss + 50.0 * out.rtd_loss)
    disc = model.discriminator(out.corrupted_ids, mask, types, labels=out.replaced)
    assert torch.allclose(disc.loss, out.rtd_loss)
    again = model(masked, labels, attention_mask=mask, token_type_ids=types, seed=11)
    assert torch.equal(again.corrupted_ids, out.corrupted_ids) and torch.equal(again.loss, out.loss)


def test_both_losses_train_the_shared_embedding():
    model = _electra().train()
    ids, mask, types = ragged_batch("electra")
    labels = mlm_labels(ids, mask)
    out = model(ids, labels, attention_mask=mask, token_type_ids=types, seed=0)
    table = model.discriminator.electra.embeddings.word_embeddings.weight
    grad_mlm, = torch.autograd.grad(out.mlm_loss, table, retain_graph=True)
    grad_rtd, = torch.autograd.grad(out.rtd_loss, table, retain_graph=True)
    assert grad_mlm.abs().sum() > 0 and grad_rtd.abs().sum() > 0
    gen_only = [p for n, p in model.generator.named_parameters() if "word_embeddings" not in n
                and "generator_lm_head.weight" not in n]
    grads = torch.autograd.grad(out.rtd_loss, gen_only, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads), "sampling must stop the RTD gradient"


# --- logits on demand, backends, precision ----------------------------------------------------
def test_logits_only_when_asked_with_labels():
    model = models.BertForPreTraining(models.BertConfig(**SIZES)).eval()
    ids, mask, types = ragged_batch("bert")
    labels = mlm_labels(ids, mask)
    lean = model(ids, mask, types, labels=labels)
    assert lean.prediction_logits is None and lean.mlm_loss is not None and lean.nsp_loss is None
    full = model(ids, mask, types, labels=labels, return_logits=True)
    plain = model(ids, mask, types)
    assert plain.loss is None and torch.equal(full.prediction_logits, plain.prediction_logits)
    expected = torch.nn.functional.cross_entropy(plain.prediction_logits.flatten(0, 1), labels.flatten())
    assert_rel_close(lean.loss, expected, 1e-6)


def test_requested_backend_that_refuses_names_every_backend():
    model = models.BertModel(models.BertConfig(**SIZES))
    ids, mask, _ = ragged_batch("bert")
    with bertfast.use_backend("triton"), pytest.raises(bertfast.ops.BackendUnavailableError) as err:
        model(ids, mask)
    message = str(err.value)
    for name in ("cuda", "triton", "torch"):
        assert f"  {name}:" in message
    with bertfast.use_backend("triton", "torch"), bertfast.record_backends() as trace:
        model(ids, mask)
    assert trace and {b for _, b in trace} == {"torch"}


def test_bfloat16_forward_and_backward_are_finite():
    model = models.AlbertForPreTraining(models.AlbertConfig(**ALBERT)).to(torch.bfloat16)
    ids, mask, types = ragged_batch("albert")
    out = model(ids, mask, types, labels=mlm_labels(ids, mask), sentence_order_label=torch.tensor([0, 1, 0, 1]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_labels_are_read_once_per_step_and_again_after_an_in_place_write(monkeypatch):
    """The model checks label values before the encoder; the loss op must not read them again
    (one reduction and, on a GPU, one sync each), unless they were modified in between."""
    model = models.BertForPreTraining(models.BertConfig(**SIZES))
    ids, mask, types = ragged_batch("bert")
    labels = mlm_labels(ids, mask)
    pair = torch.tensor([0, 1, 1, 0])
    reads = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: reads.append(t.shape) or real_aminmax(t, *a, **k))
    model(ids, mask, types, labels=labels, next_sentence_label=pair)
    # input_ids, token_type_ids, position ids, labels, next_sentence_label: once each.
    assert len(reads) == 5, reads
    labels[0, 1] = SIZES["vocab_size"]  # an in-place write after the first check
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, types, labels=labels, next_sentence_label=pair)


# --- autocast ------------------------------------------------------------------------------------
def test_pretraining_under_bfloat16_autocast_matches_transformers():
    """Under autocast a bfloat16 branch output meets the float32 residual of the embeddings: the
    LayerNorm op adds them in float32, as transformers does (it used to refuse the dtype mix)."""
    import transformers

    from test_hf_parity import build_hf, hf_inputs

    hf = build_hf("BertForPreTraining", torch.float32).train()
    ours = bertfast.from_hf(hf).train()
    kwargs = hf_inputs("BertForPreTraining", with_labels=True)
    assert isinstance(hf, transformers.BertForPreTraining)
    with torch.autocast("cpu", torch.bfloat16):
        loss, expected = ours(**kwargs).loss, hf(**kwargs).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    # bfloat16 keeps 8 bits: the two runs round differently, but agree to a few bfloat16 ulps
    assert abs(loss.item() - expected.item()) <= 0.02 * abs(expected.item())
