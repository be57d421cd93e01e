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
