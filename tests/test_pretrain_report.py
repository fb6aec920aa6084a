"""bertfast.pretrain.report: metrics JSONL, loss-curve PNG, run summary."""

import json
import math
import struct

import numpy as np
import pytest
import torch

from bertfast.pretrain.report import MetricsLog, Summary, plot_losses, read_metrics, summarize


def _strict_loads(line):
    """json.loads that refuses the non-standard NaN/Infinity tokens."""
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def _records(n, parts=("mlm_loss", "rtd_loss")):
    out = []
    for step in range(1, n + 1):
        record = {"step": step, "loss": 10.0 / step + 0.25 * (step % 3)}
        for j, part in enumerate(parts):
            record[part] = (j + 1) * 3.0 / math.sqrt(step) + 0.01 * (step % 5)
        record.update(lr=1e-3 * min(step / 10, 1.0) * (1 - step / (n + 1)),
                      tokens_per_s=1000.0 + step, grad_norm=1.0 / step, time_s=0.1 * step)
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------------
# MetricsLog / read_metrics


def test_write_read_roundtrip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # parent folder created
    records = _records(12)
    with MetricsLog(path) as log:
        for record in records:
            log.write(record)
        log.sync()
    assert log.closed
    assert read_metrics(path) == records
    lines = path.read_text().splitlines()
    assert len(lines) == len(records)
    assert [_strict_loads(line) for line in lines] == records


def test_lines_visible_before_close(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": 2.5})
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}]  # flushed at once, not at close
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        log.write({"step": 2, "loss": 2.0})


def test_non_finite_become_null(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"),
                   "rtd_loss": -float("inf"), "lr": 1e-4})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _strict_loads(text) == {"step": 1, "loss": None, "grad_norm": None, "rtd_loss": None,
                                   "lr": 1e-4}


def test_scalars_converted(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        log.write({"step": np.int64(3), "loss": torch.tensor(1.5), "mlm_loss": np.float32(0.5),
                   "nan_t": torch.tensor(float("nan")), "flags": {"skipped": np.bool_(True)}})
    assert read_metrics(path) == [{"step": 3, "loss": 1.5, "mlm_loss": 0.5, "nan_t": None,
                                   "flags": {"skipped": True}}]


def test_write_rejects_bad_records(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl") as log:
        with pytest.raises(TypeError, match="record"):
            log.write([("step", 1)])
        with pytest.raises(ValueError, match="record: needs an int 'step'"):
            log.write({"loss": 1.0})
        with pytest.raises(ValueError, match="record: needs an int 'step'"):
            log.write({"step": True, "loss": 1.0})
        with pytest.raises(TypeError, match=r"record\['when'\]"):
            log.write({"step": 1, "when": object()})
        with pytest.raises(TypeError, match="record"):
            log.write({"step": 1, 7: 1.0})
    assert read_metrics(tmp_path / "m.jsonl") == []  # nothing half-written


def test_torn_last_line_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    records = _records(3)
    with MetricsLog(path) as log:
        for record in records:
            log.write(record)
    full = json.dumps({"step": 4, "loss": 1.25, "mlm_loss": 0.5})
    with open(path, "a") as f:
        f.write(full[: len(full) // 2])  # a crash mid-write: half a line, no newline
    assert read_metrics(path) == records


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="path"):
        read_metrics(tmp_path / "missing.jsonl")


def test_resume_drops_later_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    records = _records(10)
    with MetricsLog(path) as log:
        for record in records:
            log.write(record)
    original = path.read_text().splitlines(keepends=True)
    with open(path, "a") as f:
        f.write('{"step": 11, "loss": 0.')  # torn line of the killed run
    with MetricsLog(path, resume_step=6) as log:
        # The kept lines are exactly the first six, byte for byte; 7.. and the torn line are gone.
        assert path.read_text() == "".join(original[:6])
        assert read_metrics(path) == records[:6]
        log.write({"step": 7, "loss": 0.125})
    assert read_metrics(path) == records[:6] + [{"step": 7, "loss": 0.125}]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "m.jsonl"]  # no temp files left


def test_resume_edge_cases(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path, resume_step=5) as log:  # no file yet: starts empty
        log.write({"step": 6, "loss": 1.0})
    with MetricsLog(path, resume_step=0):
        pass
    assert read_metrics(path) == []
    path.write_text('{"step": 1, "loss": 1.0}\n')
    with MetricsLog(path):  # resume_step None: a new file
        pass
    assert path.read_text() == ""
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="resume_step"):
            MetricsLog(path, resume_step=bad)
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="'step'"):
        MetricsLog(path, resume_step=3)


# --------------------------------------------------------------------------------------------------
# plot_losses


