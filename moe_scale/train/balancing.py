"""Expert balancing across a training step: global-batch losses and auxiliary-loss-free biases.

Layers with `balance_scope="global"` get a `BalanceWindow` that sums their balancing
statistics over the data-parallel world (one all-reduce of O(E) numbers per layer call) and
over the step's micro-batches; `begin_step` opens each step's window.

Each MoE layer with `bias_update_rate > 0` moves its per-expert selection bias after every
optimizer step by rate * sign(mean load - load), where the load is the number of assignments
routed to each expert over the whole step: every micro-batch of every data-parallel rank. The
counts stay on the device until the one all-reduce per step; every rank then applies the same
update to its replica of the router, so EP=1 and EP=N keep identical biases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_scale.distributed.collectives import all_reduce
from moe_scale.moe import MoELayer, MoEStats
from moe_scale.moe.losses import BalanceWindow


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t, t.device)


class ExpertBiasBalancer:
    def __init__(self, model: nn.Module, device: torch.device):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.active = any(layer.cfg.bias_update_rate > 0 for layer in self.layers)
        if dist.is_initialized() and dist.get_world_size() > 1:
            for layer in self.layers:
                if layer.balance_window is not None:
                    layer.balance_window = BalanceWindow(_sum_over_ranks, dist.get_world_size())
        E = self.layers[0].cfg.num_experts if self.layers else 0
        self.load_LE = torch.zeros(len(self.layers), E, dtype=torch.float64, device=device)

    def begin_step(self) -> None:
        for layer in self.layers:
            if layer.balance_window is not None:
                layer.balance_window.begin_step()

    def add(self, stats: list[MoEStats]) -> None:
        """The routed counts of one micro-batch, one entry per MoE layer in module order."""
        if self.active and stats:
            self.load_LE += torch.stack([s.routed_per_expert_E.detach() for s in stats]).to(self.load_LE.dtype)

    def step(self, applied: bool) -> None:
        """After the optimizer step: sum the step's load over ranks and move the biases (only if
        the step was applied); start the next step's count."""
        if not self.active:
            return
        if applied:
            if dist.is_initialized() and dist.get_world_size() > 1:
                self.load_LE = all_reduce(self.load_LE, self.load_LE.device)
            for layer, load_E in zip(self.layers, self.load_LE):
                layer.update_expert_bias(load_E)
        self.load_LE.zero_()
