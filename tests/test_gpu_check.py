"""benchmarks/gpu_check.sh (the one-call GPU check) dry-run on a CPU, and gpu_check_report.py on a
synthetic output folder. The script's GPU parts skip here; what is checked is the harness: every
part recorded in order with a status, a part over its budget reported as timed out while the next
part still runs, parts skipped when the total budget runs out, results.md always written, and the
output packed into at most 8 loose files (what the device machine returns)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
REPORT = ROOT / "benchmarks" / "gpu_check_report.py"
PARTS = ("env", "build", "ceilings", "gpu-tests", "kernel-tests", "e2e", "bench", "pretrain")
GPU_PARTS = PARTS[2:]
STATUS = re.compile(r"ok( \(.+\))?|failed rc=-?\d+|timed out after \d+ s|skipped: .+")


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    """The script as the test runs it: a dry run with this interpreter, no compile, small budget."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    base.update(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", GPU_CHECK_SKIP_BUILD="1",
                GPU_CHECK_BUDGET_S="120")
    base.update(env)
    return subprocess.run(["bash", str(SCRIPT)], env=base, cwd=out.parent, capture_output=True, text=True,
                          timeout=150)


def read_parts(out: Path) -> list[tuple[str, str, float, int]]:
    """parts.tsv, checked well-formed: the header, then (part, status, seconds, limit_s) rows."""
    lines = (out / "parts.tsv").read_text().splitlines()
    assert lines[0] == "part\tstatus\tseconds\tlimit_s"
    rows = []
    for line in lines[1:]:
        name, status, seconds, limit = line.split("\t")
        assert STATUS.fullmatch(status), f"bad status {status!r} in {line!r}"
        rows.append((name, status, float(seconds), int(limit)))
    return rows


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_finds_nothing():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_records_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    result = run_script(out)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_parts(out)
    assert [r[0] for r in rows] == [*PARTS, "report"]
    status = {r[0]: r[1] for r in rows}
    assert status["env"] == "ok"
    assert status["build"] == "ok (no compile: GPU_CHECK_SKIP_BUILD=1)"
    assert status["report"] == "ok"
    for part in GPU_PARTS:
        assert status[part].startswith("skipped: no CUDA device"), (part, status[part])

    results = (out / "results.md").read_text()
    assert results.startswith("## GPU check (dry run, no CUDA device), ")
    for heading in ("### Parts", "### GPU tests", "### Benchmarks", "### End-to-end pretraining throughput",
                    "### Pretraining run"):
        assert heading in results
    for part in PARTS:
        assert re.search(rf"^\| {re.escape(part)} \| {re.escape(status[part])} \|", results, re.M), part
    assert "- software: python " in results
    assert result.stdout.rstrip().endswith(results.rstrip())  # printed last

    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False and env["python"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["commit"])

    # Packed for the device, which returns at most 8 files: the logs are in the archive only.
    loose = [p for p in out.rglob("*") if p.is_file()]
    assert len(loose) <= 8, loose
    assert not (out / "logs").exists()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"results.md", "parts.tsv", "env.json", *(f"logs/{p}.log" for p in PARTS)} <= names
        build_log = tar.extractfile("logs/build.log").read().decode()
    assert "imported: bertfast, bertfast._C" in build_log


def test_a_part_over_its_budget_times_out_and_the_next_part_still_runs(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, GPU_CHECK_FAKE_SLOW_PART="env", GPU_CHECK_BUDGET_ENV="2", GPU_CHECK_PACK="0")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r[0]: r for r in read_parts(out)}
    _, status, seconds, limit = rows["env"]
    assert (status, limit) == ("timed out after 2 s", 2)
    assert 2 <= seconds < 12  # TERM at 2 s ends the sleep; KILL would come 10 s later
    assert rows["build"][1].startswith("ok")
    assert "test hook" in (out / "logs" / "env.log").read_text()
    assert not (out / "env.json").exists()
    results = (out / "results.md").read_text()
    assert "| env | timed out after 2 s |" in results
    assert "### Logs of failed parts" in results and "env (timed out after 2 s)" in results
    assert "- card, versions: unknown (the env part left no env.json)" in results


