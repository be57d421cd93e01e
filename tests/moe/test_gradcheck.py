"""Finite-difference gradient checks (float64) of the softmax top-k router and of whole MoE layers."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from moe_scale.moe import MoELayer
from moe_scale.moe.routing import HierarchicalRouter, NoisyTopKRouter, softmax_topk

S, D, E, H = 10, 4, 5, 6


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_softmax_topk_gradcheck(k, renormalize):
    """Gates, the probability sums (P_i * S) and the log-sum-exp (from the top logit and its
    probability, not a logsumexp) are differentiable in x and W."""
    x, w = _inputs((S, D), (D, E))

    def f(x, w):
        weight, _, prob_sum, lse = softmax_topk(x, w, k, renormalize)
        return weight, prob_sum, lse

    assert gradcheck(f, (x, w))


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_matches_the_textbook_formulas(renormalize):
    """Values and gradients against softmax over the top logits / the full softmax, and
    logsumexp, in float64."""
    x, w = _inputs((S, D), (D, E), seed=1)
    g_w, g_p, g_z = torch.randn(S, 2, dtype=torch.float64), torch.randn(E, dtype=torch.float64), 0.7

    weight, index, prob_sum, lse = softmax_topk(x, w, 2, renormalize)
    logits = x @ w
    top_val, top_idx = torch.topk(logits, 2, dim=-1)
    want_weight = torch.softmax(top_val, -1) if renormalize else torch.softmax(logits, -1).gather(1, top_idx)
    want_prob_sum = torch.softmax(logits, -1).sum(0)
    want_lse = torch.logsumexp(logits, -1)
    assert torch.equal(index, top_idx)
    for got, want in ((weight, want_weight), (prob_sum, want_prob_sum), (lse, want_lse)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    got = torch.autograd.grad((weight * g_w).sum() + (prob_sum * g_p).sum() + g_z * (lse**2).sum(), (x, w))
    want = torch.autograd.grad((want_weight * g_w).sum() + (want_prob_sum * g_p).sum() + g_z * (want_lse**2).sum(),
                               (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
