"""benchmarks/gpu_check.sh's helper: collects facts into $OUT and assembles $OUT/results.md.

    python gpu_check_report.py OUT                    # OUT/results.md from what the parts left in OUT
    python gpu_check_report.py --collect env OUT      # OUT/env.json: card, driver, versions, commit
    python gpu_check_report.py --collect ceilings OUT # OUT/ceilings.json: measured bf16 GEMM rate, copy GB/s

The report reads, each only if present (a part that failed leaves some out, and the report is
written anyway): env.json, ceilings.json, parts.tsv, junit-gpu.xml, junit-kernels.xml,
bench/bench.md, e2e/bench.md, pretrain/summary.json and logs/<part>.log (the last lines of each
failed part). results.md is one section of benchmarks/RESULTS.md, pasted there as is.

Standard library only, plus torch (and benchmarks/flops.py) for --collect.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (junit file, what ran) of the two test parts
TEST_SUITES = (("junit-gpu.xml", "GPU-marked tests (`pytest -m gpu tests`)"),
               ("junit-kernels.xml", "Triton kernel tests, compiled (`pytest tests/triton_kernels`)"))
FAILED_NAMES_SHOWN = 25
LOG_TAIL_LINES = 20
LOG_LINE_CHARS = 240
NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "clocks.max.sm", "power.limit",
                     "pstate", "temperature.gpu")


# ------------------------------------------------------------------------------------------------
# --collect


def _command(args: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a command; (-1, why) when it cannot run."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return -1, f"{type(e).__name__}: {e}"
    return done.returncode, (done.stdout + done.stderr).strip()


def _nvidia_smi() -> dict:
    """The card as nvidia-smi reports it (a query only: no setting is changed)."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS[:3]):  # older drivers lack some fields
        rc, text = _command(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
        if rc == 0 and text:
            cards = [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in text.splitlines()]
            return {"gpus": cards}
    return {"error": f"nvidia-smi query failed: {text[-300:]}"}


def _find_nvcc() -> str | None:
    """The nvcc setup.py built with (recorded in bertfast/_build.json), else the one on PATH."""
    try:
        recorded = json.loads((ROOT / "bertfast" / "_build.json").read_text()).get("nvcc")
    except (OSError, ValueError):
        recorded = None
    return recorded or shutil.which("nvcc")


def _nvcc_version() -> str | None:
    nvcc = _find_nvcc()
    if nvcc is None:
        return None
    _, text = _command([nvcc, "--version"])
    found = re.search(r"release ([\d.]+), (V[\d.]+)", text)
    return f"{found.group(1)} ({found.group(2)})" if found else (text.splitlines() or ["?"])[-1]


def _commit() -> dict:
    """GPU_CHECK_COMMIT when given (the device's copy of the tree has no .git), else git's HEAD."""
    given = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    if given:
        return {"commit": given, "commit_source": "GPU_CHECK_COMMIT"}
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return {"commit": "unknown", "commit_source": "no .git in the tree"}
    rc, head = _command(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if rc != 0:
        return {"commit": "unknown", "commit_source": f"git rev-parse failed: {head[-200:]}"}
    rc, changed = _command(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": head, "commit_source": "git", "dirty": bool(changed) if rc == 0 else None}


def _distribution_version(name: str) -> str | None:
    """The installed version from the package metadata (no import: importing transformers and
    triton would cost seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_env(out: Path) -> dict:
    """out/env.json: date, host, versions, the card (nvidia-smi and torch), nvcc, the commit."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "python_executable": sys.executable, "nvcc": _nvcc_version(), "nvidia_smi": _nvidia_smi(),
    }
    for name in ("triton", "transformers", "numpy", "pytest", "pytest-benchmark"):
        info[name] = _distribution_version(name)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                        sm_count=props.multi_processor_count,
                        device_memory_gib=round(props.total_memory / 2**30, 1),
                        l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None)
    except Exception as e:  # a broken torch is a fact to report, not a reason to stop
        info["torch_error"] = f"{type(e).__name__}: {e}"[:300]
    info.update(_commit())
    _write_json(out / "env.json", info)
    return info


def collect_ceilings(out: Path) -> dict:
    """out/ceilings.json: the card's measured bf16 matrix rate (8192^3 product) and copy bandwidth
    (a 1 GiB device-to-device copy, bytes read + written), with flops.py's timing (CUDA events,
    median)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--collect ceilings needs a CUDA device")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import copy_gbs, matmul_tflops

    device = torch.device("cuda")
    info = {"device_name": torch.cuda.get_device_name(device), "matmul_n": 8192, "matmul_dtype": "bfloat16",
            "matmul_tflops": round(matmul_tflops(device, torch.bfloat16, 8192), 1),
            "copy_bytes": 2**30, "copy_gbs": round(copy_gbs(device), 1)}
    _write_json(out / "ceilings.json", info)
    return info


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------------------
# Reading what the parts left


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_parts(path: Path) -> list[dict]:
    """parts.tsv rows (part, status, seconds, limit_s), header skipped; malformed rows kept as-is
    in `status` so the report shows them rather than hiding them."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) == 4:
            rows.append(dict(zip(("part", "status", "seconds", "limit_s"), cells)))
        elif line.strip():
            rows.append({"part": "?", "status": f"malformed row: {line!r}", "seconds": "", "limit_s": ""})
    return rows


def read_junit(path: Path) -> dict | None:
    """Counts of a pytest junit XML (passed = tests - failures - errors - skipped) and the names of
    the failed and errored tests (classname::name, first line of the message)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"{path.name}: {type(e).__name__}: {e}"} if path.exists() else None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    seconds = 0.0
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0) or 0)
        seconds += float(suite.get("time", 0) or 0)
    failed = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or "").strip().splitlines()
                name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
                failed.append((kind, name, message[0][:160] if message else ""))
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "passed": passed, "seconds": seconds, "failed": failed}


def demote_headings(markdown: str, levels: int = 3) -> str:
    """Markdown with every heading `levels` deeper (outside code fences), so an embedded report's
    `#` / `##` sit under this section's `###`."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:LOG_LINE_CHARS] for line in text[-lines:]]


# ------------------------------------------------------------------------------------------------
# The report


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:,.{digits}f}{unit}"
    return "?"


