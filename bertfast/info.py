"""`bertfast info`: versions, devices, compiled parts, and which backend can run each op here."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

import torch

import bertfast
from bertfast.ops import ALL_OPS, compiled
from bertfast.ops.dispatch import BACKEND_NAMES, ENV_VAR, requested_backends

_PACKAGES = ("torch", "triton", "transformers", "numpy", "tokenizers", "safetensors", "tqdm")
_COMPILED = {
    "bertfast._C": "C++ CPU kernels of the data pipeline",
    "bertfast._cuda": "CUDA kernels",
}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[dict]:
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():  # probed here, at command time, never at import
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": props.name,
                            "capability": f"sm_{props.major}{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def _typical_facts(device: str) -> dict:
    """The facts of a representative call: bf16 on a GPU, float32 on the CPU, BERT-base sizes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return {"device": device, "dtype": dtype, "head_dim": 64, "dropout": True, "hidden": 768, "residual": True,
            "approximate": "none", "embedding_size": 128, "projection": True, "vocab": 30522, "reduction": "mean",
            "param_dtype": torch.float32, "rows": 4096, "bias_dtype": torch.float32, "type_vocab_size": 2,
            "mixed_dtypes": False, "head_size": 128, "in_features": 768, "out_features": 3072,
            "arch": "sm_90" if device == "cuda" else None}


def collect() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts = _typical_facts(device)
    ops = {}
    for name, op in ALL_OPS.items():
        ops[name] = {b: op.refusal(b, facts) or "available" for b in BACKEND_NAMES}
    return {
        "bertfast": bertfast.__version__,
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "devices": _devices(),
        "compiled": {m: compiled.status(m.split(".")[1]) for m in _COMPILED},
        "backend_request": {"env": os.environ.get(ENV_VAR), "effective": list(requested_backends())},
        "ops_checked_for": f"{device}, {str(facts['dtype']).replace('torch.', '')}",
        "ops": ops,
    }


def render(report: dict) -> str:
    lines = [f"bertfast {report['bertfast']}  (python {report['python']})", "", "packages:"]
    lines += [f"  {p:<13} {v}" for p, v in report["packages"].items()]
    lines += ["", "devices:"]
    for d in report["devices"]:
        extra = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("device", "name"))
        lines.append(f"  {d['device']:<7} {d['name']}" + (f"  ({extra})" if extra else ""))
    if len(report["devices"]) == 1:
        lines.append("  (no CUDA device: GPU backends cannot run here; the torch backend runs everything)")
    lines += ["", "compiled parts:"]
    lines += [f"  {m:<15} {s}   [{_COMPILED[m]}]" for m, s in report["compiled"].items()]
    req = report["backend_request"]
    lines += ["", f"backend preference: {', '.join(req['effective'])}"
              + (f"  (from {ENV_VAR}={req['env']})" if req["env"] else "  (default: fastest first)")]
    lines += ["", f"ops (a typical call on {report['ops_checked_for']}):"]
    for op, backends in report["ops"].items():
        lines.append(f"  {op}")
        lines += [f"    {b:<7} {why}" for b, why in backends.items()]
    return "\n".join(lines)
