"""Fused CPU kernels, built on first use: the router, the token gathers and ReLU.

Where eager PyTorch makes several passes (and bfloat16 round trips) over a block, these read
it once, accumulate in float32 and round once:

    csrc/router_kernels.cpp      softmax top-k router: per `[C, E]` logit row held in L1, top-k,
                                 softmax, log-sum-exp and column sums (forward), the logit
                                 gradient (backward); with up to 16 experts the router's
                                 GEMMs too (`router_forward_gemm`); see topk_softmax.py
    csrc/dispatch_kernels.cpp    the combine's weighted gather-sum and its backward, the
                                 permute backward's gather-sum, the counting sort of
                                 assignments by expert; see dispatch.py
    csrc/activation_kernels.cpp  in-place ReLU and its backward on the raw bit patterns; see
                                 grouped_mlp.py
    csrc/mlp_kernels.cpp         the fused expert MLP's span loop, forward and backward, with
                                 one group of experts per thread; see grouped_mlp.py (`_MLP`)
    csrc/bf16_gemm.cpp           the span loop's bfloat16 GEMMs on CPUs with AVX512-BF16,
                                 compiled ahead of time (oneDNN's JIT kernels cost memory per
                                 GEMM shape), ReLU and its backward fused in

At thousands of experts the router passes cost more than the router GEMM itself, and with
bfloat16 GEMMs a few milliseconds, the gathers and activations are a large part of a step
(benchmarks/moe_layer.py, `MOE_SCALE_CPU_KERNELS=eager` to compare).

The extension is compiled with the host's compiler by `torch.utils.cpp_extension.load` the
first time a process needs it (well under a minute; cached under TORCH_EXTENSIONS_DIR,
shared by later processes). Where that fails (no compiler) the layer warns once and stays on
the eager ATen path, which computes the same functions.

    MOE_SCALE_CPU_KERNELS=auto    fused on CPU for float32 / bfloat16 (default; eager while
                                  torch.compile traces)
    MOE_SCALE_CPU_KERNELS=eager   never build or use the kernels
    MOE_SCALE_BF16_GEMM=aten      the span loop's bf16 GEMMs by ATen (oneDNN), not bf16_gemm.cpp
                                  (default `native` where the CPU has AVX512-BF16)
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

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["module.cpp", "router_kernels.cpp", "dispatch_kernels.cpp", "activation_kernels.cpp", "mlp_kernels.cpp",
            "bf16_gemm.cpp"]
_DTYPES = (torch.float32, torch.bfloat16)
_MODES = ("auto", "eager")
ENV = "MOE_SCALE_CPU_KERNELS"
GEMM_ENV = "MOE_SCALE_BF16_GEMM"
_GEMM_MODES = ("native", "aten")


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto")
    if mode not in _MODES:
        raise ValueError(f"{ENV} must be one of {_MODES}, got {mode!r}")
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
            name=f"moe_scale_cpu_{_host_tag()}",
            sources=[str(_CSRC / name) for name in _SOURCES],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, unsupported platform: stay eager
        warnings.warn(f"moe_scale: fused CPU kernels unavailable, using the eager ATen path ({err})")
        return None


def kernels_for(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = _DTYPES) -> ModuleType | None:
    """The kernels if they apply to these tensors (all on the CPU, of `dtypes`), else None."""
    if any(t.device.type != "cpu" or t.dtype not in dtypes for t in tensors) or kernel_mode() == "eager":
        return None
    if torch.compiler.is_compiling():  # an opaque extension call: let torch.compile trace ATen
        return None
    return load_kernels()


def native_bf16_gemm(kernels: ModuleType | None, x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether the span loop runs its bf16 GEMMs with csrc/bf16_gemm.cpp (AVX512-BF16, even
    d and h, not switched off by MOE_SCALE_BF16_GEMM=aten)."""
    mode = os.environ.get(GEMM_ENV, "native")
    if mode not in _GEMM_MODES:
        raise ValueError(f"{GEMM_ENV} must be one of {_GEMM_MODES}, got {mode!r}")
    return kernels is not None and mode == "native" and kernels.native_bf16_gemm(x, w1)
