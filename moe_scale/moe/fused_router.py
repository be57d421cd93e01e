"""Fused CPU kernels for the softmax top-k router, built on first use.

`csrc/router_kernels.cpp` does, per row of a `[C, E]` logit block held in L1, what the eager
router needs several ATen passes and a dozen small dispatches per chunk for: top-k, softmax,
log-sum-exp and the column sums of the probabilities (forward), and the logit gradient
(backward). At thousands of experts those passes cost more than the router GEMM itself
(benchmarks/moe_layer.py, `MOE_SCALE_ROUTER_KERNEL=eager` to compare).

The extension is compiled with the host's compiler by `torch.utils.cpp_extension.load` the
first time a process needs it (about a minute; cached under TORCH_EXTENSIONS_DIR, shared by
later processes). Where that fails (no compiler) the router warns once and stays eager.

    MOE_SCALE_ROUTER_KERNEL=auto    fused on CPU for float32 / bfloat16 (default; eager while
                                    torch.compile traces)
    MOE_SCALE_ROUTER_KERNEL=eager   never build or use the kernels
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).parent / "csrc" / "router_kernels.cpp"
_DTYPES = (torch.float32, torch.bfloat16)
_MODES = ("auto", "eager")


def kernel_mode() -> str:
    mode = os.environ.get("MOE_SCALE_ROUTER_KERNEL", "auto")
    if mode not in _MODES:
        raise ValueError(f"MOE_SCALE_ROUTER_KERNEL must be one of {_MODES}, got {mode!r}")
    return mode


def _host_tag() -> str:
    """The build uses -march=native: key it by the CPU so a shared cache never runs foreign code."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return hashlib.sha1((cpu + torch.__version__).encode()).hexdigest()[:10]


@functools.cache
def load_kernels() -> ModuleType | None:
    """The compiled extension, or None (with one warning) when it cannot be built."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
    try:
        return cpp_extension.load(
            name=f"moe_scale_router_{_host_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, unsupported platform: stay eager
        warnings.warn(f"moe_scale: fused router kernels unavailable, using the eager router ({err})")
        return None


def fused_kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The kernels if they apply to router input `x` (CPU, float32 / bfloat16), else None."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or kernel_mode() == "eager":
        return None
    if torch.compiler.is_compiling():  # an opaque extension call: let torch.compile trace ATen
        return None
    return load_kernels()
