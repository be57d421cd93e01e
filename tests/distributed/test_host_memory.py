"""`keep_freed_host_memory`: a freed multi-MiB tensor is reused without page-faulting again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys, torch
    from moe_scale.distributed.host_memory import keep_freed_host_memory
    # Start from a fixed glibc state (its default threshold adapts to earlier frees): blocks
    # over 64 KiB are mmapped, so every freed 4 MiB buffer goes back to the kernel.
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)
    if sys.argv[1] != "mmap":
        assert keep_freed_host_memory(never_mmap=sys.argv[1] == "never_mmap")
    numel = int(sys.argv[2])
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.ones(numel) for _ in range(4)]  # 4 buffers, written (touched)
        del buffers
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_step()  # the first step faults its pages in either way
    print(min(faults_of_one_step() for _ in range(3)))
    """
)


def _faults_per_step(mode: str, numel: int = 1 << 20) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(numel)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    pages_per_step = 4 * (4 << 20) // 4096
    assert _faults_per_step("mmap") > pages_per_step // 2  # each step faults its buffers in again
    assert _faults_per_step("keep") < pages_per_step // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_never_mmap_reuses_blocks_above_the_mmap_threshold_cap():
    numel = 12 << 20  # 48 MiB float32 buffers: above the 32 MiB cap of M_MMAP_THRESHOLD
    pages_per_step = 4 * numel * 4 // 4096
    assert _faults_per_step("keep", numel) > pages_per_step // 2  # still mmapped, faulted in again
    assert _faults_per_step("never_mmap", numel) < pages_per_step // 20
