"""Build csrc/cuda's real sources with g++ against the CUDA emulation (emu.h, emu.cpp) into a Python
extension that runs the kernels on the host: ``build(out_dir)`` returns its path, ``load(path)`` imports it
(as ``bertfast._cuda``'s stand-in; it exposes the same functions).

Each ``.cu`` file is copied with two rewrites that a macro cannot do (line numbers are kept, and a ``#line``
directive points compiler messages at the real file):

- ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` -> ``emu::launch("file:line kernel", kernel,
  emu::Config(grid, block, ...), args)``;
- ``__shared__ T name[dims];`` -> ``auto& name = emu::shared<T[dims]>([] {});`` and
  ``extern __shared__ T name[];`` -> ``T* const name = static_cast<T*>(emu::detail::dynamic_shared());``.

The ``*_bind.cpp`` files and ``module.cpp`` compile unchanged. Kernel files get ``-fsanitize=alignment``
(emu.cpp turns its reports into "misaligned address" faults, as a GPU would).

Command line (to debug a kernel by hand): ``python tests/cuda_emulation/build.py OUT_DIR [CSRC_DIR]``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden"]
KERNEL_FLAGS = ["-fsanitize=alignment", '-DBERTFAST_CUDA_ARCHS="emulated on the host (tests/cuda_emulation)"']

# A string or character literal (kept) or a comment (blanked): searches must not match inside comments.
_LITERAL_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)
_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;\[\]{}]+?)\s*\b(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"\b__shared__\s+([^;\[\]{}]+?)\s*\b(\w+)\s*((?:\[[^\];{}]*\])*)\s*;")
_ALIGN = re.compile(r"__align__\s*\(\s*\d+\s*\)")


def missing_tools() -> str | None:
    """Why the emulated module cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's development headers (Python.h) are missing"
    return None


def _code_only(src: str) -> str:
    """``src`` with comments blanked (same length, newlines kept)."""
    return _LITERAL_OR_COMMENT.sub(
        lambda m: m.group() if m.group()[0] in "\"'" else re.sub(r"[^\n]", " ", m.group()), src)


def _replace(src: str, edits: list[tuple[int, int, str]]) -> str:
    """Replaces the spans [start, end) of ``src`` (in order, disjoint), padding each replacement with the
    newlines it lost so that every later line keeps its number."""
    out, pos = [], 0
    for start, end, text in edits:
        lost = src.count("\n", start, end) - text.count("\n")
        assert lost >= 0, text
        out += [src[pos:start], text, "\n" * lost]
        pos = end
    return "".join(out + [src[pos:]])


def _matching_paren(code: str, at: int) -> int:
    depth = 0
    for i in range(at, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses")


def _callee_start(code: str, end: int) -> int:
    """Start of the kernel expression ending at ``end``: a name, maybe qualified, maybe with template
    arguments (``ns::kernel<T, decltype(c)::value>``)."""
    i = end
    if code[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(code[i], 0)
            if depth == 0:
                break
    while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_:"):
        i -= 1
    return i


def _line(src: str, at: int) -> int:
    return src.count("\n", 0, at) + 1


def rewrite(src: str, name: str) -> str:
    """The rewrites of the module docstring; ``name`` (the file's name) goes into the launch sites."""
    code, edits, at = _code_only(src), [], 0
    while (open_ := code.find("<<<", at)) >= 0:
        close = code.find(">>>", open_)
        callee_end = len(code[:open_].rstrip())
        start = _callee_start(code, callee_end)
        paren = close + 3 + len(code[close + 3:]) - len(code[close + 3:].lstrip())
        if close < 0 or start == callee_end or not code.startswith("(", paren):
            raise ValueError(f"{name}:{_line(src, open_)}: cannot parse this kernel launch")
        end = _matching_paren(code, paren)
        callee, args = src[start:callee_end], src[paren + 1:end]
        site = f"{name}:{_line(src, open_)} {' '.join(callee.split())}"
        text = (f'emu::launch("{site}", {callee}{src[callee_end:open_]}, emu::Config({src[open_ + 3:close]})'
                + (f", {args})" if args.strip() else ")"))
        edits.append((start, end + 1, text))
        at = end + 1
    src = _replace(src, edits)

    code, edits = _code_only(src), []
    for m in _EXTERN_SHARED.finditer(code):
        t = _ALIGN.sub("", m.group(1)).strip()
        edits.append((m.start(), m.end(),
                      f"{t}* const {m.group(2)} = static_cast<{t}*>(emu::detail::dynamic_shared());"))
    src = _replace(src, edits)

    code, edits = _code_only(src), []
    for m in _SHARED.finditer(code):
        t = _ALIGN.sub("", m.group(1)).strip()
        edits.append((m.start(), m.end(), f"auto& {m.group(2)} = emu::shared<{t}{m.group(3)}>([] {{}});"))
    src = _replace(src, edits)

    code = _code_only(src)
    for token in ("<<<", "__shared__"):
        if token in code:
            raise ValueError(f"{name}:{_line(src, code.index(token))}: cannot rewrite this {token}")
    return src


def _compile(source: Path, obj: Path, flags: list[str]) -> None:
    result = subprocess.run(["g++", *FLAGS, *flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"g++ failed on {source}:\n{result.stderr[-6000:]}")


def build(out_dir: str | os.PathLike, csrc: str | os.PathLike | None = None, jobs: int | None = None) -> Path:
    """Compiles ``csrc``/cuda (default: the repository's) with the emulation into ``out_dir``; returns the
    extension's path. Raises RuntimeError with the compiler's message when a file does not compile."""
    import pybind11

    csrc = Path(csrc) if csrc is not None else CSRC
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{csrc}", f"-I{csrc / 'cuda'}",
                f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
    units = []  # (source, flags)
    for cu in sorted((csrc / "cuda").glob("*.cu")) + [HERE / "selftest.cu"]:
        host = out / (cu.stem + ".cu.cpp")
        host.write_text(f'#include "emu.h"\n#line 1 "{cu}"\n' + rewrite(cu.read_text(), cu.name))
        units.append((host, KERNEL_FLAGS))
    # The pybind11 side as one unit: pybind11's headers are most of the compile time.
    bindings = out / "bindings.cpp"
    cpps = sorted((csrc / "cuda").glob("*.cpp"), key=lambda p: p.name == "module.cpp")
    bindings.write_text("".join(f'#include "{cpp}"\n' for cpp in cpps))
    units.append((bindings, []))
    units.append((HERE / "emu.cpp", []))
    objs = [out / f"{source.name}.o" for source, _ in units]
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        # the largest files first: they bound the wall time
        order = sorted(range(len(units)), key=lambda i: -units[i][0].stat().st_size)
        for f in [pool.submit(_compile, units[i][0], objs[i], includes + units[i][1]) for i in order]:
            f.result()
    target = out / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    result = subprocess.run(["g++", "-shared", *map(str, objs), "-o", str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking {target} failed:\n{result.stderr[-6000:]}")
    return target


def load(path: str | os.PathLike):
    """Imports the built extension under a name of its own (bertfast._cuda stays untouched)."""
    spec = importlib.util.spec_from_file_location("bertfast_emulated._cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [CSRC_DIR]")
    print(build(*sys.argv[1:]))
