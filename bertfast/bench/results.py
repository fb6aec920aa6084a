"""What `bertfast bench` makes of a pytest-benchmark run: rows, what was not measured, and the report.

Inputs: the ``--benchmark-json`` file (one entry per timed case: ``group``, ``fullname``, ``params``,
``stats`` in seconds and the ``extra_info`` that ``benchmarks/flops.run_case`` fills) and the
``--junitxml`` file (every case, with pytest's skip and failure messages and the case's parameters
as the ``bench_params`` property that benchmarks/conftest.py attaches).

Speedups. A case is one pytest-benchmark group (one op, one size, one mode: the implementations
side by side). The baselines of a benchmark function are every implementation whose name does not
contain "bertfast" and every one the file itself compares with (its ``speedup_vs_*`` fields, e.g.
``bertfast-autograd`` in test_albert_loop.py). In each case, for every baseline X that ran:

    speedup_vs_X = median_ms(X) / median_ms(this implementation)      (> 1: faster than X)

A function's baselines are ordered as the file lists them (the row with the most ``speedup_vs_*``
fields gives the file's BASELINES order), then by first appearance. The plot compares each other
implementation with one baseline per function (the one that ran beside the most of its cases,
the first of equals), as the geometric mean over those cases.

Outputs (``write_report``): bench.json (rows; skipped cases one by one and, as ``not_measured``,
folded by op, implementation and reason; failed cases; the environment, commit, nvidia driver,
timestamp and command line), bench.csv (one line per row), bench.md (the tables) and speedup.png;
each written atomically (a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

# extra_info keys that describe the machine, not the case: kept once, in the report's environment
ENV_KEYS = ("device_type", "device_name", "capability", "sm_count", "device_memory_gib", "cuda", "cudnn", "torch",
            "triton", "transformers", "bertfast", "python", "torch_threads", "matmul_tflops", "copy_gbs")
CSV_COLUMNS = ("op", "test", "case", "impl", "mode", "dtype", "seq_len", "median_ms", "rounds", "tflops", "gbs",
               "tokens_per_s", "sequences_per_s", "fraction_of_ceiling", "peak_mib", "bertfast_backends", "group",
               "name", "params")
NEEDS_CUDA = "needs CUDA"


def is_bertfast(impl: str) -> bool:
    """Ours (compared) or a baseline (compared with)."""
    return "bertfast" in impl.lower()


def op_of(path_or_module: str) -> str:
    """The op of a benchmark file: ``benchmarks/test_layer_norm.py`` or ``benchmarks.test_layer_norm`` ->
    ``layer_norm``."""
    stem = path_or_module.split("::")[0]
    stem = stem[:-3] if stem.endswith(".py") else stem.rsplit(".", 1)[-1]
    stem = re.split(r"[/\\]", stem)[-1]
    return stem.removeprefix("test_")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _case_label(op: str, group: str | None, test: str, params: dict) -> str:
    if group:
        for prefix in (op, test.removeprefix("test_")):  # the table's heading already says it
            if group.startswith(prefix + " "):
                return group[len(prefix) + 1:]
        return group
    rest = {k: v for k, v in params.items() if k != "impl"}
    return " ".join([test] + [f"{k}={v}" for k, v in rest.items()])


# ------------------------------------------------------------------------------------------------
# Rows


def rows_from_raw(raw: dict) -> list[dict]:
    """One row per timed case of a pytest-benchmark JSON document, in run order, with speedups.

    Row keys: op, test, name, group, case, impl, mode, dtype, seq_len, params, median_ms, rounds,
    tflops, gbs, tokens_per_s, sequences_per_s, peak_mib, bertfast_backends, speedup_vs (baseline
    -> median ratio), baseline_order (the file's own ``speedup_vs_*`` order), fraction_of_ceiling
    (of the card's measured matmul rate or copy bandwidth, or the file's MFU; GPU only)."""
    rows = []
    for bench in raw.get("benchmarks", []):
        extra = dict(bench.get("extra_info") or {})
        params = dict(bench.get("params") or {})
        fullname = bench.get("fullname") or bench.get("name", "")
        op = op_of(fullname)
        name = bench.get("name") or fullname.split("::")[-1]
        test = name.split("[")[0]
        stats = bench.get("stats") or {}
        median_ms = _number(extra.get("median_ms"))
        if median_ms is None and _number(stats.get("median")) is not None:
            median_ms = stats["median"] * 1e3
        impl = str(extra.get("impl") or params.get("impl") or bench.get("param") or name)
        group = bench.get("group")
        seq_len = extra.get("seq_len", params.get("seq_len"))
        rows.append({
            "op": op, "test": test, "name": name, "group": group, "case": _case_label(op, group, test, params),
            "impl": impl, "mode": extra.get("mode", params.get("mode")), "dtype": extra.get("dtype"),
            "seq_len": int(seq_len) if _number(seq_len) is not None else None,
            "params": params, "median_ms": median_ms, "rounds": stats.get("rounds"),
            "tflops": _number(extra.get("tflops")), "gbs": _number(extra.get("gbs")),
            "tokens_per_s": _number(extra.get("tokens_per_s")),
            "sequences_per_s": _number(extra.get("sequences_per_s")),
            "peak_mib": _number(extra.get("peak_memory_mib")),
            "fraction_of_ceiling": next((_number(extra[k]) for k in ("mfu", "fraction_of_matmul_rate",
                                                                     "fraction_of_copy_bandwidth")
                                         if _number(extra.get(k)) is not None), None),
            "bertfast_backends": list(extra.get("bertfast_backends") or []),
            "baseline_order": [k.removeprefix("speedup_vs_") for k in extra if k.startswith("speedup_vs_")],
        })
    add_speedups(rows)
    return rows


def _case_key(row: dict) -> tuple:
    if row["group"]:
        return row["op"], row["group"]
    return row["op"], row["test"], json.dumps({k: v for k, v in row["params"].items() if k != "impl"},
                                              sort_keys=True, default=str)


def _functions(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by benchmark function, named "op" for an op's only function or its namesake
    (test_rtd_loss), else "op/function" (rtd_loss/test_generator_sample); in run order."""
    tests: dict[str, list[str]] = {}
    for row in rows:
        names = tests.setdefault(row["op"], [])
        if row["test"] not in names:
            names.append(row["test"])
    out: dict[str, list[dict]] = {}
    for row in rows:
        alone = len(tests[row["op"]]) == 1 or row["test"] == f"test_{row['op']}"
        out.setdefault(row["op"] if alone else f"{row['op']}/{row['test']}", []).append(row)
    return out


def baseline_order(rows: list[dict]) -> list[str]:
    """The baselines of one benchmark function's rows, in the file's order (see the module
    docstring), whether or not they ran."""
    order: list[str] = []
    for row in sorted(rows, key=lambda r: -len(r["baseline_order"])):
        order += [name for name in row["baseline_order"] if name not in order]
    order += [r["impl"] for r in rows if not is_bertfast(r["impl"]) and r["impl"] not in order]
    return list(dict.fromkeys(order))


def add_speedups(rows: list[dict]) -> None:
    """Fill each row's ``speedup_vs`` from the medians of the baselines in its case (see the module
    docstring); recomputed here for every file alike, whether or not the file recorded them."""
    for function_rows in _functions(rows).values():
        declared = set(baseline_order(function_rows))
        cases: dict[tuple, list[dict]] = {}
        for row in function_rows:
            cases.setdefault(_case_key(row), []).append(row)
        for case in cases.values():
            base = {r["impl"]: r["median_ms"] for r in case if r["impl"] in declared and r["median_ms"]}
            for row in case:
                row["speedup_vs"] = {b: ms / row["median_ms"] for b, ms in base.items()
                                     if b != row["impl"] and row["median_ms"]}


def baselines_by_function(rows: list[dict]) -> dict[str, list[str]]:
    """benchmark function ("op" or "op/function") -> its baselines that ran, in the file's order."""
    out = {}
    for key, function_rows in _functions(rows).items():
        ran = {r["impl"] for r in function_rows if r["median_ms"]}
        out[key] = [b for b in baseline_order(function_rows) if b in ran]
    return out


# ------------------------------------------------------------------------------------------------
# What was not measured


def junit_cases(path: str | os.PathLike | None) -> list[dict]:
    """Every case of a junit XML file: op, name, params, outcome (passed | skipped | failed | error)
    and message (the skip reason or the failure's first line)."""
    if path is None or not Path(path).exists():
        return []
    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return []
    cases = []
    for case in tree.iter("testcase"):
        params = {}
        for prop in case.iter("property"):
            if prop.get("name") == "bench_params":
                try:
                    params = json.loads(prop.get("value") or "{}")
                except json.JSONDecodeError:
                    pass
        outcome, message = "passed", ""
        for tag in ("skipped", "failure", "error"):
            node = case.find(tag)
            if node is not None:
                outcome = {"skipped": "skipped", "failure": "failed", "error": "error"}[tag]
                message = node.get("message") or (node.text or "").strip()
                break
        if outcome == "skipped":
            message = re.sub(r"^Skipped:\s*", "", message)
        cases.append({"op": op_of(case.get("classname") or case.get("file") or ""),
                      "name": case.get("name", ""), "params": params, "outcome": outcome,
                      "message": message.strip().splitlines()[0] if message.strip() else ""})
    return cases


def _impl_of(case: dict, known: Iterable[str]) -> str:
    if "impl" in case["params"]:
        return str(case["params"]["impl"])
    inner = case["name"].split("[", 1)[1].rstrip("]") if "[" in case["name"] else ""
    for impl in sorted(known, key=len, reverse=True):  # the longest name the id ends with
        if inner.endswith(impl):
            return impl
    return inner or "(all cases)"


def not_measured(cases: list[dict], rows: list[dict]) -> list[dict]:
    """Skipped cases folded by (op, impl, reason): [{op, impl, reason, cases}], in first-seen order."""
    known = {r["impl"] for r in rows}
    folded: dict[tuple, dict] = {}
    for case in cases:
        if case["outcome"] != "skipped":
            continue
        key = (case["op"], _impl_of(case, known), case["message"])
        entry = folded.setdefault(key, {"op": key[0], "impl": key[1], "reason": key[2], "cases": 0})
        entry["cases"] += 1
    return list(folded.values())


def gpu_summary(skipped: list[dict], rows: list[dict]) -> str | None:
    """Plain sentences naming the implementations that never ran because there is no CUDA device
    here, bertfast's GPU kernels first, then the baselines (None when there are none)."""
    ran = {(r["op"], r["impl"]) for r in rows}
    gpu_only: dict[str, list[str]] = {}
    for entry in skipped:
        if entry["reason"].startswith(NEEDS_CUDA) and (entry["op"], entry["impl"]) not in ran:
            ops = gpu_only.setdefault(entry["impl"], [])
            if entry["op"] not in ops:
                ops.append(entry["op"])
    if not gpu_only:
        return None

    def names(ours: bool) -> str:
        return "; ".join(f"{impl} ({', '.join(ops)})" for impl, ops in gpu_only.items() if is_bertfast(impl) == ours)

    text = []
    if names(True):
        text.append(f"No CUDA device here: bertfast's GPU implementations were not measured: {names(True)}.")
    if names(False):
        text.append(f"Baselines not measured for the same reason: {names(False)}." if text else
                    f"No CUDA device here: these baselines were not measured: {names(False)}.")
    return " ".join(text)


# ------------------------------------------------------------------------------------------------
# The environment


def git_commit(directory: str | os.PathLike) -> dict:
    """{"commit": HEAD's hash or None, "dirty": uncommitted changes or None} of the checkout at
    ``directory``."""
    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip())}


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None without one)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def environment(raw: dict) -> dict:
    """The machine and versions: the benchmark files' own record (``extra_info``), else pytest-benchmark's
    ``machine_info``."""
    env: dict = {}
    for bench in raw.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        for key in ENV_KEYS:
            if extra.get(key) is not None and key not in env:
                env[key] = extra[key]
    machine = raw.get("machine_info") or {}
    env.setdefault("python", machine.get("python_version"))
    env.setdefault("device_name", (machine.get("cpu") or {}).get("brand_raw"))
    env["pytest_benchmark"] = raw.get("version")
    return {k: v for k, v in env.items() if v is not None}