def header(env: dict | None, ceilings: dict | None) -> list[str]:
    env = env or {}
    gpus = (env.get("nvidia_smi") or {}).get("gpus") or [{}]
    card = env.get("device_name") or gpus[0].get("name") or "unknown card"
    dry = os.environ.get("GPU_CHECK_CUDA") == "0" or env.get("cuda_available") is False
    date = env.get("date_utc") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    commit = str(env.get("commit") or "unknown")
    commit_short = commit[:12] + (" (with uncommitted changes)" if env.get("dirty") else "")
    title = f"## GPU check: {card}, {date} UTC, commit {commit_short}"
    if dry:
        title = f"## GPU check (dry run, no CUDA device), {date} UTC, commit {commit_short}"
    lines = [title, ""]
    if not env:
        lines.append("- card, versions: unknown (the env part left no env.json)")
    else:
        smi = gpus[0]
        card_facts = [f"driver {smi.get('driver_version', '?')}"]
        if smi.get("memory.total"):
            card_facts.append(smi["memory.total"])
        if env.get("capability"):
            card_facts.append(f"compute capability {env['capability']}, {env.get('sm_count', '?')} SMs")
        if smi.get("clocks.max.sm"):
            card_facts.append(f"max SM clock {smi['clocks.max.sm']}")
        if smi.get("power.limit"):
            card_facts.append(f"power limit {smi['power.limit']}")
        if "error" in (env.get("nvidia_smi") or {}):
            card_facts = [env["nvidia_smi"]["error"]]
        lines.append(f"- card: {card}: {', '.join(card_facts)}")
        lines.append(f"- software: python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
                     f"{env.get('torch_cuda') or 'none'}), triton {env.get('triton', '?')}, transformers "
                     f"{env.get('transformers', '?')}, nvcc {env.get('nvcc') or 'not found'}, "
                     f"{env.get('cpu_count', '?')} CPU cores")
        lines.append(f"- commit: {commit} ({env.get('commit_source', '?')})")
    if ceilings:
        lines.append(f"- ceilings (measured): bf16 GEMM {ceilings.get('matmul_n', '?')}^3 "
                     f"{_fmt(ceilings.get('matmul_tflops'))} TFLOP/s; device-to-device copy "
                     f"{_fmt(ceilings.get('copy_gbs'), digits=0)} GB/s (bytes read + written)")
    else:
        lines.append("- ceilings: not measured (see the parts)")
    budget, total = os.environ.get("GPU_CHECK_BUDGET_S"), os.environ.get("GPU_CHECK_SECONDS")
    run = "`bash benchmarks/gpu_check.sh`"
    if budget:
        run += f", budget {budget} s"
    if total:
        run += f", parts took {total} s"
    lines += [f"- run: {run}; mode: {os.environ.get('GPU_CHECK_MODE', 'unknown')}", ""]
    return lines


