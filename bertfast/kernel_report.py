"""Static report of the attention kernels: compiled ahead of time for sm_80 and sm_90 on any machine.

Every configuration the dispatcher may launch (``bertfast.kernels.attention.candidate_configs`` for
each kind, BLOCK_D, dtype and flag combination) is compiled with ``triton.compile`` for
``GPUTarget("cuda", 80 | 90, 32)``; no GPU is needed. For each cubin we read, with the
``cuobjdump`` shipped in triton's package:
    regs    registers per thread (REG)
    spill   stack bytes per thread (STACK; a Triton kernel has no local arrays, so stack = spills)
    smem    shared memory per block (the compiled metadata's ``shared``), against the card's limit
    hgmma   whether the SASS holds Hopper's warpgroup MMA (HGMMA), sm_90 only
``n_regs``/``n_spills`` of a compiled kernel are filled only when it is loaded on a GPU, hence cuobjdump.

The kernels are specialized as the JIT would specialize them for one representative problem,
padded (B, T, H, D) = (8, 512, 12, BLOCK_D) or packed with the same sizes, dropout 0.1 when on:
pointers 16-byte aligned, ints that are multiples of 16 marked divisible by 16, ints equal to 1 made
constants, unused pointers (mask, cu_seqlens, seed) constexpr None. Each kernel is also compiled for
an unaligned head dim (``aligned=False``): the dispatcher runs every multiple of 8 up to 128, and a
head dim such as 40 (BLOCK_D 64) gives the JIT no divisibility hint on head_dim nor on the head and
row strides, so its loads lose their vector width and their async copies. That problem is
(B, T, H, D) = (8, 512, 9, UNALIGNED_HEAD_DIM[BLOCK_D]): H odd, so the row stride H*D is a multiple
of 8 but not of 16, as is the head stride D.

Triton is imported inside the functions: ``import bertfast`` never needs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field

ARCHS = (80, 90)
BLOCK_DS = (16, 32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
KINDS = ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")

# Most dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_KERNEL_NAMES = {"fwd": "_attn_fwd_kernel", "bwd_delta": "_attn_bwd_delta_kernel",
                 "bwd_dkdv": "_attn_bwd_dkdv_kernel", "bwd_dq": "_attn_bwd_dq_kernel"}
# The flags each kernel takes, in its signature order; packed (VARLEN) inputs take no key mask.
_FLAGS = {"fwd": ("VARLEN", "HAS_MASK", "DROPOUT"), "bwd_delta": ("VARLEN",),
          "bwd_dkdv": ("VARLEN", "HAS_MASK", "DROPOUT", "ATOMIC_DQ"), "bwd_dq": ("VARLEN", "HAS_MASK", "DROPOUT")}
# The delta kernel has one fixed launch (attention_bwd): BLOCK_M=64, Triton's default 4 warps, 3 stages.
_DELTA_CONFIG = (64, 0, 4, 3)
_TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# The representative problem whose argument values fix the specialization (see the module docstring).
_B, _T, _H, _DROPOUT_P = 8, 512, 12, 0.1
# The unaligned problem: per BLOCK_D, a head dim that is a multiple of 8 but not of 16 and rounds up to
# it (block_d(head_dim) == BLOCK_D), and an odd head count, so that no stride but the batch one is a
# multiple of 16 either.
UNALIGNED_HEAD_DIM = {16: 8, 32: 24, 64: 40, 128: 72}
_H_UNALIGNED = 9
ALIGNMENTS = (True, False)


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel kind, an arch, a dtype, BLOCK_D, a launch config and the flags set."""

    kind: str
    arch: int
    dtype: str
    block_d: int
    block_m: int
    block_n: int  # 0 for the delta kernel, which has no key loop
    num_warps: int
    num_stages: int
    flags: tuple[str, ...] = ()
    aligned: bool = True  # False: head dim and strides multiples of 8, not 16 (module docstring)

    @property
    def head_dim(self) -> int:
        return self.block_d if self.aligned else UNALIGNED_HEAD_DIM[self.block_d]

    @property
    def heads(self) -> int:
        return _H if self.aligned else _H_UNALIGNED

    @property
    def config(self) -> str:
        n = "-" if self.block_n == 0 else str(self.block_n)
        return f"{self.block_m}x{n} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class KernelRow:
    """What one compilation gives: resources per thread / per block, or the error that stopped it."""

    variant: Variant
    regs: int | None = None
    spill_bytes: int | None = None
    smem_bytes: int | None = None
    hgmma: bool | None = None  # None on sm_80 (no HGMMA there) or when the compile failed
    compile_s: float = 0.0
    error: str | None = field(default=None)

    @property
    def smem_over(self) -> bool:
        return self.smem_bytes is not None and self.smem_bytes > SMEM_LIMIT[self.variant.arch]

    def describe(self) -> str:
        v = self.variant
        return f"attention/{v.kind} sm_{v.arch} {v.dtype} BLOCK_D={v.block_d} {v.config}"

    @property
    def problems(self) -> list[str]:
        """Why this row fails the static check (empty when it passes)."""
        v, out = self.variant, []
        if self.error is not None:
            out.append(f"failed to compile: {self.error}")
            return out
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B/thread (regs {self.regs})")
        if self.smem_over:
            out.append(f"shared memory {self.smem_bytes / 1024:.1f} KB > {SMEM_LIMIT[v.arch] // 1024} KB (sm_{v.arch})")
        if v.kind == "fwd" and v.arch >= 90 and v.dtype != "float32" and not self.hgmma:
            out.append("sm_90 forward without HGMMA")
        return out


