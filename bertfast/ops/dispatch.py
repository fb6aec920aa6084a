"""Backend dispatch: every op picks one backend per call, by declared capability.

Order of precedence for which backends a call may use:
  1. the op's ``backend=`` argument,
  2. the innermost ``bertfast.use_backend(...)`` context,
  3. the ``BERTFAST_BACKEND`` environment variable (comma-separated preference list),
  4. otherwise every registered backend, fastest first (the torch reference last).
The first backend in that list that accepts the call runs it. If none accepts, the error lists
every backend of the op and why it refused (or that it was not requested).

A backend declares what it supports with a ``refuse(facts) -> str | None`` function that returns
the reason it cannot run a call (``None`` = it can). ``facts`` are cheap properties of the call
(device type, dtype, head dim, ...) computed by the op before any kernel runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

# Every backend the project knows, in the default preference order (fastest first).
BACKEND_NAMES = ("cuda", "triton", "torch")
ENV_VAR = "BERTFAST_BACKEND"

_context_stack: list[tuple[str, ...]] = []
_trace_stack: list[list[tuple[str, str]]] = []


class BackendUnavailableError(RuntimeError):
    """No requested backend can run this call; the message says why for each backend."""


@dataclass(frozen=True)
class Backend:
    name: str
    impl: Callable
    refuse: Callable[[Mapping[str, object]], str | None]


class Op:
    """One op with its backends; backends register in preference order (fastest first)."""

    def __init__(self, name: str):
        self.name = name
        self.backends: dict[str, Backend] = {}

    def register(self, name: str, refuse: Callable[[Mapping[str, object]], str | None] | None = None):
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend: unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}")

        def decorator(impl: Callable) -> Callable:
            self.backends[name] = Backend(name, impl, refuse or (lambda facts: None))
            return impl

        return decorator

    def refusal(self, name: str, facts: Mapping[str, object]) -> str | None:
        """Why backend ``name`` cannot run a call with these facts (None if it can)."""
        backend = self.backends.get(name)
        if backend is None:
            return f"no {name} implementation of {self.name} yet"
        return backend.refuse(facts)

    def select(self, backend: str | None, facts: Mapping[str, object]) -> Backend:
        requested = requested_backends(backend)
        reasons: dict[str, str] = {}
        for name in requested:
            reason = self.refusal(name, facts)
            if reason is None:
                chosen = self.backends[name]
                # Not while torch.compile traces: reading the trace stack there would guard the
                # graph on its length and recompile on every record_backends() call.
                if not torch.compiler.is_compiling():
                    for trace in _trace_stack:
                        trace.append((self.name, name))
                return chosen
            reasons[name] = reason
        lines = [f"{self.name}: no requested backend can run this call (requested: {', '.join(requested)})"]
        for name in BACKEND_NAMES:
            if name in reasons:
                lines.append(f"  {name}: {reasons[name]}")
            else:
                why = self.refusal(name, facts)
                lines.append(f"  {name}: not requested" + ("" if why is None else f" (and: {why})"))
        raise BackendUnavailableError("\n".join(lines))


def _parse(spec: str | tuple[str, ...] | list[str], source: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    names = tuple(n for n in names if n)
    if not names:
        raise ValueError(f"{source}: empty backend list; known backends: {', '.join(BACKEND_NAMES)}")
    for n in names:
        if n not in BACKEND_NAMES:
            raise ValueError(f"{source}: unknown backend {n!r}; known backends: {', '.join(BACKEND_NAMES)}")
    return names


def requested_backends(backend: str | None = None) -> tuple[str, ...]:
    """The backends a call may use, in preference order, after applying the precedence rules."""
    if backend is not None:
        return _parse(backend, "backend")
    if _context_stack:
        return _context_stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _parse(env, ENV_VAR)
    return BACKEND_NAMES


@contextlib.contextmanager
def use_backend(*names: str) -> Iterator[None]:
    """Run the ops inside this block with the named backend(s), first acceptable one wins.

    ``use_backend("torch")`` forces the reference; ``use_backend("triton", "torch")`` prefers
    triton and falls back to torch where triton refuses. Overrides ``BERTFAST_BACKEND``; an op's
    own ``backend=`` argument overrides this.
    """
    _context_stack.append(_parse(list(names), "use_backend"))
    try:
        yield
    finally:
        _context_stack.pop()


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, backend)`` for every op call in the block, so no backend choice is hidden."""
    trace: list[tuple[str, str]] = []
    _trace_stack.append(trace)
    try:
        yield trace
    finally:
        _trace_stack.remove(trace)

