"""`MoELayer`: router -> dispatch plan -> (comm) -> grouped experts -> (comm) -> combine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property, partial

import torch
from torch import Tensor, nn

from moe_scale.distributed.comm import LocalComm
from moe_scale.moe.config import MoEConfig
from moe_scale.moe.dispatch import permute, plan_dispatch, served_tokens, unpermute
from moe_scale.moe.experts import GroupedExperts
from moe_scale.moe.losses import _NEEDS, aux_losses, check_supported, weighted_names, weighted_total
from moe_scale.moe.routing import (
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    MinLossRouter,
    NoisyTopKRouter,
    RouterStats,
    TopKSoftmaxRouter,
    capacity_for,
)

# The RouterStats fields each policy fills, so unsupported loss weights fail at construction.
_ROUTER_STATS = {
    "noisy_topk": set(_NEEDS.values()),
    "switch": {"importance_E", "prob_mean_E", "z_loss"},
    "topk": {"importance_E", "prob_mean_E", "z_loss"},
    "expert_choice": {"z_loss"},
    "hash": set(),
    "hierarchical": {"importance_E", "load_E", "z_loss"},
    "min_loss": set(),
}


@dataclass
class MoEStats:
    """What one MoE layer call did (global expert axis E; tokens of this process).

    tokens_per_expert_E   assignments computed by each expert (after capacity drops)
    routed_per_expert_E   assignments routed to each expert (before drops)
    num_dropped           assignments dropped for capacity (0-dim)
    num_unrouted          tokens with no computed assignment: their layer output is zero (0-dim)
    num_assignments       assignments before drops (0-dim)
    num_tokens            tokens in the call
    capacity              per-expert capacity used, None when dropless
    aux_losses            every balancing loss the router supports, unweighted
    aux_loss              weighted sum: add it to the training loss

    `num_unrouted`, `num_assignments` and the unweighted losses are computed on first read
    (the weighted ones are part of `aux_loss` already): a step that does not read them does
    not pay for their small ops.
    """

    tokens_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    num_dropped: Tensor
    num_tokens: int
    capacity: int | None
    aux_loss: Tensor
    _router_stats: RouterStats = field(repr=False)
    _weighted_losses: dict[str, Tensor] = field(repr=False)
    _num_experts: int = field(repr=False)
    _served: Callable[[], Tensor] = field(repr=False)

    @cached_property
    def aux_losses(self) -> dict[str, Tensor]:
        unweighted = set(_NEEDS) - set(self._weighted_losses)
        return {**self._weighted_losses, **aux_losses(self._router_stats, self._num_experts, only=unweighted)}

    @cached_property
    def num_unrouted(self) -> Tensor:
        return self.num_tokens - self._served()

    @cached_property
    def num_assignments(self) -> Tensor:
        return self.routed_per_expert_E.sum()

    @property
    def dropped_fraction(self) -> Tensor:
        return self.num_dropped.float() / self.num_assignments.clamp(min=1).float()


def build_router(cfg: MoEConfig) -> nn.Module:
    d, E = cfg.d_model, cfg.num_experts
    if cfg.router == "noisy_topk":
        return NoisyTopKRouter(d, E, cfg.k)
    if cfg.router == "switch":
        return TopKSoftmaxRouter(d, E, k=1, renormalize=False, jitter=cfg.jitter)
    if cfg.router == "topk":
        return TopKSoftmaxRouter(d, E, k=cfg.k, jitter=cfg.jitter, random_second=cfg.random_second)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(d, E)
    if cfg.router == "hash":
        return HashRouter(E)
    if cfg.router == "hierarchical":
        a = cfg.hierarchical_groups
        return HierarchicalRouter(d, a, E // a, k_groups=cfg.hierarchical_k_groups, k_experts=cfg.k)
    return MinLossRouter(E)


class MoELayer(nn.Module):
    """Sparsely-gated mixture of feed-forward experts.

    `MoELayer(d_model, num_experts, **options)` with the options of `MoEConfig`.
    forward(x `[..., d]`, token_ids `[...]` (hash routing), expert_losses `[..., E]`
    (min-loss routing)) -> (y `[..., d]`, MoEStats). A token whose assignments are all
    dropped gets zero output: keep a residual connection around the layer.
    """

    def __init__(self, d_model: int, num_experts: int, **options):
        super().__init__()
        unknown = set(options) - {f.name for f in fields(MoEConfig)}
        if unknown:
            raise TypeError(f"unknown MoELayer option(s) {sorted(unknown)}; see MoEConfig for the options")
        self.cfg = cfg = MoEConfig(d_model=d_model, num_experts=num_experts, **options)
        check_supported(cfg.aux_loss, _ROUTER_STATS[cfg.router], cfg.router)
        self.router = build_router(cfg)
        self.experts = GroupedExperts(
            num_experts, d_model, cfg.d_hidden, cfg.activation, bias=cfg.expert_bias, method=cfg.grouped_gemm
        )
        self.comm = LocalComm()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "MoELayer":
        options = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("d_model", "num_experts")}
        return cls(cfg.d_model, cfg.num_experts, **options)

    def capacity(self, num_tokens: int) -> int:
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return capacity_for(num_tokens, self.cfg.num_experts, self.cfg.experts_per_token, cf, self.cfg.min_capacity)

    def forward(
        self, x: Tensor, *, token_ids: Tensor | None = None, expert_losses: Tensor | None = None
    ) -> tuple[Tensor, MoEStats]:
        d = self.cfg.d_model
        if x.shape[-1] != d:
            raise ValueError(f"MoELayer(d_model={d}) expects inputs [..., {d}], got {tuple(x.shape)}")
        x_Sd = x if x.dim() == 2 else x.reshape(-1, d)  # (a reshape to the same shape is an autograd view)
        S = x_Sd.shape[0]
        capacity = self.capacity(S)
        positions = None
        if x.dim() >= 3 and token_ids is None:
            positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1]).reshape(-1)
        routing = self.router(
            x_Sd, token_ids=token_ids, positions=positions, expert_losses=expert_losses, capacity=capacity
        )
        uncapped = self.cfg.dropless or routing.capacity_bound
        plan = plan_dispatch(routing, None if uncapped else capacity, self.cfg.drop_policy)

        x_Md = permute(x_Sd, plan)
        x_local, local_counts, handle = self.comm.dispatch(x_Md, plan.counts_E)
        y_local = self.experts(x_local, local_counts)
        y_Md = self.comm.combine(y_local, handle)
        y_Sd = unpermute(y_Md, plan, S)

        weighted = aux_losses(routing.stats, self.cfg.num_experts, only=weighted_names(self.cfg.aux_loss))
        stats = MoEStats(
            tokens_per_expert_E=plan.counts_E,
            routed_per_expert_E=plan.routed_E,
            num_dropped=plan.num_dropped,
            num_tokens=S,
            capacity=None if uncapped else capacity,
            aux_loss=weighted_total(weighted, self.cfg.aux_loss, y_Sd),
            _router_stats=routing.stats,
            _weighted_losses=weighted,
            _num_experts=self.cfg.num_experts,
            _served=partial(served_tokens, plan, S),
        )
        return (y_Sd if x.dim() == 2 else y_Sd.reshape(x.shape)), stats