# ----------------------------------------------------------------------------------------------
# What to compile


def flag_sets(kind: str, which: str = "all") -> list[tuple[str, ...]]:
    """The flag combinations of ``kind`` the launchers can produce: "all", "extremes" (lightest and
    heaviest) or "heaviest". Heaviest = every flag a padded launch can set (mask, dropout, atomic dq)."""
    names = _FLAGS[kind]
    combos = []
    for bits in range(1 << len(names)):
        combo = tuple(n for i, n in enumerate(names) if bits >> i & 1)
        if "VARLEN" in combo and "HAS_MASK" in combo:
            continue  # packed inputs carry no key mask (attention_fwd / attention_bwd)
        combos.append(combo)
    lightest = ()
    heaviest = tuple(n for n in names if n != "VARLEN") if kind != "bwd_delta" else ("VARLEN",)
    if which == "all":
        return combos
    if which == "extremes":
        return [lightest, heaviest]
    if which == "heaviest":
        return [heaviest]
    raise ValueError(f"which: expected 'all', 'extremes' or 'heaviest', got {which!r}")


def variants(kinds=KINDS, archs=ARCHS, dtypes=DTYPES, block_ds=BLOCK_DS, flags: str = "extremes",
             alignments=ALIGNMENTS) -> list[Variant]:
    """Every (kind, arch, dtype, BLOCK_D, alignment, candidate config, flag combination) to compile."""
    import torch

    from bertfast.kernels.attention import block_d, candidate_configs

    out = []
    for kind in kinds:
        for arch in archs:
            for dtype in dtypes:
                for bd in block_ds:
                    for aligned in alignments:
                        head_dim = bd if aligned else UNALIGNED_HEAD_DIM[bd]
                        assert block_d(head_dim) == bd, (head_dim, bd)
                        if kind == "bwd_delta":
                            configs = [_DELTA_CONFIG]
                        else:  # the candidates the dispatcher would try for this head dim
                            configs = [(c.block_m, c.block_n, c.num_warps, c.num_stages)
                                       for c in candidate_configs(kind, head_dim, getattr(torch, dtype))]
                        for combo in flag_sets(kind, flags):
                            for m, n, w, s in configs:
                                out.append(Variant(kind, arch, dtype, bd, m, n, w, s, combo, aligned))
    return out


FULL_SCOPE = ("every candidate config of the four attention kernels, BLOCK_D 16/32/64/128, float16/bfloat16/float32, "
              "aligned and unaligned head dims, lightest and heaviest flags")
QUICK_SCOPE = ("the heaviest flags, aligned and unaligned head dims, every candidate config; the four kernels in "
               "bfloat16 at BLOCK_D 64 and 128, fwd, bwd_dkdv and bwd_dq in float32 at BLOCK_D 128, fwd and "
               "bwd_dkdv in float32 at BLOCK_D 64")

