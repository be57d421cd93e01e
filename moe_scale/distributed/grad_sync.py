"""Gradient synchronisation for expert parallelism with plain torch (DeepSpeed does its own).

Each rank's loss is the mean over its own batch. Dense parameters are replicated on all W
ranks of the data-parallel world, so their gradient is the average over the world (DDP).
An expert parameter on EP rank i already receives, through the backward all-to-all, the
gradient from the tokens of every rank of its EP group; summing over its EDP group (the
ranks holding the same experts) covers every token of the world once. Dividing that sum by W
gives exactly the gradient of the world-mean loss, the same as one process with the full
batch. DeepSpeed makes the same choice (`_reduce_expert_gradients` divides by the dense
data-parallel size).

    ddp = wrap_ddp(model, mesh)              # dense grads: averaged over the world in backward
    loss.backward()
    allreduce_expert_grads(model, mesh)     # expert grads: summed over EDP, divided by W
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from moe_scale.distributed.mesh import MoEMesh
from moe_scale.distributed.parallelize import is_expert_param


def expert_param_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if is_expert_param(p)]


def wrap_ddp(model: nn.Module, mesh: MoEMesh, **ddp_kwargs) -> DistributedDataParallel:
    """DDP over the data-parallel world that leaves the expert parameters alone."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    return DistributedDataParallel(model, process_group=mesh.dp_group, **ddp_kwargs)


def _reduce(params: list[nn.Parameter], group, scale: float) -> None:
    """Sum the grads of `params` over `group` and multiply by `scale` (missing grads count as 0)."""
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for bucket in by_dtype.values():
        grads = [p.grad for p in bucket]
        flat = _flatten_dense_tensors(grads)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


@torch.no_grad()
def allreduce_expert_grads(model: nn.Module, mesh: MoEMesh) -> None:
    """Expert grads: sum over the EDP group, divide by the data-parallel world size."""
    params = [p for p in model.parameters() if p.requires_grad and is_expert_param(p)]
    _reduce(params, mesh.edp_group, 1.0 / dist.get_world_size(mesh.dp_group))


@torch.no_grad()
def allreduce_grads(model: nn.Module, mesh: MoEMesh) -> None:
    """Both reductions without DDP: dense grads averaged over the world, experts as above."""
    dense = [p for p in model.parameters() if p.requires_grad and not is_expert_param(p)]
    _reduce(dense, mesh.dp_group, 1.0 / dist.get_world_size(mesh.dp_group))
    allreduce_expert_grads(model, mesh)
