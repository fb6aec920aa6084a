"""`bertfast demo`: one forward + backward pretraining step of BERT, ALBERT, RoBERTa and ELECTRA
on a random ragged batch, with the loss parts, timings and the backends that ran; and, when
transformers is installed, the largest difference of the encoder output from transformers'."""

from __future__ import annotations

import time

import torch

from bertfast import models
from bertfast.ops.dispatch import record_backends

TINY = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=128, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _batch(config, batch: int, seq_len: int, generator: torch.Generator):
    """Random ids with ragged padding, 15% of real non-first tokens masked as MLM labels."""
    pad = config.pad_token_id
    lengths = torch.randint(seq_len // 3, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    real = torch.arange(seq_len)[None, :] < lengths[:, None]
    ids = torch.randint(pad + 2, config.vocab_size, (batch, seq_len), generator=generator)
    ids = torch.where(real, ids, torch.full_like(ids, pad))
    chosen = real & (torch.rand(batch, seq_len, generator=generator) < 0.15)
    chosen[:, 0] = False
    chosen[0, 1] = True  # at least one masked token
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked = torch.where(chosen, torch.full_like(ids, pad + 1), ids)  # pad + 1 plays [MASK]
    return masked, real.long(), labels


def _models():
    bert = models.BertConfig(**TINY)
    albert = models.AlbertConfig(**TINY, embedding_size=64, num_hidden_groups=1)
    roberta = models.RobertaConfig(**{**TINY, "max_position_embeddings": 130})
    electra = models.ElectraConfig(**TINY, embedding_size=64)
    return [
        ("BERT (MLM + NSP)", models.BertForPreTraining(bert), "nsp"),
        ("ALBERT (MLM + SOP, shared layers)", models.AlbertForPreTraining(albert), "sop"),
        ("RoBERTa (MLM)", models.RobertaForMaskedLM(roberta), None),
        ("ELECTRA (generator MLM + 50 x RTD)", models.ElectraPretrainingModel(electra), "electra"),
    ]


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, models.ElectraPretrainingModel):
        return model.discriminator.electra
    return next(getattr(model, n) for n in ("bert", "albert", "roberta") if hasattr(model, n))


def _parity_with_transformers(encoder: torch.nn.Module, ids, mask) -> str:
    """Largest difference of the encoder output from the same weights run by transformers (eager)."""
    try:
        from bertfast import hf

        reference = hf.to_hf(encoder, attn_implementation="eager").eval()
    except ImportError:  # transformers is the optional [hf] extra
        return "transformers not installed: no comparison"
    encoder.eval()
    with torch.no_grad():
        ours = encoder(ids, mask).last_hidden_state
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    encoder.train()
    return f"encoder output vs transformers (eval, float32): max |diff| = {(ours - theirs).abs().max().item():.1e}"


def run(batch: int = 8, seq_len: int = 64, seed: int = 0) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    print(f"bertfast demo: one training step per model, batch {batch} x {seq_len} tokens, ragged padding, CPU\n")
    for title, model, extra in _models():
        ids, mask, labels = _batch(model.config if hasattr(model, "config") else model.discriminator.config,
                                   batch, seq_len, generator)
        params = sum(p.numel() for p in model.parameters())
        model.train()
        start = time.perf_counter()
        with record_backends() as trace:
            if extra == "electra":
                out = model(ids, labels, attention_mask=mask, seed=seed)
                parts = f"mlm {out.mlm_loss.item():.3f}  rtd {out.rtd_loss.item():.3f}"
            elif extra in ("nsp", "sop"):
                pair = torch.randint(0, 2, (batch,), generator=generator)
                key = "next_sentence_label" if extra == "nsp" else "sentence_order_label"
                out = model(ids, mask, labels=labels, **{key: pair})
                parts = f"mlm {out.mlm_loss.item():.3f}  {extra} {getattr(out, extra + '_loss').item():.3f}"
            else:
                out = model(ids, mask, labels=labels)
                parts = f"mlm {out.loss.item():.3f}"
            out.loss.backward()
        elapsed = time.perf_counter() - start
        grads = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
        backends = sorted({f"{op}:{b}" for op, b in trace})
        print(f"{title}")
        print(f"  parameters {params / 1e6:.2f}M   loss {out.loss.item():.3f} ({parts})   "
              f"fwd+bwd {elapsed * 1e3:.0f} ms   |grad|_1 {grads:.1f}")
        print(f"  backends: {', '.join(backends)}")
        print(f"  {_parity_with_transformers(_encoder(model), ids, mask)}\n")
