"""MLM head + loss: bertfast.ops.mlm_loss (head and vocabulary GEMM on the masked tokens only; the
triton backend never materializes the (tokens, vocab) logits) vs transformers' MLM head on every
token followed by CrossEntropyLoss(ignore_index=-100), as a user of BertForMaskedLM /
AlbertForMaskedLM has it, eager and under torch.compile.

    python -m pytest benchmarks/test_mlm_loss.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds and its output
is finite). ``--benchmark-json=FILE`` keeps ``extra_info``.

Cases: mode (fwd | bwd | fwd+bwd) x head, on the output of an encoder (hidden, a leaf that gets a
gradient) for batch x seq 32 x 512 in bfloat16 on a GPU (2 x 128 in float32 on a CPU), 15% of the
tokens masked (labels = token ids there, -100 elsewhere; seeded):

  bert     transformers' BertOnlyMLMHead (BertForMaskedLM's ``cls``) from BertConfig(hidden 768,
           vocab 30522, gelu): dense 768 -> 768, GELU, LayerNorm, decoder 768 -> 30522
  albert   transformers' AlbertMLMHead from AlbertConfig(hidden 768, embedding 128, vocab 30000,
           gelu_new): dense 768 -> 128, tanh-GELU, LayerNorm, decoder 128 -> 30000

Everything is in the benchmark dtype (parameters too, no autocast). Under bfloat16 autocast
transformers' loss would also make a float32 copy of the (tokens, vocab) logits (autocast runs
cross_entropy in float32), so these ratios are the conservative side.

  transformers-eager     head(hidden) -> (B, T, V) logits -> CrossEntropyLoss()(logits.view(-1, V),
                         labels.view(-1))
  transformers-compile   the same function under torch.compile (default mode; GPU only, see flops.py)
  bertfast-torch         bertfast.ops.mlm_loss(..., backend="torch") on the head's own parameters
  bertfast-triton        bertfast.ops.mlm_loss(..., backend="triton")

Gradients: hidden and every head parameter. Timing, rounds and peak memory as in test_attention.py
(``flops.run_case``). ``extra_info``: useful FLOPs (``flops.gemm_flops`` over the MASKED tokens
only: 2*M*(H*E + E*V) forward, 2x backward; every implementation is charged the same, so TFLOP/s
ratios are inverse time ratios), TFLOP/s and the fraction of the card's matmul rate, peak memory,
``speedup_vs_X`` / ``memory_ratio_vs_X`` for X = transformers-eager and transformers-compile, the
bertfast backends that ran, the card and versions. The issue's goal, recorded (never asserted) in
``goal`` / ``goal_speed_met`` / ``goal_memory_met``: >= 3x faster and >= 4x less peak memory than
transformers-eager (the training step is the fwd+bwd case). Outputs are checked to be finite.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from flops import (
    DTYPE,
    MODES,
    TRITON_NEEDS_CUDA,
    compile_skip_reason,
    fresh_compile,
    gemm_flops,
    run_case,
)

import bertfast
from bertfast.ops.bias_gelu import approximate_of

transformers = pytest.importorskip("transformers")

BATCH = {"cuda": (32, 512), "cpu": (2, 128)}  # (B, T)
MASK_RATE = 0.15
HEADS = ("bert", "albert")
IMPLS = ("transformers-eager", "transformers-compile", "bertfast-torch", "bertfast-triton")
BASELINES = ("transformers-eager", "transformers-compile")
GOAL = (3.0, 4.0)  # (times faster, times less peak memory) than transformers-eager


class Head:
    """A transformers MLM head and where its parameters sit."""

    def __init__(self, name: str):
        if name == "bert":
            from transformers.models.bert.modeling_bert import BertOnlyMLMHead

            self.config = transformers.BertConfig(vocab_size=30522, hidden_size=768, hidden_act="gelu")
            self.module = BertOnlyMLMHead(self.config)
            p = self.module.predictions
            self.dense, self.norm, self.decoder = p.transform.dense, p.transform.LayerNorm, p.decoder
        elif name == "albert":
            from transformers.models.albert.modeling_albert import AlbertMLMHead

            self.config = transformers.AlbertConfig(vocab_size=30000, embedding_size=128, hidden_size=768,
                                                    num_attention_heads=12, intermediate_size=3072,
                                                    hidden_act="gelu_new")
            self.module = AlbertMLMHead(self.config)
            self.dense, self.norm, self.decoder = self.module.dense, self.module.LayerNorm, self.module.decoder
        else:
            raise ValueError(f"head: unknown head {name!r}")
        self.approximate = approximate_of(self.config.hidden_act)
        self.hidden, self.embedding, self.vocab = self.dense.in_features, self.dense.out_features, \
            self.decoder.out_features

    def used_parameters(self) -> list[torch.Tensor]:
        """The parameters the head's forward uses (transformers' heads also hold a separate ``bias``
        that only the full model ties to ``decoder.bias``)."""
        return [self.dense.weight, self.dense.bias, self.norm.weight, self.norm.bias, self.decoder.weight,
                self.decoder.bias]


@functools.lru_cache(maxsize=1)
def built(name: str, device: torch.device, dtype: torch.dtype) -> Head:
    """The head (seeded), kept for the following cases; the cases never change its weights."""
    torch.manual_seed(0)
    head = Head(name)
    head.module.to(device=device, dtype=dtype)
    return head


def transformers_loss(head: Head):
    module, vocab = head.module, head.vocab
    loss_fct = torch.nn.CrossEntropyLoss()  # ignore_index=-100

    def loss(hidden, labels):
        logits = module(hidden)  # (B, T, V): every token
        return loss_fct(logits.view(-1, vocab), labels.view(-1))

    return loss


def bertfast_loss(head: Head, backend: str):
    d, n, dec = head.dense, head.norm, head.decoder

    def loss(hidden, labels):
        return bertfast.ops.mlm_loss(hidden, labels, d.weight, d.bias, n.weight, n.bias, dec.weight, dec.bias,
                                     approximate=head.approximate, eps=n.eps, backend=backend)

    return loss


def masked_labels(batch: tuple[int, int], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, T) labels: a random token id at 15% of the positions (at least one), -100 elsewhere."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, batch, generator=g)
    chosen = torch.rand(batch, generator=g) < MASK_RATE
    chosen[0, 0] = True
    return torch.where(chosen, ids, torch.full_like(ids, -100)).to(device)


CASES = [pytest.param(mode, head, impl, id=f"{mode}-{head}-{impl}")
         for head, mode, impl in itertools.product(HEADS, MODES, IMPLS)]  # one head's cases together


@pytest.mark.parametrize("mode, head_name, impl", CASES)
def test_mlm_loss(benchmark, device, env_info, mode, head_name, impl):
    kind = device.type
    if impl == "bertfast-triton" and kind != "cuda":
        pytest.skip(f"needs CUDA: {TRITON_NEEDS_CUDA}")
    if impl == "transformers-compile":
        reason = compile_skip_reason(device)
        if reason:
            pytest.skip(reason)
    dtype, (B, T) = DTYPE[kind], BATCH[kind]
    head = built(head_name, device, dtype)
    grad = mode != "fwd"
    head.module.requires_grad_(grad)
    if impl.startswith("transformers"):
        fn = transformers_loss(head)
        if impl == "transformers-compile":
            fn = fresh_compile(fn)
    else:
        fn = bertfast_loss(head, impl.removeprefix("bertfast-"))
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, head.hidden, generator=g, device=device, dtype=dtype).requires_grad_(grad)
    labels = masked_labels((B, T), head.vocab, device)
    masked = int((labels != -100).sum())

    dtype_name = str(dtype).removeprefix("torch.")
    run_case(benchmark, device, env_info,
             group=f"mlm_loss {mode} {head_name} B={B} T={T} H={head.hidden} E={head.embedding} V={head.vocab} "
                   f"{dtype_name}",
             impl=impl, mode=mode, forward=lambda: fn(hidden, labels), leaves=[hidden, *head.used_parameters()],
             baselines=BASELINES, goal=GOAL,
             flops=gemm_flops(mode, masked, (head.hidden, head.embedding), (head.embedding, head.vocab)),
             info={"head": head_name, "batch": B, "seq_len": T, "hidden": head.hidden,
                   "embedding_size": head.embedding, "vocab": head.vocab, "masked_tokens": masked,
                   "approximate": head.approximate})
