"""Session setup shared by every test."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the fused CPU kernels once, up front: multi-process tests then load the
    cached build instead of each rank compiling it (or waiting on another rank's lock) inside
    its own timeout."""
    from moe_scale.moe.cpu_kernels import kernel_mode, load_kernels

    if kernel_mode() != "eager":
        load_kernels()
