"""What the static kernel report compiles: each kernel family lists its launches here.

A kernel file (kernels/<family>.py) exposes ``aot_launches() -> list[Launch]``: every
(kernel, block sizes, warps, stages, flags) its launchers can pick, each with the runtime argument
values of one representative problem. ``bertfast.kernel_report`` specializes each as the JIT would
(16-byte aligned pointers, ints divisible by 16 hinted, ints equal to 1 and None pointers made
constants) and compiles it for sm_80 and sm_90 without a GPU, then reads registers and spills.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Launch:
    """One compiled form of one kernel.

    args: every non-constexpr argument of the kernel by name: a pointer as its element type
        ("fp16", "bf16", "fp32", "i32", "i64", "u8"), an int, a float, or None for a pointer the
        launcher leaves out (the JIT makes it a constant).
    constexprs: every tl.constexpr argument by name.
    """

    family: str
    kernel: object  # the @triton.jit function
    dtype: str  # "float16" | "bfloat16" | "float32": the data type of this launch
    config: str  # block sizes / warps, for the report's table
    args: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    flags: tuple[str, ...] = ()

    @property
    def kernel_name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__


TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
