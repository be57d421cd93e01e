"""Load-balancing and router losses, computed from the O(E) summaries in `RouterStats`.

    importance   CV^2 of per-expert gate sums (Shazeer et al. 2017, eq. 6)
    load         CV^2 of the smooth per-expert load estimate (eqs. 8-11, appendix A)
    switch       E * sum_i f_i * P_i, f_i = fraction of first choices, P_i = mean router
                 probability (Switch Transformer eq. 4; GShard's l_aux with first choices)
    z            mean_x logsumexp(logits)^2 (ST-MoE router z-loss)
    seq          DeepSeek-V3's sequence-wise balance loss: per sequence sum_i f_i P_i with
                 f_i = E / (k T) * tokens choosing i and P_i the mean normalised score, averaged
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moe_scale.moe.routing import RouterStats


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, var / mean^2 (population variance, as in the paper's code)."""
    v = v_E.to(torch.promote_types(v_E.dtype, torch.float32))
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


@dataclass(frozen=True)
class AuxLossWeights:
    """Weight of each balancing loss in the layer's total aux loss (0 disables it)."""

    importance: float = 0.0
    load: float = 0.0
    switch: float = 0.0
    z: float = 0.0
    seq: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"aux loss weight {f.name} must be >= 0, got {getattr(self, f.name)}")


# The RouterStats fields each loss is computed from.
_NEEDS = {"importance": {"importance_E"}, "load": {"load_E"}, "switch": {"prob_mean_E", "top1_frac_E"},
          "z": {"z_loss"}, "seq": {"seq_balance"}}
LOSS_NAMES = frozenset(_NEEDS)


def check_supported(weights: AuxLossWeights, available: set[str] | frozenset[str], router_name: str) -> None:
    """Raise if a loss with a positive weight cannot be computed for this router."""
    for name, needed in _NEEDS.items():
        if getattr(weights, name) > 0 and not needed <= available:
            raise ValueError(
                f"the {name!r} aux loss is not defined for the {router_name!r} router; set its weight to 0"
            )


def aux_losses(stats: RouterStats, num_experts: int, only: set[str] | None = None) -> dict[str, Tensor]:
    """Every loss the router's stats allow (or those of them named in `only`), unweighted."""
    out: dict[str, Tensor] = {}

    def wanted(name: str) -> bool:
        return (only is None or name in only) and all(getattr(stats, f) is not None for f in _NEEDS[name])

    if wanted("importance"):
        out["importance"] = cv_squared(stats.importance_E)
    if wanted("load"):
        out["load"] = cv_squared(stats.load_E)
    if wanted("switch"):
        prob_mean_E = stats.prob_mean_E  # a constant first-choice share times it: one node in backward
        out["switch"] = torch.dot(stats.top1_frac_E.to(prob_mean_E.dtype) * num_experts, prob_mean_E)
    if wanted("z"):
        out["z"] = stats.z_loss
    if wanted("seq"):
        out["seq"] = stats.seq_balance
    return out


def weighted_names(weights: AuxLossWeights) -> set[str]:
    """The losses with a positive weight."""
    return {f.name for f in fields(weights) if getattr(weights, f.name) > 0}


def weighted_total(losses: dict[str, Tensor], weights: AuxLossWeights, like: Tensor) -> Tensor:
    """sum of weight * loss over the weighted losses, float32 (zero, on `like`'s device, if none)."""
    total = None
    for name, value in losses.items():
        w = getattr(weights, name)
        if w:
            term = (w * value).float()
            total = term if total is None else total + term
    return like.new_zeros((), dtype=torch.float32) if total is None else total


class BalanceWindow:
    """Global-batch statistics for the balancing losses (`balance_scope="global"`).

    The switch loss and the importance / load CV^2 are formed from statistics summed over the
    data-parallel ranks (`all_reduce_sum`, a sum over ranks handed in from outside; None in one
    process) and over the earlier micro-batches of the step (`begin_step` starts a step), so
    a rank's few tokens or a small micro-batch do not make a balanced global batch look
    unbalanced. Only this micro-batch's own statistics carry gradient:

        importance_E, load_E   sums: value = the global sum; gradient scaled by the number of
                               ranks, so that the ranks' gradients averaged by data parallelism
                               give the gradient of the global loss
        top1_frac_E            the global fraction of first choices (a constant)
        prob_mean_E            this micro-batch's mean (its average over ranks is the global mean)

    Across micro-batches the loss of micro-batch m uses the statistics of micro-batches 1..m
    (the last one sees the whole step); over ranks it is exact.
    """

    def __init__(self, all_reduce_sum=None, world_size: int = 1):
        self.all_reduce_sum, self.world_size = all_reduce_sum, world_size
        self.earlier: Tensor | None = None

    def begin_step(self) -> None:
        self.earlier = None

    def globalize(self, stats: RouterStats, num_tokens: int) -> RouterStats:
        sums = [t for t in (stats.importance_E, stats.load_E) if t is not None]
        top1 = stats.top1_frac_E
        parts = [t.detach().double() for t in sums]  # O(E) numbers: exact counts, no rounding
        if top1 is not None:
            parts.append(top1.detach().double() * num_tokens)
        if not parts:
            return stats
        device = parts[0].device
        packed = torch.cat(parts + [torch.full((1,), float(num_tokens), dtype=torch.float64, device=device)])
        if self.all_reduce_sum is not None:
            packed = self.all_reduce_sum(packed)
        if self.earlier is not None:
            packed = packed + self.earlier
        self.earlier = packed
        totals = list(packed[:-1].split([p.numel() for p in parts]))
        R = self.world_size

        def global_sum(local: Tensor, total: Tensor) -> Tensor:
            own = local.detach()
            return local * R - own * (R - 1) + (total.to(local.dtype) - own)

        fields = {}
        for name in ("importance_E", "load_E"):
            if getattr(stats, name) is not None:
                fields[name] = global_sum(getattr(stats, name), totals.pop(0))
        if top1 is not None:
            fields["top1_frac_E"] = (totals.pop(0) / packed[-1].clamp(min=1)).to(top1.dtype)
        return dataclasses.replace(stats, **fields)
