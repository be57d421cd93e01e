"""Capacity, drop policy and index-based permutation of tokens to experts.

The plan sorts the N (token, expert) assignments by expert with a stable sort and keeps the
first `capacity` of each expert; nothing of size S*E or S*E*C is built. Kept assignments
and rows of the expert input are in one-to-one correspondence, so for token-choice routing
(k slots per token) both directions of the exchange are gathers, forward and backward:

    permute     x_Sd -> x_Md          row m = token of kept assignment m
    unpermute   y_Md -> y_Sd          y[s] = sum_j w[j, s] * y[pos[j, s]]   (zero if dropped)

`pos_kS` maps each (slot, token) to its row, or to M when it was dropped. It is
slot-major, like the routing's assignment list, so each slot's row is contiguous and the
combine runs as k gathers and k fused multiply-adds over `[S, d]` (a batched `[1, k] x [k, d]`
matmul per token is several times slower on CPU). On CPU a
gather is much faster than the scatter-add that autograd would use for these backwards, and
it is deterministic. Expert-choice routing (a variable number of experts per token) falls
back to `index_add`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_scale.moe.cpu_kernels import kernels_for
from moe_scale.moe.deferred import DeferredFields
from moe_scale.moe.routing import Routing

DROP_POLICIES = ("position", "probability")


@dataclass
class DispatchPlan(DeferredFields):
    """Kept assignments sorted by expert.

    token_idx_M      token of each kept assignment, grouped by expert
    weight_M         its combine weight (differentiable; computed on first read when the plan
                     is slot-major, whose combine reads `weight_kS` instead)
    assignment_M     its index in the routing's assignment list
    counts_E         kept assignments per expert (int64)
    routed_E         valid assignments per expert before capacity drops (int64)
    num_dropped      valid assignments dropped for capacity (0-dim int64)
    capacity         per-expert capacity, None when uncapped
    pos_kS           row of each (slot, token) assignment, M where it is not computed; None
                     for routings that are not slot-major
    weight_kS        routing weights as [k, S] (slot-major routings only)
    """

    token_idx_M: Tensor
    weight_M: Tensor
    assignment_M: Tensor
    counts_E: Tensor
    routed_E: Tensor
    num_dropped: Tensor
    capacity: int | None
    pos_kS: Tensor | None
    weight_kS: Tensor | None

    _deferred = frozenset({"weight_M"})

    @property
    def num_rows(self) -> int:
        return self.token_idx_M.shape[0]


def plan_dispatch(routing: Routing, capacity: int | None, drop_policy: str = "position") -> DispatchPlan:
    """Sort assignments by expert and apply the capacity.

    drop_policy "position": an expert keeps its assignments in routing order (first choices
    before second choices, earlier tokens first). "probability": it keeps the highest weights.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    E, N = routing.num_experts, routing.expert_idx_N.numel()
    # Withdrawn assignments get the key E and sort after every real one.
    key_N = routing.expert_idx_N
    if routing.valid_N is not None:
        key_N = key_N.masked_fill(~routing.valid_N, E)
    kernels = kernels_for(key_N, dtypes=(torch.long,))
    if kernels is not None and routing.num_slots is not None and (drop_policy == "position" or capacity is None):
        return _plan_by_position(kernels, routing, key_N, capacity)
    if drop_policy == "probability" and capacity is not None:
        by_weight = torch.argsort(routing.weight_N.detach(), descending=True, stable=True)
        by_key, routed_E = _sort_by_key(kernels, key_N.index_select(0, by_weight), E + 1)
        order = by_weight.index_select(0, by_key)
    else:
        order, routed_E = _sort_by_key(kernels, key_N, E + 1)
    routed_E = routed_E[:E]
    num_valid = N if routing.valid_N is None else int(routed_E.sum())
    order = order[:num_valid]
    if capacity is None:
        kept_E, dropped = routed_E, routed_E.new_zeros(())
    else:
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        rank = torch.arange(num_valid, device=order.device) - starts_E.index_select(0, key_N.index_select(0, order))
        order = order[rank < capacity]
        kept_E = routed_E.clamp(max=capacity)
        dropped = routed_E.sum() - kept_E.sum()
    pos_kS = weight_kS = None
    if routing.num_slots is not None:
        M, S, k = order.numel(), routing.num_tokens, routing.num_slots
        pos_N = torch.full((N,), M, dtype=torch.long, device=order.device)
        pos_N[order] = torch.arange(M, device=order.device)
        pos_kS = pos_N.view(k, S)
        weight_kS = routing.weight_N.view(k, S)
    return DispatchPlan(
        token_idx_M=routing.token_idx_N.index_select(0, order),  # index_select: faster than [] on CPU
        weight_M=routing.weight_N.index_select(0, order),
        assignment_M=order,
        counts_E=kept_E,
        routed_E=routed_E,
        num_dropped=dropped,
        capacity=capacity,
        pos_kS=pos_kS,
        weight_kS=weight_kS,
    )


def _plan_by_position(kernels, routing: Routing, key_N: Tensor, capacity: int | None) -> DispatchPlan:
    """`plan_dispatch` of a slot-major routing under the position policy, in one compiled call
    (csrc/dispatch_kernels.cpp): the same plan as the sort, ranks and masks below."""
    k, S = routing.num_slots, routing.num_tokens
    order, token_M, kept_E, routed_E, pos_N, dropped = kernels.plan_by_position(
        key_N.contiguous(), routing.num_experts, -1 if capacity is None else capacity, S)
    return DispatchPlan(
        token_idx_M=token_M,
        weight_M=lambda: routing.weight_N.index_select(0, order),
        assignment_M=order,
        counts_E=kept_E,
        routed_E=routed_E,
        num_dropped=dropped,
        capacity=capacity,
        pos_kS=pos_N.view(k, S),
        weight_kS=routing.weight_N.view(k, S),
    )


