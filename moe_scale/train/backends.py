"""Gradient synchronisation and optimizer stepping: plain torch or DeepSpeed.

Both backends expose the calls the trainer makes per optimizer step:

    with backend.accumulate(last=...):       # no gradient sync on all but the last micro-step
        backend.backward(loss, last=...)
    norm = backend.finish_grads()            # sync; the global grad norm (None: known after stepping)
    stepped, norm = backend.step(lr, skip)   # clip + optimizer step, or no update when skip

Gradient rule (ARCHITECTURE.md rule 3): dense parameters are averaged over the whole
data-parallel world; an expert parameter is summed over its expert-data-parallel (EDP) group
and divided by the world size. Under EP each rank's expert gradient already holds the
contributions of every token its EP group routed to it, so summing over the EDP group covers
every rank's loss once; dividing by the world gives the gradient of the mean loss, exactly
what one process computes on the full batch. With ep_size=1 the EDP group is the world.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_scale.distributed.collectives import all_reduce, any_rank, broadcast_
from moe_scale.distributed.grad_sync import expert_grad_sync, wrap_ddp
from moe_scale.distributed.mesh import MoEMesh
from moe_scale.distributed.parallelize import expert_param_names
from moe_scale.train.optim import set_lr


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters."""
    experts = expert_param_names(model)
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if name in experts else dense).append(p)
    return dense, expert


class TorchBackend:
    """DDP over dense parameters (expert parameters ignored by it) + EDP all-reduce for experts.

    Both reductions overlap backward: DDP's buckets for the dense parameters, and
    `ExpertGradBuckets` for the expert ones (each bucket's all-reduce starts from the
    post-accumulate-grad hook of its last gradient and is waited for in `finish_grads`).
    The norm and the clipping are foreach kernels over all gradients at once.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: MoEMesh,
                 device: torch.device, grad_clip: float, find_unused_parameters: bool = False):
        self.module, self.optimizer, self.mesh, self.grad_clip = model, optimizer, mesh, grad_clip
        self.device = device
        self.dense, self.expert = _split_params(model)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.expert_sync = None
        if self.world > 1:
            # find_unused_parameters: a step that leaves some parameters without gradient (the
            # MultiModel's other modality nets in joint training) would otherwise hang DDP.
            self.model = wrap_ddp(model, mesh, device_ids=[device] if device.type == "cuda" else None,
                                  find_unused_parameters=find_unused_parameters)
            self._broadcast_experts()
            self.expert_sync = expert_grad_sync(model, mesh)
        else:
            self.model = model

    def _broadcast_experts(self) -> None:
        """Replicas of an expert start equal (DDP only broadcasts the parameters it owns)."""
        group = self.mesh.edp_group
        src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
        with torch.no_grad():
            for p in self.expert:
                broadcast_(p.data, src=src, group=group)

    def accumulate(self, last: bool):
        if self.expert_sync is not None:
            self.expert_sync.enabled = last
        if self.world > 1 and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def finish_grads(self) -> torch.Tensor:
        if self.expert_sync is not None:
            self.expert_sync.finish()
        self._norm = self._grad_norm()
        return self._norm

    def _grad_norm(self) -> torch.Tensor:
        def sq(params) -> torch.Tensor:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return torch.zeros((), device=self.device)
            return torch.stack(torch._foreach_norm(grads)).float().square().sum().to(self.device)

        dense_sq, expert_sq = sq(self.dense), sq(self.expert)
        if self.mesh.ep_size > 1:  # each EP rank holds different experts
            expert_sq = all_reduce(expert_sq, self.device, group=self.mesh.ep_group)
        return (dense_sq + expert_sq).sqrt()

    def step(self, lr: float, skip: bool) -> tuple[bool, float]:
        """Clip to `grad_clip` and step, or (skip) drop the gradients without any update."""
        norm = self._norm
        if not skip:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.dense + self.expert, self.grad_clip, norm, foreach=True)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip, float(norm)


class FSDPBackend:
    """FSDP2 (`distributed/parallelize.py: apply_fsdp`): parameters, gradients and AdamW state sharded.

    Gradients are reduce-scattered during backward by FSDP itself (dense averaged over the
    world, experts over their EDP group, then scaled here to EDP sum / world). Every gradient element lives on
    exactly one rank, so the global norm is one all-reduce of the local sums of squares.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, grad_clip: float,
                 ep_size: int = 1):
        self.model = self.module = model
        self.optimizer, self.device, self.grad_clip = optimizer, device, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        names = expert_param_names(model)
        self.expert = [p for n, p in model.named_parameters() if n in names and p.requires_grad]
        self.ep_size = ep_size

    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _local_grads(self) -> list[torch.Tensor]:
        return [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in self.params if p.grad is not None]

    def finish_grads(self) -> torch.Tensor:
        expert_grads = [p.grad.to_local() for p in self.expert if p.grad is not None]
        if self.ep_size > 1 and expert_grads:  # FSDP averaged over EDP; the rule is EDP sum / world
            torch._foreach_mul_(expert_grads, 1.0 / self.ep_size)
        grads = self._local_grads()
        sq = (torch.stack(torch._foreach_norm(grads)).float().square().sum() if grads
              else torch.zeros((), device=self.device))
        self._norm = all_reduce(sq, self.device).sqrt()
        return self._norm

    def step(self, lr: float, skip: bool) -> tuple[bool, float]:
        norm = self._norm
        if not skip:
            if self.grad_clip > 0:
                coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
                torch._foreach_mul_(self._local_grads(), coef)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip, float(norm)


