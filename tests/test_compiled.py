"""The compiled parts: built by the install (a C++ or CUDA compile error fails the install, and so
CI), linking no libtorch (one build for every torch), and reported by `bertfast info`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bertfast import info
from bertfast.ops import compiled


def test_cpp_data_pipeline_is_built():
    module, why = compiled.load("_C")
    assert module is not None, why


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine: _cuda is not built here")
def test_cuda_module_is_built_wherever_nvcc_is():
    module, why = compiled.load("_cuda")
    assert module is not None, why
    assert module.runtime_version() >= 11000
    assert module.compiled_archs() == "sm_80 sm_90 compute_90"


@pytest.mark.parametrize("name", ["_C", "_cuda"])
def test_modules_link_no_libtorch(name):
    module, why = compiled.load(name)
    if module is None:
        pytest.skip(why)
    if shutil.which("readelf") is None:
        pytest.skip("readelf not found")
    dynamic = subprocess.run(["readelf", "-d", module.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    assert not [lib for lib in needed if "torch" in lib or "c10" in lib or "cudart.so" in lib], needed


def test_missing_module_reports_the_recorded_reason(monkeypatch):
    compiled.load.cache_clear()
    monkeypatch.setattr(compiled, "_build_record", lambda: {"_nothing": "not built: nvcc not found at build time"})
    try:
        module, why = compiled.load("_nothing")
        assert module is None and why == "bertfast._nothing not built: nvcc not found at build time"
    finally:
        compiled.load.cache_clear()


def test_info_reports_both_compiled_parts():
    report = info.collect()
    assert set(report["compiled"]) == {"bertfast._C", "bertfast._cuda"}
    text = info.render(report)
    assert "bertfast._C" in text and "bertfast._cuda" in text


def test_cuda_kernels_have_machine_code_for_sm80_and_sm90_and_do_not_spill():
    """Every kernel of csrc/cuda/*.cu, for both architectures: no stack frame (spills), no local memory."""
    from bertfast.kernel_report import cuobjdump_path

    module, why = compiled.load("_cuda")
    if module is None:
        pytest.skip(why)
    tool = cuobjdump_path()
    if tool is None:
        pytest.skip("cuobjdump not found (triton's package carries one)")
    dump = subprocess.run([tool, "--dump-resource-usage", module.__file__], capture_output=True, text=True,
                          check=True).stdout
    kernels: dict[str, set[str]] = {}
    arch = source = function = None
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("= ")[1]
        elif line.startswith("identifier = "):
            source = line.split("= ")[1]
        elif line.startswith("Function "):
            function = line.removeprefix("Function ").rstrip(":")
        elif line.startswith("REG:") and source and "/csrc/cuda/" in source:
            usage = dict(field.split(":") for field in line.split() if ":" in field)
            assert usage["STACK"] == "0" and usage["LOCAL"] == "0", f"{function} on {arch} spills: {line}"
            kernels.setdefault(function, set()).add(arch)
    assert len(kernels) > 50, f"found only {len(kernels)} kernels of csrc/cuda in the build"
    missing = {k: a for k, a in kernels.items() if a != {"sm_80", "sm_90"}}
    assert not missing, f"kernels without sm_80 + sm_90 machine code: {missing}"