# ------------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, trailing zeros kept (2.00, 0.0150, 812); "-" for none."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 10 ** digits:
        return f"{value:#.{digits}g}".rstrip(".")
    if 10 ** digits <= abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:.{digits - 1}e}"


def throughput(row: dict) -> str:
    """The row's rate in the unit its op is judged by: TFLOP/s, GB/s, tokens/s or sequences/s."""
    if row["tflops"] is not None:
        return f"{_fmt(row['tflops'])} TFLOP/s"
    if row["gbs"] is not None:
        return f"{_fmt(row['gbs'])} GB/s"
    if row["tokens_per_s"] is not None:
        return f"{_fmt(row['tokens_per_s'])} tok/s"
    if row["sequences_per_s"] is not None:
        return f"{_fmt(row['sequences_per_s'])} seq/s"
    return "-"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table whose columns line up as plain text too."""
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)]


def _function_table(rows: list[dict], cols: list[str]) -> list[str]:
    tokens = any(r["tokens_per_s"] is not None for r in rows) and not all(
        throughput(r).endswith("tok/s") for r in rows)
    ceiling = any(r["fraction_of_ceiling"] is not None for r in rows)
    header = ["case", "impl", "ms", "throughput", *(["tokens/s"] if tokens else []),
              *(["of card"] if ceiling else []), "peak MiB", *(f"vs {b}" for b in cols)]
    body = [[r["case"], r["impl"], _fmt(r["median_ms"]), throughput(r),
             *([_fmt(r["tokens_per_s"])] if tokens else []),
             *([f"{100 * r['fraction_of_ceiling']:.0f}%" if r["fraction_of_ceiling"] is not None else "-"]
               if ceiling else []),
             _fmt(r["peak_mib"]),
             *((f"{r['speedup_vs'][b]:.2f}x" if b in r["speedup_vs"] else "-") for b in cols)]
            for r in rows]
    return _table(header, body)


def render_markdown(report: dict) -> str:
    """bench.md: a header with the machine and versions, one table per op (a line per case and
    implementation: median ms, throughput, peak MiB, speedup vs each baseline), then what was not
    measured and why, and what failed."""
    env = report["environment"]
    rows = report["rows"]
    device = env.get("device_name", "?") + (f" (sm_{env['capability'].replace('.', '')})"
                                            if env.get("capability") else "")
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "bertfast") if env.get(k))
    commit = report.get("commit") or "not a git checkout"
    if report.get("commit_dirty"):
        commit += " + uncommitted changes"
    lines = [f"## bertfast bench: {device}, {report['timestamp']}", "",
             f"`{report['command']}`; preset {report['preset']}; {env.get('device_type', '?')}; {versions}; "
             f"commit {commit}" + (f"; driver {report['nvidia_driver']}" if report.get("nvidia_driver") else "")
             + (f"; card ceilings {env['matmul_tflops']} TFLOP/s bf16 matmul, {env['copy_gbs']} GB/s copy"
                if env.get("matmul_tflops") else ""),
             "",
             "ms = median of the timed rounds; speedup vs X = X's median / this median (> 1: faster); "
             "of card = fraction of the card's measured matmul rate or copy bandwidth (or MFU); "
             "peak MiB = one call's peak allocation (GPU only).", ""]
    baselines = report["baselines"]
    functions = _functions(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"### {op}", ""]
        for key, function_rows in functions.items():
            if key.split("/")[0] != op:
                continue
            if "/" in key:
                lines += [f"`{function_rows[0]['test']}`", ""]
            lines += _function_table(function_rows, baselines.get(key, [])) + [""]
    if not rows:
        lines += ["No case was timed.", ""]
    if report["not_measured"] or report["gpu_summary"] or report["missing_ops"]:
        lines += ["### Not measured", ""]
        if report["gpu_summary"]:
            lines += [report["gpu_summary"], ""]
        for op, reason in report["missing_ops"].items():
            lines.append(f"- {op}: {reason}")
        for entry in report["not_measured"]:
            plural = "s" if entry["cases"] != 1 else ""
            lines.append(f"- {entry['op']} / {entry['impl']}: {entry['reason']} ({entry['cases']} case{plural})")
        lines.append("")
    if report["failed"]:
        lines += ["### Failed", ""]
        lines += [f"- {c['op']} / {c['name']}: {c['message']}" for c in report["failed"]] + [""]
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_csv(rows: list[dict]) -> str:
    """bench.csv: one line per row; speedups as ``speedup_vs_<baseline>`` columns."""
    speed_cols = list(dict.fromkeys(f"speedup_vs_{b}" for r in rows for b in r["speedup_vs"]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*CSV_COLUMNS, *speed_cols], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line = {k: r.get(k) for k in CSV_COLUMNS}
        line["bertfast_backends"] = " ".join(r["bertfast_backends"])
        line["params"] = json.dumps(r["params"], default=str)
        line.update({f"speedup_vs_{b}": v for b, v in r["speedup_vs"].items()})
        writer.writerow(line)
    return out.getvalue()


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def speedup_points(report: dict) -> tuple[list[tuple], list[tuple]]:
    """The plot's data: [(function, baseline, impl, geomean speedup)] per benchmark function, and
    [(function, baseline, impl, seq_len, geomean speedup)] for the cases that have a sequence length.
    Each implementation is compared with one baseline per function: the one that ran beside the
    most of its cases, the file's first of equals (SDPA's flash backend refuses ragged batches on
    CUDA and dropout on a CPU, so a partial baseline would leave those cases out)."""
    per_fn: dict[tuple, list[float]] = {}
    per_len: dict[tuple, list[float]] = {}
    for key, rows in _functions(report["rows"]).items():
        order = report["baselines"].get(key, [])
        others = [r for r in rows if r["impl"] not in order]
        coverage = {b: sum(b in r["speedup_vs"] for r in others) for b in order}
        if not any(coverage.values()):
            continue
        first = max(order, key=lambda b: coverage[b])  # max keeps the earliest of equals
        for r in others:
            if first in r["speedup_vs"]:
                per_fn.setdefault((key, first, r["impl"]), []).append(r["speedup_vs"][first])
                if r["seq_len"]:
                    per_len.setdefault((key, first, r["impl"], r["seq_len"]), []).append(r["speedup_vs"][first])
    return ([(*k, _geomean(v)) for k, v in per_fn.items()],
            sorted(((*k, _geomean(v)) for k, v in per_len.items()), key=lambda p: p[:4]))


def render_png(report: dict) -> bytes:
    """speedup.png: left, each implementation's speedup over its benchmark function's main baseline
    (``speedup_points``; geometric mean over the function's cases); right, the same against sequence length for the
    functions measured at two or more lengths. Matplotlib's Agg canvas, no pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_fn, per_len = speedup_points(report)
    series: dict[tuple, list[tuple]] = {}
    for key, base, impl, seq_len, v in per_len:
        series.setdefault((key, base, impl), []).append((seq_len, v))
    series = {k: v for k, v in series.items() if len(v) > 1}  # a line needs two lengths
    fig = Figure(figsize=(14, max(4.5, 0.32 * len(per_fn) + 1.5)), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    env = report["environment"]
    fig.suptitle(f"bertfast speedup vs each benchmark's main baseline: {env.get('device_name', '?')}, "
                 f"{report['timestamp']}, preset {report['preset']}", fontsize=10)
    if per_fn:
        labels = [f"{key}: {impl} vs {base}" for key, base, impl, _ in per_fn]
        values = [v for *_, v in per_fn]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        left.barh(range(len(values)), values, color=colors)
        left.set_yticks(range(len(values)), labels, fontsize=7)
        left.invert_yaxis()
        left.set_xscale("log")  # 0.5x and 40x on one axis
        left.axvline(1.0, color="black", linewidth=0.8)
        for i, v in enumerate(values):
            left.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        left.set_xlabel("speedup = baseline median / median (geometric mean over the cases; log scale)")
    else:
        left.text(0.5, 0.5, "no implementation ran beside a baseline", ha="center", va="center")
        left.set_axis_off()
    if series:
        for (key, base, impl), points in series.items():
            xs, ys = zip(*points)
            right.plot(xs, ys, marker="o", label=f"{key}: {impl} vs {base}")
        right.set_xscale("log", base=2)
        lengths = sorted({x for points in series.values() for x, _ in points})
        right.set_xticks(lengths, [str(x) for x in lengths])
        right.minorticks_off()
        right.axhline(1.0, color="black", linewidth=0.8)
        right.set_ylim(bottom=0)
        right.set_xlabel("sequence length")
        right.set_ylabel("speedup")
        right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    else:
        right.text(0.5, 0.5, "no function was measured at two or more\nsequence lengths", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The report


def build_report(raw: dict, junit: str | os.PathLike | None, *, command: str, preset: str,
                 source_dir: str | os.PathLike | None = None, missing_ops: dict[str, str] | None = None,
                 pytest_exit_code: int | None = None, deselected: int | None = None) -> dict:
    """Everything bench.json holds (see the module docstring); ``raw`` is the pytest-benchmark document
    (``{}`` when pytest wrote none)."""
    rows = rows_from_raw(raw)
    cases = junit_cases(junit)
    skipped = not_measured(cases, rows)
    known = {r["impl"] for r in rows}
    commit = git_commit(source_dir) if source_dir is not None else {"commit": None, "dirty": None}
    if commit["commit"] is None and (raw.get("commit_info") or {}).get("id") not in (None, "unversioned"):
        commit = {"commit": raw["commit_info"]["id"], "dirty": raw["commit_info"].get("dirty")}
    return {
        "command": command, "preset": preset,
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit["commit"], "commit_dirty": commit["dirty"], "nvidia_driver": nvidia_driver(),
        "environment": environment(raw), "pytest_exit_code": pytest_exit_code, "deselected_by_preset": deselected,
        "rows": rows, "baselines": baselines_by_function(rows),
        "skipped": [{"op": c["op"], "name": c["name"], "impl": _impl_of(c, known), "reason": c["message"]}
                    for c in cases if c["outcome"] == "skipped"],
        "not_measured": skipped, "gpu_summary": gpu_summary(skipped, rows),
        "failed": [c for c in cases if c["outcome"] in ("failed", "error")],
        "missing_ops": dict(missing_ops or {}),
    }


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """bench.json, bench.csv, bench.md and speedup.png (the PNG only where matplotlib imports) in
    ``out_dir``; returns {kind: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        png = render_png(report)
    except ImportError:
        png = None
        report.setdefault("notes", []).append("speedup.png not written: matplotlib is not installed")
    written = {"json": out / "bench.json", "csv": out / "bench.csv", "md": out / "bench.md"}
    write_atomic(written["json"], json.dumps(report, indent=2, default=str) + "\n")
    write_atomic(written["csv"], render_csv(report["rows"]))
    write_atomic(written["md"], render_markdown(report))
    if png is not None:
        written["png"] = out / "speedup.png"
        write_atomic(written["png"], png)
    return written
