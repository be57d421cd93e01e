"""Capacity, drop policy and index-based permutation of tokens to experts, in static shapes.

The plan sorts the N (token, expert) assignments by expert with a stable sort and gives each a
row of the experts' input `[N, d]`: kept assignments first, grouped by expert, then the ones
dropped for capacity (or withdrawn by the router), parked past the last expert's rows where
the grouped GEMM neither reads nor writes them. Nothing has a data-dependent size: counts,
offsets and ranks are device tensors, so the plan runs on `meta`, compiles with
`fullgraph=True` and never syncs a GPU. Nothing of size S*E or S*E*C is built.

    permute     x_Sd -> x_Nd        row r holds the token of the assignment placed there
    combine     y_Nd -> y_Sd        y[s] = sum_j w[j, s] * y[row[j, s]]   (float32; zero if dropped)

Rows and assignments are in one-to-one correspondence, so both directions are gathers,
forward and backward, for token-choice routing (k slots per token, slot-major): no atomic
scatter-add, deterministic on every device. Expert-choice routing (a variable number of
experts per token) combines with `index_add`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_scale.moe.routing import Routing, expert_counts

DROP_POLICIES = ("position", "probability")


@dataclass
class DispatchPlan:
    """Where each assignment goes (N assignments, E experts; every tensor on the routing's device).

    row_token_N          token of each row of the experts' input
    row_of_assignment_N  row of each assignment (a permutation of [0, N))
    assignment_of_row_N  its inverse: the assignment each row holds
    kept_N               per assignment: computed by its expert (bool)
    counts_E             kept assignments per expert (int64); they fill rows [0, sum) in order
    routed_E             valid assignments per expert before capacity drops (int64)
    num_dropped          valid assignments dropped for capacity (0-dim int64)
    capacity             per-expert capacity, None when uncapped
    num_slots            k for slot-major token-choice routings (N = k * S), else None
    weight_N             the routing's combine weights
    """

    row_token_N: Tensor
    row_of_assignment_N: Tensor
    assignment_of_row_N: Tensor
    kept_N: Tensor
    counts_E: Tensor
    routed_E: Tensor
    num_dropped: Tensor
    capacity: int | None
    num_slots: int | None
    weight_N: Tensor

    @property
    def num_rows(self) -> int:
        return self.row_token_N.shape[0]


def plan_dispatch(routing: Routing, capacity: int | None, drop_policy: str = "position") -> DispatchPlan:
    """Sort assignments by expert and apply the capacity.

    drop_policy "position": an expert keeps its assignments in routing order (first choices
    before second choices, earlier tokens first). "probability": it keeps the highest weights.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    E, N = routing.num_experts, routing.expert_idx_N.numel()
    device = routing.expert_idx_N.device
    # Withdrawn assignments get the key E and sort after every real one.
    key_N = routing.expert_idx_N
    if routing.valid_N is not None:
        key_N = key_N.masked_fill(~routing.valid_N, E)
    if drop_policy == "probability" and capacity is not None:
        by_weight = torch.argsort(routing.weight_N.detach(), descending=True, stable=True)
        order = by_weight.index_select(0, torch.argsort(key_N.index_select(0, by_weight), stable=True))
    else:
        order = torch.argsort(key_N, stable=True)
    routed_K = expert_counts(key_N, E + 1)  # the last bin counts withdrawn assignments
    routed_E = routed_K[:E]
    arange_N = torch.arange(N, device=device)
    if capacity is None and routing.valid_N is None:  # every assignment kept, in sorted order
        row_sorted = arange_N
        kept_E = routed_E
        kept_sorted = torch.ones(N, dtype=torch.bool, device=device)
    else:
        sorted_key = key_N.index_select(0, order)
        starts_K = torch.cumsum(routed_K, 0) - routed_K
        rank_sorted = arange_N - starts_K.index_select(0, sorted_key)
        kept_sorted = sorted_key < E
        kept_E = routed_E
        if capacity is not None:
            kept_sorted = kept_sorted & (rank_sorted < capacity)
            kept_E = routed_E.clamp(max=capacity)
        kept_starts_E = torch.cumsum(kept_E, 0) - kept_E
        kept_row = kept_starts_E.index_select(0, sorted_key.clamp(max=E - 1)) + rank_sorted
        # Dropped and withdrawn assignments take the rows after the kept ones, in sorted order.
        parked_row = kept_E.sum() + torch.cumsum(~kept_sorted, 0) - 1
        row_sorted = torch.where(kept_sorted, kept_row, parked_row)
    row_of_assignment = torch.empty_like(order).scatter_(0, order, row_sorted)
    assignment_of_row = torch.empty_like(order).scatter_(0, row_sorted, order)
    kept_N = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)
    return DispatchPlan(
        row_token_N=routing.token_idx_N.index_select(0, assignment_of_row),
        row_of_assignment_N=row_of_assignment,
        assignment_of_row_N=assignment_of_row,
        kept_N=kept_N,
        counts_E=kept_E,
        routed_E=routed_E,
        num_dropped=routed_E.sum() - kept_E.sum(),
        capacity=capacity,
        num_slots=routing.num_slots,
        weight_N=routing.weight_N,
    )


