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
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence

import torch

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