def deepspeed_config(path: str, *, micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool,
                     world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; batch, accumulation, clipping and bf16 come from our config.

    A value the JSON sets differently is an error naming both keys, so the two files never
    silently disagree.
    """
    with open(path) as f:
        ds = json.load(f)
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    mapping = {"train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps": "train.grad_accum",
               "train_batch_size": "data.batch_size x train.grad_accum x world size",
               "gradient_clipping": "optim.grad_clip"}
    for key, value in ours.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ValueError(f"{path}: {key}={ds[key]} disagrees with {mapping[key]} = {value}; "
                             f"remove it from the JSON or set it to \"auto\"")
        ds[key] = value
    if "bf16" in ds and ds["bf16"].get("enabled") not in ("auto", bf16):
        raise ValueError(f"{path}: bf16.enabled={ds['bf16'].get('enabled')} disagrees with train.precision; "
                         f"remove it from the JSON or set it to \"auto\"")
    ds["bf16"] = {"enabled": bf16}
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: leave out \"optimizer\" and \"scheduler\"; the trainer builds AdamW with "
                         f"expert/dense groups and the warmup + cosine schedule from the optim section")
    return ds


@contextlib.contextmanager
def _deepspeed_sees_moe_layers(model: nn.Module, ep_size: int):
    """Let `deepspeed.initialize` treat our `MoELayer`s as its own expert-parallel MoE layers.

    The engine decides `has_moe_layers` (and so whether ZeRO reduces and partitions the tagged
    expert parameters over their EDP group "ep_size_N" instead of the world) only by
    `isinstance(module, deepspeed.moe.layer.MoE)` during `initialize`; it reads nothing of
    those layers but `num_experts`. So: create DeepSpeed's EP/EDP groups (the same consecutive
    layout as `build_mesh`), and for the duration of `initialize` make that check accept
    `MoELayer`. Too late afterwards: the ZeRO optimizer is built inside `initialize`.
    """
    if ep_size == 1:
        yield
        return
    import deepspeed
    from deepspeed.runtime import engine
    from deepspeed.utils import groups

    from moe_scale.moe.layer import MoELayer

    # wraps the trainer's process group; DeepSpeed knows backends by name, not by device map
    deepspeed.init_distributed(dist_backend="nccl" if "nccl" in dist.get_backend() else dist.get_backend())
    if f"ep_size_{ep_size}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.num_experts = m.cfg.num_experts
    native = engine.MoE
    engine.MoE = (native, MoELayer)
    try:
        yield
    finally:
        engine.MoE = native


class DeepSpeedBackend:
    """`deepspeed.initialize` with the AdamW dense/expert groups; ZeRO stage from the JSON config.

    The engine reduces gradients (ZeRO-1/2 partition optimizer state, ZeRO-2 gradients too),
    clips them (`gradient_clipping` = optim.grad_clip) and steps at the accumulation boundary;
    `engine.step()` is called after every micro-batch, as DeepSpeed expects. The global norm
    is only known after the step, so inf/nan is caught on the loss instead: `backward`
    back-propagates a zero loss for a micro-batch whose loss is not finite on some rank (the
    engine's hooks and buckets still run, nothing is added), and that step runs with lr = 0:
    the parameters do not change (AdamW's moment estimates do see the other micro-batches).

    With ep_size = 1 expert parameters are ordinary data-parallel parameters for DeepSpeed
    (every rank holds every expert). With ep_size > 1 the engine is told the model has MoE
    layers (`_deepspeed_sees_moe_layers`), so ZeRO-1/2 reduce the tagged expert parameters
    (`allreduce=False`, `group_name="ep_size_N"`, optimizer group of that name) over their
    EDP group, divided by the world size as the torch backend does.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 ep_size: int = 1):
        import deepspeed

        with _deepspeed_sees_moe_layers(model, ep_size):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine
        self.module = self.engine.module

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if any_rank(not bool(torch.isfinite(loss.detach())), loss.device):
            # The engine cannot drop accumulated gradients: back-propagate zero instead (its hooks
            # and buckets still run, nothing is added); the trainer then skips the step.
            loss = sum(p.sum() for p in self.module.parameters()) * 0.0
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by grad_accum
        if not last:
            self.engine.step()  # not a boundary: only advances the engine's micro-step count

    def finish_grads(self) -> None:
        return None

    def step(self, lr: float, skip: bool) -> tuple[bool, float]:
        set_lr(self.optimizer, 0.0 if skip else lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return not skip, float(norm) if norm is not None else float("nan")
