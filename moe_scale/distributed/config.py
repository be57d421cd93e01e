"""`ParallelConfig`: how the ranks of a job split the work (the `parallel:` config section).

The mesh (`mesh.build_mesh`), expert sharding and gradient sync read it; the trainer only
passes it on.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_scale.validation import check, check_choice

BACKENDS = ("torch", "fsdp", "deepspeed")
DIST_BACKENDS = ("auto", "gloo", "nccl")
FSDP_PRECISIONS = ("fp32", "bf16")
A2A_MODES = ("flat", "hierarchical")


@dataclass
class ParallelConfig:
    """How ranks split the work. World size comes from the launcher (RANK / WORLD_SIZE).

    backend      torch: DDP for dense params + expert-data-parallel all-reduce for experts;
                 fsdp: FSDP2 `fully_shard`, dense params over the world, experts over their
                 expert-data-parallel group (parameters, gradients and AdamW state sharded);
                 deepspeed: `deepspeed.initialize` with MoE parameter groups
    ep_size      expert-parallel group size; must divide moe.num_experts and the world size
    a2a          flat or hierarchical all-to-all (within nodes, then across; same result)
    dist_backend auto: nccl on CUDA, gloo on CPU
    fsdp_precision  fsdp only: fp32, or bf16 (bf16 parameters in forward/backward, gradients
                    reduced and kept in float32, float32 master weights)
    deepspeed_config  deepspeed only: the JSON file of the ZeRO options
    timeout_s    collective timeout of the process group
    ranks_per_node  processes per node; null reads LOCAL_WORLD_SIZE (torchrun) or assumes a
                    single node. Only the hierarchical all-to-all uses it.
    """

    backend: str = "torch"
    ep_size: int = 1
    a2a: str = "flat"
    dist_backend: str = "auto"
    deepspeed_config: str | None = None
    timeout_s: int = 600
    fsdp_precision: str = "fp32"
    ranks_per_node: int | None = None

    def __post_init__(self):
        check_choice("parallel.backend", self.backend, BACKENDS)
        check_choice("parallel.dist_backend", self.dist_backend, DIST_BACKENDS)
        check_choice("parallel.fsdp_precision", self.fsdp_precision, FSDP_PRECISIONS)
        check(self.fsdp_precision == "fp32" or self.backend == "fsdp",
              f"parallel.fsdp_precision={self.fsdp_precision} applies to parallel.backend=fsdp only; "
              f"use train.precision=bf16 for autocast under parallel.backend={self.backend}")
        check_choice("parallel.a2a", self.a2a, A2A_MODES)
        check(self.ep_size >= 1, f"parallel.ep_size must be >= 1, got {self.ep_size}")
        check(self.ranks_per_node is None or self.ranks_per_node >= 1,
              f"parallel.ranks_per_node must be >= 1 or null, got {self.ranks_per_node}")
        check(self.timeout_s >= 1, f"parallel.timeout_s must be >= 1, got {self.timeout_s}")
        if self.backend == "deepspeed":
            check(self.deepspeed_config is not None,
                  "parallel.backend=deepspeed needs parallel.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
