"""MoELayer against the dense float64 reference (tests/reference.py), for every routing policy.

Each case compares the output, the gradients of the input and of every parameter, and the
MoEStats counts, with capacity drops (first-come and highest-weight) and dropless.
"""

from __future__ import annotations

import pytest
import torch

from moe_scale.moe import MoELayer
from moe_scale.moe.routing import TopKRouter
from tests.reference import reference_moe

B, T, D, E, H = 2, 12, 6, 6, 10
S = B * T
TIGHT = dict(rtol=1e-10, atol=1e-12)

# name -> (MoELayer options, training mode)
POLICIES = {
    "noisy_topk-eval": (dict(router="noisy_topk", k=2), False),
    "noisy_topk-train": (dict(router="noisy_topk", k=2), True),
    "switch-eval": (dict(router="switch", k=1), False),
    "switch-train-jitter": (dict(router="switch", k=1, jitter=0.1), True),
    "topk2": (dict(router="topk", k=2), False),
    "topk2-no-renormalize": (dict(router="topk", k=2), False),
    "topk3-train": (dict(router="topk", k=3), True),
    "topk2-random-second": (dict(router="topk", k=2, random_second=True), True),
    "expert_choice-eval": (dict(router="expert_choice", k=2), False),
    "expert_choice-train": (dict(router="expert_choice", k=1), True),
    "hash-token-ids": (dict(router="hash", k=1), False),
    "hash-positions": (dict(router="hash", k=1), False),
    "hierarchical-eval": (dict(router="hierarchical", k=2, hierarchical_groups=2), False),
    "hierarchical-train": (dict(router="hierarchical", k=2, hierarchical_groups=2), True),
    "hierarchical-2groups-train": (
        dict(router="hierarchical", k=1, hierarchical_groups=3, hierarchical_k_groups=2),
        True,
    ),
    "min_loss": (dict(router="min_loss", k=1), False),
}
DROPS = {
    "dropless": dict(dropless=True),
    "position": dict(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1, drop_policy="position"),
    # 0.6: k*S/E*cf is not an integer, so the capacity rounds up
    "probability": dict(capacity_factor=0.6, eval_capacity_factor=0.6, min_capacity=1, drop_policy="probability"),
}
CASES = [
    (p, dmode)
    for p in POLICIES
    for dmode in DROPS
    # expert choice has a fixed per-expert capacity and never drops assignments
    if not (p.startswith("expert_choice") and dmode != "position")
]


def make_layer(policy: str, drops: str, activation: str = "gelu", seed: int = 0) -> MoELayer:
    options, training = POLICIES[policy]
    torch.manual_seed(seed)
    layer = MoELayer(D, E, d_hidden=H, activation=activation, expert_bias=True, **options, **DROPS[drops])
    if policy == "topk2-no-renormalize":
        layer.router = TopKRouter(D, E, k=2, renormalize=False)
    layer.double().train(training)
    with torch.no_grad():
        # Noisy routers start at zero (the paper's init); random weights make every choice distinct.
        for p in layer.router.parameters():
            p.normal_(0.0, 0.8)
    return layer


def call_inputs(policy: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=g, requires_grad=True)
    kwargs = {}
    if policy == "hash-token-ids":
        kwargs["token_ids"] = torch.randint(0, 1000, (B, T), generator=g)
    if policy == "min_loss":
        kwargs["expert_losses"] = torch.rand(B, T, E, dtype=torch.float64, generator=g)
    return x, kwargs


def run_both(layer: MoELayer, policy: str, noise_seed: int = 7):
    x, kwargs = call_inputs(policy)
    torch.manual_seed(noise_seed)
    y, stats = layer(x, **kwargs)
    torch.manual_seed(noise_seed)
    ref = reference_moe(layer, x, **kwargs)
    return x, y, stats, ref


def grads(out, x, layer, g):
    inputs = [x, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, got)]


