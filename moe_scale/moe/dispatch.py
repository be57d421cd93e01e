"""Capacity, drop policy and index-based permutation of tokens to experts.

The plan sorts the N (token, expert) assignments by expert with a stable sort and keeps the
first `capacity` of each expert; nothing of size S*E or S*E*C is built. Tokens move with a
gather (`permute`) and come back with a weighted `index_add` (`unpermute`), so a dropped
assignment contributes zero to its token and receives zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_scale.moe.routing import Routing

DROP_POLICIES = ("position", "probability")


@dataclass
class DispatchPlan:
    """Kept assignments sorted by expert.

    token_idx_M      token of each kept assignment, grouped by expert
    weight_M         its combine weight
    counts_E         kept assignments per expert (int64)
    routed_E         assignments per expert before capacity drops (int64)
    num_dropped      assignments dropped for capacity (0-dim int64)
    capacity         per-expert capacity, None when dropless
    """

    token_idx_M: Tensor
    weight_M: Tensor
    counts_E: Tensor
    routed_E: Tensor
    num_dropped: Tensor
    capacity: int | None


def plan_dispatch(routing: Routing, capacity: int | None, drop_policy: str = "position") -> DispatchPlan:
    """Sort assignments by expert and apply the capacity.

    drop_policy "position": an expert keeps its assignments in routing order (first choices
    before second choices, earlier tokens first). "probability": it keeps the highest weights.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    expert_N, E = routing.expert_idx_N, routing.num_experts
    if drop_policy == "probability" and capacity is not None:
        by_weight = torch.argsort(routing.weight_N.detach(), descending=True, stable=True)
        order = by_weight[torch.argsort(expert_N[by_weight], stable=True)]
    else:
        order = torch.argsort(expert_N, stable=True)
    routed_E = torch.bincount(expert_N, minlength=E)
    if capacity is None:
        kept_E, dropped = routed_E, expert_N.new_zeros(())
    else:
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        rank_N = torch.arange(order.numel(), device=order.device) - starts_E[expert_N[order]]
        order = order[rank_N < capacity]
        kept_E = routed_E.clamp(max=capacity)
        dropped = expert_N.numel() - kept_E.sum()
    return DispatchPlan(
        token_idx_M=routing.token_idx_N[order],
        weight_M=routing.weight_N[order],
        counts_E=kept_E,
        routed_E=routed_E,
        num_dropped=dropped,
        capacity=capacity,
    )


def permute(x_Sd: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather the token of every kept assignment: `[S, d]` -> `[M, d]` grouped by expert."""
    return x_Sd.index_select(0, plan.token_idx_M)


def unpermute(y_Md: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted sum of each token's expert outputs: `[M, d]` -> `[S, d]` (zero if none kept)."""
    weighted = y_Md * plan.weight_M.to(y_Md.dtype)[:, None]
    return y_Md.new_zeros(num_tokens, y_Md.shape[-1]).index_add(0, plan.token_idx_M, weighted)
