"""`ExpertGradBuckets`: expert gradients reduced bucket by bucket during backward, same result as after it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_scale.distributed.grad_sync import ExpertGradBuckets
from moe_scale.distributed.launch import run_local


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _rank(rank: int, world: int) -> dict:
    model, ref = _model(0), _model(0)
    params = list(model.parameters())
    sync = ExpertGradBuckets(params, dist.group.WORLD, 1.0 / world, bucket_bytes=16 * 16 * 4)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    unused = nn.Parameter(torch.ones(3))  # no gradient this step: reduced as zeros, in order
    sync_unused = ExpertGradBuckets([unused], dist.group.WORLD, 1.0 / world)
    model(x).square().sum().backward()
    started_in_backward = len(sync._launched)
    sync.finish()
    sync_unused.finish()
    ref(x).square().sum().backward()
    for p in ref.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    return {"buckets": len(sync.buckets), "started_in_backward": started_in_backward,
            "equal": all(torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7) for a, b in zip(params, ref.parameters())),
            "unused": unused.grad.tolist()}


def test_buckets_start_during_backward_and_average_like_a_plain_all_reduce():
    for r in run_local(_rank, 2, timeout=60):
        assert r["equal"]
        assert r["buckets"] >= 3 and r["started_in_backward"] == r["buckets"]  # every bucket before backward returned
        assert r["unused"] == [0.0, 0.0, 0.0]