def test_parts_are_skipped_when_the_total_budget_runs_out(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, GPU_CHECK_BUDGET_S="25", GPU_CHECK_PACK="0")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_parts(out)
    assert [r[0] for r in rows] == [*PARTS, "report"]
    for name, status, _, _ in rows[:2]:  # the GPU parts say "no CUDA device" first
        assert re.fullmatch(r"skipped: \d+ s of the total budget left \(needs >= \d+ s\)", status), name
    assert rows[-1][1] == "ok"
    assert (out / "results.md").read_text().startswith("## GPU check (dry run, no CUDA device)")


def test_a_bad_part_budget_is_reported_not_run(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, GPU_CHECK_BUDGET_ENV="soon", GPU_CHECK_BUDGET_BUILD="1", GPU_CHECK_PACK="0",
                        GPU_CHECK_FAKE_SLOW_PART="build")
    assert result.returncode == 0, result.stdout + result.stderr
    status = {r[0]: r[1] for r in read_parts(out)}
    assert status["env"] == "skipped: bad GPU_CHECK_BUDGET_ENV='soon'"
    assert status["build"] == "timed out after 1 s"


# ------------------------------------------------------------------------------------------------
# gpu_check_report.py on a synthetic $OUT

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.5">
<testcase classname="tests.test_layer_norm_cuda" name="test_fwd[bf16]" time="0.1"/>
<testcase classname="tests.test_layer_norm_cuda" name="test_bwd[bf16]" time="0.2">
  <failure message="AssertionError: max error 0.5 &gt; 0.01&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_rtd_loss_cuda" name="test_big" time="0.1">
  <error message="RuntimeError: CUDA out of memory">trace</error></testcase>
<testcase classname="tests.test_mask_tokens_cuda" name="test_skip" time="0.0">
  <skipped message="no sm_90">skip</skipped></testcase>
