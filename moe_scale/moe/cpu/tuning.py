"""The CPU backend's tuning: every choice the expert MLP makes that a test or benchmark may pin.

    CPUTuning          the choices, each field documented; `CPUTuning()` is what the layer uses
    current_tuning()   the tuning in effect (the default, unless inside `use_tuning`)
    use_tuning(...)    a `with` block in which the expert MLP runs with another tuning

The defaults are the measured choices (docs/performance.md). A field left at None is decided
per call from the shapes, the dtype and the machine, as its docstring says; a value pins it.
`grouped_mlp.grouped_mlp(..., tuning=...)` takes one directly; the layer reads the current one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

_SPAN_LOOPS = ("auto", "compiled", "python")
_BF16_GEMMS = ("native", "aten")


@dataclass(frozen=True)
class CPUTuning:
    """How the CPU backend runs the expert MLP. Every choice keeps the math exact: they move
    work between GEMMs, threads and autograd nodes, never change what is computed."""

    row_bucket: int = 64
    """Rows a span's GEMM is rounded up to a multiple of, where rows are bucketed
    (`bucket_rows`): oneDNN JIT-compiles a kernel per GEMM shape, so a few fixed row counts
    keep it from compiling every step as the expert loads change."""

    bucket_rows: bool | None = None
    """Whether the loop layout rounds its GEMMs' row counts up to a multiple of `row_bucket`.
    None: for bfloat16 / float16 CPU tensors, whose GEMMs oneDNN runs. Spans on the native
    bf16 GEMM (`bf16_gemm`) are always exact: it compiles nothing per shape."""

    fused_backward: bool | None = None
    """Whether both layers run in one autograd node with a per-expert backward (loop layout
    only). None: when the `[M, h]` hidden gradient it avoids is larger than the extra weight
    gradient it holds (`[E, d, h]`), i.e. when M > E * d."""

    expert_groups: int | None = None
    """Groups of experts the compiled span loop runs at once, one per thread. None: one per
    intra-op thread when at least as many experts have rows, else one group whose GEMMs each
    use every thread (fewer experts than threads would leave cores idle)."""

    balance_max_blocks: int = 64
    """Up to this many experts with rows, exact spans go to the groups by a balanced partition
    of their row counts; more experts are small next to a group, and contiguous groups are as
    even as one expert."""

    split_min_rows: int = 256
    """A group more than this many rows above its share is evened out by moving rows of its
    largest expert to the lightest group. A split costs about what a hundred or more rows of
    work do (the piece packs its expert's weights again, its weight gradients go through
    float32 partials), so small excesses are left alone (benchmarks/span_balance.py)."""

    span_loop: str = "auto"
    """Which loop runs the fused node's spans: "auto" the compiled one (csrc/mlp_kernels.cpp)
    where it applies (float32 / bfloat16 CPU tensors of one dtype, contiguous, kernels built),
    else the Python one; "python" always the Python one; "compiled" the compiled one or a
    RuntimeError, for tests and benchmarks that must measure it."""

    bf16_gemm: str | None = None
    """Who runs the compiled span loop's bfloat16 GEMMs: "native" csrc/bf16_gemm.cpp where it
    can (AVX512-BF16, even d and h), "aten" ATen's oneDNN GEMMs. None: the environment
    variable MOE_SCALE_BF16_GEMM, "native" when unset."""

    def __post_init__(self):
        if self.row_bucket < 1:
            raise ValueError(f"CPUTuning.row_bucket must be at least 1, got {self.row_bucket}")
        if self.expert_groups is not None and self.expert_groups < 1:
            raise ValueError(f"CPUTuning.expert_groups must be None or at least 1, got {self.expert_groups}")
        if self.balance_max_blocks < 0 or self.split_min_rows < 0:
            raise ValueError("CPUTuning.balance_max_blocks and split_min_rows must be at least 0, got "
                             f"{self.balance_max_blocks} and {self.split_min_rows}")
        if self.span_loop not in _SPAN_LOOPS:
            raise ValueError(f"CPUTuning.span_loop must be one of {_SPAN_LOOPS}, got {self.span_loop!r}")
        if self.bf16_gemm is not None and self.bf16_gemm not in _BF16_GEMMS:
            raise ValueError(f"CPUTuning.bf16_gemm must be None or one of {_BF16_GEMMS}, got {self.bf16_gemm!r}")


DEFAULT_TUNING = CPUTuning()

_current: ContextVar[CPUTuning] = ContextVar("moe_scale_cpu_tuning", default=DEFAULT_TUNING)


def current_tuning() -> CPUTuning:
    """The tuning the expert MLP runs with here: the innermost `use_tuning`'s, or the default."""
    return _current.get()


@contextmanager
def use_tuning(tuning: CPUTuning | None = None, **changes) -> Iterator[CPUTuning]:
    """Run the block with `tuning` (default: the current one) with `changes` to its fields:
    `with use_tuning(split_min_rows=0): ...`. Unknown fields raise a TypeError naming them."""
    chosen = dataclasses.replace(tuning or current_tuning(), **changes)
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)