class _Permute(torch.autograd.Function):
    """x_Nd = x_Sd[row_token]; the backward sums each token's k rows with gathers (no scatter)."""

    @staticmethod
    def forward(ctx, x_Sd: Tensor, row_token_N: Tensor, row_kS: Tensor):
        ctx.save_for_backward(row_kS)
        return x_Sd.index_select(0, row_token_N)

    @staticmethod
    def backward(ctx, grad_Nd: Tensor):
        (row_kS,) = ctx.saved_tensors
        grad_Sd = grad_Nd.index_select(0, row_kS[0])
        for j in range(1, row_kS.shape[0]):
            grad_Sd = grad_Sd + grad_Nd.index_select(0, row_kS[j])
        return grad_Sd, None, None


def permute(x_Sd: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather the token of every row: `[S, d]` -> `[N, d]`, kept rows grouped by expert first."""
    if plan.num_slots is None:
        return x_Sd.index_select(0, plan.row_token_N)
    row_kS = plan.row_of_assignment_N.view(plan.num_slots, -1)
    return _Permute.apply(x_Sd, plan.row_token_N, row_kS)


def combine_dtype(y_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The combine sums in float32 at least (float64 stays float64)."""
    return torch.promote_types(torch.promote_types(y_dtype, weight_dtype), torch.float32)


class _Combine(torch.autograd.Function):
    """y_Sd[s] = sum_j w[j, s] * y_Nd[row[j, s]] in `combine_dtype`, with w = 0 where not kept.

    Backward, both gathers: the row gradient is w * grad[token of row], the weight gradient of
    a kept assignment is <y[row], grad[token]>.
    """

    @staticmethod
    def forward(ctx, y_Nd: Tensor, weight_kS: Tensor, row_kS: Tensor, kept_kS: Tensor, row_token_N: Tensor,
                assignment_of_row_N: Tensor):
        acc = combine_dtype(y_Nd.dtype, weight_kS.dtype)
        w_kS = torch.where(kept_kS, weight_kS, 0).to(acc)
        ctx.save_for_backward(y_Nd, w_kS, row_kS, kept_kS, row_token_N, assignment_of_row_N)
        ctx.weight_dtype = weight_kS.dtype
        out_Sd = y_Nd.index_select(0, row_kS[0]).to(acc) * w_kS[0, :, None]
        for j in range(1, row_kS.shape[0]):
            out_Sd = out_Sd.addcmul_(y_Nd.index_select(0, row_kS[j]).to(acc), w_kS[j, :, None])
        return out_Sd

    @staticmethod
    def backward(ctx, grad_Sd: Tensor):
        y_Nd, w_kS, row_kS, kept_kS, row_token_N, assignment_of_row_N = ctx.saved_tensors
        grad_y = grad_w = None
        grad_rows_Nd = grad_Sd.to(w_kS.dtype).index_select(0, row_token_N)
        if ctx.needs_input_grad[0]:
            w_row_N = w_kS.reshape(-1).index_select(0, assignment_of_row_N)
            grad_y = (grad_rows_Nd * w_row_N[:, None]).to(y_Nd.dtype)
        if ctx.needs_input_grad[1]:
            dots_N = (y_Nd.to(w_kS.dtype) * grad_rows_Nd).sum(-1)
            dots_kS = dots_N.index_select(0, row_kS.reshape(-1)).view_as(row_kS)
            grad_w = torch.where(kept_kS, dots_kS, 0).to(ctx.weight_dtype)
        return grad_y, grad_w, None, None, None, None


def combine(y_Nd: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted sum of each token's expert outputs, in float32 at least: `[N, d]` -> `[S, d]`
    (zero if none kept)."""
    if plan.num_slots is None:
        acc = combine_dtype(y_Nd.dtype, plan.weight_N.dtype)
        w_N = torch.where(plan.kept_N, plan.weight_N, 0).to(acc).index_select(0, plan.assignment_of_row_N)
        weighted = y_Nd.to(acc) * w_N[:, None]
        return weighted.new_zeros(num_tokens, y_Nd.shape[-1]).index_add(0, plan.row_token_N, weighted)
    k = plan.num_slots
    return _Combine.apply(y_Nd, plan.weight_N.view(k, -1), plan.row_of_assignment_N.view(k, -1),
                          plan.kept_N.view(k, -1), plan.row_token_N, plan.assignment_of_row_N)


def served_tokens(plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Number of tokens with at least one computed assignment (0-dim int64)."""
    if plan.num_slots is not None:
        return plan.kept_N.view(plan.num_slots, -1).any(0).sum()
    token_N = plan.row_token_N.index_select(0, plan.row_of_assignment_N)
    served = torch.zeros(num_tokens, dtype=torch.long, device=token_N.device)
    return served.index_add(0, token_N, plan.kept_N.long()).clamp(max=1).sum()
