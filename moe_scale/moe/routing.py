"""Routing policies and their registry. Every router maps tokens `x_Sd` to one `Routing`.

A `Routing` is a flat list of N (token, expert, weight) assignments. Token-choice routers emit
them slot-major (all first choices, then all second choices, ...), so a stable sort by expert
gives first choices priority when capacity is short, as GShard does. Every tensor has a shape
fixed by S, k and E: no router reads tensor data on the host, so routing runs on `meta`, under
`torch.compile(fullgraph=True)`, and on a GPU without a sync. Routers never build a dense
`[S, E, C]` mask; the flat-gated ones need the `[S, E]` logits and nothing else of that size.

Policies (`ROUTERS`: name -> `RouterSpec`):
    noisy_topk      Shazeer et al. 2017, eqs. 3-5, smooth load estimator (appendix A)
    switch          top-1 with the full softmax gate and input jitter (Fedus et al. 2021)
    topk            softmax or sigmoid top-k, renormalised or not, group-limited, with
                    auxiliary-loss-free bias balancing (GShard, Mixtral, OLMoE, DeepSeek-V3)
    expert_choice   each expert takes its top-C tokens (Zhou et al. 2022)
    hash            fixed hash of token id or position (Roller et al. 2021)
    hierarchical    primary gate over groups, secondary gate per group (Shazeer app. B)
    min_loss        hard EM: the expert with the lowest caller-supplied loss
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.moe.grouped_gemm import group_ends, grouped_linear

if TYPE_CHECKING:
    from moe_scale.moe.config import MoEConfig



@dataclass
class RouterStats:
    """O(E) summaries the balancing losses are computed from (None where a policy has none).

    importance_E   sum over tokens of each expert's gate value (differentiable)
    load_E         smooth estimate of tokens per expert (differentiable; noisy gates only)
    prob_mean_E    mean over tokens of the full softmax router probability (differentiable)
    top1_frac_E    fraction of tokens whose first choice is each expert (constant)
    z_loss         mean over tokens of logsumexp(logits)^2 (differentiable)
    seq_balance    DeepSeek-V3's sequence-wise balance loss (differentiable; `sequence_balance_loss`)
    """

    importance_E: Tensor | None = None
    load_E: Tensor | None = None
    prob_mean_E: Tensor | None = None
    top1_frac_E: Tensor | None = None
    z_loss: Tensor | None = None
    seq_balance: Tensor | None = None


@dataclass
class Routing:
    """Assignments of tokens to experts.

    token_idx_N    token of each assignment, in [0, num_tokens)
    expert_idx_N   global expert of each assignment, in [0, num_experts)
    weight_N       combine weight of each assignment (differentiable where the gate is learned)
    num_slots      k when the assignments are token-choice and slot-major (N = k * S, assignment
                   n = slot * S + token); None otherwise (expert choice)
    valid_N        False for assignments the policy withdrew (GShard's random 2nd expert);
                   None when all are valid
    capacity_bound True when the policy already respects capacity (expert choice)
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    weight_N: Tensor
    num_tokens: int
    num_experts: int
    stats: RouterStats = field(default_factory=RouterStats)
    num_slots: int | None = None
    valid_N: Tensor | None = None
    capacity_bound: bool = False


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routers work in float32 at least: bf16 / fp16 logits are upcast, float64 is kept."""
    return torch.promote_types(dtype, torch.float32)


def expert_counts(index: Tensor, num_experts: int) -> Tensor:
    """Occurrences of each expert in `index` (int64 `[E]`): a scatter-add, static in shape
    (`torch.bincount` sizes its output from the data, a host read on a GPU)."""
    flat = index.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=index.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def _slot_major(index_Sk: Tensor, weight_Sk: Tensor, num_experts: int, stats: RouterStats) -> Routing:
    """The `[S, k]` choices as a slot-major routing."""
    S, k = index_Sk.shape
    return Routing(
        token_idx_N=torch.arange(S, device=index_Sk.device).repeat(k),
        expert_idx_N=index_Sk.t().reshape(-1),
        weight_N=weight_Sk.t().reshape(-1),
        num_tokens=S,
        num_experts=num_experts,
        stats=stats,
        num_slots=k,
    )


def _importance(index_Sk: Tensor, weight_Sk: Tensor, num_experts: int) -> Tensor:
    return torch.zeros(num_experts, dtype=weight_Sk.dtype, device=weight_Sk.device).index_add(
        0, index_Sk.reshape(-1), weight_Sk.reshape(-1)
    )


def _top1_fraction(index_Sk: Tensor, num_experts: int) -> Tensor:
    return expert_counts(index_Sk[:, 0], num_experts).float() / max(index_Sk.shape[0], 1)


def _z_loss(lse_S: Tensor) -> Tensor:
    """mean of logsumexp^2 over tokens (zero for no tokens)."""
    return (lse_S * lse_S).sum() / max(lse_S.shape[0], 1)


def _check_k(k: int, num_experts: int) -> None:
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must satisfy 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")


SCORE_FUNCS = ("softmax", "sigmoid")

# Floor of the noise std, as in the paper's code (tensor2tensor `noise_epsilon`): without it a
# softplus that underflows to 0 divides the smooth load by zero and training turns NaN.
NOISE_EPSILON = 1e-2


def noisy_topk(clean_SE: Tensor, noise_raw_SE: Tensor | None, k: int, training: bool):
    """Noisy top-k gating (Shazeer et al. eqs. 3-5) and its smooth load (appendix A).

    H = clean + N(0,1) * (softplus(noise_raw) + NOISE_EPSILON) in training, H = clean in eval; keep the top-k of H
    and softmax over them. Returns index_Sk, gates_Sk and, in training, in_topk_prob_SE:
    P(expert in top-k | x) under re-drawn noise, Phi((clean_i - kth_excluding(H, k, i)) / std_i)
    (None in eval, where the load is the hard count).
    """
    E = clean_SE.shape[-1]
    if not training:
        top_val, index_Sk = torch.topk(clean_SE, k, dim=-1)
        return index_Sk, torch.softmax(top_val, dim=-1), None
    noise_std_SE = F.softplus(noise_raw_SE) + NOISE_EPSILON
    noisy_SE = clean_SE + torch.randn_like(clean_SE) * noise_std_SE
    top_val, top_idx = torch.topk(noisy_SE, min(k + 1, E), dim=-1)
    index_Sk, gates_Sk = top_idx[:, :k], torch.softmax(top_val[:, :k], dim=-1)
    if k == E:
        return index_Sk, gates_Sk, torch.ones_like(clean_SE)
    # An expert inside the top-k must stay above the (k+1)-th value, one outside must beat the k-th.
    threshold_in, threshold_out = top_val[:, k : k + 1], top_val[:, k - 1 : k]
    threshold_SE = torch.where(noisy_SE > threshold_in, threshold_in, threshold_out)
    prob_SE = torch.special.ndtr((clean_SE - threshold_SE) / noise_std_SE)
    return index_Sk, gates_Sk, prob_SE


def _load(index_Sk: Tensor, in_topk_prob_SE: Tensor | None, num_experts: int) -> Tensor:
    if in_topk_prob_SE is not None:
        return in_topk_prob_SE.sum(0)
    return expert_counts(index_Sk, num_experts).float()


def _gate_logits(x_Sd: Tensor, w_dE: Tensor) -> Tensor:
    """`x @ W` in the router's dtype (float32 at least)."""
    logits = x_Sd @ w_dE.to(x_Sd.dtype)
    return logits.to(router_dtype(logits.dtype))


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating; W_g and W_noise start at zero as in the paper."""

    def __init__(self, d_model: int, num_experts: int, k: int = 2):
        super().__init__()
        _check_k(k, num_experts)
        self.num_experts, self.k = num_experts, k
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))

    def forward(self, x_Sd: Tensor) -> Routing:
        clean_SE = _gate_logits(x_Sd, self.w_gate)
        noise_raw_SE = _gate_logits(x_Sd, self.w_noise) if self.training else None
        index_Sk, gates_Sk, prob_SE = noisy_topk(clean_SE, noise_raw_SE, self.k, self.training)
        S = x_Sd.shape[0]
        stats = RouterStats(
            importance_E=_importance(index_Sk, gates_Sk, self.num_experts),
            load_E=_load(index_Sk, prob_SE, self.num_experts),
            prob_mean_E=torch.softmax(clean_SE, dim=-1).sum(0) / max(S, 1),
            top1_frac_E=_top1_fraction(index_Sk, self.num_experts),
            z_loss=_z_loss(torch.logsumexp(clean_SE, dim=-1)),
        )
        return _slot_major(index_Sk, gates_Sk, self.num_experts, stats)


def softmax_topk(x_Sd: Tensor, w_dE: Tensor, k: int, renormalize: bool):
    """Softmax top-k gating in plain ops: one GEMM and one softmax over the whole batch.

    Returns weight_Sk (router dtype), index_Sk, prob_sum_E (sum over tokens of the softmax),
    lse_S (log-sum-exp of each token's logits). The log-sum-exp comes from the top logit and
    its probability, lse = l_max - log p_max, so autograd keeps one `[S, E]` tensor (the
    probabilities) and no logits.
    """
    logits_SE = _gate_logits(x_Sd, w_dE)
    prob_SE = torch.softmax(logits_SE, dim=-1)
    top_p_Sk, index_Sk = torch.topk(prob_SE, k, dim=-1)
    weight_Sk = top_p_Sk / top_p_Sk.sum(-1, keepdim=True) if renormalize else top_p_Sk
    lse_S = logits_SE.gather(1, index_Sk[:, :1]).squeeze(1) - top_p_Sk[:, 0].log()
    return weight_Sk, index_Sk, prob_SE.sum(0), lse_S


def limit_to_groups(select_SE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """Group-limited routing (DeepSeek-V2/V3): experts in `num_groups` equal groups; each token
    keeps the `topk_groups` groups with the largest sum of their two best scores (the best one
    where a group has a single expert) and masks the others to -inf. `[S, E]` -> `[S, E]`."""
    S, E = select_SE.shape
    grouped = select_SE.view(S, num_groups, E // num_groups)
    group_score_SG = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(-1)
    keep_SG = torch.zeros_like(group_score_SG, dtype=torch.bool).scatter_(
        1, group_score_SG.topk(topk_groups, dim=-1).indices, True)
    return grouped.masked_fill(~keep_SG[:, :, None], float("-inf")).view(S, E)


def sequence_balance_loss(index_Sk: Tensor, share_SE: Tensor, num_sequences: int) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eqs. 17-20), averaged over sequences.

    For each sequence of T tokens: f_i = E / (k T) * (tokens choosing expert i), P_i = mean over
    its tokens of share_SE[:, i] (each token's scores normalised to sum 1); loss = sum_i f_i P_i.
    Tokens are in sequence-major order (token s belongs to sequence s // T).
    """
    S, E = share_SE.shape
    k = index_Sk.shape[1]
    T = S // max(num_sequences, 1)
    seq_Sk = (torch.arange(S, device=index_Sk.device) // max(T, 1))[:, None].expand(S, k)
    counts_BE = torch.zeros(num_sequences * E, dtype=share_SE.dtype, device=share_SE.device).scatter_add_(
        0, (seq_Sk * E + index_Sk).reshape(-1), torch.ones(S * k, dtype=share_SE.dtype, device=share_SE.device))
    f_BE = counts_BE.view(num_sequences, E) * (E / (k * max(T, 1)))
    P_BE = share_SE.view(num_sequences, T, E).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


class TopKRouter(nn.Module):
    """Top-k gating over softmax or sigmoid scores: switch (k=1), GShard top-2, Mixtral, OLMoE /
    Qwen3-MoE, DeepSeek-V3.

    score_func        "softmax" (Switch, GShard, Mixtral, OLMoE) or "sigmoid" (DeepSeek-V3)
    renormalize       weights are the kept scores divided by their sum (GShard, Mixtral,
                      DeepSeek-V3); otherwise the scores themselves (Switch, OLMoE, Qwen3-MoE).
                      Default: True for k > 1 with softmax, and for sigmoid
    route_scale       multiplies the combine weights (DeepSeek-V3's routed scaling factor)
    num_groups        group-limited routing: experts in this many groups, each token picks
                      among the experts of its `topk_groups` best groups (0 or 1: no groups)
    bias_balancing    a per-expert bias (buffer `expert_bias_E`) added to the scores for the
                      choice only, updated by `update_bias` (auxiliary-loss-free balancing)
    sequence_balance  compute DeepSeek-V3's sequence-wise balance loss (`RouterStats.seq_balance`)
    jitter            multiply the router input by U(1-eps, 1+eps) in training (Switch)
    random_second     keep the 2nd expert with probability min(1, 2*g2) in training (GShard)
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        renormalize: bool | None = None,
        jitter: float = 0.0,
        random_second: bool = False,
        score_func: str = "softmax",
        route_scale: float = 1.0,
        num_groups: int = 0,
        topk_groups: int = 0,
        bias_balancing: bool = False,
        sequence_balance: bool = False,
    ):
        super().__init__()
        _check_k(k, num_experts)
        if random_second and k != 2:
            raise ValueError("random_second applies to top-2 routing only; set k=2 or random_second=False")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        self.num_experts, self.k = num_experts, k
        self.score_func = score_func
        self.renormalize = (k > 1 or score_func == "sigmoid") if renormalize is None else renormalize
        self.jitter, self.random_second, self.route_scale = jitter, random_second, route_scale
        self.num_groups, self.topk_groups = (num_groups, topk_groups) if num_groups > 1 else (0, 0)
        self.sequence_balance = sequence_balance
        self.w_gate = nn.Parameter(torch.empty(d_model, num_experts))
        nn.init.normal_(self.w_gate, std=d_model**-0.5)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts) if bias_balancing else None)

    @property
    def plain_softmax(self) -> bool:
        return (self.score_func == "softmax" and not self.num_groups and self.expert_bias_E is None
                and not self.sequence_balance)

    @torch.no_grad()
    def update_bias(self, load_E: Tensor, rate: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load),
        with `load_E` the assignments per expert of the whole step (all micro-batches and ranks)."""
        load = load_E.to(self.expert_bias_E.dtype)
        self.expert_bias_E += rate * torch.sign(load.mean() - load)

    def forward(self, x_Sd: Tensor, *, num_sequences: int = 1) -> Routing:
        if self.training and self.jitter > 0:
            x_Sd = x_Sd * torch.empty_like(x_Sd).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        S, E = x_Sd.shape[0], self.num_experts
        if self.plain_softmax:
            weight_Sk, index_Sk, prob_sum_E, lse_S = softmax_topk(x_Sd, self.w_gate, self.k, self.renormalize)
            z_loss, top1_E = _z_loss(lse_S), _top1_fraction(index_Sk, E)
        else:
            logits_SE = _gate_logits(x_Sd, self.w_gate)
            scores_SE = torch.softmax(logits_SE, -1) if self.score_func == "softmax" else torch.sigmoid(logits_SE)
            select_SE = scores_SE.detach()
            if self.expert_bias_E is not None:
                select_SE = select_SE + self.expert_bias_E
            if self.num_groups:
                select_SE = limit_to_groups(select_SE, self.num_groups, self.topk_groups)
            index_Sk = select_SE.topk(self.k, dim=-1).indices
            top_Sk = scores_SE.gather(1, index_Sk)
            weight_Sk = top_Sk / top_Sk.sum(-1, keepdim=True) if self.renormalize else top_Sk
            share_SE = scores_SE if self.score_func == "softmax" else scores_SE / scores_SE.sum(-1, keepdim=True)
            prob_sum_E = share_SE.sum(0)
            z_loss, top1_E = _z_loss(torch.logsumexp(logits_SE, dim=-1)), _top1_fraction(index_Sk, E)
        if self.route_scale != 1.0:
            weight_Sk = weight_Sk * self.route_scale
        stats = RouterStats(
            importance_E=_importance(index_Sk, weight_Sk, E),
            prob_mean_E=prob_sum_E / max(S, 1),
            top1_frac_E=top1_E,
            z_loss=z_loss,
            seq_balance=sequence_balance_loss(index_Sk, share_SE, num_sequences) if self.sequence_balance else None,
        )
        routing = _slot_major(index_Sk, weight_Sk, E, stats)
        if self.training and self.random_second:
            keep_second = torch.rand(S, device=x_Sd.device) < 2.0 * routing.weight_N[S:].detach()
            routing.valid_N = torch.cat([torch.ones(S, dtype=torch.bool, device=x_Sd.device), keep_second])
        return routing


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its top-C tokens by softmax score; C = capacity of the layer.

    Tokens no expert picks get no expert (their layer output is zero, carried by the residual).
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(d_model, num_experts))
        nn.init.normal_(self.w_gate, std=d_model**-0.5)

    def forward(self, x_Sd: Tensor, *, capacity: int) -> Routing:
        S, E = x_Sd.shape[0], self.num_experts
        logits_SE = _gate_logits(x_Sd, self.w_gate)
        scores_SE = torch.softmax(logits_SE, dim=-1)
        C = min(capacity, S)
        weight_CE, token_CE = torch.topk(scores_SE, C, dim=0)
        stats = RouterStats(prob_mean_E=scores_SE.sum(0) / max(S, 1),
                            z_loss=_z_loss(torch.logsumexp(logits_SE, dim=-1)))
        return Routing(
            token_idx_N=token_CE.t().reshape(-1),
            expert_idx_N=torch.arange(E, device=x_Sd.device).repeat_interleave(C),
            weight_N=weight_CE.t().reshape(-1),
            num_tokens=S,
            num_experts=E,
            stats=stats,
            capacity_bound=True,
        )


def hash_experts(ids_S: Tensor, num_experts: int) -> Tensor:
    """A fixed multiplicative (Knuth) hash of integer ids onto experts."""
    return ((ids_S.long() * 2654435761) % (1 << 32)) % num_experts


class HashRouter(nn.Module):
    """Route by a fixed hash of the token id (or of the position when no ids are given)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_Sd: Tensor, *, token_ids: Tensor | None = None, positions: Tensor | None = None) -> Routing:
        ids = token_ids if token_ids is not None else positions
        if ids is None:
            ids = torch.arange(x_Sd.shape[0], device=x_Sd.device)
        ids = ids.reshape(-1)
        if ids.numel() != x_Sd.shape[0]:
            raise ValueError(
                f"hash routing needs one id per token: got {ids.numel()} token_ids for {x_Sd.shape[0]} tokens"
            )
        index_S1 = hash_experts(ids, self.num_experts)[:, None]
        return _slot_major(index_S1, x_Sd.new_ones(index_S1.shape), self.num_experts, RouterStats())


class HierarchicalRouter(nn.Module):
    """Two-level noisy top-k gating (Shazeer appendix B): `groups` x `experts_per_group`.

    Expert id = group * experts_per_group + j. The router costs S*d*(a + k_a*b) instead of
    S*d*a*b: the secondary gates run as one grouped GEMM over the (token, group) pairs sorted
    by group. Importance and load follow eqs. 13-14 and are reported over the a*b experts.
    """

    def __init__(self, d_model: int, groups: int, experts_per_group: int, k_groups: int = 1, k_experts: int = 2):
        super().__init__()
        _check_k(k_groups, groups)
        _check_k(k_experts, experts_per_group)
        self.groups, self.experts_per_group = groups, experts_per_group
        self.num_experts = groups * experts_per_group
        self.k_groups, self.k_experts = k_groups, k_experts
        self.w_gate = nn.Parameter(torch.zeros(d_model, groups))
        self.w_noise = nn.Parameter(torch.zeros(d_model, groups))
        self.w_gate_inner = nn.Parameter(torch.zeros(groups, d_model, experts_per_group))
        self.w_noise_inner = nn.Parameter(torch.zeros(groups, d_model, experts_per_group))

    def _inner_logits(self, x_sorted: Tensor, w_adb: Tensor, ends_a: Tensor, order_P: Tensor) -> Tensor:
        b = w_adb.shape[-1]
        # Zero columns up to a 16-byte row stride keep the secondary gates on the grouped GEMM
        # without a host read (see grouped_gemm.py); the gate weights are small to copy.
        columns = 16 // x_sorted.element_size()
        w_adb = F.pad(w_adb.to(x_sorted.dtype), (0, -b % columns))
        logits = grouped_linear(x_sorted, w_adb, ends_a)[:, :b]
        return _unsort(logits.to(router_dtype(logits.dtype)), order_P)

    def forward(self, x_Sd: Tensor) -> Routing:
        S, a, b = x_Sd.shape[0], self.groups, self.experts_per_group
        clean_Sa = _gate_logits(x_Sd, self.w_gate)
        noise_Sa = _gate_logits(x_Sd, self.w_noise) if self.training else None
        group_Sk, group_gate_Sk, group_prob_Sa = noisy_topk(clean_Sa, noise_Sa, self.k_groups, self.training)
        group_load_a = _load(group_Sk, group_prob_Sa, a)
        # (token, group) pairs, slot-major, sorted by group for the grouped secondary gate.
        pair_group_P = group_Sk.t().reshape(-1)
        pair_token_P = torch.arange(S, device=x_Sd.device).repeat(self.k_groups)
        order_P = torch.argsort(pair_group_P, stable=True)
        counts_a = expert_counts(pair_group_P, a)
        ends_a = group_ends(counts_a)
        x_sorted = x_Sd.index_select(0, pair_token_P.index_select(0, order_P))
        clean_Pb = self._inner_logits(x_sorted, self.w_gate_inner, ends_a, order_P)
        noise_Pb = self._inner_logits(x_sorted, self.w_noise_inner, ends_a, order_P) if self.training else None
        inner_Pk, inner_gate_Pk, inner_prob_Pb = noisy_topk(clean_Pb, noise_Pb, self.k_experts, self.training)
        if inner_prob_Pb is None:
            inner_prob_Pb = torch.zeros_like(clean_Pb).scatter_(1, inner_Pk, 1.0)
        # Load_i(X^(i))_j: secondary load of group i over the tokens sent to group i.
        inner_load_ab = torch.zeros(a, b, dtype=inner_prob_Pb.dtype, device=x_Sd.device).index_add(
            0, pair_group_P, inner_prob_Pb
        )

        kb = self.k_experts
        expert_Pk = pair_group_P[:, None] * b + inner_Pk
        weight_Pk = group_gate_Sk.t().reshape(-1)[:, None] * inner_gate_Pk
        # Slot-major over (group slot, expert slot): pair p = group_slot * S + s.
        expert_N = expert_Pk.view(self.k_groups, S, kb).permute(0, 2, 1).reshape(-1)
        weight_N = weight_Pk.view(self.k_groups, S, kb).permute(0, 2, 1).reshape(-1)
        token_N = torch.arange(S, device=x_Sd.device).repeat(self.k_groups * kb)

        importance_E = torch.zeros(self.num_experts, dtype=weight_N.dtype, device=x_Sd.device).index_add(
            0, expert_N, weight_N
        )
        tokens_per_group = counts_a.clamp(min=1).to(inner_load_ab.dtype)
        load_E = (group_load_a[:, None] * inner_load_ab / tokens_per_group[:, None]).reshape(-1)
        stats = RouterStats(
            importance_E=importance_E,
            load_E=load_E,
            top1_frac_E=expert_counts(expert_N[:S], self.num_experts).float() / max(S, 1),
            z_loss=_z_loss(torch.logsumexp(clean_Sa, dim=-1)),
        )
        return Routing(token_N, expert_N, weight_N, S, self.num_experts, stats, num_slots=self.k_groups * kb)


def _unsort(sorted_P: Tensor, order_P: Tensor) -> Tensor:
    """Undo `sorted_P = original[order_P]`."""
    return torch.empty_like(sorted_P).index_copy(0, order_P, sorted_P)


class MinLossRouter(nn.Module):
    """Hard-EM routing: each token goes to the expert with the lowest supplied loss.

    The caller computes `expert_losses` `[S, E]` (e.g. with gradients off, the E-step), and
    only the chosen expert then receives the token (the M-step trains only it).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_Sd: Tensor, *, expert_losses: Tensor | None) -> Routing:
        if expert_losses is None:
            raise ValueError("min-loss routing needs expert_losses of shape [tokens, num_experts]")
        losses_SE = expert_losses.reshape(-1, expert_losses.shape[-1])
        if losses_SE.shape != (x_Sd.shape[0], self.num_experts):
            raise ValueError(
                f"expert_losses must be [{x_Sd.shape[0]}, {self.num_experts}], got {tuple(expert_losses.shape)}"
            )
        index_S1 = losses_SE.detach().argmin(dim=-1, keepdim=True)
        stats = RouterStats(top1_frac_E=_top1_fraction(index_S1, self.num_experts))
        return _slot_major(index_S1, x_Sd.new_ones(index_S1.shape), self.num_experts, stats)


def capacity_for(num_tokens: int, num_experts: int, k: float, capacity_factor: float, min_capacity: int) -> int:
    """ceil(k * S / E * capacity_factor), at least `min_capacity`."""
    return max(int(math.ceil(k * num_tokens / num_experts * capacity_factor)), min_capacity)


@dataclass(frozen=True)
class RouterSpec:
    """What the layer and the config need to know of one routing policy.

    build      MoEConfig -> the router module
    stats      the RouterStats fields it fills (a loss that needs another is refused)
    inputs     the keyword inputs its forward takes beyond x_Sd (token_ids, positions,
               expert_losses, capacity)
    options    the MoEConfig options it reads beyond the common ones (others must keep their
               defaults)
    fixed_k    the only k it supports, or None
    """

    build: Callable[[MoEConfig], nn.Module]
    stats: frozenset[str]
    inputs: tuple[str, ...] = ()
    options: frozenset[str] = frozenset()
    fixed_k: int | None = None


_ALL_STATS = frozenset({"importance_E", "load_E", "prob_mean_E", "top1_frac_E", "z_loss"})

ROUTERS: dict[str, RouterSpec] = {
    "noisy_topk": RouterSpec(
        build=lambda cfg: NoisyTopKRouter(cfg.d_model, cfg.num_experts, cfg.k),
        stats=_ALL_STATS,
    ),
    "switch": RouterSpec(
        build=lambda cfg: TopKRouter(cfg.d_model, cfg.num_experts, k=1, renormalize=False,
                                            jitter=cfg.jitter),
        stats=frozenset({"importance_E", "prob_mean_E", "top1_frac_E", "z_loss"}),
        options=frozenset({"jitter"}),
        fixed_k=1,
    ),
    "topk": RouterSpec(
        build=lambda cfg: TopKRouter(
            cfg.d_model, cfg.num_experts, k=cfg.k, renormalize=cfg.renormalize, jitter=cfg.jitter,
            random_second=cfg.random_second, score_func=cfg.score_func, route_scale=cfg.route_scale,
            num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, bias_balancing=cfg.bias_update_rate > 0,
            sequence_balance=cfg.aux_loss.seq > 0),
        stats=frozenset({"importance_E", "prob_mean_E", "top1_frac_E", "z_loss", "seq_balance"}),
        inputs=("num_sequences",),
        options=frozenset({"jitter", "random_second", "renormalize", "score_func", "route_scale", "num_groups",
                           "topk_groups", "bias_update_rate"}),
    ),
    "expert_choice": RouterSpec(
        build=lambda cfg: ExpertChoiceRouter(cfg.d_model, cfg.num_experts),
        stats=frozenset({"prob_mean_E", "z_loss"}),
        inputs=("capacity",),
    ),
    "hash": RouterSpec(
        build=lambda cfg: HashRouter(cfg.num_experts),
        stats=frozenset(),
        inputs=("token_ids", "positions"),
        fixed_k=1,
    ),
    "hierarchical": RouterSpec(
        build=lambda cfg: HierarchicalRouter(
            cfg.d_model, cfg.hierarchical_groups, cfg.num_experts // cfg.hierarchical_groups,
            k_groups=cfg.hierarchical_k_groups, k_experts=cfg.k),
        stats=frozenset({"importance_E", "load_E", "top1_frac_E", "z_loss"}),
        options=frozenset({"hierarchical_groups", "hierarchical_k_groups"}),
    ),
    "min_loss": RouterSpec(
        build=lambda cfg: MinLossRouter(cfg.num_experts),
        stats=frozenset({"top1_frac_E"}),
        inputs=("expert_losses",),
        fixed_k=1,
    ),
}
