"""What the benchmarks count and how they time: FLOP formulas, a device-event clock, the record.

FLOP convention ("useful" FLOPs). Only the work on REAL tokens counts: a padded implementation
that computes a (T x T) score grid for a sequence of L < T tokens is charged 4 * L * L * H * D, not
4 * T * T * H * D, so its TFLOP/s falls with the padding it wastes and implementations that skip
padding (varlen) are credited for it. Every implementation of one case is charged the same FLOPs,
so TFLOP/s ratios are exactly inverse time ratios. Only matrix products count (2 FLOPs per
multiply-add); softmax, scaling, masking and dropout (O(Tq * Tk) elementwise, not O(Tq * Tk * D),
and not on the tensor cores) are not counted.

    forward  = 4 * sum_b(Tq_b * Tk_b) * H * D
               two GEMMs per (sequence, head): S = Q K^T (Tq x Tk x D) and O = P V (Tq x D x Tk),
               2 * Tq * Tk * D each
    backward = 2.5 * forward = 10 * sum_b(Tq_b * Tk_b) * H * D
               five GEMMs of 2 * Tq * Tk * D each, FlashAttention-2's backward: S = Q K^T again
               (recomputed from the saved logsumexp), dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
    fwd+bwd  = 3.5 * forward

The backward is charged the recompute too, for every implementation (also those that keep P from
the forward and do four GEMMs): it is the work of the algorithm the fused kernels run, and the
convention of FlashAttention's own benchmark (Dao-AILab/flash-attention
``benchmarks/benchmark_flash_attention.py``: ``2.5 * f`` for bwd, ``3.5 * f`` for fwd+bwd), so
our numbers line up with published ones.

Timing on a GPU. pytest-benchmark's default clock is host wall time, which for asynchronous CUDA
work measures how fast Python enqueues kernels. ``DeviceClock`` is a clock that advances by device
time: each reading records a CUDA event on the current stream, waits for it, and adds the
event-to-event time since the previous reading. pytest-benchmark times a round as
``clock() ; target() ; clock()``, so each round's duration is the CUDA-event time from just before
the first launch to the end of the last kernel (host launch gaps inside the call included, as in
``triton.testing.do_bench``), and the table's median is the median of those per-round event times.
On a CPU the default wall clock is the right one.

The ops' benchmarks (test_layer_norm.py, test_bias_gelu.py, test_embedding.py, test_mlm_loss.py,
test_rtd_loss.py, test_albert_loop.py) share the harness at the end of this file (the session
fixtures are in conftest.py): ``run_case`` (one timed case: first call untimed, CUDA events and an L2 flush on a GPU,
wall time on a CPU, peak memory, finiteness, extra_info) and the formulas below.

Bytes ("compulsory traffic"), for the memory-bound ops, in the convention of Triton's layer-norm
tutorial: every (rows, N) tensor the op must read or write, once, at its element size. (N,)
parameters, their gradients' per-program partial sums and per-row statistics are left out (under
1% at the benchmarked sizes). GB/s = bytes / median time, and the fraction of the card's measured
copy bandwidth (``copy_gbs``: bytes read + bytes written by a device-to-device copy) says how close
an op comes to the memory system's limit.

    layer_norm  fwd: read x (+ residual), write y                              2 (3) x rows*N
                bwd: read dy, x (+ residual) to recompute the input,
                     write dx (+ d_residual)                                   3 (5) x rows*N
    bias_gelu   fwd: read x, write y: 2 x rows*N;   bwd: read dy, x, write dx: 3 x rows*N
    embedding   see ``embedding_bytes``
    fwd+bwd = fwd + bwd

FLOPs of the GEMM-shaped heads (``gemm_flops``): 2 per multiply-add of their matrix products on the
tokens that count (masked tokens for the MLM loss and the generator, real tokens for RTD); the
backward does two products per forward product (d_input and d_weight): bwd = 2x fwd, fwd+bwd = 3x.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import pytest
import torch

import bertfast

# FLOPs of each mode, in units of the forward's (see the module docstring).
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_fwd_flops(seqlens_q: Sequence[int], seqlens_k: Sequence[int], heads: int, head_dim: int) -> int:
    """4 * sum_b(Tq_b * Tk_b) * H * D: S = Q K^T and O = P V over each sequence's real tokens."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"seqlens_q and seqlens_k must list the same batch, got {len(seqlens_q)} and {len(seqlens_k)}")
    return 4 * sum(int(tq) * int(tk) for tq, tk in zip(seqlens_q, seqlens_k)) * heads * head_dim


