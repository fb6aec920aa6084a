"""Attention, side by side: bertfast (triton padded, triton varlen, torch reference) vs
``torch.nn.functional.scaled_dot_product_attention`` with each backend forced, and transformers'
eager attention, on whatever device is here.

    python -m pytest benchmarks/test_attention.py --benchmark-only

``--benchmark-only`` runs only the tests that use the ``benchmark`` fixture (all of them here),
timed; ``--benchmark-disable`` runs each case's call once, untimed and without a table (a smoke
run: every case builds and its output is finite). Useful on a GPU:
``-k "seq128 or seq512"`` / ``-k "seq2048 or seq8192"`` (halves of the matrix),
``--benchmark-columns=median,iqr,min,rounds``, ``--benchmark-json=FILE``
(keeps ``extra_info``: TFLOP/s, peak memory, card and versions).

Cases: mode (fwd | bwd | fwd+bwd) x sequence length (128, 512, 2048, 8192) at a fixed token budget
(B * T = 16384 on a GPU in bfloat16, 512 on a CPU in float32), 12 heads of dim 64, ragged padding
(lengths uniform in [T/4, T], seed 0, padded to T as padding to a fixed max_length does) or none,
attention dropout 0 or 0.1. Each case is one pytest-benchmark group, so the table lists the
implementations of a case side by side:

  bertfast-triton-padded            (B, T, H, D) with key_padding_mask (B, T)
  bertfast-triton-varlen            packed (tokens, H, D) with cu_seqlens; packed outside timing
  bertfast-torch                    the torch reference backend, padded layout
  sdpa-{flash,efficient,cudnn,math} SDPA with ``sdpa_kernel(SDPBackend.X)``, inputs as transformers
                                    passes them (transposed views of (B, T, H, D)), bool attn_mask
                                    (B, 1, 1, T)
  hf-eager                          transformers' BERT ``eager_attention_forward`` with the additive
                                    (B, 1, T, T) mask transformers 5 builds for eager attention

Timing: every round is one call (fwd: the forward without autograd; bwd: ``torch.autograd.grad``
of a forward run untimed in that round's setup; fwd+bwd: both). On a GPU each round is timed with
CUDA events (``flops.DeviceClock``) and the L2 cache is overwritten between rounds; the table's
median is the median of those event times over 10-100 rounds (as many as fit ~0.5 s) after the
first call (compilation, Triton's autotune) and 3 warmup rounds. On a CPU: wall time, 3 rounds
after the first call, one intra-op thread; only the CPU-capable implementations at seq 128 and 512
run (the rest skip, saying why).

``extra_info`` of each case: useful FLOPs and TFLOP/s at the median (formulas in ``flops.py``:
only real tokens' work counts), peak memory of one untimed call above what was allocated before it
(``torch.cuda.max_memory_allocated``; not measured on a CPU), the card's measured matmul rate and
the fraction of it reached, and the card and versions. Outputs are checked to be finite, nothing
more: correctness is the tests' business, never a benchmark's.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from flops import (
    DTYPE,
    MODES,
    TRITON_NEEDS_CUDA,
    L2Flush,
    all_finite,
    attention_flops,
    peak_memory_mib,
    tflops,
    use_device_clock,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import bertfast

SEQ_LENS = (128, 512, 2048, 8192)
CPU_SEQ_LENS = (128, 512)
PADDINGS = ("ragged", "nopad")
DROPOUTS = (0.0, 0.1)
IMPLS = ("bertfast-triton-padded", "bertfast-triton-varlen", "bertfast-torch",
         "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "hf-eager")
HEADS, HEAD_DIM = 12, 64
TOKENS = {"cuda": 16384, "cpu": 512}  # B * T of every case
# (fewest rounds, most rounds, seconds the timed rounds should take) and warmup rounds, per device
ROUNDS = {"cuda": (10, 100, 0.5), "cpu": (3, 3, 0.0)}
WARMUP_ROUNDS = {"cuda": 3, "cpu": 0}  # after the first call, which is untimed on both
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
CUDA_ONLY = {  # impl -> why it cannot run on a CPU
    "bertfast-triton-padded": TRITON_NEEDS_CUDA,
    "bertfast-triton-varlen": TRITON_NEEDS_CUDA,
    "sdpa-efficient": "SDPA's EFFICIENT_ATTENTION backend has CUDA kernels only",
    "sdpa-cudnn": "SDPA's CUDNN_ATTENTION backend has CUDA kernels only",
}


# ------------------------------------------------------------------------------------------------
# Session facts: decided when the first benchmark runs, never at import


# ------------------------------------------------------------------------------------------------
# One case's batch and its implementations


@dataclass
class Batch:
    lengths: list[int]  # real tokens of each sequence
    seq_len: int  # T: the padded length (max_length), >= max(lengths)
    mask: torch.Tensor | None  # (B, T) bool, True = real token; None without padding
    cu_seqlens: torch.Tensor  # (B + 1,) int32 offsets of the packed sequences
    max_seqlen: int

    @property
    def size(self) -> int:
        return len(self.lengths)


def make_batch(device: torch.device, seq_len: int, padding: str) -> Batch:
    B = max(1, TOKENS[device.type] // seq_len)
    if padding == "ragged":
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(seq_len // 4, seq_len + 1, (B,), generator=g)  # padded to T = max_length
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).to(device)  # (B, T)
    else:
        lengths, mask = torch.full((B,), seq_len), None
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return Batch(lengths.tolist(), seq_len, mask, cu_seqlens.to(device), int(lengths.max()))


def make_inputs(batch: Batch, device, dtype, varlen: bool, requires_grad: bool):
    """q, k, v leaves: (B, T, H, D), or packed (tokens, H, D) with the padding dropped (untimed)."""
    g = torch.Generator(device=device).manual_seed(1)
    shape = (batch.size, batch.seq_len, HEADS, HEAD_DIM)
    qkv = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]  # (B, T, H, D)
    if varlen and batch.mask is not None:
        qkv = [t[batch.mask] for t in qkv]  # (tokens, H, D)
    elif varlen:
        qkv = [t.flatten(0, 1) for t in qkv]  # (B * T, H, D)
    return [t.requires_grad_(requires_grad) for t in qkv]


def forward_fn(impl: str, batch: Batch, dropout_p: float, dtype):
    """The timed forward for ``impl``: (q, k, v) -> output (same layout as q)."""
    if impl.startswith("bertfast-triton-varlen"):
        return lambda q, k, v: bertfast.ops.attention(q, k, v, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                                                      dropout_p=dropout_p, backend="triton")
    if impl.startswith("bertfast-"):
        backend = impl.split("-")[1]
        return lambda q, k, v: bertfast.ops.attention(q, k, v, key_padding_mask=batch.mask, dropout_p=dropout_p,
                                                      backend=backend)
    if impl.startswith("sdpa-"):
        attn_mask = None if batch.mask is None else batch.mask[:, None, None, :]  # (B, 1, 1, T) bool, True = attend

        def sdpa(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attn_mask, dropout_p=dropout_p)  # (B, H, T, D)
            return out.transpose(1, 2).contiguous()  # (B, T, H, D), as transformers' sdpa_attention_forward

        return sdpa
    if impl == "hf-eager":
        from transformers.models.bert import modeling_bert

        eager = getattr(modeling_bert, "eager_attention_forward", None)
        if eager is None:
            pytest.skip("this transformers has no models.bert.modeling_bert.eager_attention_forward")
        module = torch.nn.Module().train()  # eager reads module.training for its dropout
        additive = None
        if batch.mask is not None:  # transformers 5's eager_mask: (B, 1, Tq, Tk), 0 or finfo.min, materialized
            B, T = batch.mask.shape
            keep = batch.mask[:, None, None, :].expand(B, 1, T, T)
            additive = torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)

        def hf(q, k, v):
            out, _ = eager(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive,
                           scaling=HEAD_DIM**-0.5, dropout=dropout_p)
            return out  # (B, T, H, D)

        return hf
    raise ValueError(f"impl: unknown implementation {impl!r}")


def round_fns(mode: str, forward, q, k, v, flush):
    """(setup, target) for pytest-benchmark's pedantic mode: setup runs untimed before each round
    and returns the round's arguments; target is the timed call."""
    grad_out = torch.randn_like(q) if mode != "fwd" else None

    def setup():
        args = (forward(q, k, v),) if mode == "bwd" else ()  # bwd: the forward is not timed
        flush()
        return args, {}

    if mode == "fwd":
        return setup, lambda: forward(q, k, v)
    if mode == "bwd":
        return setup, lambda out: torch.autograd.grad(out, (q, k, v), grad_out)

    def fwd_bwd():
        out = forward(q, k, v)
        return (out,) + torch.autograd.grad(out, (q, k, v), grad_out)

    return setup, fwd_bwd


