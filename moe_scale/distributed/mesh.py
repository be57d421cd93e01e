"""Process layout of an expert-parallel job: EP x EDP groups over the data-parallel world.

World ranks form a `[edp_size, ep_size]` grid (a `DeviceMesh` with dims ("edp", "ep")):

    ep group    a row, contiguous ranks [g*ep, (g+1)*ep): together they hold all E experts,
                EP rank i holds global experts [i*E_local, (i+1)*E_local); tokens move by
                all-to-all inside it
    edp group   a column, ranks r with the same r % ep: they hold the same experts and average
                those experts' gradients
    dp group    the whole world: dense (non-expert) parameters are averaged over it

This is DeepSpeed's layout (`groups._create_expert_and_data_parallel`, EP groups of consecutive
ranks), so the same parameter tags serve both runtimes. Ranks of a node are consecutive
(`rank // ranks_per_node` is the node). When an EP group spans nodes it is further split for
the hierarchical all-to-all: `ep_intra_group` (the EP ranks on this node) and
`ep_inter_group` (the EP ranks with the same position on the other nodes).

Example, world 8, ep 4, 2 ranks per node:
    ep [0 1 2 3] [4 5 6 7]; edp [0 4] [1 5] [2 6] [3 7]
    ep_intra [0 1] [2 3] [4 5] [6 7]; ep_inter [0 2] [1 3] [4 6] [5 7]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_scale.distributed.collectives import all_gather, device_for
from moe_scale.distributed.config import A2A_MODES, ParallelConfig


@dataclass
class MoEMesh:
    """This rank's view of the layout (see the module docstring)."""

    rank: int
    world_size: int
    ep_size: int
    edp_size: int
    ranks_per_node: int
    ep_rank: int
    edp_rank: int
    ep_group: ProcessGroup | None
    edp_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    device_mesh: DeviceMesh | None
    ep_intra_group: ProcessGroup | None = None
    ep_inter_group: ProcessGroup | None = None
    a2a: str = "flat"

    @classmethod
    def data_parallel(cls) -> "MoEMesh":
        """ep_size = 1: every rank holds every expert, so there is no EP group and the EDP group
        is the whole world (None in one process, where nothing is reduced)."""
        world = dist.group.WORLD if dist.is_initialized() else None
        size = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(rank=rank, world_size=size, ep_size=1, edp_size=size,
                   ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", size)), ep_rank=0, edp_rank=rank,
                   ep_group=None, edp_group=world, dp_group=world, device_mesh=None)

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans (1 when the EP group fits in a node)."""
        return max(1, self.ep_size // self.ranks_per_node)

    @property
    def ep_ranks_per_node(self) -> int:
        """EP ranks of one EP group on one node."""
        return self.ep_size // self.ep_nodes

    @property
    def expert_group_name(self) -> str:
        """DeepSpeed's name for this EP layout's expert-data-parallel group."""
        return f"ep_size_{self.ep_size}"

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        check_experts(num_experts, self.ep_size)
        n = num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)


def check_layout(world_size: int, ep_size: int, ranks_per_node: int, a2a: str = "flat") -> None:
    """Raise ValueError naming the fix when `ep_size` does not fit the world (and the nodes)."""
    if world_size % ep_size:
        raise ValueError(
            f"ep_size={ep_size} must divide the world size {world_size}; "
            f"use one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    if a2a != "hierarchical":
        return
    if world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must divide the world size {world_size}")
    if ep_size > ranks_per_node and ep_size % ranks_per_node:
        raise ValueError(
            f"the hierarchical all-to-all needs an EP group that covers whole nodes: make ep_size "
            f"a multiple of ranks_per_node={ranks_per_node} (or at most it), or use a2a='flat'"
        )
    if ep_size < ranks_per_node and ranks_per_node % ep_size:
        raise ValueError(
            f"ep_size={ep_size} must divide ranks_per_node={ranks_per_node} so that no EP group "
            f"straddles two nodes, or use a2a='flat'"
        )


def check_experts(num_experts: int, ep_size: int) -> None:
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by ep_size={ep_size} "
            f"(each EP rank holds num_experts / ep_size experts)"
        )


def _agree(values: list[int], names: list[str], device: torch.device) -> None:
    """Every rank learns the values of every rank; any disagreement raises on all of them."""
    table = all_gather(torch.tensor(values, dtype=torch.int64), device).cpu()
    for i, name in enumerate(names):
        column = table[:, i]
        if (column != column[0]).any():
            raise ValueError(f"ranks disagree on {name}: {column.tolist()} (rank order); pass the same value everywhere")


def build_mesh(cfg: ParallelConfig | None = None, device_type: str = "cpu", **options) -> MoEMesh:
    """Create the process groups of `cfg` (or `ParallelConfig(**options)`); collective over the world.

    Needs an initialised default process group. Validation happens before any group is built and
    raises the same ValueError on every rank, so a bad `ep_size` never leaves ranks waiting.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialised (init_process_group) first")
    cfg = cfg if cfg is not None else ParallelConfig(**options)
    world, rank = dist.get_world_size(), dist.get_rank()
    ranks_per_node = cfg.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    _agree([cfg.ep_size, ranks_per_node, A2A_MODES.index(cfg.a2a)], ["ep_size", "ranks_per_node", "a2a"],
           device_for(device_type))
    check_layout(world, cfg.ep_size, ranks_per_node, cfg.a2a)
    ep, edp = cfg.ep_size, world // cfg.ep_size
    device_mesh = init_device_mesh(device_type, (edp, ep), mesh_dim_names=("edp", "ep"))
    mesh = MoEMesh(
        rank=rank,
        world_size=world,
        ep_size=ep,
        edp_size=edp,
        ranks_per_node=ranks_per_node,
        ep_rank=rank % ep,
        edp_rank=rank // ep,
        ep_group=device_mesh.get_group("ep"),
        edp_group=device_mesh.get_group("edp"),
        dp_group=dist.group.WORLD,
        device_mesh=device_mesh,
        a2a=cfg.a2a,
    )
    if cfg.a2a == "hierarchical":
        mesh.ep_intra_group, mesh.ep_inter_group = _node_subgroups(mesh)
    return mesh


def _node_subgroups(mesh: MoEMesh) -> tuple[ProcessGroup, ProcessGroup]:
    """Split every EP group into per-node groups and cross-node groups (all ranks create all)."""
    ep, nodes, local = mesh.ep_size, mesh.ep_nodes, mesh.ep_ranks_per_node
    intra = inter = None
    for first in range(0, mesh.world_size, ep):
        for n in range(nodes):
            ranks = list(range(first + n * local, first + (n + 1) * local))
            group = dist.new_group(ranks)
            if mesh.rank in ranks:
                intra = group
        for i in range(local):
            ranks = [first + n * local + i for n in range(nodes)]
            group = dist.new_group(ranks)
            if mesh.rank in ranks:
                inter = group
    return intra, inter
