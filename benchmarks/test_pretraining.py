"""End-to-end pretraining throughput: one training step of ALBERT-base, RoBERTa-base and
ELECTRA-base, bertfast vs transformers (sdpa, eager, sdpa + torch.compile), same weights.

    python -m pytest benchmarks/test_pretraining.py --benchmark-only

``--benchmark-disable`` runs each case once, untimed (a smoke run: every case builds, steps and its
loss is finite). ``--benchmark-json=FILE`` keeps ``extra_info``. ``BERTFAST_BENCH_PRESET=small``
keeps only seq 128 on a GPU.

One step = ``optimizer.zero_grad(set_to_none=True)``, forward with the loss, backward,
``AdamW.step()`` (lr 1e-5, fused on CUDA; the same optimizer for every implementation). Models:

  albert   bertfast.models.AlbertForPreTraining(AlbertConfig()) = ALBERT-base v2 (E 128, H 768, one
           shared layer applied 12 times, vocab 30000): MLM + sentence-order (SOP) labels
  roberta  RobertaForMaskedLM(RobertaConfig()) = RoBERTa-base (vocab 50265): MLM labels
  electra  ElectraPretrainingModel(ElectraConfig(H 768, 12 layers, 12 heads, I 3072, E 768)) and its
           default generator (1/3 width: H 256, 4 heads, I 1024, 12 layers), sharing the word
           embeddings: generator MLM, a token sampled from the generator at every masked position,
           discriminator replaced-token detection (RTD) on every real token; loss = mlm + 50 * rtd

Implementations (each starts from the same seeded bertfast weights):

  hf-eager          bertfast.to_hf(model, attn_implementation="eager")
  hf-sdpa           bertfast.to_hf(model, attn_implementation="sdpa")
  hf-sdpa-compile   torch.compile of the hf-sdpa model(s) (default mode; GPU only, see flops.py)
  hf-sdpa-patched   the hf-sdpa model(s) after ``bertfast.patch`` (the drop-in swap: transformers'
                    classes, bertfast ops underneath); ELECTRA's generator keeps its logits
                    (``keep_logits=True``) because the step samples from them
  hf-sdpa-patched-compile  torch.compile of the patched model(s), as hf-sdpa-compile (GPU only)
  bertfast          the bertfast model; dispatch picks the fastest backend for every op
  bertfast-compile  torch.compile of the bertfast model (GPU only; the padded path traces)

transformers' ELECTRA is an ElectraForMaskedLM generator and an ElectraForPreTraining
discriminator whose word embeddings are made one module (and the generator's tied decoder with
them), joined by the step ELECTRA describes, written with plain torch: generator MLM loss (its
logits on every token), ``torch.multinomial`` of softmax(logits) at the masked positions (no
gradient), RTD labels = sampled != original, loss = mlm + 50 * rtd. Under torch.compile the two
models are compiled and the sampling between them stays eager.

Batches (fixed seeds): sequence length T = 128 with batch 512 and T = 512 with batch 128 (64k
token slots per step) on a GPU. Lengths: pretraining data packed to full sentences is mostly full
length: 70% of the sequences are T long, 30% draw L = 0.6 T exp(0.5 z), z ~ N(0, 1) (log-normal,
median 0.6 T), rounded and clipped to [8, T]; padding after. 15% of each sequence's real tokens
(at least one) are masked: labels = original id there (-100 elsewhere), input = the mask id
(vocab - 1). ALBERT's token types mark the second half of each sequence's real tokens as segment
B; SOP labels are random. bfloat16 autocast on a GPU (float32 parameters and optimizer state),
float32 on a CPU.

On a CPU the base models are replaced by stand-in configs (hidden 128, 2 layers, 2 heads,
intermediate 512, vocab 8000; ALBERT E 64; T = 64, batch 4), recorded in ``extra_info["config_note"]``:
base models at 64k tokens take minutes per step there, and the CPU numbers only show that the cases
run and what dispatch, validation and the reference paths cost against transformers.

Timing: the first step is untimed (compilation, autotuning, the optimizer's state); on a GPU a
second untimed step sizes the rounds and each round is one step timed with CUDA events
(``flops.use_device_clock``); on a CPU wall clock. Medians. Peak memory: ``max_memory_allocated``
during one more untimed step (parameters, optimizer state and batch included; ``step_memory_mib``
is the part above what was allocated before the step).

``extra_info``: impl, model, seq_len, batch, real_tokens, masked_tokens, median_ms, tokens_per_s
(real tokens / median step time), flops (``model_flops``: useful model FLOPs, the same for every
implementation) and tflops, mfu (= fraction_of_matmul_rate: model TFLOP/s / the card's measured
bfloat16 matmul rate), peak memory, ``speedup_vs_X`` / ``memory_ratio_vs_X`` for the baselines X
that ran earlier in the same group (hf-sdpa, hf-eager, hf-sdpa-compile), the bertfast backends
that ran (``bertfast.record_backends``), the card and versions.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass

import model_flops
import pytest
import torch
from flops import DTYPE, compare_with_baselines, compile_skip_reason, fresh_compile, tflops, use_device_clock
from torch import nn

import bertfast
from bertfast import models

transformers = pytest.importorskip("transformers")

PRESET_ENV = "BERTFAST_BENCH_PRESET"
PRESET = os.environ.get(PRESET_ENV) or "default"
if PRESET not in ("small", "default"):
    raise ValueError(f"{PRESET_ENV}: must be 'small' or 'default', got {PRESET!r}")

ON_GPU = torch.cuda.is_available()  # decided at collection, as the case list depends on it
MODELS = ("albert", "roberta", "electra")
IMPLS = ("hf-eager", "hf-sdpa", "hf-sdpa-compile", "hf-sdpa-patched", "hf-sdpa-patched-compile", "bertfast",
         "bertfast-compile")  # baselines first
BASELINES = ("hf-sdpa", "hf-eager", "hf-sdpa-compile")
COMPILED = ("hf-sdpa-compile", "hf-sdpa-patched-compile", "bertfast-compile")
# (seq_len, batch): ~64k token slots per step on a GPU; one tiny case on a CPU
SHAPES = ([(128, 512)] if PRESET == "small" else [(128, 512), (512, 128)]) if ON_GPU else [(64, 4)]

FULL_FRACTION = 0.7  # sequences at full length
SHORT_MEDIAN, SHORT_SIGMA, MIN_LEN = 0.6, 0.5, 8  # the others: log-normal, median 0.6 T, clipped [8, T]
MASK_RATE = 0.15
BATCH_SEED = 2  # fixed; with it the 4-sequence CPU case has one short (padded) sequence too
RTD_WEIGHT = 50.0
LR = 1e-5

CPU_STAND_IN = {"vocab_size": 8000, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 512}
CPU_NOTE = ("cpu stand-in config: hidden 128, 2 layers, 2 heads, intermediate 512, vocab 8000 (ALBERT E 64, "
            "ELECTRA E 128 + 1/3 generator) instead of the base model; base sizes run on a GPU")

# (fewest rounds, most rounds, seconds the timed rounds should take) and warmup rounds, per device
ROUNDS = {"cuda": (5, 30, 2.0), "cpu": (3, 3, 0.0)}
WARMUP_ROUNDS = {"cuda": 2, "cpu": 0}


# ------------------------------------------------------------------------------------------------
# Models


def bertfast_model(name: str, stand_in: bool) -> nn.Module:
    """The seeded bertfast pretraining model (float32, CPU): base size, or the CPU stand-in."""
    torch.manual_seed(0)
    small = CPU_STAND_IN if stand_in else {}
    if name == "albert":
        return models.AlbertForPreTraining(models.AlbertConfig(**small, **({"embedding_size": 64} if stand_in else {})))
    if name == "roberta":
        return models.RobertaForMaskedLM(models.RobertaConfig(**small))
    if name == "electra":
        base = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "embedding_size": 768}
        config = models.ElectraConfig(**({**small, "embedding_size": 128} if stand_in else base))
        return models.ElectraPretrainingModel(config)
    raise ValueError(f"model: unknown model {name!r}; known: {', '.join(MODELS)}")


def configs(name: str, model: nn.Module) -> tuple:
    """(config,) or, for ELECTRA, (discriminator config, generator config)."""
    if name == "electra":
        return model.discriminator.config, model.generator.config
    return (model.config,)


def hf_electra(model: models.ElectraPretrainingModel, attn: str) -> nn.ModuleDict:
    """transformers' generator and discriminator with the weights of ``model`` and, as in it, one
    word-embedding module (the generator's decoder tied to it)."""
    gen = bertfast.to_hf(model.generator, attn_implementation=attn)
    disc = bertfast.to_hf(model.discriminator, attn_implementation=attn)
    shared = disc.electra.embeddings.word_embeddings
    gen.electra.embeddings.word_embeddings = shared
    gen.generator_lm_head.weight = shared.weight
    return nn.ModuleDict({"generator": gen, "discriminator": disc})


def hf_model(name: str, model: nn.Module, attn: str) -> nn.Module:
    return hf_electra(model, attn) if name == "electra" else bertfast.to_hf(model, attn_implementation=attn)


# ------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) masked input
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) original id at masked positions, -100 elsewhere
    token_type_ids: torch.Tensor | None  # ALBERT: segment B = 1
    sentence_order_label: torch.Tensor | None  # ALBERT: (B,)
    lengths: list[int]
    masked: int

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def ragged_lengths(batch: int, seq_len: int, g: torch.Generator) -> list[int]:
    """70% full length, 30% log-normal (median 0.6 T, sigma 0.5) clipped to [8, T], in seeded order."""
    full = round(FULL_FRACTION * batch)
    z = torch.randn(batch - full, generator=g, dtype=torch.float64)
    short = (SHORT_MEDIAN * seq_len * torch.exp(SHORT_SIGMA * z)).round().clamp(min(MIN_LEN, seq_len), seq_len)
    lengths = torch.cat([torch.full((full,), seq_len, dtype=torch.float64), short])
    return [int(n) for n in lengths[torch.randperm(batch, generator=g)]]