# What the quick subset compiles: (kinds, dtypes, BLOCK_Ds), each with the heaviest flags, both archs
# and both alignments.
QUICK_PARTS = ((KINDS, ("bfloat16",), (64, 128)),
               (("fwd", "bwd_dkdv", "bwd_dq"), ("float32",), (128,)),
               (("fwd", "bwd_dkdv"), ("float32",), (64,)))


def quick_variants() -> list[Variant]:
    """The subset the test compiles (QUICK_PARTS, 132 compiles; about 3 minutes on 2 busy cores with
    a cold Triton cache, under a minute with a warm one): the heaviest flags, sm_80 and sm_90,
    aligned and unaligned head dims, every candidate; the four kernels in bfloat16 at BLOCK_D 64 and
    128, the three with a dot in float32 at BLOCK_D 128, fwd and bwd_dkdv in float32 at BLOCK_D 64.
    float16 compiles as bfloat16 does, and the narrow BLOCK_Ds 16 and 32 have the most register
    room; the full report covers them."""
    out = []
    for kinds, dtypes, block_ds in QUICK_PARTS:
        out += variants(kinds=kinds, dtypes=dtypes, block_ds=block_ds, flags="heaviest")
    return out


# ----------------------------------------------------------------------------------------------
# Compiling one variant


