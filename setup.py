"""bertfast: fast BERT-family encoders (BERT, ALBERT, RoBERTa, ELECTRA) for PyTorch.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``bertfast.kernels``.
The compiled parts (``csrc/``) are built here with ninja:

- ``bertfast._C``    C++ CPU kernels of the data pipeline; always built (any C++17 compiler).
- ``bertfast._cuda`` CUDA kernels; built when ``nvcc`` is found, for sm_80 and sm_90 plus PTX.
  ``BERTFAST_CUDA=1`` requires it (no nvcc is then an error), ``BERTFAST_CUDA=0`` skips it.

Neither links libtorch: they take numpy buffers / raw pointers, so one build serves every torch
version. Without nvcc, ``pip install .`` still succeeds; ``bertfast info`` says what was built and
why something was not (``_build.json``, written next to the modules). A compile error is an error.
"""

import json
import os
import shlex
import shutil
import subprocess
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")  # machine code for each; PTX of the last, so newer GPUs JIT it


def _sources(folder, suffixes):
    path = os.path.join("csrc", folder)
    return sorted(os.path.join(path, f) for f in os.listdir(os.path.join(HERE, path)) if f.endswith(suffixes))


def find_nvcc():
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def cuda_decision():
    """(build _cuda?, nvcc path or None, reason when not built)."""
    want = os.environ.get("BERTFAST_CUDA", "").strip()
    if want not in ("", "0", "1"):
        raise SystemExit(f"BERTFAST_CUDA must be 0, 1 or unset, got {want!r}")
    if want == "0":
        return False, None, "skipped: BERTFAST_CUDA=0"
    nvcc = find_nvcc()
    if nvcc is None:
        if want == "1":
            raise SystemExit("BERTFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return False, None, "not built: nvcc not found at build time (set CUDA_HOME, or BERTFAST_CUDA=1 to require it)"
    return True, nvcc, None


def find_ninja():
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package, a build requirement in pyproject.toml

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        raise SystemExit("building bertfast needs ninja: `pip install ninja` (or your system's package)")


class NinjaBuildExt(build_ext):
    """Writes one build.ninja for every extension and runs it with as many jobs as there are cores.

    Objects and the ninja file live in build_temp, so a rebuild recompiles only what changed.
    """

    def build_extensions(self):
        import pybind11

        os.makedirs(self.build_temp, exist_ok=True)
        py_include = sysconfig.get_paths()["include"]
        includes = [pybind11.get_include(), py_include, os.path.join(HERE, "csrc")]
        cxx = os.environ.get("CXX", "c++")
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
        lines = [
            "ninja_required_version = 1.3",
            f"builddir = {_escape(os.path.abspath(self.build_temp))}",  # .ninja_log/.ninja_deps live there
            f"cxx = {cxx}",
            f"cflags = {' '.join(cflags)} {' '.join('-I' + shlex.quote(i) for i in includes)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $cxx -shared $in -o $out",
            "  description = link $out",
        ]
        nvcc = self.nvcc
        if nvcc:
            archs = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS)
            archs += f" -gencode arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"
            names = " ".join([f"sm_{a}" for a in CUDA_ARCHS] + [f"compute_{CUDA_ARCHS[-1]}"])
            lines += [
                f"nvcc = {nvcc}",
                f"nvflags = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden --expt-relaxed-constexpr "
                # --threads 0: the architectures of one file compile in parallel (the GPU check's build budget)
                f"--threads 0 -lineinfo {archs} -DBERTFAST_CUDA_ARCHS='\"{names}\"' -I{shlex.quote(os.path.join(HERE, 'csrc'))}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
                # nvcc links the CUDA module: it knows where its toolkit is (nvcc may be a wrapper
                # script) and links the static runtime, so the module needs only the driver
                # (libcuda) at run time, whatever CUDA runtime torch brings.
                "rule nvlink",
                "  command = $nvcc -shared -cudart static $in -o $out",
                "  description = link $out",
            ]
        for ext in self.extensions:
            objects = []
            for src in ext.sources:
                obj = os.path.join(self.build_temp, src + ".o")
                rule = "nvcc" if src.endswith(".cu") else "cxx"
                lines.append(f"build {_escape(obj)}: {rule} {_escape(os.path.join(HERE, src))}")
                objects.append(obj)
            target = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            link = "nvlink" if any(src.endswith(".cu") for src in ext.sources) else "link"
            lines.append(f"build {_escape(target)}: {link} {' '.join(_escape(o) for o in objects)}")
        ninja_file = os.path.join(self.build_temp, "build.ninja")
        with open(ninja_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([find_ninja(), "-f", ninja_file, "-j", jobs], check=True)
        self._write_build_info()

    def _write_build_info(self):
        """What was built and why not, next to the modules, for `bertfast info`."""
        info = {"_C": "built", "_cuda": self.cuda_reason or "built"}
        if self.nvcc:
            info["nvcc"] = self.nvcc  # the compiler it was built with (the GPU check reports its version)
        folders = {os.path.dirname(self.get_ext_fullpath("bertfast._C"))}
        if self.inplace or getattr(self, "editable_mode", False):  # editable: the modules land in the tree
            folders.add(os.path.join(HERE, "bertfast"))
        for folder in folders:
            with open(os.path.join(folder, "_build.json"), "w") as f:
                json.dump(info, f, indent=1)


def _escape(path):
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


EXTENSIONS = [
    Extension("bertfast._C", sources=_sources("cpu", (".cpp",))),
    Extension("bertfast._cuda", sources=_sources("cuda", (".cpp", ".cu"))),
]


class BuildExt(NinjaBuildExt):
    """Decides at build time whether _cuda is built (not at import of setup.py: egg_info and sdist
    need no compiler) and drops it from the list when it is not."""

    def run(self):
        build_cuda, nvcc, reason = cuda_decision()
        self.nvcc, self.cuda_reason = nvcc, reason
        if not build_cuda:
            self.extensions = [e for e in self.extensions if e.name != "bertfast._cuda"]
        super().run()
        if self.inplace:  # setuptools builds with inplace off, then copies the modules into the tree
            self._write_build_info()


setup(
    name="bertfast",
    version=VERSION,
    description="Fused kernels and drop-in modules for BERT, ALBERT, RoBERTa and ELECTRA",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every package under bertfast/ (a new one cannot be forgotten: bertfast.bench once was), plus the
    # Triton kernels, which live in kernels/ and install as bertfast.kernels.
    packages=find_packages(include=["bertfast", "bertfast.*"]) + ["bertfast.kernels"],
    package_dir={"bertfast.kernels": "kernels"},
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        # 2.13.0 (the CPU build CI installs first) satisfies this range.
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # the loss plot of `bertfast pretrain`
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "hf": ["transformers>=4.48"],
        "test": [
            "transformers>=4.48",
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "pybind11>=2.10",  # tests/test_cuda_emulated.py builds the CUDA kernels against the emulation
        ],
        "dev": [
            "transformers>=4.48",
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "pybind11>=2.10",
            "ninja",
        ],
    },
    entry_points={"console_scripts": ["bertfast=bertfast.cli:main"]},
)
