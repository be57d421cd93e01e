"""Autocast at the boundary of the fused autograd functions.

The fused router and expert MLP write into preallocated buffers of one dtype, so they must not
run under autocast, which would change the dtype of each op inside. Inside an autocast region
they instead take their inputs in the autocast dtype and run with autocast off.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor


def outside_autocast(*tensors: Tensor):
    """(tensors cast to the active autocast dtype, a context that disables autocast).

    Outside autocast: the tensors unchanged and a no-op context.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors), torch.autocast(device_type, enabled=False)