def make_batch(name: str, config, batch: int, seq_len: int, device: torch.device) -> Batch:
    """A seeded masked batch (see the module docstring) for ``config``'s vocabulary and padding id."""
    g = torch.Generator().manual_seed(BATCH_SEED)
    lengths = ragged_lengths(batch, seq_len, g)
    lens = torch.tensor(lengths)
    positions = torch.arange(seq_len)
    real = positions[None, :] < lens[:, None]
    vocab, pad = config.vocab_size, config.pad_token_id
    # Ordinary ids avoid the low (special) ids, the padding id (RoBERTa's positions count non-pad ids)
    # and the mask id vocab - 1.
    ids = torch.randint(5, vocab - 1, (batch, seq_len), generator=g)
    ids = torch.where(real, ids, torch.full_like(ids, pad))
    # round(15%) of each sequence's real tokens, at least one: the k_b lowest random scores among them
    per_row = torch.clamp((lens * MASK_RATE).round().long(), min=1)
    scores = torch.rand(batch, seq_len, generator=g).masked_fill(~real, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = (rank < per_row[:, None]) & real
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    input_ids = torch.where(chosen, torch.full_like(ids, vocab - 1), ids)
    types = sop = None
    if name == "albert":
        types = ((positions[None, :] >= (lens[:, None] // 2)) & real).long()
        sop = torch.randint(0, 2, (batch,), generator=g)

    def dev(t):
        return None if t is None else t.to(device)

    return Batch(dev(input_ids), dev(real.long()), dev(labels), dev(types), dev(sop), lengths, int(chosen.sum()))


# ------------------------------------------------------------------------------------------------
# Losses


def bertfast_loss(name: str, model: nn.Module, b: Batch) -> torch.Tensor:
    if name == "albert":
        return model(b.input_ids, b.attention_mask, b.token_type_ids, labels=b.labels,
                     sentence_order_label=b.sentence_order_label).loss
    if name == "roberta":
        return model(b.input_ids, b.attention_mask, labels=b.labels).loss
    return model(b.input_ids, b.labels, b.attention_mask).loss


def hf_electra_loss(gen: nn.Module, disc: nn.Module, b: Batch) -> torch.Tensor:
    """ELECTRA's step on transformers' models: generator MLM, sampling, discriminator RTD."""
    out = gen(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    masked = b.labels != -100
    with torch.no_grad():  # ELECTRA does not backpropagate through sampling
        probs = torch.softmax(out.logits[masked].float(), dim=-1)
        sampled = torch.multinomial(probs, 1).squeeze(1)
        corrupted = b.input_ids.clone()
        corrupted[masked] = sampled
        replaced = torch.zeros_like(b.labels)
        replaced[masked] = (sampled != b.labels[masked]).long()
    rtd = disc(input_ids=corrupted, attention_mask=b.attention_mask, labels=replaced).loss
    return out.loss + RTD_WEIGHT * rtd


def hf_loss(name: str, model: nn.Module, b: Batch) -> torch.Tensor:
    if name == "albert":
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids,
                     labels=b.labels, sentence_order_label=b.sentence_order_label).loss
    if name == "roberta":
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    return hf_electra_loss(model["generator"], model["discriminator"], b)


def compiled(name: str, impl: str, model: nn.Module) -> nn.Module:
    """torch.compile of what the user would compile: the model (transformers' ELECTRA: both models,
    the sampling between them stays eager); dynamo's caches reset first (``flops.fresh_compile``)."""
    if impl in ("hf-sdpa-compile", "hf-sdpa-patched-compile") and name == "electra":
        gen = fresh_compile(model["generator"])
        return nn.ModuleDict({"generator": gen, "discriminator": torch.compile(model["discriminator"])})
    return fresh_compile(model)


# ------------------------------------------------------------------------------------------------
# Timing


def peak_step_memory(step) -> tuple[float, float]:
    """(peak MiB allocated during one untimed step, MiB of it above what was allocated before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def time_step(benchmark, device: torch.device, env_info: dict, impl: str, step) -> tuple[torch.Tensor, list, tuple]:
    """Run ``step`` as ``flops.run_case`` runs a case; returns (last loss, backends that ran, peak memory).

    A bertfast backend that refuses, a step that runs out of memory, or (for the compiled
    implementations) a torch.compile that fails, is skipped with the reason at the first call.
    Every call, timed or not, runs in its own fresh ``record_backends`` block: dynamo guards on the
    dispatcher's trace stack and on the length of the trace list, so a compiled model called
    outside the block it was compiled in, or inside one block whose list grows, recompiles."""
    kind = device.type
    clock = use_device_clock(benchmark) if kind == "cuda" else time.perf_counter
    compile_errors = ()
    if impl in COMPILED:
        # (`import torch._dynamo.exc` here would make `torch` a local name of the whole function)
        from torch._dynamo import exc as dynamo_exc  # also the base of inductor's errors

        compile_errors = (dynamo_exc.TorchDynamoException,)
    backends: set[tuple[str, str]] = set()

    def traced_step() -> torch.Tensor:
        with bertfast.record_backends() as trace:
            loss = step()
        backends.update(trace)
        return loss

    refused = None
    try:
        if benchmark.disabled:  # the smoke run: this one untimed call is all pedantic does
            loss = benchmark.pedantic(traced_step)
        else:
            start = clock()
            loss = traced_step()
            estimate = clock() - start
    except torch.OutOfMemoryError:
        refused = f"out of memory on {env_info['device_name']} ({env_info.get('device_memory_gib')} GiB)"
    except bertfast.ops.BackendUnavailableError as error:
        refused = f"bertfast refused the call: {error}"
    except compile_errors as error:
        refused = f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if refused is not None:
        pytest.skip(refused)
    peak = (None, None)
    if not benchmark.disabled:
        fewest, most, seconds = ROUNDS[kind]
        if kind == "cuda":  # the first step compiled, autotuned and made the optimizer state
            start = clock()
            traced_step()
            estimate = clock() - start
        rounds = min(most, max(fewest, round(seconds / max(estimate, 1e-9))))
        loss = benchmark.pedantic(traced_step, rounds=rounds, warmup_rounds=WARMUP_ROUNDS[kind])
        if kind == "cuda":
            peak = peak_step_memory(traced_step)
    return loss, sorted(backends), peak


CASES = [pytest.param(name, seq_len, batch, impl, id=f"{name}-T{seq_len}-B{batch}-{impl}")
         for name, (seq_len, batch), impl in itertools.product(MODELS, SHAPES, IMPLS)]  # a group's cases together


@pytest.mark.parametrize("name, seq_len, batch, impl", CASES)
def test_pretraining_step(benchmark, device, env_info, name, seq_len, batch, impl):
    kind = device.type
    if impl in COMPILED:
        reason = compile_skip_reason(device)
        if reason:
            pytest.skip(reason)
    stand_in = kind != "cuda"
    ours = bertfast_model(name, stand_in)
    cfgs = configs(name, ours)
    b = make_batch(name, cfgs[0], batch, seq_len, device)
    if impl.startswith("hf"):
        attn = "eager" if impl == "hf-eager" else "sdpa"
        model = hf_model(name, ours, attn).to(device).train()
        del ours
        loss_fn = hf_loss
        if impl.startswith("hf-sdpa-patched"):
            report = bertfast.patch(model, keep_logits=name == "electra")
            assert report.swapped and not report.left, str(report)
    else:
        model = ours.to(device).train()
        loss_fn = bertfast_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, **({"fused": True} if kind == "cuda" else {}))
    if impl in COMPILED:
        model = compiled(name, impl, model)

    def autocast():
        return torch.autocast("cuda", torch.bfloat16) if kind == "cuda" else contextlib.nullcontext()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(name, model, b)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if name == "albert":
        parts = model_flops.albert_pretraining_flops(cfgs[0], b.lengths, b.masked)
    elif name == "roberta":
        parts = model_flops.roberta_mlm_flops(cfgs[0], b.lengths, b.masked)
    else:
        parts = model_flops.electra_pretraining_flops(cfgs[0], cfgs[1], b.lengths, b.masked)
    flops = model_flops.total(parts)
    dtype = "bfloat16 autocast" if kind == "cuda" else str(DTYPE[kind]).removeprefix("torch.")
    group = f"pretraining {name} T={seq_len} B={batch} {dtype}"
    benchmark.group = group

    loss, trace, (peak, step_peak) = time_step(benchmark, device, env_info, impl, step)
    assert math.isfinite(float(loss)), f"{impl}: non-finite loss (a sanity check, not a timing assertion)"

    cfg = cfgs[0]
    record = {"impl": impl, "mode": "train step", "dtype": dtype, "model": name, "seq_len": seq_len, "batch": batch,
              "real_tokens": b.real_tokens, "masked_tokens": b.masked, "padding_fraction": 1 - b.real_tokens /
              (batch * seq_len), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
              "vocab": cfg.vocab_size, "config_note": CPU_NOTE if stand_in else "base config",
              "optimizer": f"AdamW(lr={LR}{', fused' if kind == 'cuda' else ''})",
              "bertfast_backends": sorted({f"{op}:{backend}" for op, backend in trace}),
              "timer": "CUDA events (flops.DeviceClock)" if kind == "cuda" else "wall clock (time.perf_counter)",
              "peak_memory_mib": peak, "step_memory_mib": step_peak,
              "peak_memory_note": ("max_memory_allocated during one step: parameters, optimizer state, batch "
                                   "included" if peak is not None else "not measured on CPU" if kind != "cuda"
                                   else "not measured in a smoke run"),
              "flops": flops, "flops_parts": parts, "flops_note": "model FLOPs (benchmarks/model_flops.py)",
              **env_info}
    if name == "electra":
        record["generator_hidden"] = cfgs[1].hidden_size
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:
        median = stats.median
        record["median_ms"] = median * 1e3
        record["tokens_per_s"] = b.real_tokens / median
        record["tflops"] = tflops(flops, median)
        if env_info.get("matmul_tflops"):
            record["mfu"] = record["fraction_of_matmul_rate"] = record["tflops"] / env_info["matmul_tflops"]
        compare_with_baselines(record, group, impl, median, peak, BASELINES)[impl] = (median, peak)
    benchmark.extra_info.update(record)