def _png_size(data):
    """(width, height) from the PNG signature + IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("parts", [("mlm_loss", "rtd_loss"), ("mlm_loss", "nsp_loss")],
                         ids=["electra", "bert"])
def test_plot_png(tmp_path, parts):
    records = _records(120, parts)
    records[7]["loss"] = None  # a NaN logged as null is skipped, not an error
    out = plot_losses(records, tmp_path / "plots" / "loss.png", title=f"{parts} run")
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    width, height = _png_size(data)
    assert width >= 400 and height >= 600  # three loss axes + the lr axis
    assert len(data) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # atomic: no temp file left


def test_plot_without_lr_and_degenerate_series(tmp_path):
    records = [{"step": 1, "mlm_loss": 5.0, "sop_loss": None}]  # one point, an all-null key
    data = plot_losses(records, tmp_path / "a.png", title="tiny").read_bytes()
    width, height = _png_size(data)
    assert width >= 400 and 0 < height < 600 and len(data) > 5_000


def test_plot_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="records"):
        plot_losses([], tmp_path / "a.png", title="x")
    with pytest.raises(ValueError, match="records"):
        plot_losses([{"step": 1, "lr": 1e-3}], tmp_path / "a.png", title="x")
    with pytest.raises(ValueError, match=r"records\[1\]\['loss'\]"):
        plot_losses([{"step": 1, "loss": 1.0}, {"step": 2, "loss": "x"}], tmp_path / "a.png",
                    title="x")
    with pytest.raises(ValueError, match=r"records\[0\]"):
        plot_losses([{"loss": 1.0}], tmp_path / "a.png", title="x")
    with pytest.raises(TypeError, match="title"):
        plot_losses([{"step": 1, "loss": 1.0}], tmp_path / "a.png", title=None)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# summarize / Summary


def _known_records():
    # 25 records: loss = step, so the 10% windows are ceil(2.5) = 3 records long.
    # mlm_loss only on even steps (12 records: windows of 2); nsp_loss null at step 25.
    records = []
    for step in range(1, 26):
        record = {"step": step, "loss": float(step), "nsp_loss": 0.5, "lr": 1e-4}
        if step % 2 == 0:
            record["mlm_loss"] = 100.0 - step
        records.append(record)
    records[-1]["nsp_loss"] = None
    return records


def test_summarize_means(tmp_path):
    summary = summarize(_known_records(), model="bert-tiny", tokens=1_234_567, seconds=100.0,
                        backends={"attention": ["torch"], "layer_norm": "triton"},
                        device="cpu", precision="fp32", world_size=2,
                        extra={"checkpoint": tmp_path / "ckpt", "skipped_docs": 3})
    assert isinstance(summary, Summary)
    assert list(summary.first_losses) == ["loss", "nsp_loss", "mlm_loss"]
    assert summary.first_losses["loss"] == (1 + 2 + 3) / 3
    assert summary.final_losses["loss"] == (23 + 24 + 25) / 3
    assert summary.first_losses["mlm_loss"] == (98 + 96) / 2
    assert summary.final_losses["mlm_loss"] == (78 + 76) / 2
    assert summary.first_losses["nsp_loss"] == 0.5
    assert math.isnan(summary.final_losses["nsp_loss"])  # a null in the window shows
    assert summary.steps == 25
    assert summary.tokens_per_s == 1_234_567 / 100.0
    assert summary.backends == {"attention": ["torch"], "layer_norm": ["triton"]}

    text = summary.render()
    assert "bert-tiny" in text
    assert "  loss 2.00 -> 24.00" in text
    assert "mlm_loss 97.00 -> 77.00" in text
    assert "nsp_loss 0.50 -> nan" in text
    assert "tokens: 1,234,567" in text
    assert "tokens/s: 12,346" in text
    assert "attention torch" in text and "layer_norm triton" in text
    assert f"checkpoint: {tmp_path / 'ckpt'}" in text

    d = summary.to_dict()
    assert d["final_losses"]["nsp_loss"] is None and d["extra"]["checkpoint"] == str(tmp_path / "ckpt")
    json.dumps(d, allow_nan=False)  # strict JSON


def test_summarize_from_log(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 11):  # 10 records: windows of one record
            log.write({"step": step, "loss": 9.0 - 0.25 * step, "rtd_loss": float("nan")
                       if step == 1 else 0.5})
    summary = summarize(read_metrics(path), model="electra-tiny", tokens=0, seconds=0,
                        backends={}, device="cpu", precision="bf16", world_size=1)
    assert summary.first_losses["loss"] == 8.75 and summary.final_losses["loss"] == 6.5
    assert math.isnan(summary.first_losses["rtd_loss"]) and summary.final_losses["rtd_loss"] == 0.5
    assert summary.tokens_per_s == 0.0
    assert "loss 8.75 -> 6.50" in summary.render()


def test_summarize_empty_and_bad_input():
    kwargs = dict(model="m", tokens=10, seconds=1.0, backends=None, device="cpu",
                  precision="fp32", world_size=1)
    summary = summarize([], **kwargs)
    assert summary.steps == 0 and summary.first_losses == {} and "losses: none" in summary.render()
    for name, bad, error in [("tokens", -1, ValueError), ("seconds", float("nan"), ValueError),
                             ("world_size", 0, ValueError), ("model", 3, TypeError),
                             ("backends", ["torch"], TypeError), ("extra", [1], TypeError)]:
        with pytest.raises(error, match=name):
            summarize([], **{**kwargs, name: bad})
    with pytest.raises(TypeError, match=r"backends\['attention'\]"):
        summarize([], **{**kwargs, "backends": {"attention": [1]}})
    with pytest.raises(TypeError, match="records"):
        summarize({"step": 1}, **kwargs)