@pytest.mark.parametrize("policy,drops", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_layer_matches_dense_reference(policy, drops):
    layer = make_layer(policy, drops)
    x, y, stats, ref = run_both(layer, policy)

    torch.testing.assert_close(y, ref.y_Sd, **TIGHT)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads(y, x, layer, g), grads(ref.y_Sd, x, layer, g)):
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, n=name: f"grad of {n}: {m}")

    assert stats.tokens_per_expert_E.tolist() == ref.tokens_per_expert_E
    assert stats.routed_per_expert_E.tolist() == ref.routed_per_expert_E
    assert int(stats.num_dropped) == ref.num_dropped
    assert int(stats.num_unrouted) == ref.num_unrouted
    assert stats.num_assignments == ref.num_assignments
    assert stats.num_tokens == S
    assert float(stats.dropped_fraction) == pytest.approx(ref.num_dropped / ref.num_assignments)
    if not policy.startswith("expert_choice"):
        assert stats.capacity == ref.capacity
    if drops != "dropless" and not policy.startswith("expert_choice"):
        assert ref.num_dropped > 0, "the small capacity should drop assignments in this case"


@pytest.mark.parametrize("policy", ["noisy_topk-train", "switch-eval", "topk2", "hierarchical-eval", "expert_choice-eval"])
def test_unserved_tokens_get_zero_output_and_zero_gradient(policy):
    """A token none of whose assignments is computed contributes nothing, in value or gradient."""
    layer = make_layer(policy, "position")
    x, y, stats, ref = run_both(layer, policy)
    unserved = ref.unrouted_tokens
    assert unserved, "the case must leave some tokens unserved"
    y_Sd = y.reshape(S, D)
    assert torch.equal(y_Sd[unserved], torch.zeros(len(unserved), D, dtype=y.dtype))
    # Gradient only through the unserved tokens' outputs: nothing may depend on them.
    g_Sd = torch.zeros(S, D, dtype=y.dtype)
    g_Sd[unserved] = 1.0
    for gr in grads(y, x, layer, g_Sd.reshape(y.shape)):
        assert torch.count_nonzero(gr) == 0
    # Under the full loss, their input gradient is still exactly zero (router included).
    g = torch.randn(y.shape, dtype=torch.float64)
    x_grad_Sd = grads(y, x, layer, g)[0].reshape(S, D)
    assert torch.count_nonzero(x_grad_Sd[unserved]) == 0
    assert int(stats.num_unrouted) == len(unserved)


def test_dropped_tokens_do_not_reach_the_experts():
    """With routing independent of x (min-loss), changing dropped tokens changes nothing else."""
    layer = make_layer("min_loss", "position")
    x, y, stats, ref = run_both(layer, "min_loss")
    _, kwargs = call_inputs("min_loss")
    unserved = ref.unrouted_tokens
    assert unserved and int(stats.num_dropped) == len(unserved)
    g = torch.randn(y.shape, dtype=torch.float64)
    before = grads(y, x, layer, g)[1:]
    x2 = x.detach().clone().reshape(S, D)
    x2[unserved] += 5.0
    x2 = x2.reshape(x.shape).requires_grad_()
    y2, _ = layer(x2, **kwargs)
    assert torch.equal(y2, y)
    for a, b in zip(grads(y2, x2, layer, g)[1:], before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_reference_other_activations(activation):
    layer = make_layer("topk2", "position", activation=activation)
    x, y, stats, ref = run_both(layer, "topk2")
    torch.testing.assert_close(y, ref.y_Sd, **TIGHT)
    g = torch.randn(y.shape, dtype=torch.float64)
    for got, want in zip(grads(y, x, layer, g), grads(ref.y_Sd, x, layer, g)):
        torch.testing.assert_close(got, want, **TIGHT)


def test_capacity_formula():
    """ceil(k * S / E * cf) with the train or eval factor, floored at min_capacity, k = assignments per token."""
    layer = MoELayer(D, 8, k=2, capacity_factor=1.25, eval_capacity_factor=0.3, min_capacity=4)
    assert layer.train().capacity(100) == 32  # ceil(2 * 100 / 8 * 1.25) = ceil(31.25)
    assert layer.eval().capacity(100) == 8  # ceil(7.5)
    assert layer.eval().capacity(40) == 4  # ceil(3.0) = 3, floored at min_capacity
    hier = MoELayer(D, 8, router="hierarchical", k=1, hierarchical_groups=4, hierarchical_k_groups=2)
    assert hier.train().capacity(100) == 32  # 2 groups x 1 expert per token
