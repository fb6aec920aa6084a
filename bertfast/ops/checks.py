"""Input validation shared by the ops: every error names the argument, before any kernel runs.

Shape, dtype and device checks are free (metadata only). Value checks (token ids in range)
read the tensor, which costs one small reduction and, on a GPU, one synchronisation; they are
skipped while ``torch.compile`` traces (the compiled graph must not branch on data) and can be
switched off with ``bertfast.ops.checks.VALUE_CHECKS = False`` in a tuned training loop.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

VALUE_CHECKS = True

# The last few (tensor, (version, high, allow)) that passed `index_range`: a model checks its labels
# before the encoder runs and the loss op would check them again (one more reduction and, on a GPU,
# one more sync). Holding the tensor keeps its identity unique; its version counter moves on any
# in-place write, so a modified tensor is checked again.
_ACCEPTED: deque = deque(maxlen=8)

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(op: str, name: str, t, *, ndim: int | None = None, kind: str | None = None) -> torch.Tensor:
    """``t`` must be a tensor, with ``ndim`` dims and of ``kind`` 'float', 'int', 'bool' or 'int_or_bool'."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dims, got shape {tuple(t.shape)}")
    allowed = {
        None: None,
        "float": _FLOATING,
        "int": _INTEGER,
        "bool": (torch.bool,),
        "int_or_bool": _INTEGER + (torch.bool,),
    }[kind]
    if allowed is not None and t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: `{name}` must have dtype in ({names}), got {t.dtype}")
    return t


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int | None], meaning: str) -> None:
    """``t.shape`` must equal ``expected`` (None = any); ``meaning`` names the dims, e.g. '(batch, seq_len)'."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{op}: `{name}` must have shape {meaning} = {want}, got {tuple(t.shape)}")


def same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; they must match")


def same_dtype_unless_autocast(op: str, name: str, t: torch.Tensor | None, ref_name: str,
                                ref: torch.Tensor) -> None:
    """Parameters share the activations' dtype, except inside ``torch.autocast``, whose purpose is
    to run float32 parameters on half activations."""
    if t is not None and t.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
        same_dtype(op, name, t, ref_name, ref)


def same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; they must match")


def nonempty(op: str, name: str, t: torch.Tensor, dims: Sequence[int], meaning: str) -> None:
    for d in dims:
        if t.shape[d] == 0:
            raise ValueError(f"{op}: `{name}` is empty along {meaning} (shape {tuple(t.shape)})")


def probability(op: str, name: str, p: float) -> None:
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{op}: `{name}` must be in [0, 1), got {p}")


def already_accepted(t: torch.Tensor, key: tuple) -> bool:
    """Whether ``t``, unmodified since, passed the value check ``key`` recently (see ``_ACCEPTED``)."""
    full_key = (t._version, *key)
    return any(seen is t and seen_key == full_key for seen, seen_key in _ACCEPTED)


def accept(t: torch.Tensor, key: tuple) -> None:
    _ACCEPTED.append((t, (t._version, *key)))


def value_checks_enabled() -> bool:
    return VALUE_CHECKS and not torch.compiler.is_compiling()


def index_range(op: str, name: str, ids: torch.Tensor, high: int, what: str, allow: int | None = None) -> None:
    """Every id must be in [0, high); ``allow`` is one extra permitted value (e.g. ignore_index)."""
    if not value_checks_enabled() or ids.numel() == 0 or ids.device.type == "meta":  # meta: no values to read
        return
    key = ("index_range", high, allow)
    if already_accepted(ids, key):
        return
    values = ids if allow is None else ids[ids != allow]
    if values.numel() > 0:
        lo, hi = torch.aminmax(values)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= high:
            bad = lo if lo < 0 else hi
            extra = "" if allow is None else f" (or {allow})"
            raise ValueError(f"{op}: `{name}` holds {bad}, outside [0, {high}){extra}: {what}")
    accept(ids, key)
