"""Session setup shared by every test."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the CPU kernel backend once, up front, where this machine can run it: multi-process
    tests then load the cached build instead of each rank compiling it inside its own timeout."""
    from moe_scale.moe.cpu import kernels

    if kernels.has_avx512():
        kernels.load_kernels()
