"""Picking a launch config among a kernel family's few candidates, shared by every family.

On a GPU the candidates are timed once per key per process with ``triton.testing.do_bench`` (about
0.1 s; every launch only writes its outputs, so the timing reruns are safe) and the fastest is
kept. Under the interpreter, with one candidate, or with ``BERTFAST_AUTOTUNE=0`` the first
candidate runs.
"""

from __future__ import annotations

import functools
import os

import triton

AUTOTUNE_ENV = "BERTFAST_AUTOTUNE"
_tuned: dict[tuple, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick(key: tuple, candidates: list, launch):
    """The config for ``key`` (which must name the kernel): the first candidate, or the fastest."""
    if len(candidates) == 1 or interpreting() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return candidates[0]
    if key not in _tuned:
        times = []
        for config in candidates:
            try:
                times.append(triton.testing.do_bench(functools.partial(launch, config), warmup=5, rep=20))
            except triton.runtime.errors.OutOfResources:  # more shared memory than the card holds
                times.append(float("inf"))
        _tuned[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _tuned[key]
