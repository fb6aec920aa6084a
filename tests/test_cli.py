"""The `bertfast` command: `info` reports every op's backends with reasons; `demo` trains a step of
each model and agrees with transformers. Run as subprocesses, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from bertfast.ops import ALL_OPS


def run_cli(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "bertfast.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_lists_every_op_and_backend_with_a_reason():
    report = json.loads(run_cli("info", "--json"))
    assert report["packages"]["torch"] != "not installed"
    assert set(report["ops"]) == set(ALL_OPS)
    for op, backends in report["ops"].items():
        assert set(backends) == {"cuda", "triton", "torch"}
        assert backends["torch"] == "available"
        for name in ("cuda", "triton"):
            assert backends[name] == "available" or len(backends[name]) > 10, (op, name)
    assert set(report["compiled"]) == {"bertfast._C", "bertfast._cuda"}


def test_info_text_shows_the_environment_preference():
    text = run_cli("info", env={"BERTFAST_BACKEND": "torch"})
    assert "backend preference: torch  (from BERTFAST_BACKEND=torch)" in text
    assert "attention" in text
    assert ("no CUDA device" in text) or ("cuda:0" in text)


def test_demo_runs_every_model_and_matches_transformers():
    pytest.importorskip("transformers")
    text = run_cli("demo", "--batch", "2", "--seq-len", "16")
    for title in ("BERT", "ALBERT", "RoBERTa", "ELECTRA"):
        assert title in text
    diffs = [float(x) for x in re.findall(r"max \|diff\| = ([0-9.e+-]+)", text)]
    assert len(diffs) == 4 and all(d < 1e-4 for d in diffs), text
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+) \(", text)]
    assert len(losses) == 4 and all(0 < x < 100 for x in losses), text
