"""Bad options and bad inputs fail early, with a message that names the option at fault."""

from __future__ import annotations

import re

import pytest
import torch

from moe_scale.moe import GroupedExperts, MoELayer
from moe_scale.moe.dispatch import plan_dispatch
from moe_scale.moe.grouped_gemm import group_ends, grouped_linear
from moe_scale.moe.routing import Routing

D, E = 8, 4

# id -> (MoELayer options, exception type, text the message must contain)
BAD_OPTIONS = {
    "k>E": (dict(k=5), ValueError, "k=5"),
    "k=0": (dict(k=0), ValueError, "k must be >= 1"),
    "capacity_factor=0": (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    "capacity_factor<0": (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    "eval_capacity_factor=0": (dict(eval_capacity_factor=0.0), ValueError, "eval_capacity_factor"),
    "min_capacity<0": (dict(min_capacity=-1), ValueError, "min_capacity"),
    "unknown option": (dict(capcity_factor=1.0), TypeError, "capcity_factor"),
    "unknown router": (dict(router="top2"), ValueError, "router"),
    "unknown activation": (dict(activation="tanh"), ValueError, "activation"),
    "unknown drop_policy": (dict(drop_policy="random"), ValueError, "drop_policy"),
    "unknown grouped_gemm": (dict(grouped_gemm="cutlass"), ValueError, "grouped_gemm"),
    "switch k=2": (dict(router="switch", k=2), ValueError, "k=1"),
    "hash k=2": (dict(router="hash", k=2), ValueError, "k=1"),
    "min_loss k=2": (dict(router="min_loss", k=2), ValueError, "k=1"),
    "hierarchical groups do not divide E": (dict(router="hierarchical", k=1, hierarchical_groups=3), ValueError, "hierarchical_groups=3"),
    "hierarchical groups unset": (dict(router="hierarchical", k=1), ValueError, "hierarchical_groups"),
    "hierarchical k_groups > groups": (
        dict(router="hierarchical", k=1, hierarchical_groups=2, hierarchical_k_groups=3),
        ValueError,
        "hierarchical_k_groups",
    ),
    "hierarchical k > experts per group": (dict(router="hierarchical", k=3, hierarchical_groups=2), ValueError, "k=3"),
    "jitter>=1": (dict(router="switch", k=1, jitter=1.0), ValueError, "jitter"),
    "random_second k=3": (dict(router="topk", k=3, random_second=True), ValueError, "random_second"),
    "random_second noisy": (dict(router="noisy_topk", k=2, random_second=True), ValueError, "random_second"),
    "expert_choice dropless": (dict(router="expert_choice", dropless=True), ValueError, "dropless"),
    "load loss with topk": (dict(router="topk", aux_loss=dict(load=0.1)), ValueError, "'load'"),
    "load loss with switch": (dict(router="switch", k=1, aux_loss=dict(load=0.1)), ValueError, "'load'"),
    "importance loss with hash": (dict(router="hash", k=1, aux_loss=dict(importance=0.1)), ValueError, "'importance'"),
    "switch loss with expert_choice": (dict(router="expert_choice", aux_loss=dict(switch=0.1)), ValueError, "'switch'"),
    "switch loss with hierarchical": (
        dict(router="hierarchical", k=1, hierarchical_groups=2, aux_loss=dict(switch=0.1)),
        ValueError,
        "'switch'",
    ),
    "z loss with min_loss": (dict(router="min_loss", k=1, aux_loss=dict(z=0.1)), ValueError, "'z'"),
    "negative aux weight": (dict(aux_loss=dict(importance=-1.0)), ValueError, "importance"),
    "unknown aux loss": (dict(aux_loss=dict(balance=1.0)), TypeError, "balance"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_rejected_at_construction(case):
    options, exc, text = BAD_OPTIONS[case]
    with pytest.raises(exc, match=re.escape(text)):
        MoELayer(D, E, **options)


@pytest.mark.parametrize("options", [dict(), dict(router="noisy_topk"), dict(router="hash", k=1)])
def test_wrong_model_dim_at_forward_names_d_model(options):
    layer = MoELayer(D, E, **options)
    with pytest.raises(ValueError, match=r"d_model=8.*\(2, 3, 7\)"):
        layer(torch.randn(2, 3, 7))


def test_min_loss_needs_expert_losses():
    layer = MoELayer(D, E, router="min_loss", k=1)
    with pytest.raises(ValueError, match="expert_losses"):
        layer(torch.randn(6, D))
    with pytest.raises(ValueError, match="expert_losses"):
        layer(torch.randn(6, D), expert_losses=torch.randn(6, E + 1))


def test_hash_needs_one_token_id_per_token():
    layer = MoELayer(D, E, router="hash", k=1)
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(6, D), token_ids=torch.arange(5))


def test_grouped_linear_checks_its_arguments():
    w = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="one entry per group"):
        grouped_linear(torch.randn(6, 4), w, group_ends(torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="columns"):
        grouped_linear(torch.randn(6, 5), w, group_ends(torch.tensor([2, 2, 2])))
    with pytest.raises(ValueError, match="method"):
        grouped_linear(torch.randn(6, 4), w, group_ends(torch.tensor([2, 2, 2])), method="fast")


def test_experts_check_model_dim():
    experts = GroupedExperts(E, D, 16)
    with pytest.raises(ValueError, match="d_model=8"):
        experts(torch.randn(3, 7), torch.tensor([3, 0, 0, 0]))


def test_plan_dispatch_checks_drop_policy():
    routing = Routing(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.ones(3), 3, E)
    with pytest.raises(ValueError, match="drop_policy"):
        plan_dispatch(routing, 2, "random")