def parts_table(parts: list[dict]) -> list[str]:
    lines = ["### Parts", ""]
    if not parts:
        return lines + ["No part recorded (parts.tsv missing or empty).", ""]
    lines += ["| part | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for p in parts]
    return lines + [""]


def tests_section(out: Path, parts: dict[str, str]) -> list[str]:
    lines = ["### GPU tests", ""]
    rows, failed = [], []
    for (filename, what), part in zip(TEST_SUITES, ("gpu-tests", "kernel-tests")):
        counts = read_junit(out / filename)
        if counts is None:
            rows.append(f"| {what} | no results ({parts.get(part, 'not run')}) | | | | | |")
        elif "error" in counts:
            rows.append(f"| {what} | unreadable: {counts['error']} | | | | | |")
        else:
            rows.append(f"| {what} | {counts['passed']} | {counts['failures']} | {counts['errors']} | "
                        f"{counts['skipped']} | {counts['tests']} | {counts['seconds']:.1f} |")
            failed += [(what, *f) for f in counts["failed"]]
    lines += ["| suite | passed | failed | errors | skipped | total | seconds |", "|---|---|---|---|---|---|---|", *rows,
              ""]
    if failed:
        lines.append(f"Failed ({len(failed)}):")
        lines += [f"- {kind}: `{name}`{': ' + message if message else ''}"
                  for _, kind, name, message in failed[:FAILED_NAMES_SHOWN]]
        if len(failed) > FAILED_NAMES_SHOWN:
            lines.append(f"- ... and {len(failed) - FAILED_NAMES_SHOWN} more (junit XML in the archive)")
        lines.append("")
    return lines


def table_section(title: str, path: Path, part: str, parts: dict[str, str]) -> list[str]:
    lines = [f"### {title}", ""]
    try:
        text = path.read_text().strip()
    except OSError:
        return lines + [f"No table: {part} {parts.get(part, 'not run')} (see logs/{part}.log).", ""]
    return lines + [demote_headings(text), ""]


def pretrain_section(out: Path, parts: dict[str, str]) -> list[str]:
    lines = ["### Pretraining run", "",
             "`python -m bertfast.pretrain --model electra --size small --steps 30 --batch-size 64 --seq-len 128`"
             " (tokens/s over the whole run, first steps' compilation included)", ""]
    summary = read_json(out / "pretrain" / "summary.json")
    if summary is None:
        return lines + [f"No summary: pretrain {parts.get('pretrain', 'not run')} (see logs/pretrain.log).", ""]
    lines += [f"- model {summary.get('model', '?')}, {summary.get('steps', '?')} steps, "
              f"{_fmt(summary.get('tokens'), digits=0)} tokens in {_fmt(summary.get('seconds'))} s: "
              f"**{_fmt(summary.get('tokens_per_s'), digits=0)} tokens/s**",
              f"- device {summary.get('device', '?')}, precision {summary.get('precision', '?')}, "
              f"world size {summary.get('world_size', '?')}"]
    backends = summary.get("backends") or {}
    if isinstance(backends, dict) and backends:
        used = "; ".join(f"{op}: {', '.join(map(str, names)) if isinstance(names, list) else names}"
                         for op, names in backends.items())
        lines.append(f"- backends that ran: {used}")
    first, final = summary.get("first_losses") or {}, summary.get("final_losses") or {}
    if isinstance(first, dict) and first:
        losses = ", ".join(f"{k} {_fmt(v, digits=3)} -> {_fmt(final.get(k) if isinstance(final, dict) else None, digits=3)}"
                           for k, v in first.items())
        lines.append(f"- losses (first -> last 10% of logged steps): {losses}")
    return lines + [""]


def failed_logs(out: Path, parts: list[dict]) -> list[str]:
    bad = [p for p in parts if p["status"].startswith(("failed", "timed out"))]
    if not bad:
        return []
    lines = ["### Logs of failed parts", ""]
    for p in bad:
        tail = log_tail(out / "logs" / f"{p['part']}.log")
        if not tail:
            lines += [f"{p['part']} ({p['status']}): logs/{p['part']}.log is missing or empty.", ""]
            continue
        lines += [f"{p['part']} ({p['status']}), last {len(tail)} lines of logs/{p['part']}.log:", "", "```",
                  *tail, "```", ""]
    return lines


def build_report(out: Path) -> str:
    """The results.md text for the folder `out` (see the module docstring)."""
    parts = read_parts(out / "parts.tsv")
    status = {p["part"]: p["status"] for p in parts}
    lines = header(read_json(out / "env.json"), read_json(out / "ceilings.json"))
    lines += parts_table(parts)
    lines += tests_section(out, status)
    lines += table_section("Benchmarks (`bertfast bench --preset default`)", out / "bench" / "bench.md", "bench",
                           status)
    lines += table_section("End-to-end pretraining throughput (`bertfast bench --ops pretraining`)",
                           out / "e2e" / "bench.md", "e2e", status)
    lines += pretrain_section(out, status)
    lines += failed_logs(out, parts)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the gpu_check output folder ($OUT)")
    parser.add_argument("--collect", choices=("env", "ceilings"), help="collect facts into OUT instead of reporting")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"out: {args.out} is not a folder")
    if args.collect == "env":
        collect_env(args.out)
    elif args.collect == "ceilings":
        collect_ceilings(args.out)
    else:
        (args.out / "results.md").write_text(build_report(args.out))
        print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
