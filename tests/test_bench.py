"""`bertfast bench`: the report built from a synthetic pytest-benchmark run (exact numbers), the small
preset's selection, one real run of the layer_norm benchmarks on this CPU, and the errors it gives.
Nothing here asserts a time."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bertfast import cli
from bertfast.bench import BenchError, KNOWN_OPS, find_benchmarks_dir, parse_ops, results, runner

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TRITON_REASON = "needs CUDA: the triton backend compiles for a GPU"


def _bench(fullname, group, params, median_s, **extra):
    return {"group": group, "name": fullname.split("::")[1], "fullname": fullname, "params": params,
            "param": "-".join(str(v) for v in params.values()),
            "stats": {"median": median_s, "rounds": 3, "min": median_s, "max": median_s},
            "extra_info": {"impl": params["impl"], **extra}}


ENV = {"device_type": "cpu", "device_name": "Test CPU", "torch": "2.13.0", "triton": "3.9.0",
       "transformers": "5.0", "bertfast": "0.1.0", "python": "3.11"}
LN_GROUP = "layer_norm fwd+bwd rows=512 N=768 residual+dropout float32"


def synthetic_raw() -> dict:
    """Two layer_norm implementations in one case; attention at seq 128 and 512, two implementations each."""
    ln = "benchmarks/test_layer_norm.py::test_layer_norm[fwd+bwd-N768-residual+dropout-{}]"
    att = "benchmarks/test_attention.py::test_attention[fwd-seq{}-ragged-p0-{}]"
    benches = [
        _bench(ln.format("torch-eager"), LN_GROUP, {"mode": "fwd+bwd", "hidden": 768, "impl": "torch-eager"}, 4e-3,
               mode="fwd+bwd", dtype="float32", gbs=1.5, peak_memory_mib=None, **ENV),
        _bench(ln.format("bertfast-torch"), LN_GROUP, {"mode": "fwd+bwd", "hidden": 768, "impl": "bertfast-torch"},
               2e-3, mode="fwd+bwd", dtype="float32", gbs=3.0, bertfast_backends=["layer_norm:torch"],
               **{"speedup_vs_torch-eager": 2.0}, **ENV),
    ]
    for seq, (math_s, ours_s) in {128: (6e-3, 3e-3), 512: (8e-3, 2e-3)}.items():
        group = f"attention fwd T={seq} B=4 ragged dropout=0 float32"
        for impl, median in (("bertfast-torch", ours_s), ("sdpa-math", math_s)):
            benches.append(_bench(att.format(seq, impl), group, {"mode": "fwd", "seq_len": seq, "impl": impl}, median,
                                  mode="fwd", seq_len=seq, dtype="float32", tflops=0.01, **ENV))
    return {"benchmarks": benches, "version": "5.3.1", "machine_info": {"python_version": "3.11"},
            "commit_info": {"id": "unversioned"}}


def synthetic_junit(path: Path) -> Path:
    triton = {"mode": "fwd+bwd", "hidden": 768, "impl": "bertfast-triton"}
    path.write_text(f"""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="benchmarks.test_layer_norm" name="test_layer_norm[fwd+bwd-N768-residual+dropout-torch-eager]"/>
