"""The swap itself: a recognized module keeps its identity, parameters, buffers, hooks and place in
the tree; only its class changes, to a generated subclass (same name) whose ``forward`` runs on
bertfast ops. ``unpatch`` sets the original class back, so nothing needs copying either way, and
``state_dict``, optimizers, ``.to()``, ``train()``/``eval()``, DDP and transformers' own
``gradient_checkpointing_enable`` see the same objects as before.

A patched forward that meets a call it does not serve (``output_attentions=True``, a 4D mask, ...)
runs the original class's forward for that call, with a one-time warning naming the reason.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import nn

ORIGINAL = "_bertfast_original_class"
PLAN = "_bertfast_plan"

_classes: dict[tuple[type, Callable], type] = {}
_warned: set[tuple[str, str]] = set()


def patched_class(original: type, forward: Callable) -> type:
    """The subclass of ``original`` with ``forward`` (one per pair). It keeps the original's name,
    qualname and module, so transformers' ``save_pretrained`` records the original architecture
    and pickling refers to the original class."""
    key = (original, forward)
    if key not in _classes:
        _classes[key] = type(original.__name__, (original,), {
            "forward": forward, ORIGINAL: original, "__module__": original.__module__,
            "__qualname__": original.__qualname__, "__doc__": original.__doc__})
    return _classes[key]


def is_patched(module: nn.Module) -> bool:
    return ORIGINAL in type(module).__dict__


def swap(module: nn.Module, forward: Callable, plan: Any) -> None:
    if is_patched(module):
        raise RuntimeError(f"{type(module).__name__} is already patched")  # never a subclass of a patched class
    object.__setattr__(module, PLAN, plan)  # a plain attribute: not in state_dict, not a submodule
    module.__class__ = patched_class(type(module), forward)


def restore(module: nn.Module) -> bool:
    if not is_patched(module):
        return False
    module.__class__ = type(module).__dict__[ORIGINAL]
    module.__dict__.pop(PLAN, None)
    return True


def plan_of(module: nn.Module) -> Any:
    return module.__dict__.get(PLAN)


def original_forward(module: nn.Module, reason: str, *args, **kwargs):
    """Run the original class's forward for this call (warned once per class and reason)."""
    original = type(module).__dict__.get(ORIGINAL, type(module))
    key = (original.__qualname__, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bertfast.patch: {original.__name__} called with {reason}: running transformers'/torch's "
                      f"own forward for such calls", stacklevel=3)
    return original.forward(module, *args, **kwargs)


def defined_in_library(cls: type, method: str = "forward") -> bool:
    """Whether ``cls.method`` is transformers' or torch's own code (so its math is known), not a
    user override."""
    fn = getattr(cls, method, None)
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("transformers.", "torch.nn."))