def _launch_values(v: Variant) -> dict[str, object]:
    """The runtime arguments (no constexprs) the launcher would pass for the representative
    problem: a str is a pointer's element type, None a pointer left out."""
    from bertfast.kernels.rng import dropout_threshold

    varlen, mask, dropout = "VARLEN" in v.flags, "HAS_MASK" in v.flags, "DROPOUT" in v.flags
    dt = _TRITON_TYPE[v.dtype]
    D, H = v.head_dim, v.heads
    rows = _B * _T
    strides = {"b": 0 if varlen else _T * H * D, "t": H * D, "h": D}  # (B, T, H, D) contiguous, or packed
    vals: dict[str, object] = {
        "LSE": "fp32", "DELTA": "fp32", "MASK": "u8" if mask else None, "CU": "i32" if varlen else None,
        "SEED": "i64" if dropout else None, "DQ_ACC": "fp32" if "ATOMIC_DQ" in v.flags else dt,
        "stride_mb": _T if mask else 0, "lse_stride_h": rows, "lse_rows_per_batch": 0 if varlen else _T,
        "H": H, "seqlen_q": _T, "seqlen_k": _T, "head_dim": D, "scale": D**-0.5,
        "drop_threshold": dropout_threshold(_DROPOUT_P) if dropout else 0,
        "drop_scale": 1.0 / (1.0 - _DROPOUT_P) if dropout else 1.0,
        "n_m_blocks": -(-_T // v.block_m), "n_n_blocks": -(-_T // v.block_n) if v.block_n else 0,
    }
    for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
        vals[name] = dt
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        for axis, stride in strides.items():
            vals[f"stride_{t}{axis}"] = stride
    return vals


def _source(v: Variant):
    """(ASTSource, options) of one variant, specialized as the JIT would (module docstring)."""
    from bertfast.kernels import attention

    fn = getattr(attention, _KERNEL_NAMES[v.kind])
    constexprs = {name: name in v.flags for name in _FLAGS[v.kind]}
    constexprs.update(BLOCK_M=v.block_m, BLOCK_D=v.block_d)
    if v.kind != "bwd_delta":
        # float32 inputs take full float32 products, the others tf32 (attention._dot_precision)
        constexprs.update(BLOCK_N=v.block_n, DOT_PRECISION="ieee" if v.dtype == "float32" else "tf32")
    return _specialize(fn, _launch_values(v), constexprs), {"num_warps": v.num_warps, "num_stages": v.num_stages}


def _specialize(fn, values: dict, constexprs: dict):
    """ASTSource of ``fn`` specialized as the JIT would for these runtime argument values: a str is
    a pointer's element type (16-byte aligned, as torch allocates), None a pointer left out; ints
    equal to 1 and None become constants, ints divisible by 16 get the divisibility hint."""
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = f"*{value}", [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def cuobjdump_path() -> str | None:
    """The cuobjdump shipped in triton's package (or named by TRITON_CUOBJDUMP_PATH), if any."""
    try:
        import triton
    except ImportError:
        return None
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def _cubin_resources(cubin: bytes, name: str, sass: bool) -> tuple[int, int, bool | None]:
    """(registers, stack bytes, HGMMA in the SASS or None) of kernel ``name`` in a cubin."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found in triton's package")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        # "Function <name>:\n  REG:128 STACK:0 SHARED:0 LOCAL:0 ..."
        found = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", usage)
        if found is None:
            raise RuntimeError(f"no resource usage for {name} in cuobjdump's output:\n{usage}")
        hgmma = None
        if sass:
            text = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
            hgmma = "HGMMA" in text
    return int(found.group(1)), int(found.group(2)), hgmma


def compile_variant(v: Variant) -> KernelRow:
    """Compile one variant for its arch and read its resources; a failure becomes the row's error."""
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        src, options = _source(v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # triton 3.9's TRITON_DEFAULT_FP_FUSION notice
            kernel = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=options)
        regs, stack, hgmma = _cubin_resources(kernel.asm["cubin"], kernel.metadata.name, sass=v.arch >= 90)
    except Exception as e:  # noqa: BLE001 - a failing config is a finding, reported in its row
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return KernelRow(v, compile_s=time.perf_counter() - start, error=message[:300])
    return KernelRow(v, regs=regs, spill_bytes=stack, smem_bytes=kernel.metadata.shared, hgmma=hgmma,
                     compile_s=time.perf_counter() - start)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _compile_one(item):
    return compile_launch(item) if isinstance(item, LaunchJob) else compile_variant(item)


def _cost(v) -> tuple:
    if isinstance(v, LaunchJob):
        return (False, 0, False, 0, False)
    return (v.dtype == "float32", v.block_d, v.kind == "bwd_dkdv", v.block_m * max(v.block_n, 1), not v.aligned)


def compile_all(todo: list, jobs: int | None = None, progress=None) -> list:
    """Compile every attention ``Variant`` (or family ``LaunchJob``), ``jobs`` at a time (default: one
    per CPU) in spawned processes; rows in the order of ``todo``. ``progress(done, total, row)`` is
    called as rows arrive."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs <= 1 or len(todo) <= 1:
        rows = []
        for row in map(_compile_one, todo):
            rows.append(row)
            if progress:
                progress(len(rows), len(todo), row)
        return rows
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent may hold torch / triton threads
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as ex:
        # the slowest compiles first (float32, wide tiles, the backward), so no worker idles at the end
        order = sorted(range(len(todo)), key=lambda i: _cost(todo[i]), reverse=True)
        futures = {ex.submit(_compile_one, todo[i]): i for i in order}
        rows: list[KernelRow | None] = [None] * len(todo)
        for done, future in enumerate(as_completed(futures), 1):
            row = future.result()
            rows[futures[future]] = row
            if progress:
                progress(done, len(todo), row)
    return rows  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# The other kernel families: each lists its launches (bertfast.kernels.aot.Launch)

# kernels/<family>.py modules with an ``aot_launches()``.
FAMILIES = ("layer_norm", "bias_gelu", "linear_gelu", "embedding", "vocab_loss", "rtd_loss")


@dataclass(frozen=True)
class LaunchJob:
    """One launch of one family compiled for one arch; picklable (the launch is found again by index)."""

    family: str
    index: int
    arch: int

    def launch(self):
        return family_launches(self.family)[self.index]


@dataclass(frozen=True)
class LaunchRow:
    job: LaunchJob
    kernel: str
    dtype: str
    config: str
    flags: tuple[str, ...]
    regs: int | None = None
    spill_bytes: int | None = None
    smem_bytes: int | None = None
    hgmma: bool | None = None
    compile_s: float = 0.0
    error: str | None = None

    @property
    def smem_over(self) -> bool:
        return self.smem_bytes is not None and self.smem_bytes > SMEM_LIMIT[self.job.arch]

    @property
    def problems(self) -> list[str]:
        if self.error is not None:
            return [f"failed to compile: {self.error}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B/thread (regs {self.regs})")
        if self.smem_over:
            out.append(f"shared memory {self.smem_bytes / 1024:.1f} KB > {SMEM_LIMIT[self.job.arch] // 1024} KB")
        return out

    def describe(self) -> str:
        return (f"{self.job.family}/{self.kernel} sm_{self.job.arch} {self.dtype} {self.config} "
                f"flags={'+'.join(self.flags) or '-'}")


def family_launches(family: str) -> list:
    """The launches kernels/<family>.py declares (``aot_launches()``)."""
    import importlib

    return list(importlib.import_module(f"bertfast.kernels.{family}").aot_launches())


def launch_jobs(families=FAMILIES, archs=ARCHS, dtypes=DTYPES) -> list[LaunchJob]:
    return [LaunchJob(family, i, arch) for family in families for i, launch in enumerate(family_launches(family))
            if launch.dtype in dtypes for arch in archs]


def quick_launch_jobs(families=FAMILIES) -> list[LaunchJob]:
    """What the test compiles of the families: for every kernel, block config and dtype in bfloat16
    and float32 (float16 compiles as bfloat16 does), the launch with the most flags set (the most
    live values), on both archs. ``bertfast static-report`` compiles every launch."""
    heaviest: dict[tuple, tuple[int, LaunchJob]] = {}
    for family in families:
        for i, launch in enumerate(family_launches(family)):
            if launch.dtype == "float16":
                continue
            for arch in ARCHS:
                key = (family, launch.kernel_name, launch.dtype, launch.config, arch)
                if key not in heaviest or len(launch.flags) > heaviest[key][0]:
                    heaviest[key] = (len(launch.flags), LaunchJob(family, i, arch))
    return [job for _, job in heaviest.values()]


def compile_launch(job: LaunchJob) -> LaunchRow:
    """Compile one family launch for its arch and read its resources; a failure becomes the row's error."""
    import triton
    from triton.backends.compiler import GPUTarget

    launch = job.launch()
    start = time.perf_counter()
    row = dict(job=job, kernel=launch.kernel_name, dtype=launch.dtype, config=launch.config, flags=tuple(launch.flags))
    try:
        src = _specialize(launch.kernel, launch.args, launch.constexprs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                    options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        regs, stack, hgmma = _cubin_resources(kernel.asm["cubin"], kernel.metadata.name, sass=job.arch >= 90)
    except Exception as e:  # noqa: BLE001 - a failing config is a finding, reported in its row
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return LaunchRow(**row, compile_s=time.perf_counter() - start, error=message[:300])
    return LaunchRow(**row, regs=regs, spill_bytes=stack, smem_bytes=kernel.metadata.shared, hgmma=hgmma,
                     compile_s=time.perf_counter() - start)


def launch_table(rows: list[LaunchRow]) -> str:
    out = ["| family | kernel | arch | dtype | config | flags | regs | spill bytes | smem KB | HGMMA |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error is not None:
            cells = ["**compile error**: " + r.error.replace("|", "/"), "", "", ""]
        else:
            smem = f"{r.smem_bytes / 1024:.1f}" + (f" **> {SMEM_LIMIT[r.job.arch] // 1024}**" if r.smem_over else "")
            hgmma = "-" if r.hgmma is None else ("yes" if r.hgmma else "no")
            cells = [str(r.regs), f"**{r.spill_bytes}**" if r.spill_bytes else "0", smem, hgmma]
        out.append("| " + " | ".join([r.job.family, r.kernel, f"sm_{r.job.arch}", r.dtype, r.config,
                                      "+".join(r.flags) or "-", *cells]) + " |")
    return "\n".join(out)


def launch_summary(rows: list[LaunchRow]) -> list[str]:
    lines = []
    for family in dict.fromkeys(r.job.family for r in rows):
        sub = [r for r in rows if r.job.family == family]
        ok = [r for r in sub if r.error is None]
        lines.append(f"{family}: {len(sub)} compiles, {len(sub) - len(ok)} failed, "
                     f"{sum(1 for r in ok if r.spill_bytes)} spill, {sum(1 for r in ok if r.smem_over)} over the "
                     f"shared-memory limit, max regs {max((r.regs for r in ok), default=0)}")
    return lines


# ----------------------------------------------------------------------------------------------
# The report


def missing_tools() -> str | None:
    """Why the static report cannot run here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if cuobjdump_path() is None:
        return "triton's package ships no executable cuobjdump (triton/backends/nvidia/bin/cuobjdump)"
    return None


def summary(rows: list[KernelRow]) -> list[str]:
    """One line per kernel kind, and one overall: configs, spills, shared-memory overruns, failures, HGMMA."""
    lines = []
    for kind in KINDS:
        sub = [r for r in rows if r.variant.kind == kind]
        if not sub:
            continue
        ok = [r for r in sub if r.error is None]
        spill = [r for r in ok if r.spill_bytes]
        over = [r for r in ok if r.smem_over]
        line = (f"{kind}: {len(sub)} configs, {len(sub) - len(ok)} failed to compile, {len(spill)} spill"
                f"{' (max ' + str(max(r.spill_bytes for r in spill)) + ' B)' if spill else ''}, "
                f"{len(over)} over the shared-memory limit, max regs {max((r.regs for r in ok), default=0)}")
        sm90 = [r for r in ok if r.variant.arch >= 90]
        if sm90 and kind != "bwd_delta":  # the delta kernel has no dot
            tc = [r for r in sm90 if r.variant.dtype != "float32"]
            f32 = [r for r in sm90 if r.variant.dtype == "float32"]
            line += f"; sm_90 HGMMA: {sum(bool(r.hgmma) for r in tc)}/{len(tc)} float16/bfloat16"
            line += f", {sum(bool(r.hgmma) for r in f32)}/{len(f32)} float32" if f32 else ""
        lines.append(line)
    fwd90 = [r for r in rows if r.variant.kind == "fwd" and r.variant.arch >= 90 and r.variant.dtype != "float32"]
    bad = [r for r in rows if r.problems]
    lines.append(f"total: {len(rows)} configs, {sum(1 for r in rows if r.error)} failed to compile, "
                 f"{sum(1 for r in rows if r.spill_bytes)} spill, {sum(1 for r in rows if r.smem_over)} over the "
                 f"shared-memory limit; every sm_90 float16/bfloat16 forward uses HGMMA: "
                 f"{'yes' if fwd90 and all(r.hgmma for r in fwd90) else 'no'}; {len(bad)} rows fail the check")
    return lines


def markdown_table(rows: list[KernelRow]) -> str:
    """The rows as a Markdown table (the columns of ``bertfast static-report``)."""
    out = ["| kernel | arch | dtype | BLOCK_D | head dim | config | flags | regs | spill bytes | smem KB | HGMMA |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.variant
        flags = "+".join(v.flags) or "-"
        if r.error is not None:
            cells = ["**compile error**: " + r.error.replace("|", "/"), "", "", ""]
        else:
            smem = f"{r.smem_bytes / 1024:.1f}" + (f" **> {SMEM_LIMIT[v.arch] // 1024}**" if r.smem_over else "")
            spill = f"**{r.spill_bytes}**" if r.spill_bytes else "0"
            hgmma = "-" if r.hgmma is None else ("yes" if r.hgmma else "no")
            cells = [str(r.regs), spill, smem, hgmma]
        head_dim = str(v.head_dim) if v.aligned else f"{v.head_dim} (unaligned)"
        out.append("| " + " | ".join([v.kind, f"sm_{v.arch}", v.dtype, str(v.block_d), head_dim, v.config, flags,
                                      *cells]) + " |")
    return "\n".join(out)


def problems(rows: list[KernelRow]) -> list[str]:
    """One line per row that fails the static check: a compile failure, a spill, too much shared memory,
    or an sm_90 float16/bfloat16 forward without HGMMA."""
    return [f"{r.variant.kind} sm_{r.variant.arch} {r.variant.dtype} BLOCK_D={r.variant.block_d} "
            f"head_dim={r.variant.head_dim}{'' if r.variant.aligned else ' (unaligned)'} {r.variant.config} "
            f"flags={'+'.join(r.variant.flags) or '-'}: {'; '.join(r.problems)}" for r in rows if r.problems]


def render(rows: list[KernelRow], command: str, seconds: float, scope: str,
           launch_rows: list[LaunchRow] = ()) -> str:
    """The whole report as Markdown: how it was made, what the columns mean, the summary, the rows
    that fail the check, and the tables (attention, then the other kernel families)."""
    import datetime

    import triton

    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    made = (f"Made by `{command}` with triton {triton.__version__} on {date}, no GPU: {scope}, compiled with "
            f"`triton.compile` for `GPUTarget('cuda', 80 | 90, 32)` ({len(rows)} compiles, {seconds:.0f} s wall, "
            f"{sum(r.compile_s for r in rows):.0f} s of compile time).")
    unaligned = ", ".join(f"{d} for {bd}" for bd, d in UNALIGNED_HEAD_DIM.items())
    specialized = ("Specialization: padded (B, T, H, D) = (8, 512, 12, BLOCK_D) or packed with the same sizes, "
                   "dropout 0.1 when on; pointers 16-byte aligned; ints that are multiples of 16 marked so "
                   "(as the JIT does). Unaligned rows (head dim marked *unaligned*): (B, T, H, D) = "
                   f"(8, 512, {_H_UNALIGNED}, D) with D a multiple of 8 but not 16 ({unaligned}), so head_dim, the "
                   "head stride and the row stride get no divisibility hint (narrower loads, no async copies).")
    columns = ("Columns: **kernel** fwd = `_attn_fwd_kernel`, bwd_delta / bwd_dkdv / bwd_dq = `_attn_bwd_*_kernel`; "
               "**arch** compile target; **BLOCK_D** head-dim tile (head dims 8..128 round up to 16, 32, 64, 128); "
               "**head dim** the head_dim argument the kernel was specialized for; "
               "**config** BLOCK_MxBLOCK_N, warps, pipeline stages; **flags** constexpr flags set (the others off); "
               "**regs** registers per thread (cuobjdump REG); **spill bytes** stack frame per thread (cuobjdump "
               "STACK, = spills in a Triton kernel; bold when > 0); **smem KB** shared memory per block (compiled "
               f"metadata `shared`; limit {SMEM_LIMIT[80] // 1024} KB on sm_80, {SMEM_LIMIT[90] // 1024} KB on "
               "sm_90); **HGMMA** the sm_90 SASS uses Hopper warpgroup MMA (float32 runs full-precision `ieee` dots, "
               "which have no HGMMA).")
    lines = ["# Triton kernels compiled ahead of time: registers, spills, shared memory, HGMMA", "",
             made, specialized, "", columns, "", "## Summary", "", *[f"- {line}" for line in summary(rows)], ""]
    bad = problems(rows)
    if bad:
        title = ("## Configs that fail the check (spill, shared memory over the limit, compile error, sm_90 "
                 "half-precision forward without HGMMA)")
        lines += [title, "", *[f"- {b}" for b in bad], ""]
    lines += ["## All configs", "", markdown_table(rows), ""]
    if launch_rows:
        lines += families_section(launch_rows)
    return "\n".join(lines)


def families_section(launch_rows: list[LaunchRow], made: str = "") -> list[str]:
    """The report's part for the kernel families: summary, failing rows, table."""
    lines = ["# The other kernel families", "",
             "Every launch each family's launchers can pick (`aot_launches()` in kernels/<family>.py), "
             "specialized for that module's representative problem, for sm_80 and sm_90." + made, "",
             *[f"- {line}" for line in launch_summary(launch_rows)], ""]
    bad = [f"- {r.describe()}: {'; '.join(r.problems)}" for r in launch_rows if r.problems]
    if bad:
        lines += ["## Launches that fail the check", "", *bad, ""]
    return lines + ["## All launches", "", launch_table(launch_rows), ""]


def render_families(rows: list[LaunchRow], command: str, seconds: float, quick: bool) -> str:
    """The families' part alone (``bertfast static-report --part families``)."""
    import datetime

    import triton

    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    scope = (" Quick subset: per kernel, block config and dtype (bfloat16, float32), the launch with the most "
             "flags." if quick else "")
    made = (f"{scope} Made by `{command}` with triton {triton.__version__} on {date}, no GPU ({len(rows)} "
            f"compiles, {seconds:.0f} s wall).")
    return "\n".join(families_section(rows, made))