<testcase classname="benchmarks.test_layer_norm" name="test_layer_norm[fwd+bwd-N768-residual+dropout-bertfast-triton]">
<properties><property name="bench_params" value='{json.dumps(triton)}'/></properties>
<skipped type="pytest.skip" message="{TRITON_REASON}">benchmarks/test_layer_norm.py:90: skip</skipped></testcase>
<testcase classname="benchmarks.test_attention" name="test_attention[fwd-seq128-ragged-p0-sdpa-cudnn]">
<skipped type="pytest.skip" message="needs CUDA: SDPA's CUDNN_ATTENTION backend has CUDA kernels only">x</skipped>
</testcase>
<testcase classname="benchmarks.test_attention" name="test_attention[fwd-seq512-ragged-p0-sdpa-cudnn]">
<skipped type="pytest.skip" message="needs CUDA: SDPA's CUDNN_ATTENTION backend has CUDA kernels only">x</skipped>
</testcase>
<testcase classname="benchmarks.test_attention" name="test_attention[fwd-seq128-ragged-p0-hf-eager]">
<failure message="AssertionError: hf-eager: non-finite output">trace</failure></testcase>
</testsuite></testsuites>""")
    return path


@pytest.fixture(name="report")
def report_fixture(tmp_path):
    return results.build_report(synthetic_raw(), synthetic_junit(tmp_path / "junit.xml"),
                                command="bertfast bench --preset small", preset="small", source_dir=ROOT,
                                pytest_exit_code=1, deselected=7)


def test_rows_speedups_and_baselines(report):
    rows = {(r["op"], r["case"], r["impl"]): r for r in report["rows"]}
    ours = rows[("layer_norm", LN_GROUP.removeprefix("layer_norm "), "bertfast-torch")]
    assert ours["median_ms"] == pytest.approx(2.0, rel=1e-12)
    assert ours["speedup_vs"] == {"torch-eager": pytest.approx(2.0, rel=1e-12)}
    assert ours["bertfast_backends"] == ["layer_norm:torch"] and ours["gbs"] == 3.0
    assert rows[("layer_norm", LN_GROUP.removeprefix("layer_norm "), "torch-eager")]["speedup_vs"] == {}
    att = [r for r in report["rows"] if r["op"] == "attention" and r["impl"] == "bertfast-torch"]
    assert [(r["seq_len"], r["speedup_vs"]["sdpa-math"]) for r in att] == [(128, pytest.approx(2.0)),
                                                                           (512, pytest.approx(4.0))]
    assert report["baselines"] == {"layer_norm": ["torch-eager"], "attention": ["sdpa-math"]}


def test_not_measured_and_failed_are_named(report):
    skipped = {(e["op"], e["impl"]): e for e in report["not_measured"]}
    assert skipped[("layer_norm", "bertfast-triton")] == {"op": "layer_norm", "impl": "bertfast-triton",
                                                           "reason": TRITON_REASON, "cases": 1}
    # no bench_params property: the implementation is the longest known name the id ends with, else the id
    assert skipped[("attention", "fwd-seq128-ragged-p0-sdpa-cudnn")]["cases"] == 1
    assert "bertfast-triton (layer_norm)" in report["gpu_summary"]
    assert [c["name"] for c in report["failed"]] == ["test_attention[fwd-seq128-ragged-p0-hf-eager]"]
    assert report["failed"][0]["message"] == "AssertionError: hf-eager: non-finite output"


def test_markdown_table(report):
    text = results.render_markdown(report)
    assert "### layer_norm" in text and "### attention" in text
    header = next(line for line in text.splitlines() if line.startswith("| case") and "vs torch-eager" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["case", "impl", "ms", "throughput", "peak MiB",
                                                                 "vs torch-eager"]
    ours = next(line for line in text.splitlines() if "| bertfast-torch" in line and "GB/s" in line)
    assert [c.strip() for c in ours.strip("|").split("|")][2:] == ["2.00", "3.00 GB/s", "-", "2.00x"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if "T=512" in line]
    assert [c[1:3] + c[5:] for c in cells] == [["bertfast-torch", "2.00", "4.00x"], ["sdpa-math", "8.00", "-"]]
    assert f"- layer_norm / bertfast-triton: {TRITON_REASON} (1 case)" in text
    assert "### Failed" in text and "Test CPU" in text


def test_files_written(report, tmp_path):
    written = results.write_report(report, tmp_path / "out")
    assert set(written) == {"json", "csv", "md", "png"}
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert len(lines) == 6
    ours = next(r for r in lines if r["op"] == "layer_norm" and r["impl"] == "bertfast-torch")
    assert float(ours["speedup_vs_torch-eager"]) == pytest.approx(2.0) and float(ours["median_ms"]) == 2.0
    assert json.loads(ours["params"]) == {"mode": "fwd+bwd", "hidden": 768, "impl": "bertfast-torch"}
    doc = json.loads(written["json"].read_text())
    assert doc["environment"]["device_name"] == "Test CPU" and doc["environment"]["torch"] == "2.13.0"
    assert doc["commit"] is None or len(doc["commit"]) == 40  # git rev-parse HEAD where this is a checkout
    assert {"rows", "skipped", "not_measured", "environment", "timestamp", "command", "nvidia_driver"} <= set(doc)
    assert {"impl": "bertfast-triton", "reason": TRITON_REASON}.items() <= doc["skipped"][0].items()
    assert doc["deselected_by_preset"] == 7 and len(doc["not_measured"]) == 3
    assert not [p for p in written["md"].parent.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave none


def test_plot_points(report):
    per_op, per_len = results.speedup_points(report)
    assert [(op, base, impl, pytest.approx(v)) for op, base, impl, v in per_op] == [
        ("layer_norm", "torch-eager", "bertfast-torch", 2.0), ("attention", "sdpa-math", "bertfast-torch", 8 ** 0.5)]
    assert [(op, seq, pytest.approx(v)) for op, _, _, seq, v in per_len] == [("attention", 128, 2.0),
                                                                            ("attention", 512, 4.0)]


def test_empty_run_still_reports(tmp_path):
    report = results.build_report({}, None, command="bertfast bench", preset="default",
                                  missing_ops={"pretraining": "not measured: no file"})
    written = results.write_report(report, tmp_path)
    assert "No case was timed." in written["md"].read_text()
    assert "- pretraining: not measured: no file" in written["md"].read_text()


# ------------------------------------------------------------------------------------------------
# Requests it refuses


def test_parse_ops():
    assert parse_ops(None) == list(KNOWN_OPS)
    assert parse_ops("layer_norm, attention,layer_norm") == ["layer_norm", "attention"]
    with pytest.raises(BenchError, match="--ops: unknown op 'flash'; known ops: attention, layer_norm"):
        parse_ops("layer_norm,flash")


def test_cli_unknown_op_names_ops(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--ops", "layernorm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ops" in err and "'layernorm'" in err and "layer_norm" in err


def test_cli_flag_mixups(capsys):
    for argv, expected in ((["bench", "--quick"], "--quick goes only with --static"),
                           (["bench", "--static", "--ops", "attention"], "--ops applies to the timed benchmarks")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert expected in capsys.readouterr().err


def test_missing_benchmarks_dir(tmp_path, monkeypatch, capsys):
    with pytest.raises(BenchError, match="not a bertfast benchmarks folder"):
        find_benchmarks_dir(tmp_path)
    monkeypatch.setattr(runner, "package_root", lambda: tmp_path)  # an installed wheel: no benchmarks beside it
    with pytest.raises(BenchError, match="needs the source tree.*--benchmarks PATH"):
        find_benchmarks_dir()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ops", "layer_norm"])
    assert "bench needs the source tree" in capsys.readouterr().err
    assert find_benchmarks_dir(BENCHMARKS) == BENCHMARKS.resolve()


def test_static_report_is_an_alias(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "static_report", lambda **kw: calls.append(kw) or 0)
    assert cli.main(["static-report", "--quick", "--part", "families", "--jobs", "2"]) == 0
    assert cli.main(["bench", "--static", "--quick", "--part", "families", "--jobs", "2"]) == 0
    first, second = calls
    assert first.pop("command") == "bertfast static-report" and second.pop("command") == "bertfast bench --static"
    assert first == second == {"quick": True, "part": "families", "jobs": 2, "out": None}


# ------------------------------------------------------------------------------------------------
# The small preset and one real run


def _load(monkeypatch, name: str):
    """A benchmarks/ file as a module of its own (conftest imports flops from its folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _items(module, function: str) -> list:
    """Stand-ins for the pytest items of one parametrized benchmark function (what the hook reads)."""
    argnames = [a.strip() for a in getattr(module, function).pytestmark[0].args[0].split(",")]
    path = BENCHMARKS / f"{module.__name__.split('_under_test')[0].removeprefix('bench_')}.py"
    return [SimpleNamespace(path=path, originalname=function, name=f"{function}[{p.id}]", module=module,
                            callspec=SimpleNamespace(params=dict(zip(argnames, p.values))))
            for p in module.CASES]


def test_small_preset_keeps_one_case_per_function_with_every_impl(monkeypatch):
    conftest = _load(monkeypatch, "conftest")
    layer_norm, attention = _load(monkeypatch, "test_layer_norm"), _load(monkeypatch, "test_attention")
    items = _items(layer_norm, "test_layer_norm") + _items(attention, "test_attention")
    kept = [item.name for item in conftest.small_selection(items)]
    assert kept == [f"test_layer_norm[fwd+bwd-N768-residual+dropout-{impl}]" for impl in layer_norm.IMPLS] + [
        f"test_attention[fwd+bwd-seq128-ragged-p0.1-{impl}]" for impl in attention.IMPLS]
    # a file's own SMALL_PRESET wins, parameter by parameter; a tuple keeps each of its values
    monkeypatch.setattr(layer_norm, "SMALL_PRESET", {"hidden": (768, 1024), "mode": "fwd"}, raising=False)
    kept = [item.name for item in conftest.small_selection(_items(layer_norm, "test_layer_norm"))]
    assert kept == [f"test_layer_norm[fwd-N{n}-residual+dropout-{impl}]" for n in (768, 1024)
                    for impl in layer_norm.IMPLS]


def test_preset_value_is_checked(monkeypatch):
    conftest = _load(monkeypatch, "conftest")
    monkeypatch.delenv("BERTFAST_BENCH_PRESET", raising=False)
    assert conftest.preset() == "default"
    monkeypatch.setenv("BERTFAST_BENCH_PRESET", "small")
    assert conftest.preset() == "small"
    monkeypatch.setenv("BERTFAST_BENCH_PRESET", "tiny")
    with pytest.raises(pytest.UsageError, match="BERTFAST_BENCH_PRESET must be one of small, default, got 'tiny'"):
        conftest.preset()


def _cells(text: str) -> list[list[str]]:
    """The cells of every Markdown table line in ``text``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]


def doc_skipped(out: Path) -> list[dict]:
    return json.loads((out / "bench.json").read_text())["skipped"]


def test_real_run_layer_norm_small(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--ops", "layer_norm", "--preset", "small", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = printed[printed.index("## bertfast bench"):]
    rows = [line for line in table.splitlines() if line.startswith("| fwd+bwd")]
    assert {line.split("|")[2].strip() for line in rows} == {"torch-eager", "bertfast-torch"}
    assert "vs torch-eager" in table
    assert "bertfast-triton (layer_norm)" in table  # named as not measured on a CPU
    assert "- layer_norm / bertfast-triton: needs CUDA" in table
    # the small preset's one case, all six implementations: two timed, four skipped on a CPU
    assert sorted(s["impl"] for s in doc_skipped(out)) == ["bertfast-cuda", "bertfast-triton", "liger",
                                                           "torch-compile"]
    doc = json.loads((out / "bench.json").read_text())
    # the file's 3 modes x 4 hidden sizes x 2 variants x 6 implementations, less the one case kept
    assert doc["preset"] == "small" and doc["pytest_exit_code"] == 0 and doc["deselected_by_preset"] == 144 - 6
    assert {r["impl"] for r in doc["rows"]} == {"torch-eager", "bertfast-torch"}
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_case_exits_1_and_still_prints_the_table(tmp_path, capsys):
    """A stand-in benchmarks folder (no torch): one case passes, one fails, one op has no file."""
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "flops.py").write_text("")
    (fake / "conftest.py").write_text("")
    (fake / "test_layer_norm.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('impl', ['torch-eager', 'bertfast-torch'])\n"
        "def test_layer_norm(benchmark, impl):\n"
        "    benchmark.group = 'layer_norm tiny'\n"
        "    benchmark.extra_info['impl'] = impl\n"
        "    benchmark.pedantic(lambda: None, rounds=2)\n"
        "    assert impl != 'bertfast-torch', 'broken on purpose'\n")
    out = tmp_path / "out"
    code = cli.main(["bench", "--ops", "layer_norm,pretraining", "--benchmarks", str(fake), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    table = printed[printed.index("## bertfast bench"):]
    assert ["tiny", "torch-eager"] in [cells[:2] for cells in _cells(table)]
    assert "### Failed" in table and "test_layer_norm[bertfast-torch]: AssertionError: broken on purpose" in table
    assert f"- pretraining: not measured: {fake / 'test_pretraining.py'} is not in this tree" in table
    doc = json.loads((out / "bench.json").read_text())
    assert doc["pytest_exit_code"] == 1 and [f["name"] for f in doc["failed"]] == ["test_layer_norm[bertfast-torch]"]
