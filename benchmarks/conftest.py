"""Fixtures every benchmark file uses (pytest finds them here; no import needed), and the presets.

Presets (environment variable ``BERTFAST_BENCH_PRESET``; ``bertfast bench --preset`` sets it):

  default (or unset)  every case of every file
  small               a CI-friendly subset: per benchmark function, one case (one mode, the smallest
                      or most typical sizes) with every implementation side by side; the rest are
                      deselected. Which values are kept: ``SMALL_PRESET`` below, per file, and a
                      ``SMALL_PRESET`` dict in the benchmark module itself (its entries win): a
                      parameter given one value keeps that value, one given a tuple keeps each of
                      those values, and a parameter named in neither keeps the value of the first
                      case collected (the implementation, ``impl``, keeps every value).

Every collected case also carries its parameters as the junit property ``bench_params`` (JSON), so
``bertfast bench`` can say which implementation a skipped case was and why it did not run.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from flops import DTYPE, copy_gbs, environment, matmul_tflops

PRESET_ENV = "BERTFAST_BENCH_PRESET"
PRESETS = ("small", "default")
# The parameter that names the implementation: the small preset keeps every value of it.
IMPL_PARAMS = ("impl",)
# file name -> {parameter: kept value or tuple of kept values}; "*" applies to every file.
# fwd+bwd runs both directions' kernels in one case; the sizes are the CPU-capable ones.
SMALL_PRESET: dict[str, dict[str, object]] = {
    "*": {"mode": "fwd+bwd"},
    "test_attention.py": {"seq_len": 128, "padding": "ragged", "dropout_p": 0.1},
    "test_layer_norm.py": {"hidden": 768, "variant": "residual+dropout"},
    "test_bias_gelu.py": {"hidden": 3072, "approximate": "none", "in_features": 768, "out_features": 3072},
    "test_embedding.py": {"model": "albert"},
    "test_mlm_loss.py": {"head_name": "bert"},
    "test_rtd_loss.py": {"hidden_size": 256},
    "test_pretraining.py": {"name": ("albert", "roberta", "electra")},  # its own preset picks the shapes
}
_HERE = Path(__file__).resolve().parent


def preset() -> str:
    """The preset this session runs (``BERTFAST_BENCH_PRESET``, default "default")."""
    value = os.environ.get(PRESET_ENV, "").strip() or "default"
    if value not in PRESETS:
        raise pytest.UsageError(f"{PRESET_ENV} must be one of {', '.join(PRESETS)}, got {value!r}")
    return value


def _kept(spec) -> tuple:
    return tuple(spec) if isinstance(spec, (tuple, list, set, frozenset)) else (spec,)


def small_selection(items: list) -> list:
    """The items the small preset keeps (see the module docstring), in collection order."""
    by_function: dict[tuple, list] = {}
    for item in items:
        by_function.setdefault((str(item.path), getattr(item, "originalname", item.name)), []).append(item)
    keep = []
    for (path, _), group in by_function.items():
        if not all(hasattr(item, "callspec") for item in group):
            keep.extend(group)  # not parametrized: one case already
            continue
        rules = dict(SMALL_PRESET["*"])
        rules.update(SMALL_PRESET.get(Path(path).name, {}))
        rules.update(getattr(group[0].module, "SMALL_PRESET", None) or {})

        def matches(item, rules=rules):
            params = item.callspec.params
            return all(params[name] in _kept(spec) for name, spec in rules.items() if name in params)

        candidates = [item for item in group if matches(item)] or group  # rules that match nothing: ignored
        free = set(IMPL_PARAMS) | {name for name, spec in rules.items() if len(_kept(spec)) > 1}
        first = {k: v for k, v in candidates[0].callspec.params.items() if k not in free}
        keep.extend(item for item in candidates
                    if all(item.callspec.params.get(k) == v for k, v in first.items()))
    return keep


def pytest_configure(config):
    preset()  # a bad value stops the session before anything is collected


def pytest_report_header(config):
    return f"bertfast bench preset: {preset()} ({PRESET_ENV})"


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if _HERE in Path(item.path).resolve().parents]
    for item in ours:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        item.user_properties.append(("bench_params", json.dumps(params, default=str)))
    if preset() != "small":
        return
    kept = {id(item) for item in small_selection(ours)}
    dropped = [item for item in ours if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in gone]


@pytest.fixture(scope="session", name="device")
def device_fixture() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", name="env_info")
def env_info_fixture(device, one_cpu_thread) -> dict:
    """The card and versions, the card's measured bfloat16 matmul rate and copy bandwidth (GPU only)."""
    info = environment(device)
    info["matmul_tflops"] = info["copy_gbs"] = None
    if device.type == "cuda":
        info["matmul_tflops"] = round(matmul_tflops(device, DTYPE["cuda"]), 1)
        info["copy_gbs"] = round(copy_gbs(device), 1)
    return info


@pytest.fixture(scope="session", autouse=True, name="one_cpu_thread")
def one_cpu_thread_fixture(device):
    """On a CPU, one intra-op thread (as the tests use): on a small, shared machine two threads
    spin-wait on each other and the times say more about the neighbours than about the code."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, name="release_memory")
def release_memory_fixture(device):
    yield
    if device.type == "cuda":  # a large case's blocks must not crowd the next case out
        gc.collect()
        torch.cuda.empty_cache()
