"""Autocast at the MoE layer's boundary.

Under autocast the layer casts the tokens to the autocast dtype once, before dispatch (half the
bytes through the permute and the all-to-all in bf16), and runs its experts with autocast off on
rows that are already in that dtype. Devices autocast does not know (`meta`) run as without it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`, or None where autocast is off."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: the autocast dtype where autocast is on, else x's."""
    return autocast_dtype(x.device) or x.dtype


def autocast_disabled(device: torch.device) -> AbstractContextManager:
    """A context with autocast off on `device` (a no-op where it is off already)."""
    if autocast_dtype(device) is None:
        return nullcontext()
    return torch.autocast(device.type, enabled=False)


def outside_autocast(*tensors: Tensor):
    """(tensors cast to the active autocast dtype, a context that disables autocast).

    For fused functions that write into buffers of one dtype. Outside autocast: the tensors
    unchanged and a no-op context.
    """
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors, nullcontext()
    return tuple(t.to(dtype) for t in tensors), torch.autocast(tensors[0].device.type, enabled=False)