def _sort_by_key(kernels, key_N: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """(stable order of `key_N`, count of each key in [0, num_keys)): a counting sort with the
    CPU kernels (csrc/dispatch_kernels.cpp), else argsort and bincount."""
    if kernels is not None:
        order, counts = kernels.sort_by_key(key_N.contiguous(), num_keys)
        return order, counts
    return torch.argsort(key_N, stable=True), torch.bincount(key_N, minlength=num_keys)


def _clamped(pos_kS: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Positions with the dropped ones (== M) pointing at a real row, and the kept mask `[k, S]`.

    Gathers read the clamped row and give it weight zero, rather than reading a zero row
    appended to the `[M, d]` rows: that append would copy all of them (and page-fault a new
    buffer) on every call.
    """
    return pos_kS.clamp(max=max(num_rows - 1, 0)), pos_kS < num_rows


def _gather_sum(rows_Md: Tensor, pos_kS: Tensor, weight_kS: Tensor | None = None) -> Tensor:
    """out[s] = sum_j w[j, s] * rows[pos[j, s]] (w = 1 when None), pos == M adds nothing. `[S, d]`."""
    S, d, M = pos_kS.shape[1], rows_Md.shape[-1], rows_Md.shape[0]
    if M == 0:
        return rows_Md.new_zeros(S, d)
    kernels = kernels_for(rows_Md)
    if kernels is not None:  # one pass, float32 accumulation (csrc/dispatch_kernels.cpp)
        weight = None if weight_kS is None else weight_kS.float().contiguous()
        return kernels.gather_sum(rows_Md.contiguous(), pos_kS.contiguous(), weight)
    pos, kept = _clamped(pos_kS, M)
    if weight_kS is None and bool(kept.all()):  # nothing dropped: a plain sum of gathers
        out = rows_Md.index_select(0, pos[0])
        for j in range(1, pos.shape[0]):
            out += rows_Md.index_select(0, pos[j])
        return out
    w = kept.to(rows_Md.dtype) if weight_kS is None else weight_kS.to(rows_Md.dtype) * kept
    out = rows_Md.index_select(0, pos[0]).mul_(w[0, :, None])
    for j in range(1, pos.shape[0]):
        out.addcmul_(rows_Md.index_select(0, pos[j]), w[j, :, None])
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Sd: Tensor, token_idx_M: Tensor, pos_kS: Tensor):
        ctx.save_for_backward(pos_kS)
        return x_Sd.index_select(0, token_idx_M)

    @staticmethod
    def backward(ctx, grad_Md):
        (pos_kS,) = ctx.saved_tensors
        return _gather_sum(grad_Md, pos_kS), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_Md: Tensor, weight_kS: Tensor, pos_kS: Tensor, token_idx_M: Tensor, assignment_M: Tensor):
        ctx.save_for_backward(y_Md, weight_kS, token_idx_M, assignment_M)
        return _gather_sum(y_Md, pos_kS, weight_kS)

    @staticmethod
    def backward(ctx, grad_Sd):
        y_Md, weight_kS, token_idx_M, assignment_M = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kernels = kernels_for(y_Md, grad_Sd)
        if kernels is not None and weight_kS.dtype == torch.float32 and (need_y or need_w):
            # one pass over the rows (csrc/dispatch_kernels.cpp), the same two gradients
            grad_y, grad_w = kernels.unpermute_backward(y_Md.contiguous(), grad_Sd.contiguous(), token_idx_M,
                                                        assignment_M, weight_kS.contiguous().view(-1), need_y)
            return grad_y if need_y else None, grad_w.view_as(weight_kS) if need_w else None, None, None, None
        # One gather serves both: the row gradient is w_m * grad[token_m], the weight gradient
        # of a kept assignment is <y_m, grad[token_m]>, and dropped ones get zero.
        grad_tok_Md = grad_Sd.index_select(0, token_idx_M) if need_y or need_w else None
        grad_w = grad_y = None
        if need_w:
            grad_w = torch.zeros_like(weight_kS)
            row_dots = torch.linalg.vecdot(y_Md, grad_tok_Md).to(weight_kS.dtype)
            grad_w.view(-1).index_copy_(0, assignment_M, row_dots)
        if need_y:
            w_M = weight_kS.reshape(-1).index_select(0, assignment_M).to(grad_Sd.dtype)
            grad_y = grad_tok_Md.mul_(w_M[:, None])
        return grad_y, grad_w, None, None, None


def permute(x_Sd: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather the token of every kept assignment: `[S, d]` -> `[M, d]` grouped by expert."""
    if plan.pos_kS is None:
        return x_Sd.index_select(0, plan.token_idx_M)
    return _Permute.apply(x_Sd, plan.token_idx_M, plan.pos_kS)


def unpermute(y_Md: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted sum of each token's expert outputs: `[M, d]` -> `[S, d]` (zero if none kept)."""
    if plan.pos_kS is None:
        weighted = y_Md * plan.weight_M.to(y_Md.dtype)[:, None]
        return y_Md.new_zeros(num_tokens, y_Md.shape[-1]).index_add(0, plan.token_idx_M, weighted)
    return _Unpermute.apply(y_Md, plan.weight_kS, plan.pos_kS, plan.token_idx_M, plan.assignment_M)


def served_tokens(plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Number of tokens with at least one computed assignment (0-dim int64)."""
    if plan.pos_kS is not None:
        return (plan.pos_kS < plan.num_rows).any(0).sum()
    served = torch.zeros(num_tokens, dtype=torch.bool, device=plan.token_idx_M.device)
    return served.index_fill(0, plan.token_idx_M, True).sum()
