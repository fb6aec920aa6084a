"""The compiled modules (``bertfast._C``, ``bertfast._cuda``): loaded on first use, never at import
of bertfast, and with the reason when one is missing.

setup.py writes ``_build.json`` next to the modules: "built", or why not (no nvcc, BERTFAST_CUDA=0).
A module that was built but fails to import reports its import error.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from types import ModuleType

_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the bertfast package


def _build_record() -> dict:
    try:
        with open(os.path.join(_FOLDER, "_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@functools.cache
def load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when ``bertfast.<name>`` imports, else (None, why not)."""
    try:
        return importlib.import_module(f"bertfast.{name}"), None
    except ImportError as e:
        recorded = _build_record().get(name)
        if recorded and recorded != "built":
            return None, f"bertfast.{name} {recorded}"
        if recorded == "built":
            return None, f"bertfast.{name} was built but does not import: {e}"
        return None, (f"bertfast.{name} is not built (no compiled parts in this install: "
                      f"reinstall with `pip install .` and a C++ compiler)")


def status(name: str) -> str:
    """One line for `bertfast info`."""
    module, reason = load(name)
    if module is None:
        return reason.removeprefix(f"bertfast.{name} ")  # the line already names the module
    if name == "_cuda":
        v = module.runtime_version()
        return f"built (CUDA runtime {v // 1000}.{v % 1000 // 10}, machine code for {module.compiled_archs()})"
    return "built"
