"""Balancing losses and the smooth load estimator against hand computations and Monte Carlo.

Formulas: Shazeer et al. 2017 eqs. 6-11 and appendix A (importance, load, P(x, i) with
kth_excluding), appendix B eqs. 13-14 (hierarchical importance and load), Switch Transformer
eq. 4 (switch loss), ST-MoE (z-loss).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from moe_scale.moe import MoELayer
from moe_scale.moe.losses import AuxLossWeights, aux_losses, cv_squared, weighted_total
from moe_scale.moe.routing import NOISE_EPSILON, HierarchicalRouter, NoisyTopKRouter, RouterStats, noisy_topk

D = 4


def _randomize(module, std=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g) * std)


def _x(S, seed=1):
    return torch.randn(S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_cv_squared_is_population_variance_over_mean_squared():
    assert float(cv_squared(torch.tensor([1.0, 2.0, 3.0, 6.0]))) == pytest.approx(3.5 / 9.0)
    assert float(cv_squared(torch.tensor([2.0, 2.0, 2.0]))) == 0.0
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0


def test_switch_z_importance_by_hand():
    """E=2 switch router on three one-hot tokens with logits [ln 3, 0], [0, ln 3], [ln 3, 0]."""
    layer = MoELayer(2, 2, router="switch", k=1, dropless=True, aux_loss=dict(switch=0.5, z=0.25, importance=2.0))
    layer.double().eval()
    with torch.no_grad():
        layer.router.w_gate.copy_(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    _, stats = layer(x)
    # f = [2/3, 1/3]; P = [(3/4 + 1/4 + 3/4) / 3, (1/4 + 3/4 + 1/4) / 3] = [7/12, 5/12]
    switch = 2 * (2 / 3 * 7 / 12 + 1 / 3 * 5 / 12)
    z = math.log(4) ** 2  # logsumexp([ln 3, 0]) = ln 4 for every token
    importance = 1 / 9  # gates [3/4, 3/4, 3/4] -> importance [3/2, 3/4]: var 9/64 / mean^2 81/64
    losses = {name: float(v.detach()) for name, v in stats.aux_losses.items()}
    # f_i is a float32 constant (a count over S): exact to float32 precision only
    assert losses["switch"] == pytest.approx(switch, rel=1e-7)
    assert losses["z"] == pytest.approx(z, rel=1e-12)
    assert losses["importance"] == pytest.approx(importance, rel=1e-9)
    assert set(losses) == {"switch", "z", "importance"}
    assert float(stats.aux_loss.detach()) == pytest.approx(0.5 * switch + 0.25 * z + 2.0 * importance, rel=1e-7)


@pytest.mark.parametrize("router,k", [("topk", 2), ("topk", 3), ("switch", 1), ("noisy_topk", 2)])
def test_losses_and_their_gradients_match_plain_formulas(router, k):
    """Values and W_g / x gradients of every loss against autograd on the textbook formulas."""
    E, S = 6, 40
    weights = dict(switch=0.3, z=0.2, importance=0.7) | (dict(load=0.4) if router == "noisy_topk" else {})
    layer = MoELayer(D, E, router=router, k=k, dropless=True, aux_loss=weights).double().eval()
    _randomize(layer.router)
    x = _x(S).requires_grad_()
    _, stats = layer(x)

    logits = x @ layer.router.w_gate
    prob = torch.softmax(logits, -1)
    top_val, top_idx = torch.topk(logits, k, -1)
    if router == "switch":
        gates = prob.gather(1, top_idx)
    else:
        gates = torch.softmax(top_val, -1)
    importance = torch.zeros(E, dtype=x.dtype).index_add(0, top_idx.reshape(-1), gates.reshape(-1))
    f = torch.bincount(top_idx[:, 0], minlength=E).double() / S
    want = {
        "importance": importance.var(unbiased=False) / importance.mean() ** 2,
        "switch": E * (f * prob.mean(0)).sum(),
        "z": (torch.logsumexp(logits, -1) ** 2).mean(),
    }
    if router == "noisy_topk":
        load = torch.bincount(top_idx.reshape(-1), minlength=E).double()  # eval: hard counts
        want["load"] = load.var(unbiased=False) / load.mean() ** 2
    assert set(stats.aux_losses) == set(want)
    for name, value in want.items():
        rtol = 1e-7 if name in ("switch", "load") else 1e-9  # f_i and the hard load are float32
        torch.testing.assert_close(stats.aux_losses[name].double(), value, rtol=rtol, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    total = sum(weights[n] * want[n] for n in want)
    torch.testing.assert_close(stats.aux_loss.double(), total, rtol=1e-6, atol=1e-9)

    inputs = (x, layer.router.w_gate)
    for name, value in want.items():
        if not value.requires_grad:
            continue
        got = torch.autograd.grad(stats.aux_losses[name], inputs, retain_graph=True)
        ref = torch.autograd.grad(value, inputs, retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_weighted_total_uses_only_positive_weights():
    losses = {"importance": torch.tensor(2.0), "switch": torch.tensor(3.0), "z": torch.tensor(5.0)}
    total = weighted_total(losses, AuxLossWeights(importance=0.5, z=0.1), torch.zeros(1))
    assert float(total) == pytest.approx(0.5 * 2.0 + 0.1 * 5.0)


def test_aux_losses_skip_missing_stats():
    stats = RouterStats(prob_mean_E=torch.full((4,), 0.25))  # no top1 fraction: no switch loss
    assert aux_losses(stats, 4) == {}


# --- smooth load estimator (Shazeer appendix A) ---------------------------------------------


def shazeer_in_topk_prob(clean: np.ndarray, std: np.ndarray, h: np.ndarray, k: int) -> np.ndarray:
    """P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i), written with plain loops."""
    S, E = clean.shape
    out = np.zeros((S, E))
    for s in range(S):
        for i in range(E):
            others = sorted((h[s, j] for j in range(E) if j != i), reverse=True)
            out[s, i] = norm.cdf((clean[s, i] - others[k - 1]) / std[s, i])
    return out


def _noisy_parts(router, x, seed):
    """Clean logits, noise std and the noisy logits H the router drew under `seed`."""
    clean = x @ router.w_gate
    std = F.softplus(x @ router.w_noise) + NOISE_EPSILON
    torch.manual_seed(seed)
    h = clean + torch.randn(clean.shape, dtype=clean.dtype) * std
    return clean.detach().numpy(), std.detach().numpy(), h.detach().numpy()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_load_equals_kth_excluding_formula(k):
    S, E = 12, 6
    router = NoisyTopKRouter(D, E, k=k).double().train()
    _randomize(router)
    x = _x(S)
    torch.manual_seed(5)
    routing = router(x)
    clean, std, h = _noisy_parts(router, x, 5)
    want = shazeer_in_topk_prob(clean, std, h, k)
    np.testing.assert_allclose(routing.stats.load_E.detach().numpy(), want.sum(0), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_in_topk_prob_matches_monte_carlo_per_token(k):
    """Redraw expert i's noise only (the others' fixed): the fraction of draws where i is in the
    top-k must match P(x, i), token by token, and summed into RouterStats.load_E."""
    S, E, N = 8, 5, 20000
    router = NoisyTopKRouter(D, E, k=k).double().train()
    _randomize(router, seed=3)
    x = _x(S, seed=4)
    torch.manual_seed(9)
    load_E = router(x).stats.load_E.detach().numpy()
    clean, std, h = _noisy_parts(router, x, 9)
    z = np.random.default_rng(0).standard_normal(N)
    hits = np.zeros((S, E))
    for i in range(E):
        h_i = clean[:, i, None] + std[:, i, None] * z[None, :]  # [S, N]
        others = np.delete(h, i, axis=1)  # [S, E-1]
        beaten_by = (others[:, :, None] > h_i[:, None, :]).sum(1)
        hits[:, i] = (beaten_by < k).mean(1)
    torch.manual_seed(9)
    _, _, prob_SE = noisy_topk(x @ router.w_gate, x @ router.w_noise, k, training=True)
    p = prob_SE.detach().numpy()
    sigma = np.sqrt(p * (1 - p) / N)
    assert np.all(np.abs(hits - p) <= 5 * sigma + 2e-3)
    np.testing.assert_allclose(load_E, p.sum(0), rtol=1e-12)
    assert np.all(np.abs(hits.sum(0) - load_E) <= 5 * np.sqrt((p * (1 - p)).sum(0) / N) + 2e-3)


def test_noisy_load_matches_monte_carlo_under_fully_redrawn_noise():
    """E[smooth load] = E[hard count] when all noise is redrawn: R draws in one batched call."""
    S, E, k, R = 6, 5, 2, 4000
    router = NoisyTopKRouter(D, E, k=k).double().train()
    _randomize(router, seed=6)
    x = _x(S, seed=7).repeat(R, 1)
    torch.manual_seed(13)
    routing = router(x)
    smooth = routing.stats.load_E.detach() / R
    hard = torch.bincount(routing.expert_idx_N, minlength=E).double() / R
    # Per (token, draw): 1[i in top-k] - P(x, i) has mean zero and variance at most P(1 - P).
    torch.manual_seed(13)
    _, _, prob_SE = noisy_topk(x @ router.w_gate, x @ router.w_noise, k, training=True)
    p = prob_SE.detach()
    sigma = torch.sqrt((p * (1 - p)).sum(0)) / R
    assert torch.all((smooth - hard).abs() <= 5 * sigma + 1e-9), (smooth, hard, sigma)
    assert torch.all(smooth > 0.05)  # every expert gets some load: the comparison is not vacuous


# --- hierarchical (Shazeer appendix B) -------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k_groups,k_experts", [(1, 2), (2, 1)])
def test_hierarchical_importance_and_load_eqs_13_14(training, k_groups, k_experts):
    S, a, b = 16, 3, 4
    router = HierarchicalRouter(D, a, b, k_groups=k_groups, k_experts=k_experts).double().train(training)
    _randomize(router, seed=8)
    x = _x(S, seed=9)
    torch.manual_seed(21)
    stats = router(x).stats

    # Redraw the router's noise: [S, a] for the primary gate, then [k_groups * S, b] for pairs.
    torch.manual_seed(21)
    clean_p = (x @ router.w_gate).detach().numpy()
    std_p = (F.softplus(x @ router.w_noise) + NOISE_EPSILON).detach().numpy()
    eps_p = torch.randn(S, a, dtype=torch.float64).numpy() if training else np.zeros((S, a))
    eps_in = torch.randn(k_groups * S, b, dtype=torch.float64).numpy() if training else None
    h_p = clean_p + eps_p * std_p
    primary_idx = np.argsort(-h_p, axis=1)[:, :k_groups]
    g_primary = np.zeros((S, a))
    for s in range(S):
        v = np.exp(h_p[s, primary_idx[s]] - h_p[s, primary_idx[s]].max())
        g_primary[s, primary_idx[s]] = v / v.sum()
    if training:
        load_primary = shazeer_in_topk_prob(clean_p, std_p, h_p, k_groups).sum(0)
    else:
        load_primary = (g_primary > 0).sum(0).astype(float)

    importance = np.zeros((a, b))
    load_inner = np.zeros((a, b))
    members = np.zeros(a)
    for s in range(S):
        for slot, i in enumerate(primary_idx[s]):
            members[i] += 1  # |X^(i)|: tokens with G_primary(x)_i > 0
            wi = router.w_gate_inner[i].detach().numpy()
            ni = router.w_noise_inner[i].detach().numpy()
            xs = x[s].numpy()
            clean_i = xs @ wi
            std_i = np.log1p(np.exp(xs @ ni)) + NOISE_EPSILON
            h_i = clean_i + (eps_in[slot * S + s] * std_i if training else 0.0)
            top = np.argsort(-h_i)[:k_experts]
            g_i = np.zeros(b)
            v = np.exp(h_i[top] - h_i[top].max())
            g_i[top] = v / v.sum()
            importance[i] += g_primary[s, i] * g_i  # eq. 13
            if training:
                load_inner[i] += shazeer_in_topk_prob(clean_i[None], std_i[None], h_i[None], k_experts)[0]
            else:
                load_inner[i] += g_i > 0
    load = load_primary[:, None] * load_inner / np.maximum(members, 1)[:, None]  # eq. 14

    np.testing.assert_allclose(stats.importance_E.detach().numpy(), importance.reshape(-1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.load_E.detach().numpy(), load.reshape(-1), rtol=1e-10, atol=1e-12)
    losses = aux_losses(stats, a * b)
    for name, v in (("importance", importance), ("load", load)):
        assert float(losses[name].detach()) == pytest.approx(v.var() / v.mean() ** 2, rel=1e-9)


@pytest.mark.parametrize("router_cls", ["flat", "hierarchical"])
def test_noisy_gate_stays_finite_when_the_noise_softplus_underflows(router_cls):
    """A very negative x W_noise makes softplus 0 in float32; the noise-std floor keeps the smooth
    load and its gradients finite (without it, training on the MultiModel turned NaN)."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 16, k=2) if router_cls == "flat" else HierarchicalRouter(8, 4, 4, k_groups=1, k_experts=2)
    with torch.no_grad():
        for name, p in router.named_parameters():
            p.copy_(torch.randn_like(p) if "gate" in name else torch.full_like(p, -1e4))
    x = torch.randn(32, 8).abs()  # positive inputs: x @ W_noise is about -1e4 * 8
    assert float(F.softplus(x @ router.w_noise).max()) == 0.0  # the case under test: no noise left at all
    routing = router(x)
    losses = aux_losses(routing.stats, 16)
    total = routing.weight_N.sum() + losses["load"] + losses["importance"]
    total.backward()
    assert torch.isfinite(total)
    for name, p in router.named_parameters():
        assert torch.isfinite(p.grad).all(), name
