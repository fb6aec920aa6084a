"""The attention kernels compiled ahead of time for sm_80 and sm_90, here, without a GPU (DESIGN.md,
"Testing without a GPU", item 3): no configuration the dispatcher may pick fails to compile, spills
registers, or asks for more shared memory than the card has, and every sm_90 float16/bfloat16
forward runs on Hopper's HGMMA.

The attention subset is ``kernel_report.quick_variants()`` (`bertfast static-report --quick`): the heaviest
flags (key mask + dropout, + atomic dq for dkdv), BLOCK_D 64 and 128, aligned head dims (multiples
of 16) and unaligned ones (multiples of 8, e.g. 40 and 72, which compile to scalar masked loads),
every candidate config; the four kernels in bfloat16, the three with a dot in float32 at BLOCK_D
128 (fwd and bwd_dkdv at 64 too). About 3 minutes on 2 busy cores with a cold Triton cache, under
a minute with a warm one.
`bertfast static-report` compiles everything (benchmarks/STATIC.md). float32 is left out of the
HGMMA check: its dots are full-precision ("ieee"), which Hopper's warpgroup MMA does not do.

The other kernel families (kernels/<family>.py ``aot_launches()``): ``kernel_report.quick_launch_jobs()``,
per kernel, block config and dtype (bfloat16, float32) the launch with the most flags, on both archs
(about 300 compiles); `bertfast static-report --part families` compiles all of them.
"""

from __future__ import annotations

import pytest

from bertfast import kernel_report


@pytest.fixture(scope="module")
def rows() -> list[kernel_report.KernelRow]:
    missing = kernel_report.missing_tools()
    if missing:
        pytest.skip(f"cannot compile ahead of time: {missing}")
    return kernel_report.compile_all(kernel_report.quick_variants())


def _describe(bad: list[kernel_report.KernelRow]) -> str:
    return "\n".join(kernel_report.problems(bad))


def test_subset_covers_every_candidate_of_each_kernel(rows):
    seen = {(r.variant.kind, r.variant.arch, r.variant.dtype, r.variant.block_d, r.variant.aligned) for r in rows}
    expected = {(kind, arch, dtype, bd, aligned)
                for kinds, dtypes, block_ds in kernel_report.QUICK_PARTS
                for kind in kinds for dtype in dtypes for bd in block_ds
                for arch in kernel_report.ARCHS for aligned in (True, False)}
    assert seen == expected
    # every kind at BLOCK_D 64 and 128 in bfloat16, aligned and unaligned; float32 at BLOCK_D 128
    assert {(k, bd, a) for k, _, dt, bd, a in seen if dt == "bfloat16"} == {
        (k, bd, a) for k in kernel_report.KINDS for bd in (64, 128) for a in (True, False)}
    assert {k for k, _, dt, bd, _ in seen if dt == "float32" and bd == 128} == {"fwd", "bwd_dkdv", "bwd_dq"}
    assert all(r.variant.flags for r in rows)
    unaligned = [r.variant for r in rows if not r.variant.aligned]
    assert unaligned and all(v.head_dim % 16 == 8 for v in unaligned)


def test_every_config_compiles(rows):
    bad = [r for r in rows if r.error is not None]
    assert not bad, f"{len(bad)} configs failed to compile:\n{_describe(bad)}"


def test_no_config_spills_registers(rows):
    bad = [r for r in rows if r.spill_bytes]
    assert not bad, f"{len(bad)} of {len(rows)} configs spill (stack bytes per thread):\n{_describe(bad)}"


def test_shared_memory_fits_the_card(rows):
    bad = [r for r in rows if r.smem_over]
    assert not bad, f"{len(bad)} configs need more shared memory than the card has:\n{_describe(bad)}"


def test_sm90_half_precision_forward_uses_hgmma(rows):
    fwd = [r for r in rows if r.variant.kind == "fwd" and r.variant.arch == 90 and r.variant.dtype != "float32"]
    assert fwd
    bad = [r for r in fwd if r.error is None and not r.hgmma]
    assert not bad, f"sm_90 forward configs without HGMMA:\n{_describe(bad)}"


def test_unaligned_head_dims_get_no_divisibility_hint():
    """The unaligned rows are specialized as the JIT specializes head_dim 40 / 72: no hint on head_dim
    nor on the head and row strides (multiples of 8, not 16); aligned rows carry them."""
    if kernel_report.missing_tools():
        pytest.skip(kernel_report.missing_tools())

    def hinted(aligned: bool) -> set[str]:
        v = kernel_report.Variant("bwd_dkdv", 90, "bfloat16", 128, 32, 64, 8, 2,
                                  ("HAS_MASK", "DROPOUT", "ATOMIC_DQ"), aligned)
        src, _ = kernel_report._source(v)
        names = src.fn.arg_names
        return {names[i] for (i,), attr in src.attrs.items() if ["tt.divisibility", 16] in attr}

    strides = {"head_dim"} | {f"stride_{t}{a}" for t in ("q", "k", "v", "do", "dq", "dk", "dv") for a in "th"}
    assert strides <= hinted(True)
    assert not strides & hinted(False)
    assert {"Q", "K", "V", "stride_qb"} <= hinted(False)  # pointers stay 16-byte aligned, the batch stride too


# --- the other kernel families (kernels/<family>.py aot_launches) -------------------------------


@pytest.fixture(scope="module")
def launch_rows() -> list[kernel_report.LaunchRow]:
    missing = kernel_report.missing_tools()
    if missing:
        pytest.skip(f"cannot compile ahead of time: {missing}")
    return kernel_report.compile_all(kernel_report.quick_launch_jobs())


@pytest.mark.parametrize("family", kernel_report.FAMILIES)
def test_family_lists_launches_for_every_dtype(family):
    pytest.importorskip("triton")
    launches = kernel_report.family_launches(family)
    assert {launch.dtype for launch in launches} == set(kernel_report.DTYPES), family
    for launch in launches:  # every argument of the kernel is given, as the report specializes them
        names = set(launch.kernel.arg_names)
        assert set(launch.args) | set(launch.constexprs) == names, (family, launch.kernel_name, launch.config)


def test_family_launches_compile_without_spills(launch_rows):
    assert {r.job.family for r in launch_rows} == set(kernel_report.FAMILIES)
    bad = [f"{r.describe()}: {'; '.join(r.problems)}" for r in launch_rows if r.problems]
    assert not bad, f"{len(bad)} of {len(launch_rows)} launches fail the static check:\n" + "\n".join(bad)
