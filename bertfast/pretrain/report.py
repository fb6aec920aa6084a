"""What a person sees of a pretraining run: a metrics JSONL, a PNG of the loss curves, a summary.

Metrics file format (JSON Lines, strict JSON, one object per logged step, ASCII, "\\n"-terminated):
    {"step": int, "loss": float, "<part>_loss": float, "lr": float, "tokens_per_s": float,
     "grad_norm": float, "time_s": float, ...}
NaN and +-inf are written as null so that any JSON reader accepts the file. Only the last line may be
torn (a crash mid-write); readers drop it. Loss keys are "loss" (the total) and every "*_loss" part
(mlm_loss, nsp_loss, sop_loss, rtd_loss, ...).

Only rank 0 of a distributed run should log; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["MetricsLog", "read_metrics", "plot_losses", "Summary", "summarize"]


# --------------------------------------------------------------------------------------------------
# JSON helpers


def _jsonable(value, where: str, *, lenient: bool = False):
    """`value` as plain JSON data: non-finite floats -> None, 0-d numpy/torch scalars -> Python.

    Strict mode (metrics records) raises TypeError naming `where` for anything else; lenient mode
    (summaries) turns paths and unknown objects into strings.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a str")
            out[key] = _jsonable(item, f"{where}[{key!r}]", lenient=lenient)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", lenient=lenient) for i, v in enumerate(value)]
    # numpy scalars and 0-d torch tensors (e.g. a loss the caller did not .item()).
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return _jsonable(value.item(), where, lenient=lenient)
    if lenient:
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serializable")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace, so a
    reader (or a crash) sees either the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable; best effort (some filesystems refuse to fsync folders).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _is_step(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Metrics JSONL


def _parse_metrics(path: Path) -> list[dict]:
    """Records of a metrics file; an unparsable last line (torn by a crash) is dropped, an
    unparsable line before it is an error."""
    data = path.read_bytes()
    lines = [(i + 1, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            if pos == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {lineno} is not valid JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {lineno} is a {type(record).__name__}, not an object")
        records.append(record)
    return records


def read_metrics(path) -> list[dict]:
    """All records of the metrics JSONL at `path`, in file order (null where NaN/inf was logged).

    A torn last line is dropped; a missing file is FileNotFoundError, a corrupt line before the
    last is ValueError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no metrics file at {path}")
    return _parse_metrics(path)


class MetricsLog:
    """Append-only JSONL of dicts, one per logged step (format in the module docstring).

    resume_step None starts a new file (truncating any old one). An int keeps the existing records
    with step <= resume_step and drops the later ones: a killed run may have logged past its last
    checkpoint, and the resumed run logs those steps again. The kept records are rewritten
    atomically (temporary file + os.replace), which also drops a torn last line; a missing file
    starts empty. Each write is one line, flushed at once; sync() also fsyncs it.
    Use as a context manager or call close().
    """

    def __init__(self, path, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="ascii", newline="\n")
            return
        if not _is_step(resume_step):
            raise ValueError(f"resume_step: expected an int >= 0 or None, got {resume_step!r}")
        kept = []
        if self.path.is_file():
            for i, record in enumerate(_parse_metrics(self.path)):
                step = record.get("step")
                if not _is_step(step):
                    raise ValueError(f"path: record {i} of {self.path} has no int 'step' ({step!r})")
                if step <= resume_step:
                    kept.append(record)
        _atomic_write(self.path, "".join(_dump_line(r) for r in kept).encode("ascii"))
        self._file = open(self.path, "a", encoding="ascii", newline="\n")

    def write(self, record: dict) -> None:
        """Append `record` (a dict with an int "step" >= 0, str keys, JSON-able values) as one
        line; NaN/inf become null. Flushed to the OS at once (fsync is sync()'s job)."""
        if self._file is None:
            raise ValueError(f"MetricsLog({self.path}): closed, cannot write")
        if not isinstance(record, Mapping):
            raise TypeError(f"record: expected a dict, got {type(record).__name__}")
        if not _is_step(record.get("step")):
            raise ValueError(f"record: needs an int 'step' >= 0, got {record.get('step')!r}")
        line = _dump_line(_jsonable(record, "record"))
        # One write call per line: a crash tears at most this line, which readers then drop.
        self._file.write(line)
        self._file.flush()

    def sync(self) -> None:
        """Flush and os.fsync the file, so the logged lines survive a machine crash."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsLog({str(self.path)!r}{', closed' if self.closed else ''})"


def _dump_line(record: dict) -> str:
    # allow_nan=False: _jsonable already turned NaN/inf into None, so this only guards strictness.
    return json.dumps(record, allow_nan=False) + "\n"


# --------------------------------------------------------------------------------------------------
# Record series


def _check_records(records) -> list:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"records: expected a list of dicts, got {type(records).__name__}")
    records = list(records)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"records[{i}]: expected a dict, got {type(record).__name__}")
    return records


def _loss_keys(records: list) -> list[str]:
    """"loss" first (if any record has it), then each "*_loss" key in order of first appearance."""
    keys: dict[str, None] = {}
    for record in records:
        for key in record:
            if key == "loss" or (isinstance(key, str) and key.endswith("_loss")):
                keys.setdefault(key)
    ordered = [k for k in keys if k == "loss"] + [k for k in keys if k != "loss"]
    return ordered


def _series(records: list, key: str, *, need_step: bool) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have `key`; a null value becomes NaN."""
    steps, values = [], []
    for i, record in enumerate(records):
        if key not in record:
            continue
        value = record[key]
        if value is None:
            value = math.nan
        elif not _is_number(value):
            raise ValueError(f"records[{i}][{key!r}]: expected a number or null, got {value!r}")
        step = record.get("step")
        if need_step and not _is_step(step):
            raise ValueError(f"records[{i}]: needs an int 'step' >= 0, got {step!r}")
        steps.append(int(step) if need_step else i)
        values.append(float(value))
    return steps, values


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average, alpha = 2 / (span + 1), started at the first value (no bias
    towards zero): e_0 = v_0, e_t = e_{t-1} + alpha * (v_t - e_{t-1})."""
    alpha = 2.0 / (span + 1)
    out, e = [], values[0]
    for v in values:
        e += alpha * (v - e)
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------------
# Plot


def plot_losses(records: list[dict], path, *, title: str) -> Path:
    """Write a PNG of the loss curves of `records` to `path` (atomically) and return the path.

    One axis per loss key ("loss", then each "*_loss" part), loss vs step: the raw points faint and
    an exponential moving average (span = clamp(n // 20, 1, 50) points) bold; log-scale y where
    the finite positive values span more than one decade. Null (NaN) values are skipped and counted
    in the legend. If any record has "lr", a last small axis shows the learning-rate schedule.
    Raises ValueError naming `records` when there are no records or no loss key.
    """
    records = _check_records(records)
    if not records:
        raise ValueError("records: nothing to plot (no logged steps)")
    if not isinstance(title, str):
        raise TypeError(f"title: expected a str, got {type(title).__name__}")
    keys = _loss_keys(records)
    if not keys:
        raise ValueError("records: no 'loss' or '*_loss' key to plot")
    series = {key: _series(records, key, need_step=True) for key in keys}
    lr_steps, lr_values = _series(records, "lr", need_step=True)
    lr_points = [(s, v) for s, v in zip(lr_steps, lr_values) if math.isfinite(v)]

    # The object API with an explicit Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    ratios = [3.0] * len(keys) + ([1.2] if lr_points else [])
    fig = Figure(figsize=(8.0, 0.8 + 0.7 * sum(ratios)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": ratios})[:, 0]
    fig.suptitle(title)
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    for n, (ax, key) in enumerate(zip(axes, keys)):
        color = colors[n % len(colors)]
        steps, values = series[key]
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        skipped = len(values) - len(finite)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if not finite:
            ax.text(0.5, 0.5, f"no finite values ({skipped} logged)", transform=ax.transAxes,
                    ha="center", va="center")
            continue
        xs = [s for s, _ in finite]
        ys = [v for _, v in finite]
        raw_label = "raw" + (f" ({skipped} non-finite skipped)" if skipped else "")
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8,
                marker="." if len(xs) < 50 else None, label=raw_label)
        span = max(1, min(50, len(ys) // 20))
        smooth = _ema(ys, span)
        ax.plot(xs, smooth, color=color, linewidth=2.0,
                label=f"EMA (span {span}), last {smooth[-1]:.4g}")
        low, high = min(ys), max(ys)
        if low > 0 and high / low > 10.0:
            ax.set_yscale("log")
            # Plain numbers ("0.1", "3") instead of "10^-1"; on a short range (< 2 decades) also
            # label 2x, 3x, 5x of each decade, so the axis has more than one or two labels.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            if high / low < 100.0:
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
                ax.yaxis.set_minor_formatter(plain)
        ax.legend(loc="upper right", fontsize="small")
    if lr_points:
        ax = axes[-1]
        ax.plot([s for s, _ in lr_points], [v for _, v in lr_points], color="0.3", linewidth=1.2)
        ax.set_ylabel("lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    _atomic_write(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# Summary


def _fmt_loss(value: float) -> str:
    if not math.isfinite(value):
        return str(value)  # "nan" / "inf": a diverged run must show as such
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def _fmt_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or "none"
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _fmt_duration(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{seconds:.1f} s ({whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d})"


@dataclasses.dataclass
class Summary:
    """The end-of-run summary.

    first_losses / final_losses: per loss key, the mean of its first / last ceil(n / 10) logged
    values (n = records that have the key; a null in the window makes the mean NaN).
    backends: op name -> backends that ran it, e.g. {"attention": ["torch"]}.
    """

    model: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first_losses: dict[str, float]
    final_losses: dict[str, float]
    backends: dict[str, list[str]]
    device: str
    precision: str
    world_size: int
    extra: dict

    def render(self) -> str:
        """A short text block, one line per item; losses as "mlm_loss 9.01 -> 6.52"."""
        lines = [
            f"model: {self.model}",
            f"steps: {self.steps:,}",
            f"tokens: {self.tokens:,}",
            f"time: {_fmt_duration(self.seconds)}",
            f"tokens/s: {self.tokens_per_s:,.0f}",
            f"device: {self.device}",
            f"precision: {self.precision}",
            f"world size: {self.world_size}",
        ]
        if self.first_losses:
            lines.append("losses (mean of the first -> last 10% of logged steps):")
            for key, first in self.first_losses.items():
                final = self.final_losses.get(key, math.nan)
                lines.append(f"  {key} {_fmt_loss(first)} -> {_fmt_loss(final)}")
        else:
            lines.append("losses: none logged")
        used = "; ".join(f"{op} {', '.join(names) or 'none'}" for op, names in self.backends.items())
        lines.append(f"backends: {used or 'none recorded'}")
        for key, value in self.extra.items():
            lines.append(f"{key}: {_fmt_value(value)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON data (strict: NaN/inf -> None, paths and other objects -> str)."""
        return _jsonable(dataclasses.asdict(self), "summary", lenient=True)


def _window_mean(values: list[float], first: bool) -> float:
    k = max(1, math.ceil(len(values) / 10))
    window = values[:k] if first else values[-k:]
    return sum(window) / len(window)  # NaN (a null) or inf in the window shows in the mean


def _check_backends(backends) -> dict[str, list[str]]:
    if backends is None:
        return {}
    if not isinstance(backends, Mapping):
        raise TypeError(f"backends: expected a dict of op -> backend names, got "
                        f"{type(backends).__name__}")
    out = {}
    for op, names in backends.items():
        if not isinstance(op, str):
            raise TypeError(f"backends: op name {op!r} is not a str")
        if isinstance(names, str):
            names = [names]
        listed = list(names) if isinstance(names, Iterable) else None
        if listed is None or not all(isinstance(n, str) for n in listed):
            raise TypeError(f"backends[{op!r}]: expected backend names (str), got {names!r}")
        out[op] = list(dict.fromkeys(listed))  # de-duplicated, first-use order kept
    return out


def summarize(records: list[dict], *, model: str, tokens: int, seconds: float, backends,
              device: str, precision: str, world_size: int, extra: dict | None = None) -> Summary:
    """Summary of a run from its metrics `records` (e.g. read_metrics of the whole run).

    steps = the largest logged "step" (0 without records); tokens_per_s = tokens / seconds (0 when
    seconds is 0); first/final losses as in Summary. `backends` maps op name -> a backend name or a
    list of them.
    """
    records = _check_records(records)
    for name, value in (("model", model), ("device", device), ("precision", precision)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if not _is_step(tokens):
        raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
    if not _is_number(seconds) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds: expected a finite number >= 0, got {seconds!r}")
    if not _is_step(world_size) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra: expected a dict or None, got {type(extra).__name__}")

    steps = 0
    for i, record in enumerate(records):
        step = record.get("step")
        if step is not None:
            if not _is_step(step):
                raise ValueError(f"records[{i}]: 'step' must be an int >= 0, got {step!r}")
            steps = max(steps, int(step))
    first, final = {}, {}
    for key in _loss_keys(records):
        _, values = _series(records, key, need_step=False)
        first[key] = _window_mean(values, first=True)
        final[key] = _window_mean(values, first=False)
    return Summary(
        model=model, steps=steps, tokens=int(tokens), seconds=float(seconds),
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        first_losses=first, final_losses=final, backends=_check_backends(backends),
        device=device, precision=precision, world_size=int(world_size),
        extra=dict(extra or {}),
    )
