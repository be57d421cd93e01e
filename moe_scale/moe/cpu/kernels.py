"""Building and loading the CPU kernels (csrc/), compiled with the host's compiler on first use.

    csrc/activation_kernels.cpp  in-place ReLU and its backward on the raw bit patterns
    csrc/mlp_kernels.cpp         the expert MLP's span loop, one group of experts per thread
    csrc/bf16_gemm.cpp           the span loop's bfloat16 GEMMs on CPUs with AVX512-BF16,
                                 compiled ahead of time (oneDNN JIT-compiles and keeps a kernel
                                 per GEMM shape), ReLU and its backward fused in

The build is keyed by the sources (their folder and contents), the CPU's flags and the torch
version, so two checkouts, or machines of different CPUs, never share or load each other's build.
Another process's build of the same kernels is waited on as `BuildWait` says, after which the
layer warns and runs the core path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["module.cpp", "activation_kernels.cpp", "mlp_kernels.cpp", "bf16_gemm.cpp"]
GEMM_ENV = "MOE_SCALE_BF16_GEMM"
_GEMM_MODES = ("native", "aten")


@dataclass(frozen=True)
class BuildWait:
    """How a load waits on the lock another process holds on the same build folder."""

    max_wait_seconds: float = 600.0
    """A lock held by a live build is waited on this long; then the layer warns and runs the
    core path."""

    stale_after_seconds: float = 180.0
    """A lock in a build folder where nothing changed for this long was left by a builder
    that died, and is taken over (a live build writes an object file every few seconds to
    minutes)."""


BUILD_WAIT = BuildWait()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def has_avx512() -> bool:
    """The kernels' vector paths are written for AVX-512; other CPUs run the core path."""
    return "avx512f" in cpu_flags() and platform.machine() in ("x86_64", "AMD64")


def build_name() -> str:
    """Keyed by the sources' folder and contents, the CPU's flags and torch: two checkouts never
    share a build folder (each load rewrites its build file with its own paths)."""
    digest = hashlib.sha1(str(CSRC.resolve()).encode())
    for name in sorted(p.name for p in CSRC.iterdir()):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    digest.update(torch.__version__.encode())
    return f"moe_scale_cpu_{digest.hexdigest()[:12]}"


def _wait_for_lock(build_dir: Path, wait: BuildWait = BUILD_WAIT) -> bool:
    """False when another live build holds the lock past `wait.max_wait_seconds`."""
    lock = build_dir / "lock"
    deadline = time.monotonic() + wait.max_wait_seconds
    while lock.exists():
        try:
            age = time.time() - max(p.stat().st_mtime for p in build_dir.iterdir())
        except (FileNotFoundError, ValueError):
            break
        if age > wait.stale_after_seconds:  # its builder died mid-build: nobody will release it
            lock.unlink(missing_ok=True)
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


@functools.cache
def load_kernels() -> ModuleType | None:
    """The compiled extension, or None (with one warning) when it cannot be built or loaded."""
    return build_and_load(BUILD_WAIT)


def build_and_load(wait: BuildWait) -> ModuleType | None:
    """`load_kernels` without its cache, waiting on another build's lock as `wait` says."""
    from torch.utils import cpp_extension

    name = build_name()
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not _wait_for_lock(build_dir, wait):
        warnings.warn(f"moe_scale: the CPU kernel build in {build_dir} stays locked by another process; "
                      "using the core path")
        return None
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(CSRC / source) for source in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, unsupported platform: the core path serves
        warnings.warn(f"moe_scale: CPU kernels unavailable, using the core path ({err})")
        return None


def available() -> bool:
    """Whether this machine can run the CPU kernel backend (AVX-512 x86, no CUDA, kernels build)."""
    return has_avx512() and not torch.cuda.is_available() and load_kernels() is not None


def kernels_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels if they apply to these tensors (float32 / bfloat16 on the CPU), else None."""
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        return None
    if torch.compiler.is_compiling():  # an opaque extension call: let torch.compile trace ATen
        return None
    return load_kernels()


def use_native_bf16_gemm(kernels: ModuleType | None, x: torch.Tensor, w1: torch.Tensor,
                         mode: str | None = None) -> bool:
    """Whether the span loop runs its bf16 GEMMs with csrc/bf16_gemm.cpp: `mode` "native"
    (None: MOE_SCALE_BF16_GEMM, "native" when unset) and the kernels can run it on these
    tensors (AVX512-BF16, bfloat16, even d and h)."""
    if mode is None:
        mode = os.environ.get(GEMM_ENV, "native")
        if mode not in _GEMM_MODES:
            raise ValueError(f"{GEMM_ENV} must be one of {_GEMM_MODES}, got {mode!r}")
    return kernels is not None and mode == "native" and kernels.can_run_native_bf16_gemm(x, w1)
