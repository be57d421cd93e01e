"""A dense float64 reference MoE, written independently of `moe_scale.moe`'s code paths.

Each routing policy is restated from its paper as dense `[S, E]` tensors and masks; the
assignments it produces are listed slot-major (all first choices, then all second choices),
capacity drops are decided by plain loops over that list, a dense combine matrix
`combine_SE` holds the weight of every kept (token, expert) pair, every expert runs on every
token, and y = sum_e combine_SE[:, e] * expert_e(x). Gradients come from autograd through
these plain ops, so they check the engine's custom backward passes and index arithmetic.

Randomness: the reference redraws the engine's noise from the same seed in the same order
(noisy top-k: one `randn [S, E]`; hierarchical: `randn [S, a]` then `randn [k_a * S, b]`;
switch jitter: `uniform [S, d]`; random second expert: `rand [S]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NOISE_EPSILON = 1e-2  # floor of the noisy gate's noise std (tensor2tensor's noise_epsilon)


@dataclass
class Assignment:
    token: int
    expert: int
    weight: Tensor  # 0-dim, differentiable where the gate is learned


@dataclass
class Reference:
    """Output and bookkeeping of the dense reference (S tokens, E experts)."""

    y_Sd: Tensor
    combine_SE: Tensor
    tokens_per_expert_E: list[int]
    routed_per_expert_E: list[int]
    num_dropped: int
    num_unrouted: int
    num_assignments: int
    unrouted_tokens: list[int]
    capacity: int | None


def reference_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    return max(math.ceil(k * num_tokens * capacity_factor / num_experts), min_capacity)


def expert_mlp(experts, e: int, x_Sd: Tensor) -> Tensor:
    """Expert e of a `GroupedExperts` on every token `[S, d]`, written as plain matmuls."""
    h = x_Sd @ experts.w1[e]
    if experts.b1 is not None:
        h = h + experts.b1[e]
    if experts.activation == "relu":
        h = torch.clamp(h, min=0)
    elif experts.activation == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    else:
        h = h * torch.sigmoid(h) * (x_Sd @ experts.w3[e])
    y = h @ experts.w2[e]
    if experts.b2 is not None:
        y = y + experts.b2[e]
    return y


def _masked_softmax(h_SE: Tensor, keep_SE: Tensor) -> Tensor:
    return torch.softmax(h_SE.masked_fill(~keep_SE, float("-inf")), dim=-1)


def _top_mask(h_SE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the k largest per row (best first) and the boolean mask of them."""
    order_SE = torch.argsort(h_SE, dim=-1, descending=True)
    index_Sk = order_SE[:, :k]
    keep_SE = torch.zeros_like(h_SE, dtype=torch.bool).scatter(1, index_Sk, True)
    return index_Sk, keep_SE


def _slot_major(index_Sk: Tensor, gate_SE: Tensor) -> list[Assignment]:
    S, k = index_Sk.shape
    return [
        Assignment(s, int(index_Sk[s, j]), gate_SE[s, int(index_Sk[s, j])]) for j in range(k) for s in range(S)
    ]


def _noisy_gate(clean_SE: Tensor, noise_raw_SE: Tensor | None, k: int, training: bool):
    """Shazeer eqs. 3-5: keep the top-k of H, softmax over them. Returns (index_Sk, G_SE)."""
    if training:
        noise_std_SE = F.softplus(noise_raw_SE) + NOISE_EPSILON
        h_SE = clean_SE + torch.randn(clean_SE.shape, dtype=clean_SE.dtype) * noise_std_SE
    else:
        h_SE = clean_SE
    index_Sk, keep_SE = _top_mask(h_SE, k)
    return index_Sk, _masked_softmax(h_SE, keep_SE)


def reference_assignments(layer, x_Sd: Tensor, *, capacity: int, token_ids=None, positions=None, expert_losses=None):
    """The policy's (token, expert, weight) assignments, slot-major, before capacity drops."""
    cfg, router, training = layer.cfg, layer.router, layer.training
    S, E = x_Sd.shape[0], cfg.num_experts
    if cfg.router == "noisy_topk":
        noise = x_Sd @ router.w_noise if training else None
        index_Sk, gate_SE = _noisy_gate(x_Sd @ router.w_gate, noise, cfg.k, training)
        return _slot_major(index_Sk, gate_SE)
    if cfg.router in ("switch", "topk"):
        x_in = x_Sd
        if training and router.jitter > 0:
            x_in = x_Sd * torch.empty(x_Sd.shape, dtype=x_Sd.dtype).uniform_(1 - router.jitter, 1 + router.jitter)
        logits_SE = x_in @ router.w_gate
        index_Sk, keep_SE = _top_mask(logits_SE, router.k)
        gate_SE = _masked_softmax(logits_SE, keep_SE) if router.renormalize else torch.softmax(logits_SE, -1)
        out = _slot_major(index_Sk, gate_SE)
        if training and router.random_second:
            u_S = torch.rand(S)
            out = out[:S] + [a for a in out[S:] if bool(u_S[a.token] < 2.0 * a.weight.detach())]
        return out
    if cfg.router == "expert_choice":
        prob_SE = torch.softmax(x_Sd @ router.w_gate, dim=-1)
        C = min(capacity, S)
        out = []
        for e in range(E):
            for s in torch.argsort(prob_SE[:, e], descending=True)[:C].tolist():
                out.append(Assignment(s, e, prob_SE[s, e]))
        return out
    if cfg.router == "hash":
        ids = token_ids if token_ids is not None else positions
        ids = ids.reshape(-1).tolist() if ids is not None else list(range(S))
        one = x_Sd.new_ones(())
        return [Assignment(s, (i * 2654435761 % 2**32) % E, one) for s, i in enumerate(ids)]
    if cfg.router == "hierarchical":
        return _hierarchical(router, x_Sd, training)
    losses_SE = expert_losses.reshape(S, E)
    one = x_Sd.new_ones(())
    return [Assignment(s, int(torch.argmin(losses_SE[s])), one) for s in range(S)]


