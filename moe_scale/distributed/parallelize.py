"""`parallelize(model, mesh)`: turn a one-process MoE model into an expert-parallel one.

For every `MoELayer` in the model:
    experts   the stacked weights `[E, ...]` are cut to this EP rank's block `[E_local, ...]`
              (global expert e lives on EP rank e // E_local)
    router    untouched: replicated, averaged over the whole data-parallel world like any
              dense parameter
    comm      `AllToAllComm` over the EP group (flat or hierarchical as the mesh says);
              with ep_size 1 the `LocalComm` stays
    tags      every expert parameter gets
                  moe_expert = True                 (moe_scale's gradient sync)
                  allreduce = False, group_name     (DeepSpeed: `is_moe_param`, and its
                                                     expert-data-parallel group "ep_size_{N}")
                  expert_offset, global_experts     (where the block sits on the global axis)

A model built under `torch.device("meta")` never allocates the full expert weights: the local
block is created on `device` and initialised by `GroupedExperts.reset_parameters` from a seed
of (init_seed, EP rank), so EDP replicas agree. Other meta parameters are left to the caller.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_scale.distributed.comm import AllToAllComm
from moe_scale.distributed.mesh import MoEMesh, check_experts
from moe_scale.moe.config import MoEConfig
from moe_scale.moe.experts import GroupedExperts
from moe_scale.moe.layer import MoELayer

_EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2")


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def parallelize(model: nn.Module, mesh: MoEMesh, *, device: torch.device | str = "cpu", init_seed: int = 0) -> nn.Module:
    """Shard the experts of every MoELayer over `mesh`'s EP group, in place; returns `model`."""
    layers = moe_layers(model)
    for _, layer in layers:
        check_experts(layer.cfg.num_experts, mesh.ep_size)
    for _, layer in layers:
        shard_experts(layer.experts, mesh.ep_rank, mesh.ep_size, device=device, init_seed=init_seed)
        tag_expert_params(layer.experts, mesh.expert_group_name)
        if mesh.ep_size > 1:
            layer.comm = AllToAllComm.from_mesh(mesh, layer.experts.num_experts)
    return model


def shard_experts(
    experts: GroupedExperts, ep_rank: int, ep_size: int, *, device: torch.device | str = "cpu", init_seed: int = 0
) -> None:
    """Keep experts [ep_rank * E_local, (ep_rank + 1) * E_local) of `experts`, in place."""
    E = experts.num_experts
    check_experts(E, ep_size)
    n = E // ep_size
    block = slice(ep_rank * n, (ep_rank + 1) * n)
    on_meta = any(p.is_meta for p in experts.parameters())
    for name in _EXPERT_PARAMS:
        full = getattr(experts, name)
        if full is None:
            continue
        if on_meta:
            local = torch.empty((n,) + tuple(full.shape[1:]), dtype=full.dtype, device=device)
        else:
            local = full.detach()[block].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=full.requires_grad))
    experts.num_experts = n
    experts.expert_offset = ep_rank * n
    experts.global_experts = E
    if on_meta:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed * 1_000_003 + ep_rank)
            experts.reset_parameters()


def tag_expert_params(experts: GroupedExperts, group_name: str) -> None:
    """Mark the expert parameters for moe_scale's and DeepSpeed's gradient reduction."""
    for name in _EXPERT_PARAMS:
        p = getattr(experts, name)
        if p is None:
            continue
        p.moe_expert = True
        p.allreduce = False
        p.group_name = group_name
        p.expert_offset = getattr(experts, "expert_offset", 0)
        p.global_experts = getattr(experts, "global_experts", experts.num_experts)


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "moe_expert", False))


def hierarchical_placement(cfg: MoEConfig, mesh: MoEMesh) -> str:
    """Where the experts of each primary-gate group of a hierarchical router live.

    Group g holds experts [g*b, (g+1)*b). "rank": every group lies inside one EP rank's block
    (E_local % b == 0), so a token whose primary gate picks one group goes to one rank and the
    secondary gate picks among experts there. "node": every group lies inside one node's part
    of the EP group, so such a token crosses to one node. "split": groups straddle nodes;
    routing is still correct but the primary gate no longer picks a destination.
    """
    if cfg.router != "hierarchical":
        raise ValueError(f"hierarchical_placement needs router='hierarchical', got {cfg.router!r}")
    b = cfg.num_experts // cfg.hierarchical_groups
    e_local = cfg.num_experts // mesh.ep_size
    if e_local % b == 0:
        return "rank"
    if (e_local * mesh.ep_ranks_per_node) % b == 0:
        return "node"
    return "split"