<testcase classname="tests.test_mask_tokens_cuda" name="test_ok" time="0.1"/>
</testsuite></testsuites>
"""


def synthetic_out(out: Path) -> None:
    (out / "logs").mkdir(parents=True)
    (out / "bench").mkdir()
    (out / "pretrain").mkdir()
    (out / "env.json").write_text(json.dumps({
        "date_utc": "2026-11-27 01:02", "python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
        "triton": "3.6.0", "transformers": "5.17.0", "nvcc": "13.0 (V13.0.88)", "cpu_count": 16,
        "cuda_available": True, "device_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132,
        "nvidia_smi": {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04",
                                 "memory.total": "81559 MiB"}]},
        "commit": "8fd068b1234567890abcdef1234567890abcdef0", "commit_source": "GPU_CHECK_COMMIT"}))
    (out / "ceilings.json").write_text(json.dumps({"matmul_n": 8192, "matmul_tflops": 798.1, "copy_gbs": 3012.4}))
    (out / "parts.tsv").write_text(
        "part\tstatus\tseconds\tlimit_s\n"
        "env\tok\t3.2\t20\nbuild\tok\t61.0\t90\nceilings\tok\t9.9\t30\ngpu-tests\tfailed rc=1\t40.1\t60\n"
        "kernel-tests\ttimed out after 90 s\t90.0\t90\nbench\tfailed rc=1\t100.5\t150\n"
        "e2e\tskipped: 12 s of the total budget left (needs >= 30 s)\t0\t90\nthis row is broken\n")
    (out / "junit-gpu.xml").write_text(JUNIT)
    (out / "logs" / "bench.log").write_text("\n".join(f"line {i}" for i in range(100)) + "\nValueError: boom\n")
    (out / "logs" / "kernel-tests.log").write_text("collected 300 items\n")
    (out / "bench" / "bench.md").write_text("# bertfast bench\n\n| op | ms |\n|---|---|\n| layer_norm | 0.12 |\n"
                                            "```\n# not a heading\n```\n")
    (out / "pretrain" / "summary.json").write_text(json.dumps({
        "model": "electra-small", "steps": 30, "tokens": 245760, "seconds": 20.5, "tokens_per_s": 11988.3,
        "first_losses": {"mlm_loss": 9.5, "rtd_loss": 0.7}, "final_losses": {"mlm_loss": 7.25, "rtd_loss": 0.5},
        "backends": {"attention": ["triton"], "layer_norm": ["cuda", "triton"]}, "device": "cuda:0",
        "precision": "bf16", "world_size": 1, "extra": {}}))


def test_report_on_a_synthetic_output_folder(tmp_path):
    out = tmp_path / "out"
    synthetic_out(out)
    env = {**os.environ, "GPU_CHECK_BUDGET_S": "480", "GPU_CHECK_SECONDS": "455", "GPU_CHECK_MODE": "CUDA device",
           "GPU_CHECK_CUDA": "1"}
    result = subprocess.run([sys.executable, str(REPORT), str(out)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = (out / "results.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "## GPU check: NVIDIA H100 80GB HBM3, 2026-11-27 01:02 UTC, commit 8fd068b12345"
    assert "- card: NVIDIA H100 80GB HBM3: driver 580.159.04, 81559 MiB, compute capability 9.0, 132 SMs" in lines
    assert ("- software: python 3.12.3, torch 2.11.0+cu130 (CUDA 13.0), triton 3.6.0, transformers 5.17.0, "
            "nvcc 13.0 (V13.0.88), 16 CPU cores") in lines
    assert ("- ceilings (measured): bf16 GEMM 8192^3 798.1 TFLOP/s; device-to-device copy 3,012 GB/s "
            "(bytes read + written)") in lines
    assert "- run: `bash benchmarks/gpu_check.sh`, budget 480 s, parts took 455 s; mode: CUDA device" in lines
    assert "| gpu-tests | failed rc=1 | 40.1 | 60 |" in lines
    assert "| ? | malformed row: 'this row is broken' |  |  |" in lines
    # junit: 5 tests = 2 passed + 1 failure + 1 error + 1 skipped; the failures by name
    assert "| GPU-marked tests (`pytest -m gpu tests`) | 2 | 1 | 1 | 1 | 5 | 12.5 |" in lines
    assert ("- failure: `tests.test_layer_norm_cuda::test_bwd[bf16]`: AssertionError: max error 0.5 > 0.01"
            in lines)
    assert "- error: `tests.test_rtd_loss_cuda::test_big`: RuntimeError: CUDA out of memory" in lines
    assert "test_skip" not in text
    assert ("| Triton kernel tests, compiled (`pytest tests/triton_kernels`) | no results (timed out after 90 s)"
            " | | | | | |") in lines
    # the bench table embedded under this section's headings; code fences left alone
    assert "#### bertfast bench" in lines and "| layer_norm | 0.12 |" in lines and "# not a heading" in lines
    assert ("No table: e2e skipped: 12 s of the total budget left (needs >= 30 s) (see logs/e2e.log)."
            in lines)
    assert "- model electra-small, 30 steps, 245,760 tokens in 20.5 s: **11,988 tokens/s**" in lines
    assert "- backends that ran: attention: triton; layer_norm: cuda, triton" in lines
    assert "- losses (first -> last 10% of logged steps): mlm_loss 9.500 -> 7.250, rtd_loss 0.700 -> 0.500" in lines
    # the failed parts' log tails: 20 lines of bench's, ending with the error; gpu-tests left no log
    assert "bench (failed rc=1), last 20 lines of logs/bench.log:" in lines
    assert "ValueError: boom" in lines and "line 81" in lines and "line 80" not in lines
    assert "kernel-tests (timed out after 90 s), last 1 lines of logs/kernel-tests.log:" in lines
    assert "gpu-tests (failed rc=1): logs/gpu-tests.log is missing or empty." in lines


def test_report_on_an_empty_output_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "results.md").read_text()
    assert "No part recorded (parts.tsv missing or empty)." in text
    assert "- ceilings: not measured (see the parts)" in text
