"""Training steps: EP=2 x EDP=2 on 4 ranks == one process with the full batch; determinism."""

from __future__ import annotations

import copy
import random
import time

import pytest
import torch
from torch import nn

from moe_scale.distributed.determinism import rank_seed, seed_everything
from moe_scale.distributed.grad_sync import expert_grad_sync, wrap_ddp
from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import build_mesh
from moe_scale.distributed.parallelize import is_expert_param, parallelize
from moe_scale.moe import MoELayer

WORLD, D, E, H, TOKENS_PER_RANK, STEPS = 4, 8, 8, 16, 16, 3


class TinyMoEModel(nn.Module):
    """Linear -> MoE (residual) -> Linear head. Holds no process group (parallelize adds them)."""

    def __init__(self, **moe_options):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(D, E, d_hidden=H, **moe_options)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        y, stats = self.moe(h)
        return self.head(h + y).squeeze(-1), stats.aux_loss


# Dropless top-2 with the z-loss: the z-loss is a mean over tokens, so the mean of the per-rank
# losses is exactly the full-batch loss (a CV^2 balancing loss would not be).
OPTIONS = dict(router="topk", k=2, dropless=True, aux_loss=dict(z=1e-2))


def _batches():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, WORLD * TOKENS_PER_RANK, D, generator=g)
    return xs, torch.sin(xs.sum(-1))


def _loss(model, x, y):
    pred, aux = model(x)
    return nn.functional.mse_loss(pred, y) + aux


def _train_reference(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xs, ys = _batches()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return model


def _train_ep(model, mesh):
    ddp = wrap_ddp(model, mesh)
    sync = expert_grad_sync(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xs, ys = _batches()
    shard = slice(mesh.rank * TOKENS_PER_RANK, (mesh.rank + 1) * TOKENS_PER_RANK)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        _loss(ddp, x[shard], y[shard]).backward()
        sync.finish()
        opt.step()
    sync.remove()
    return model


def _steps_main(rank: int, world: int) -> list[str]:
    torch.manual_seed(0)
    initial = TinyMoEModel(**OPTIONS)
    reference = _train_reference(copy.deepcopy(initial))
    mesh = build_mesh(ep_size=2)
    block = mesh.local_experts(E)
    failures = []
    model = _train_ep(parallelize(copy.deepcopy(initial), mesh), mesh)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        want = p_ref[block.start : block.stop] if is_expert_param(p) else p_ref
        if not torch.allclose(p, want, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {rank} {name}: max diff {(p - want).abs().max().item():.3g}")
    moved = (model.moe.experts.w1 - initial.moe.experts.w1[block.start : block.stop]).abs().max()
    assert moved > 1e-3, "the experts did not train"
    return failures


@pytest.mark.timeout(90)
def test_ep2_x_edp2_steps_equal_one_process_full_batch():
    results = run_local(_steps_main, WORLD, timeout=80)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


def _deterministic_main(rank: int, world: int, jitter_arrivals: bool) -> list[torch.Tensor]:
    seed_everything(1234, deterministic=True, warn_only=False)
    model = TinyMoEModel(router="noisy_topk", k=2, capacity_factor=1.0, aux_loss=dict(load=0.1))
    torch.manual_seed(rank_seed(1234, rank))
    mesh = build_mesh(ep_size=2)
    model = parallelize(model, mesh)
    ddp = wrap_ddp(model, mesh)
    sync = expert_grad_sync(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xs, ys = _batches()
    shard = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    outputs = []
    delays = random.Random(rank)
    for x, y in zip(xs, ys):
        if jitter_arrivals:  # ranks reach the all-to-alls in a different order than in the first run
            time.sleep(delays.random() * 0.05)
        opt.zero_grad()
        pred, aux = ddp(x[shard])
        (nn.functional.mse_loss(pred, y[shard]) + aux).backward()
        sync.finish()
        outputs.append(pred.detach())
        outputs += [p.grad.clone() for p in model.parameters()]
        opt.step()
    return outputs + [p.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(90)
def test_deterministic_mode_is_bitwise_reproducible():
    first = run_local(_deterministic_main, 2, False, timeout=40)
    second = run_local(_deterministic_main, 2, True, timeout=40)
    for rank, (a, b) in enumerate(zip(first, second)):
        assert len(a) == len(b)
        for i, (ta, tb) in enumerate(zip(a, b)):
            assert torch.equal(ta, tb), f"rank {rank}: tensor {i} differs between runs"
