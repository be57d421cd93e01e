"""Cross-checks against DeepSpeed-MoE and FairScale on identical weights (dropless: the peers
renormalise the top-2 gates after capacity drops, GShard and we before, so only dropless
routing is the same function).

DeepSpeed 0.19.8's `MoE(ep_size=1)` runs forward and backward without a process group, so no
torch.distributed state is created here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_scale.moe import MoELayer

pytestmark = pytest.mark.peers

D, H, E = 8, 16, 4
SHAPE = (4, 8, D)  # 32 tokens, a multiple of E as FairScale requires


@pytest.fixture(scope="module")
def ds_moe():
    return pytest.importorskip("deepspeed.moe.layer").MoE


def _ds_layer(ds_moe, k: int, seed: int):
    torch.manual_seed(seed)
    expert = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
    return ds_moe(
        hidden_size=D,
        expert=expert,
        num_experts=E,
        ep_size=1,
        k=k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )


def _ours_from(ds, router: str, k: int) -> MoELayer:
    layer = MoELayer(D, E, d_hidden=H, router=router, k=k, expert_bias=True, activation="relu", dropless=True)
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        layer.router.w_gate.copy_(ds.deepspeed_moe.gate.wg.weight.t())
        for e, mlp in enumerate(experts):
            layer.experts.w1[e].copy_(mlp[0].weight.t())
            layer.experts.b1[e].copy_(mlp[0].bias)
            layer.experts.w2[e].copy_(mlp[2].weight.t())
            layer.experts.b2[e].copy_(mlp[2].bias)
    return layer


def _ds_grads(ds):
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    return {
        "router.w_gate": ds.deepspeed_moe.gate.wg.weight.grad.t(),
        "experts.w1": torch.stack([m[0].weight.grad.t() for m in experts]),
        "experts.b1": torch.stack([m[0].bias.grad for m in experts]),
        "experts.w2": torch.stack([m[2].weight.grad.t() for m in experts]),
        "experts.b2": torch.stack([m[2].bias.grad for m in experts]),
    }


@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1)])
def test_matches_deepspeed_moe(ds_moe, router, k):
    """Output, l_aux, expert counts and every gradient (output loss + aux loss)."""
    ds = _ds_layer(ds_moe, k, seed=0)
    ours = _ours_from(ds, router, k)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    x_ds = x.clone().requires_grad_()
    y_ds, l_aux, exp_counts = ds(x_ds)
    ((y_ds * g).sum() + 0.3 * l_aux).backward()

    x_ours = x.clone().requires_grad_()
    y, stats = ours(x_ours)
    ((y * g).sum() + 0.3 * stats.aux_losses["switch"]).backward()

    torch.testing.assert_close(y, y_ds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.aux_losses["switch"], l_aux, rtol=1e-6, atol=1e-7)
    assert stats.routed_per_expert_E.tolist() == exp_counts.tolist()
    assert int(stats.num_dropped) == 0
    torch.testing.assert_close(x_ours.grad, x_ds.grad, rtol=1e-5, atol=1e-6)
    for name, want in _ds_grads(ds).items():
        torch.testing.assert_close(ours.get_parameter(name).grad, want, rtol=1e-5, atol=1e-6, msg=name)


def test_switch_loss_matches_fairscale_top2_l_aux():
    """FairScale's l_aux is mean_e(me * ce) = (1/E^2) * our E * sum_e f_e P_e, first choices only."""
    top2gate = pytest.importorskip("fairscale.nn.moe.top2gate")
    for seed in range(3):
        ours = MoELayer(D, E, router="topk", k=2, dropless=True)
        torch.manual_seed(seed)
        nn.init.normal_(ours.router.w_gate)
        gate = top2gate.Top2Gate(D, E)
        with torch.no_grad():
            gate.wg.weight.copy_(ours.router.w_gate.t())
        x = torch.randn(SHAPE)
        l_aux, _, _ = gate(x.reshape(-1, D))
        _, stats = ours(x)
        torch.testing.assert_close(stats.aux_losses["switch"], E * E * l_aux, rtol=1e-6, atol=1e-7)
