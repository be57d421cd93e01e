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
    sync = expert_grad_sync(model, mesh)     # expert grads: summed over EDP, divided by W
    loss.backward()                          # both reductions start during backward
    sync.finish()

`ExpertGradBuckets` does the expert half during backward: the expert gradients are
packed into buckets (in the reverse order of the parameters, roughly the order backward
produces them) and a bucket's all-reduce starts as soon as its last gradient is accumulated,
so the reduction of late layers overlaps the backward of early ones, as DDP does for the
dense half. Buckets start strictly in order on every rank (a collective order that differs
between ranks would pair the wrong tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from moe_scale.distributed.collectives import all_reduce_async
from moe_scale.distributed.mesh import MoEMesh
from moe_scale.distributed.parallelize import expert_param_names


def wrap_ddp(model: nn.Module, mesh: MoEMesh, **ddp_kwargs) -> DistributedDataParallel:
    """DDP over the data-parallel world that leaves the expert parameters alone."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_param_names(model)))
    return DistributedDataParallel(model, process_group=mesh.dp_group, **ddp_kwargs)


def expert_grad_sync(model: nn.Module, mesh: MoEMesh) -> "ExpertGradBuckets":
    """The expert half of the gradient rule for `model`'s expert parameters on `mesh`.

    The buckets run on a group of their own even when the EDP group is the whole world: DDP's
    bucket all-reduces run on the default group during the same backward, and on one group two
    streams of collectives could pair up differently on different ranks (a bucket ready on one
    rank, its parameter unused on another).
    """
    names = expert_param_names(model)
    params = [p for n, p in model.named_parameters() if n in names and p.requires_grad]
    edp = mesh.edp_group
    if edp is None or edp is dist.group.WORLD:
        edp = dist.new_group(list(range(dist.get_world_size())))
    return ExpertGradBuckets(params, edp, 1.0 / dist.get_world_size(mesh.dp_group))


class ExpertGradBuckets:
    """Sum expert gradients over `group` and multiply by `scale`, bucket by bucket, during backward.

        sync = ExpertGradBuckets(expert_params, edp_group, 1 / world)
        sync.enabled = last_micro_step     # micro-steps before the last only accumulate
        loss.backward()                     # full buckets start their all-reduce here
        sync.finish()                       # the rest start; all are waited for and scaled

    A parameter that got no gradient in a step counts as zeros (every rank must join every
    bucket). Gradients must be dense and contiguous, as autograd leaves them.
    """

    def __init__(self, params: list[nn.Parameter], group, scale: float, bucket_bytes: int = 25 * 2**20):
        self.group, self.scale, self.enabled = group, scale, True
        self.buckets: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            fits = self.buckets and self.buckets[-1][0].dtype == p.dtype and size + nbytes <= bucket_bytes
            if not fits:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for b in self.buckets for p in b]

    def _reset(self) -> None:
        self._pending = [len(b) for b in self.buckets]
        self._launched: list[tuple[torch.Tensor, object]] = []

    def _ready(self, p: nn.Parameter) -> None:
        if not self.enabled:
            return
        i = self._bucket_of[id(p)]
        self._pending[i] = max(self._pending[i] - 1, 0)
        while len(self._launched) < len(self.buckets) and self._pending[len(self._launched)] == 0:
            self._launch(len(self._launched))

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = _flatten_dense_tensors(grads)
        self._launched.append((flat, all_reduce_async(flat, flat.device, self.group)))

    @torch.no_grad()
    def finish(self) -> None:
        """Start the buckets backward left (unused parameters), wait for all, write grads back."""
        for i in range(len(self._launched), len(self.buckets)):
            self._launch(i)
        for bucket, (flat, work) in zip(self.buckets, self._launched):
            work.wait()
            flat.mul_(self.scale)
            for p, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                if p.grad is None:
                    p.grad = reduced.view_as(p).clone()
                else:
                    p.grad.copy_(reduced)
        self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