def attention_flops(mode: str, seqlens_q: Sequence[int], seqlens_k: Sequence[int], heads: int,
                    head_dim: int) -> float:
    """Useful FLOPs of one call in ``mode`` ("fwd", "bwd" = 2.5x fwd, "fwd+bwd" = 3.5x fwd)."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {', '.join(MODE_FACTOR)}, got {mode!r}")
    return MODE_FACTOR[mode] * attention_fwd_flops(seqlens_q, seqlens_k, heads, head_dim)


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


# ------------------------------------------------------------------------------------------------
# Timing


class DeviceClock:
    """A pytest-benchmark clock (seconds) that advances by CUDA-event time on the current stream.

    Each call records an event, synchronizes on it and adds the time since the previous call's
    event. Only differences of consecutive readings mean anything; each is one short event
    interval, so float32 event resolution (~0.5 us) holds however long the session runs."""

    __name__ = "cuda_event_clock"  # pytest-benchmark names its timer by __name__ in the saved JSON

    def __init__(self) -> None:
        self._last: torch.cuda.Event | None = None
        self._now = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._last is not None:
            self._now += self._last.elapsed_time(event) / 1e3  # ms -> s
        self._last = event
        return self._now


def use_device_clock(benchmark) -> DeviceClock:
    """Make this benchmark's rounds time with CUDA events (see the module docstring).

    pytest-benchmark takes a timer only process-wide (``--benchmark-timer``, an importable name);
    each fixture keeps it in ``_timer``, which its runner reads when a round starts. Fail loudly if
    a pytest-benchmark release renames it rather than silently timing host wall time."""
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("pytest-benchmark's fixture has no `_timer` any more: cannot time with CUDA events")
    clock = DeviceClock()
    benchmark._timer = clock
    return clock


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> list[float]:
    """CUDA-event time (ms) of each of ``reps`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    clock = DeviceClock()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return times


class L2Flush:
    """Overwrites a buffer larger than the card's L2 (as ``triton.testing.do_bench`` does), so a
    round does not find its inputs cached by the previous one; run between rounds, untimed."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 2**20) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """The card's measured matrix rate: median TFLOP/s of an (n x n) @ (n x n) product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(cuda_time_ms(lambda: a @ b, reps, warmup=3))
    return tflops(2 * n**3, ms / 1e3)


# ------------------------------------------------------------------------------------------------
# The record that goes with every table


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device) -> dict:
    """The card (or CPU) and the versions a reviewer needs to reproduce a table."""
    info = {"device_type": device.type, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "bertfast": _version("bertfast"),
            "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info.update(device_name=_cpu_name(), torch_threads=torch.get_num_threads())
    return info


# ------------------------------------------------------------------------------------------------
# Bytes and FLOPs of the ops' benchmarks (see the module docstring)

# FLOPs of each mode of a GEMM-shaped op, in units of its forward's: each forward product has two
# backward products (the input's and the weight's gradient).
GEMM_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


def _check_mode(mode: str) -> None:
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {', '.join(MODE_FACTOR)}, got {mode!r}")


def gbs(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def layer_norm_bytes(mode: str, rows: int, n: int, itemsize: int, residual: bool) -> int:
    """fwd: x (+ residual) in, y out; bwd: dy, x (+ residual) in, dx (+ d_residual) out."""
    _check_mode(mode)
    per_tensor = rows * n * itemsize
    fwd, bwd = (3, 5) if residual else (2, 3)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] * per_tensor


def bias_gelu_bytes(mode: str, rows: int, n: int, itemsize: int) -> int:
    """fwd: x in, y out; bwd: dy, x in, dx out (the bias and its gradient left out)."""
    _check_mode(mode)
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * rows * n * itemsize


def embedding_bytes(mode: str, *, ids_bytes: int, tokens: int, embedding_size: int, out_size: int,
                    itemsize: int, word_table_bytes: int, small_tables_bytes: int, projection_bytes: int) -> int:
    """Compulsory traffic of the embedding (gather, LayerNorm, dropout, optional projection).

    fwd: the id tensors; one word row per token (tokens x E); the position and type tables and the
         projection weight, each read once; the output (tokens x out_size, out_size = H with a
         projection, else E).
    bwd: the id tensors; dy (tokens x out_size); one (tokens x E) read of the embedding rows (to
         recompute the normalized input, or the saved copy of it); the gradients of the word table
         (dense, vocab x E), of the small tables and of the projection weight, each written once.
    """
    _check_mode(mode)
    fwd = (ids_bytes + tokens * embedding_size * itemsize + small_tables_bytes + projection_bytes
           + tokens * out_size * itemsize)
    bwd = (ids_bytes + tokens * out_size * itemsize + tokens * embedding_size * itemsize + word_table_bytes
           + small_tables_bytes + projection_bytes)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def gemm_flops(mode: str, tokens: int, *products: tuple[int, int]) -> float:
    """2 * tokens * sum(K * N) over the (K -> N) products of one forward, times the mode's factor."""
    _check_mode(mode)
    return GEMM_MODE_FACTOR[mode] * 2 * tokens * sum(k * n for k, n in products)


def copy_gbs(device: torch.device, nbytes: int = 2**30, reps: int = 20) -> float:
    """The card's measured copy bandwidth: median GB/s (bytes read + bytes written) of a
    device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_time_ms(lambda: dst.copy_(src), reps, warmup=3))
    return gbs(2 * nbytes, ms / 1e3)


# ------------------------------------------------------------------------------------------------
# The ops' benchmark harness (its fixtures: conftest.py); nothing here touches a GPU before a case runs.

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
# (fewest rounds, most rounds, seconds the timed rounds should take) and warmup rounds, per device
ROUNDS = {"cuda": (10, 100, 0.5), "cpu": (3, 3, 0.0)}
WARMUP_ROUNDS = {"cuda": 3, "cpu": 0}  # after the first call, which is untimed on both
TRITON_NEEDS_CUDA = "the triton backend compiles for a GPU (the Triton interpreter on CPU is for tests, never timed)"
# torch.compile on a CPU builds C++ with inductor: ~25 s per graph on a 2-core machine, more than a
# whole smoke run of a file. Set this variable to 1 to run the compiled cases on a CPU anyway.
COMPILE_ON_CPU_ENV = "BERTFAST_BENCH_COMPILE_ON_CPU"
NO_COMPILE_ENV = "BERTFAST_BENCH_NO_COMPILE"  # "1": skip every torch.compile case (compiling takes minutes)


def compile_skip_reason(device: torch.device) -> str | None:
    """Why a torch.compile case does not run here (None: it runs)."""
    if os.environ.get(NO_COMPILE_ENV) == "1":
        return f"{NO_COMPILE_ENV}=1: torch.compile cases are left out (the GPU check's time budget)"
    if device.type == "cuda" or os.environ.get(COMPILE_ON_CPU_ENV) == "1":
        return None
    return (f"needs CUDA: torch.compile on a CPU compiles C++ for ~25 s per case (set {COMPILE_ON_CPU_ENV}=1 "
            f"to run it anyway)")


def fresh_compile(fn: Callable) -> Callable:
    """torch.compile(fn) with dynamo's caches reset first: every case compiles the same Python code
    for new shapes, and past dynamo's recompile limit a compiled function silently runs eager."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _differentiated(out):
    """The output a backward starts from: the output itself, or the first of a tuple (the others,
    e.g. sampled token ids, get no gradient)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def mode_fns(mode: str, forward: Callable[[], object], leaves: Sequence[torch.Tensor], flush: Callable[[], None],
             grad_out: torch.Tensor | None = None):
    """(setup, target) for pytest-benchmark's pedantic mode: setup runs untimed before each round
    and returns the round's arguments; target is the timed call.

    fwd: ``forward()`` under ``torch.no_grad()`` (inference: nothing saved for a backward);
    bwd: ``torch.autograd.grad`` of a forward run in the round's untimed setup, w.r.t. ``leaves``;
    fwd+bwd: both. ``grad_out`` seeds the backward (None for a scalar loss)."""
    _check_mode(mode)

    def setup():
        args = (forward(),) if mode == "bwd" else ()  # bwd: the forward is not timed
        flush()
        return args, {}

    def backward(out):
        return torch.autograd.grad(_differentiated(out), leaves, grad_out, allow_unused=True)

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()

        return setup, fwd
    if mode == "bwd":
        return setup, backward

    def fwd_bwd():
        out = forward()
        return out, backward(out)

    return setup, fwd_bwd


def all_finite(result) -> bool:
    """Every float tensor in ``result`` (nested tuples/lists, None allowed) is finite."""
    if isinstance(result, (tuple, list)):
        return all(all_finite(r) for r in result)
    if isinstance(result, torch.Tensor):
        return not result.is_floating_point() or bool(torch.isfinite(result).all())
    return True


def peak_memory_mib(setup, target) -> float:
    """Peak allocation of one untimed call above what was allocated when it began (outputs, saved
    activations, workspace; for bwd the forward's saved tensors count as already allocated)."""
    args, _ = setup()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = target(*args)
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# group -> impl -> (median seconds, peak MiB or None) of the cases already run in this session, so
# a later implementation of the same case reports its speed and memory ratios to the earlier ones.
_MEASURED: dict[str, dict[str, tuple[float, float | None]]] = {}


def compare_with_baselines(record: dict, group: str, impl: str, median: float, peak: float | None,
                           baselines: Sequence[str]) -> dict:
    """Add ``speedup_vs_X`` (X's median / this median) and ``memory_ratio_vs_X`` (X's peak / this
    peak) to ``record`` for every baseline X that ran earlier in ``group``; returns the group's
    {impl: (median, peak)} so far (the caller records this impl in it)."""
    earlier = _MEASURED.setdefault(group, {})
    for name in baselines:
        if name == impl or name not in earlier:
            continue
        their_median, their_peak = earlier[name]
        record[f"speedup_vs_{name}"] = their_median / median
        if their_peak is not None and peak:
            record[f"memory_ratio_vs_{name}"] = their_peak / peak
    return earlier


def run_case(benchmark, device: torch.device, env_info: dict, *, group: str, impl: str, mode: str,
             forward: Callable[[], object], leaves: Sequence[torch.Tensor], grad_out: torch.Tensor | None = None,
             info: dict | None = None, nbytes: float | None = None, flops: float | None = None,
             tokens: int | None = None, baselines: Sequence[str] = (),
             goal: tuple[float, float | None] | None = None):
    """Time one implementation of one case and fill ``benchmark.extra_info``; returns the result.

    The first call is untimed (compilation, autotuning; a bertfast backend that refuses or a case
    that runs out of memory is skipped with the reason here); with ``--benchmark-disable`` it is
    the only call (a smoke run). On a GPU a second untimed call sizes the rounds, each round is
    timed with CUDA events after an L2 flush, and the peak memory of one more untimed call is
    recorded. ``baselines``: implementations this one is compared with when
    they ran earlier in the same group (``speedup_vs_X`` = X's median / this median,
    ``memory_ratio_vs_X`` = X's peak / this peak); ``goal`` = (speedup, memory ratio or None) the
    issue asks of bertfast against the first baseline: recorded with whether it was met, never
    asserted. ``tokens``: the tokens one call processes, for tokens/s.
    """
    kind = device.type
    flush = L2Flush(device) if kind == "cuda" else (lambda: None)
    setup, target = mode_fns(mode, forward, leaves, flush, grad_out)
    clock = use_device_clock(benchmark) if kind == "cuda" else time.perf_counter

    def one_call():
        args, _ = setup()
        start = clock()
        result = target(*args)
        return result, clock() - start

    benchmark.group = group
    refused = None
    try:
        with bertfast.record_backends() as trace:
            if benchmark.disabled:  # the smoke run: this one untimed call is all pedantic does
                result = benchmark.pedantic(target, setup=setup)
            else:
                _, estimate = one_call()  # compiles, autotunes; a refusing backend raises here
    except torch.OutOfMemoryError:
        refused = f"out of memory on {env_info['device_name']} ({env_info.get('device_memory_gib')} GiB)"
    except bertfast.ops.BackendUnavailableError as error:
        refused = f"bertfast refused the call: {error}"
    if refused is not None:
        del setup, target, forward
        if kind == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        pytest.skip(refused)

    if not benchmark.disabled:
        fewest, most, seconds = ROUNDS[kind]
        if kind == "cuda":  # the first call compiled and autotuned: time a second one
            _, estimate = one_call()
        rounds = min(most, max(fewest, round(seconds / max(estimate, 1e-9))))
        result = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS[kind])
    peak = peak_memory_mib(setup, target) if kind == "cuda" and not benchmark.disabled else None
    assert all_finite(result), f"{impl}: non-finite output (a sanity check, not a timing assertion)"

    on_gpu = kind == "cuda"
    record = {"impl": impl, "mode": mode, "dtype": str(DTYPE[kind]).removeprefix("torch."), **(info or {}),
              "bertfast_backends": sorted({f"{op}:{backend}" for op, backend in trace}),
              "timer": "CUDA events (flops.DeviceClock)" if on_gpu else "wall clock (time.perf_counter)",
              "peak_memory_mib": peak,
              "peak_memory_note": ("one call, above what was allocated before it" if peak is not None
                                   else "not measured on CPU" if not on_gpu else "not measured in a smoke run"),
              "bytes": nbytes, "flops": flops, **env_info}
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:
        median = stats.median
        record["median_ms"] = median * 1e3
        if nbytes:
            record["gbs"] = gbs(nbytes, median)
            if env_info.get("copy_gbs"):
                record["fraction_of_copy_bandwidth"] = record["gbs"] / env_info["copy_gbs"]
        if flops:
            record["tflops"] = tflops(flops, median)
            if env_info.get("matmul_tflops"):
                record["fraction_of_matmul_rate"] = record["tflops"] / env_info["matmul_tflops"]
        if tokens:
            record["tokens_per_s"] = tokens / median
        earlier = compare_with_baselines(record, group, impl, median, peak, baselines)
        if goal is not None and baselines and impl not in baselines and baselines[0] in earlier:
            speed, memory = goal
            first = baselines[0]
            record["goal"] = f">= {speed:g}x faster" + ("" if memory is None else
                                                         f" and >= {memory:g}x less peak memory") + f" than {first}"
            record["goal_speed_met"] = record[f"speedup_vs_{first}"] >= speed
            if memory is not None and f"memory_ratio_vs_{first}" in record:
                record["goal_memory_met"] = record[f"memory_ratio_vs_{first}"] >= memory
        earlier[impl] = (median, peak)
    benchmark.extra_info.update(record)
    return result