def sdpa_refusal(impl: str, error: RuntimeError, caught: list) -> str | None:
    """Why SDPA refused a forced backend ("No available kernel" and torch's warnings), else None."""
    text = str(error)
    if not impl.startswith("sdpa-") or not ("No available kernel" in text or "No viable backend" in text):
        return None
    reasons = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught]
    reasons = [r for r in reasons if r and not r.endswith("not used because:")]
    return f"SDPA {SDPA_BACKENDS[impl].name} refused this case: " + ("; ".join(reasons) or text.splitlines()[0])


# ------------------------------------------------------------------------------------------------
# The benchmark


CASES = [pytest.param(mode, seq_len, padding, p, impl, id=f"{mode}-seq{seq_len}-{padding}-p{p:g}-{impl}")
         for mode, seq_len, padding, p, impl in itertools.product(MODES, SEQ_LENS, PADDINGS, DROPOUTS, IMPLS)]


@pytest.mark.parametrize("mode, seq_len, padding, dropout_p, impl", CASES)
def test_attention(benchmark, device, env_info, mode, seq_len, padding, dropout_p, impl):
    kind = device.type
    if kind != "cuda" and impl in CUDA_ONLY:
        pytest.skip(f"needs CUDA: {CUDA_ONLY[impl]}")
    if kind != "cuda" and seq_len not in CPU_SEQ_LENS:
        pytest.skip(f"needs CUDA: the CPU run covers seq {' and '.join(map(str, CPU_SEQ_LENS))} only")
    if kind == "cuda" and impl == "sdpa-flash" and padding == "ragged":
        pytest.skip("SDPA FLASH_ATTENTION takes no attn_mask on CUDA: a padded ragged batch cannot run on it")

    dtype = DTYPE[kind]
    batch = make_batch(device, seq_len, padding)
    varlen = impl.startswith("bertfast-triton-varlen")
    q, k, v = make_inputs(batch, device, dtype, varlen, requires_grad=mode != "fwd")
    forward = forward_fn(impl, batch, dropout_p, dtype)
    flush = L2Flush(device) if kind == "cuda" else (lambda: None)
    setup, target = round_fns(mode, forward, q, k, v, flush)
    clock = use_device_clock(benchmark) if kind == "cuda" else time.perf_counter

    def one_call():
        args, _ = setup()
        start = clock()
        result = target(*args)
        return result, clock() - start

    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"attention {mode} T={seq_len} B={batch.size} {padding} dropout={dropout_p:g} {dtype_name}"
    refused = None
    with sdpa_kernel(SDPA_BACKENDS[impl]) if impl in SDPA_BACKENDS else contextlib.nullcontext():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, estimate = one_call()  # compiles, autotunes; SDPA refuses a forced backend here
        except torch.OutOfMemoryError:
            refused = f"out of memory on {env_info['device_name']} ({env_info.get('device_memory_gib')} GiB)"
        except RuntimeError as error:
            refused = sdpa_refusal(impl, error, caught)
            if refused is None:
                raise
        if refused is None:
            fewest, most, seconds = ROUNDS[kind]
            rounds = 1
            if not benchmark.disabled:
                if kind == "cuda":  # the first call compiled and autotuned: time a second one
                    _, estimate = one_call()
                rounds = min(most, max(fewest, round(seconds / max(estimate, 1e-9))))
            result = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS[kind])
            peak = peak_memory_mib(setup, target) if kind == "cuda" else None
    if refused is not None:
        del q, k, v, forward, setup, target
        pytest.skip(refused)

    assert all_finite(result), f"{impl}: non-finite output (a sanity check, not a timing assertion)"
    flops = attention_flops(mode, batch.lengths, batch.lengths, HEADS, HEAD_DIM)  # real tokens only
    on_gpu = kind == "cuda"
    info = {"impl": impl, "mode": mode, "seq_len": seq_len, "batch": batch.size, "heads": HEADS, "head_dim": HEAD_DIM,
            "dtype": dtype_name, "padding": padding, "dropout_p": dropout_p, "real_tokens": sum(batch.lengths),
            "padded_tokens": batch.size * seq_len, "useful_flops": flops,
            "timer": "CUDA events (flops.DeviceClock)" if on_gpu else "wall clock (time.perf_counter)",
            "peak_memory_mib": peak,
            "peak_memory_note": "one call, above what was allocated before it" if on_gpu else "not measured on CPU",
            **env_info}
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:
        info["median_ms"] = stats.median * 1e3
        info["tflops"] = tflops(flops, stats.median)
        if env_info["matmul_tflops"]:
            info["fraction_of_matmul_rate"] = info["tflops"] / env_info["matmul_tflops"]
    benchmark.extra_info.update(info)
