"""A one-process smoke run: fit a mixture of random teacher MLPs with an MoE layer on CPU.

Tokens are drawn from `num_clusters` clusters and each cluster has its own teacher function,
so a layer whose router learns to send each cluster to its own expert fits the data far
better than one shared MLP of the same active size. The loss printed every `log_every` steps
falls as the router specialises.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moe_scale.moe import MoELayer


class _TeacherTask:
    def __init__(self, d: int, clusters: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(clusters, d, generator=g) * 3
        self.teachers = torch.randn(clusters, d, d, generator=g) / d**0.5
        self.g = g

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.randint(len(self.centers), (n,), generator=self.g)
        x = self.centers[c] + torch.randn(n, self.centers.shape[1], generator=self.g)
        y = torch.tanh(torch.einsum("nd,nde->ne", x, self.teachers[c]))
        return x, y


def run_demo(steps: int = 300, num_experts: int = 8, d_model: int = 32, batch: int = 512,
             router: str = "topk", seed: int = 0, log_every: int = 50) -> list[float]:
    """Train for `steps` and return the logged losses."""
    torch.manual_seed(seed)
    task = _TeacherTask(d_model, num_experts, seed)
    layer = MoELayer(d_model, num_experts, k=2 if router != "switch" else 1, router=router,
                     aux_loss=dict(switch=0.01), dropless=True)
    head = nn.LayerNorm(d_model)
    opt = torch.optim.AdamW(list(layer.parameters()) + list(head.parameters()), lr=3e-3)
    losses, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = task.batch(batch)
        out, stats = layer(head(x))
        loss = nn.functional.mse_loss(out, y)
        opt.zero_grad()
        (loss + stats.aux_loss).backward()
        opt.step()
        if step % log_every == 0 or step == 1:
            load = stats.tokens_per_expert_E.float()
            print(f"step {step:4d}  mse {loss.item():.4f}  aux {stats.aux_loss.item():.4f}  "
                  f"max/mean load {(load.max() / load.mean()).item():.2f}  "
                  f"{step * batch / (time.perf_counter() - t0):,.0f} tokens/s", flush=True)
            losses.append(loss.item())
    return losses
