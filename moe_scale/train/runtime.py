"""Where this process runs: rank, world, device, process group.

Launchers are recognised by their environment: torchrun, the deepspeed launcher and SLURM +
torchrun set RANK / WORLD_SIZE / LOCAL_RANK; mpirun (accelerate's MULTI_CPU path) sets
OMPI_COMM_WORLD_* or PMI_* and accelerate sets MASTER_ADDR / MASTER_PORT. With none of these
the process is the single-process debug mode: world size 1, no process group, all experts
local, the same code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_RANK_VARS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def launcher_ranks(env=os.environ) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by a launcher, or None for the debug mode."""
    for rank_var, world_var, local_var in _RANK_VARS:
        if rank_var in env and world_var in env:
            rank, world = int(env[rank_var]), int(env[world_var])
            return rank, world, int(env.get(local_var, rank))
    return None


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def process_group_backend(dist_backend: str, device: torch.device) -> str:
    """The backend string of the process group: a device -> backend map on GPU runs.

    NCCL serves CUDA tensors only; gloo next to it serves the CPU tensors that torch itself
    puts into collectives (object collectives, DCP's planning, a stray host tensor), so no
    collective of the run can meet a backend that does not serve its device. moe_scale's own
    collectives move their tensors to the run's device anyway (`distributed/collectives.py`).
    """
    if dist_backend == "gloo" or (dist_backend == "auto" and device.type != "cuda"):
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def init_runtime(device: str = "auto", dist_backend: str = "auto", timeout_s: int = 600) -> Runtime:
    """Join the launcher's process group (if any) and pick this rank's device."""
    ranks = launcher_ranks()
    if ranks is None:
        return Runtime(0, 1, 0, pick_device(device, 0))
    rank, world, local_rank = ranks
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(process_group_backend(dist_backend, dev), rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def close_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
