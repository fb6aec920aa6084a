"""`bertfast bench`: run the benchmark files under pytest-benchmark in a subprocess, then report.

    bertfast bench [--ops OP[,OP...]] [--preset small|default] [--out DIR] [--benchmarks PATH]

runs, in the source tree's root,

    python -m pytest <benchmarks>/test_<op>.py ... --benchmark-only --benchmark-json=DIR/raw.json
        --junitxml=DIR/junit.xml -p no:cacheprovider -q -rs --benchmark-columns=median,rounds

with ``BERTFAST_BENCH_PRESET=<preset>`` (benchmarks/conftest.py reads it), passes pytest's output
through to the terminal (and to DIR/pytest.log), and then writes DIR/bench.json, bench.csv,
bench.md and speedup.png (``results.py``) and prints the table. Exit status: 0 when pytest passed
(skipped cases are fine: they are listed as not measured, with the reason), 1 when a case failed
or pytest could not run (the table of what did run is printed all the same).

A subprocess, not ``pytest.main`` in this process: the benchmarks set torch's thread count, compile
kernels and fill CUDA caches; a fresh interpreter keeps the next run honest and this one clean.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

# Benchmark file stems without "test_", in the order `bertfast bench` runs them.
KNOWN_OPS = ("attention", "layer_norm", "bias_gelu", "embedding", "mlm_loss", "rtd_loss", "albert_loop",
             "collators", "pretraining")
PRESETS = ("small", "default")
PRESET_ENV = "BERTFAST_BENCH_PRESET"


class BenchError(Exception):
    """A request `bertfast bench` cannot carry out (bad --ops, no benchmarks folder, no pytest-benchmark)."""


def package_root() -> Path:
    """The folder that holds the ``bertfast`` package (a source checkout's root when run from one)."""
    return Path(__file__).resolve().parents[2]


def find_benchmarks_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The benchmarks folder: ``explicit`` (``--benchmarks``), else ``bertfast/../benchmarks`` (a
    source checkout or an editable install). A wheel does not ship the benchmarks."""
    if explicit is not None:
        path = Path(explicit).expanduser().resolve()
        if not (path / "conftest.py").is_file() or not (path / "flops.py").is_file():
            raise BenchError(f"--benchmarks {explicit}: not a bertfast benchmarks folder (no conftest.py and "
                             f"flops.py there)")
        return path
    path = package_root() / "benchmarks"
    if (path / "conftest.py").is_file() and (path / "flops.py").is_file():
        return path
    raise BenchError(f"bertfast bench needs the source tree: its benchmarks are not installed with the package "
                     f"(looked for {path}). Run it from a source checkout (git clone, then pip install -e .), "
                     f"or pass --benchmarks PATH to a checkout's benchmarks folder.")


def parse_ops(text: str | None) -> list[str]:
    """``--ops`` ("attention,layer_norm") -> the op names, validated; None or empty -> every op."""
    if text is None or not text.strip():
        return list(KNOWN_OPS)
    ops = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in ops if name not in KNOWN_OPS]
    if unknown:
        raise BenchError(f"--ops: unknown op{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known ops: {', '.join(KNOWN_OPS)}")
    return list(dict.fromkeys(ops))


def default_out_dir() -> Path:
    """bench-results/<UTC timestamp> under the current folder."""
    return Path("bench-results") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class PytestRun:
    command: list[str]
    exit_code: int
    raw_json: Path
    junit_xml: Path
    log: Path
    seconds: float
    deselected: int | None = None
    missing_ops: dict[str, str] = field(default_factory=dict)


def pytest_command(bench_dir: Path, ops: list[str], out_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, {op: why it is not run}) for the benchmark files of ``ops`` that exist."""
    files, missing = [], {}
    for op in ops:
        path = bench_dir / f"test_{op}.py"
        if path.is_file():
            files.append(str(path))
        else:
            missing[op] = f"not measured: {path} is not in this tree"
    argv = [sys.executable, "-m", "pytest", *files, "--benchmark-only", f"--benchmark-json={out_dir / 'raw.json'}",
            f"--junitxml={out_dir / 'junit.xml'}", "-p", "no:cacheprovider", "-q", "-rs",
            "--benchmark-columns=median,rounds"]
    return argv, missing


def _environment(preset: str, bench_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[PRESET_ENV] = preset
    env["PYTHONUNBUFFERED"] = "1"
    root = package_root()
    if bench_dir.parent == root:  # a source checkout: its bertfast, even where it is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def run_pytest(bench_dir: Path, ops: list[str], preset: str, out_dir: Path, stream: TextIO | None = None) -> PytestRun:
    """Run the benchmark files of ``ops`` with ``preset``; pytest's output goes to ``stream`` (default
    sys.stdout) as it comes, and to out_dir/pytest.log."""
    if preset not in PRESETS:
        raise BenchError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise BenchError("bertfast bench needs pytest-benchmark: pip install pytest pytest-benchmark")
    stream = stream or sys.stdout
    out_dir.mkdir(parents=True, exist_ok=True)
    argv, missing = pytest_command(bench_dir, ops, out_dir)
    for name in ("raw.json", "junit.xml"):  # a stale file from an earlier run must not pass for this one's
        (out_dir / name).unlink(missing_ok=True)
    log_path = out_dir / "pytest.log"
    if all(op in missing for op in ops):
        raise BenchError(f"no benchmark file for {', '.join(ops)} in {bench_dir}")
    start = time.perf_counter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(shlex.join(argv) + "\n")
        proc = subprocess.Popen(argv, cwd=bench_dir.parent, env=_environment(preset, bench_dir),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        try:
            # raw chunks, not lines: pytest -q's progress dots show as each case ends
            while chunk := os.read(proc.stdout.fileno(), 65536):
                text = decoder.decode(chunk)
                stream.write(text)
                stream.flush()
                log.write(text)
            code = proc.wait()
        except BaseException:  # Ctrl-C: stop pytest too, then let the caller see the interrupt
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            proc.stdout.close()
    found = re.findall(r"(\d+) deselected", log_path.read_text(encoding="utf-8"))
    deselected = int(found[-1]) if found else None
    return PytestRun(argv, code, out_dir / "raw.json", out_dir / "junit.xml", log_path,
                     time.perf_counter() - start, deselected, missing)


def bench(ops: str | None = None, preset: str = "default", out: str | os.PathLike | None = None,
          benchmarks: str | os.PathLike | None = None, command: str = "bertfast bench",
          stream: TextIO | None = None) -> int:
    """`bertfast bench`: run, report, print the table; returns the exit status (0 passed, 1 a case
    failed or pytest could not run). Raises BenchError for a request it cannot carry out."""
    import json

    from bertfast.bench import results

    stream = stream or sys.stdout
    op_list = parse_ops(ops)
    if preset not in PRESETS:
        raise BenchError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    bench_dir = find_benchmarks_dir(benchmarks)
    out_dir = Path(out) if out is not None else default_out_dir()
    run = run_pytest(bench_dir, op_list, preset, out_dir, stream)
    raw = {}
    if run.raw_json.is_file():
        try:
            raw = json.loads(run.raw_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raw = {}
    report = results.build_report(raw, run.junit_xml, command=command, preset=preset, source_dir=bench_dir.parent,
                                  missing_ops=run.missing_ops, pytest_exit_code=run.exit_code,
                                  deselected=run.deselected)
    report["ops"] = op_list
    report["pytest_command"] = run.command
    report["pytest_seconds"] = round(run.seconds, 1)
    if run.exit_code not in (0, 1):  # 1 = some case failed: listed under "Failed"
        report.setdefault("notes", []).append(f"pytest exited with status {run.exit_code}; its output is in "
                                              f"{run.log}")
    written = results.write_report(report, out_dir)
    stream.write("\n" + results.render_markdown(report) + "\n")
    stream.write(f"wrote {', '.join(str(p) for p in written.values())} (pytest {run.seconds:.0f} s)\n")
    stream.flush()
    return 0 if run.exit_code == 0 else 1


def static_report(*, quick: bool, part: str, jobs: int | None, out: str | os.PathLike | None, command: str,
                  stream: TextIO | None = None) -> int:
    """`bertfast bench --static` (alias `bertfast static-report`): compile every Triton kernel config
    the dispatchers can pick for sm_80 and sm_90, no GPU needed, and print (and with ``out``, write)
    the Markdown report of registers, spills, shared memory and HGMMA use."""
    from bertfast import kernel_report

    stream = stream or sys.stdout
    missing = kernel_report.missing_tools()
    if missing:
        raise BenchError(missing)
    todo, jobs_list = [], []
    if part in ("all", "attention"):
        todo = kernel_report.quick_variants() if quick else kernel_report.variants(flags="extremes")
    if part in ("all", "families"):
        jobs_list = kernel_report.quick_launch_jobs() if quick else kernel_report.launch_jobs()

    def progress(done, total, row):
        print(f"\r[{done}/{total}] {row.describe()} {row.compile_s:.1f} s   ", end="", file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = kernel_report.compile_all(todo + jobs_list, jobs=jobs, progress=progress)
    print(file=sys.stderr)
    command = command + (" --quick" if quick else "") + (f" --part {part}" if part != "all" else "")
    scope = kernel_report.QUICK_SCOPE if quick else kernel_report.FULL_SCOPE
    seconds = time.perf_counter() - start
    if todo:
        text = kernel_report.render(rows[:len(todo)], command, seconds, scope, launch_rows=rows[len(todo):])
    else:
        text = kernel_report.render_families(rows, command, seconds, quick=quick)
    print(text, file=stream)
    if out:
        from bertfast.bench.results import write_atomic

        write_atomic(out, text)
    return 0
