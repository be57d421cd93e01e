"""Collectives on tensors that moe_scale makes itself: flags, counts, metrics, checks.

NCCL serves CUDA tensors only. A tensor built on the host for bookkeeping (a float64 loss sum,
an int64 table of config values) and handed to a collective of an NCCL group fails there, and
no CPU run (gloo takes any CPU tensor) can show it. So every such collective goes through this
module, which first moves the tensor to the run's device (`device`: the CUDA device of this rank
on GPU runs, the CPU under gloo). Results come back on that device.

Collectives of tensors that already live where the model lives (gradients, parameters, the
tokens of the all-to-all in `comm.py` / `a2a.py`) need no move; those of gradients still come
here so the rule stays one sentence: outside the token exchange, moe_scale calls tensor
collectives only from this module (`tests/distributed/test_collective_devices.py` holds the code to it).
Object collectives (`all_gather_object`, ...) are left to torch, which picks their device from
the group's backend.

    total = all_reduce(torch.tensor([loss_sum, n], dtype=torch.float64), device=rt.device)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def device_for(device_type: str) -> torch.device:
    """This process's device of `device_type` ("cuda" means the current CUDA device)."""
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def all_reduce(t: torch.Tensor, device: torch.device, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """`t` reduced over `group`, on `device` (a new tensor unless `t` was already there)."""
    t = t.to(device)
    dist.all_reduce(t, op=op, group=group)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (the same answer on every rank); `flag` in one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    return bool(all_reduce(torch.tensor(float(flag)), device, op=ReduceOp.MAX).item())


def all_reduce_async(t: torch.Tensor, device: torch.device, group=None):
    """Start a sum of `t` (already on `device`, reduced in place) over `group`; returns the work handle."""
    if t.device != device:
        raise ValueError(f"an asynchronous all-reduce reduces in place: the tensor is on {t.device}, the run on {device}")
    return dist.all_reduce(t, group=group, async_op=True)


def all_gather(t: torch.Tensor, device: torch.device, group=None) -> torch.Tensor:
    """`[group size, *t.shape]`: every rank's `t`, in group rank order, on `device`."""
    t = t.to(device).contiguous()
    world = dist.get_world_size(group)
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=device)  # gloo takes a flat output only
    dist.all_gather_into_tensor(out, t.flatten(), group=group)
    return out.view(world, *t.shape)


def broadcast_(t: torch.Tensor, src: int, group=None) -> None:
    """Overwrite `t` (a parameter on the run's device) with global rank `src`'s values."""
    dist.broadcast(t, src=src, group=group)