def _hierarchical(router, x_Sd: Tensor, training: bool) -> list[Assignment]:
    """Shazeer appendix B: primary noisy gate over groups, a noisy gate per chosen group."""
    S, a, b = x_Sd.shape[0], router.groups, router.experts_per_group
    ka, kb = router.k_groups, router.k_experts
    noise = x_Sd @ router.w_noise if training else None
    group_Sk, group_gate_Sa = _noisy_gate(x_Sd @ router.w_gate, noise, ka, training)
    eps_Pb = torch.randn(ka * S, b, dtype=x_Sd.dtype) if training else None
    # pair p = group_slot * S + s
    inner = {}
    for gs in range(ka):
        for s in range(S):
            g = int(group_Sk[s, gs])
            clean_b = x_Sd[s] @ router.w_gate_inner[g]
            h_b = clean_b
            if training:
                h_b = clean_b + eps_Pb[gs * S + s] * (F.softplus(x_Sd[s] @ router.w_noise_inner[g]) + NOISE_EPSILON)
            idx_1k, keep_1b = _top_mask(h_b[None], kb)
            inner[gs, s] = (g, idx_1k[0], _masked_softmax(h_b[None], keep_1b)[0])
    out = []
    for gs in range(ka):
        for js in range(kb):
            for s in range(S):
                g, idx_k, gate_b = inner[gs, s]
                j = int(idx_k[js])
                out.append(Assignment(s, g * b + j, group_gate_Sa[s, g] * gate_b[j]))
    return out


def keep_within_capacity(assignments: list[Assignment], num_experts: int, capacity: int | None, policy: str):
    """One bool per assignment: kept by its expert's capacity (first come, or highest weight)."""
    keep = [True] * len(assignments)
    if capacity is None:
        return keep
    for e in range(num_experts):
        mine = [n for n, a in enumerate(assignments) if a.expert == e]
        if policy == "probability":
            mine = sorted(mine, key=lambda n: -float(assignments[n].weight.detach()))
        for n in mine[capacity:]:
            keep[n] = False
    return keep


def reference_moe(layer, x: Tensor, *, token_ids=None, expert_losses=None) -> Reference:
    """Dense float64 evaluation of `layer` on `x [..., d]` (noise: seed the RNG as for the layer)."""
    cfg = layer.cfg
    d, E = cfg.d_model, cfg.num_experts
    x_Sd = x.reshape(-1, d)
    S = x_Sd.shape[0]
    kk = cfg.k * (cfg.hierarchical_k_groups if cfg.router == "hierarchical" else 1)
    cf = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
    capacity = reference_capacity(S, E, kk, cf, cfg.min_capacity)
    positions = None
    if x.dim() >= 3:
        positions = torch.arange(x.shape[-2]).expand(x.shape[:-1])
    assignments = reference_assignments(
        layer, x_Sd, capacity=capacity, token_ids=token_ids, positions=positions, expert_losses=expert_losses
    )
    capped = not (cfg.dropless or cfg.router == "expert_choice")
    keep = keep_within_capacity(assignments, E, capacity if capped else None, cfg.drop_policy)

    N = len(assignments)
    token_NS = F.one_hot(torch.tensor([a.token for a in assignments]), S).to(x.dtype)
    expert_NE = F.one_hot(torch.tensor([a.expert for a in assignments]), E).to(x.dtype)
    weight_N = torch.stack([a.weight for a in assignments]) * torch.tensor(keep, dtype=x.dtype)
    combine_SE = (token_NS * weight_N[:, None]).t() @ expert_NE
    y_ESd = torch.stack([expert_mlp(layer.experts, e, x_Sd) for e in range(E)])
    y_Sd = (combine_SE.t()[:, :, None] * y_ESd).sum(0)

    served = {a.token for a, kept in zip(assignments, keep) if kept}
    kept_E = [sum(1 for a, kp in zip(assignments, keep) if kp and a.expert == e) for e in range(E)]
    routed_E = [sum(1 for a in assignments if a.expert == e) for e in range(E)]
    return Reference(
        y_Sd=y_Sd.reshape(x.shape),
        combine_SE=combine_SE,
        tokens_per_expert_E=kept_E,
        routed_per_expert_E=routed_E,
        num_dropped=N - sum(keep),
        num_unrouted=S - len(served),
        num_assignments=N,
        unrouted_tokens=sorted(set(range(S)) - served),
        capacity=capacity if capped else None,
    )
