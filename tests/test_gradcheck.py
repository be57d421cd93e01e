"""Finite-difference gradient checks (float64) of the fused router and of whole MoE layers."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from moe_scale.moe import MoELayer
from moe_scale.moe import topk_softmax as tks
from moe_scale.moe.routing import HierarchicalRouter, NoisyTopKRouter
from moe_scale.moe.topk_softmax import topk_softmax_router

S, D, E, H = 10, 4, 5, 6


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True) for s in shapes]


FUSED_CASES = [(k, renorm, False) for k in (1, 2, 3) for renorm in (True, False)] + [(2, True, True), (2, False, True)]


@pytest.mark.parametrize("k,renormalize,chunked", FUSED_CASES)
def test_fused_router_gradcheck(k, renormalize, chunked, monkeypatch):
    """All three differentiable outputs: gates, prob_sum (P_i * S) and the sum of lse^2."""
    if chunked:
        # 3 tokens per chunk: 4 chunks for 10 tokens, the last one ragged.
        monkeypatch.setattr(tks, "_CHUNK_ELEMENTS", 3 * E)
    x, w = _inputs((S, D), (D, E))

    def f(x, w):
        weight, _, prob_sum, lse_sq, _ = topk_softmax_router(x, w, k, renormalize)
        return weight, prob_sum, lse_sq

    assert gradcheck(f, (x, w))


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_router_matches_autograd_softmax_topk(renormalize, monkeypatch):
    """Values and gradients against plain softmax + topk autograd, chunked and in float64."""
    monkeypatch.setattr(tks, "_CHUNK_ELEMENTS", 4 * E)
    x, w = _inputs((S, D), (D, E), seed=1)
    g_w, g_p, g_z = torch.randn(S, 2, dtype=torch.float64), torch.randn(E, dtype=torch.float64), 0.7

    weight, index, prob_sum, lse_sq, _ = topk_softmax_router(x, w, 2, renormalize)
    logits = x @ w
    top_val, top_idx = torch.topk(logits, 2, dim=-1)
    want_weight = torch.softmax(top_val, -1) if renormalize else torch.softmax(logits, -1).gather(1, top_idx)
    want_prob_sum = torch.softmax(logits, -1).sum(0)
    want_lse_sq = (torch.logsumexp(logits, -1) ** 2).sum()
    assert torch.equal(index, top_idx)
    for got, want in ((weight, want_weight), (prob_sum, want_prob_sum), (lse_sq, want_lse_sq)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    got = torch.autograd.grad((weight * g_w).sum() + (prob_sum * g_p).sum() + g_z * lse_sq, (x, w))
    want = torch.autograd.grad((want_weight * g_w).sum() + (want_prob_sum * g_p).sum() + g_z * want_lse_sq, (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_router_gradient_of_one_input_only():
    x, w = _inputs((S, D), (D, E), seed=2)
    x_only, w_fixed = x.detach().clone().requires_grad_(), w.detach()
    assert gradcheck(lambda x: topk_softmax_router(x, w_fixed, 2, True)[0], (x_only,))
    assert gradcheck(lambda w: topk_softmax_router(x.detach(), w, 2, False)[2], (w,))


LAYER_CASES = {
    "topk": dict(router="topk", k=2, dropless=True),
    "topk-drops": dict(router="topk", k=2, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1),
    "switch": dict(router="switch", k=1, expert_bias=True, activation="relu", dropless=True),
    "noisy_topk": dict(router="noisy_topk", k=2, activation="swiglu", dropless=True),
    "hierarchical": dict(router="hierarchical", k=1, hierarchical_groups=3, hierarchical_k_groups=2, dropless=True),
    "expert_choice": dict(router="expert_choice", k=2),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_gradcheck(case):
    """The layer output as a function of x, every router weight and every expert weight (eval mode)."""
    torch.manual_seed(0)
    layer = MoELayer(D, 6, d_hidden=H, **LAYER_CASES[case]).double().eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0.0, 0.8)
    names = [n for n, _ in layer.named_parameters() if "noise" not in n]  # noise weights are unused in eval
    (x,) = _inputs((S, D), seed=3)
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        y, stats = functional_call(layer, dict(zip(names, ps)), (x,))
        # eval-mode load is a hard count: gradcheck wants differentiable outputs only
        return (y, *(v for v in stats.aux_losses.values() if v.requires_grad))

    # fast mode: random directional derivatives, one pair of evaluations per input tensor
    assert gradcheck(f, (x, *params), fast_mode=True)


def test_noisy_load_gradcheck():
    """The smooth load estimator (appendix A) is differentiable in x, W_g and W_noise (fixed noise)."""
    router = NoisyTopKRouter(D, E, k=2).double().train()
    x, wg, wn = _inputs((S, D), (D, E), (D, E), seed=4)

    def load(x, wg, wn):
        torch.manual_seed(11)
        return functional_call(router, {"w_gate": wg, "w_noise": wn}, (x,)).stats.load_E

    assert gradcheck(load, (x, wg, wn), fast_mode=True)


def test_hierarchical_load_gradcheck():
    router = HierarchicalRouter(D, groups=2, experts_per_group=3, k_groups=1, k_experts=2).double().train()
    names = [n for n, _ in router.named_parameters()]
    (x,) = _inputs((S, D), seed=5)
    params = [torch.randn_like(p).requires_grad_() for p in router.parameters()]

    def f(x, *ps):
        torch.manual_seed(12)
        stats = functional_call(router, dict(zip(names, ps)), (x,)).stats
        return stats.load_E, stats.importance_E

    assert gradcheck(f, (x, *params), fast_mode=True)
