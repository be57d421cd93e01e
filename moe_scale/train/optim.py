"""AdamW parameter groups (dense decay / dense no-decay / experts) and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_scale.distributed.parallelize import expert_param_names


def param_groups(model: nn.Module, lr: float, weight_decay: float, expert_lr_scale: float = 1.0,
                 expert_weight_decay: float | None = None) -> list[dict]:
    """Matrices decay, vectors (norms, biases) do not (nanoGPT); experts are a group of their own.

    Each group carries `lr_scale` (applied by `set_lr`) and `moe` (DeepSpeed's MoE group flag).
    """
    experts = expert_param_names(model)
    decay, no_decay, expert = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in experts:
            expert.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "dense_decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "moe": False},
        {"name": "dense_no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "moe": False},
    ]
    if expert:
        wd = weight_decay if expert_weight_decay is None else expert_weight_decay
        name = getattr(expert[0], "group_name", "experts")  # DeepSpeed's ZeRO finds the EDP group by it
        groups.append({"name": name, "params": expert, "weight_decay": wd, "lr_scale": expert_lr_scale,
                       "moe": True})
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], optim_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups`: one fused kernel per step on CUDA, foreach (multi-tensor) kernels on the CPU."""
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas, eps=optim_cfg.eps, **kernel)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr at `max_steps` (step is 0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: `lr` times the group's `lr_scale` (experts may train slower)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
