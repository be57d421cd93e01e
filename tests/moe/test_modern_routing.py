"""Today's routing and balancing against float64 references written from the papers' equations:
sigmoid scores with normalised selected scores and a route scale (DeepSeek-V3 eqs. 13-16),
softmax top-k with and without renormalisation (Mixtral, OLMoE / Qwen3-MoE), group-limited
routing (DeepSeek-V2 / V3), auxiliary-loss-free bias balancing (DeepSeek-V3 eq. 16 and its
update rule), the sequence-wise balance loss (eqs. 17-20) and shared experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_scale.moe import MoELayer
from moe_scale.moe.routing import TopKRouter, limit_to_groups, sequence_balance_loss

D, E = 6, 8


def _x(S=20, seed=0):
    return torch.randn(S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _router(**options) -> TopKRouter:
    torch.manual_seed(1)
    return TopKRouter(D, E, **options).double()


def _reference_choice(scores, select, k, groups=0, topk_groups=0):
    """Per token, in Python: the experts of its best groups (sum of the two best selection
    scores), then the k best selection scores among them."""
    chosen = []
    for t in range(scores.shape[0]):
        allowed = list(range(E))
        if groups:
            size = E // groups
            group_scores = [sum(sorted(select[t, g * size:(g + 1) * size].tolist(), reverse=True)[:2])
                            for g in range(groups)]
            best = sorted(range(groups), key=lambda g: -group_scores[g])[:topk_groups]
            allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
        chosen.append(sorted(allowed, key=lambda e: -select[t, e].item())[:k])
    return chosen


@pytest.mark.parametrize("groups,topk_groups", [(0, 0), (4, 2), (2, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_sigmoid_routing_follows_deepseek_v3(groups, topk_groups, bias):
    """g_i = s_i / sum_{j in topk} s_j * route_scale with s = sigmoid(x W); the choice uses
    s + b (bias for selection only), restricted to the best groups."""
    router = _router(k=2, score_func="sigmoid", route_scale=2.5, num_groups=groups, topk_groups=topk_groups,
                     bias_balancing=bias)
    if bias:
        router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, E))
    x = _x()
    r = router(x)
    s = torch.sigmoid(x @ router.w_gate)
    select = s + (router.expert_bias_E if bias else 0)
    chosen = _reference_choice(s, select, 2, groups, topk_groups)
    got_idx = r.expert_idx_N.view(2, -1).t()
    got_w = r.weight_N.view(2, -1).t()
    for t, experts in enumerate(chosen):
        assert got_idx[t].tolist() == experts
        want = s[t, experts] / s[t, experts].sum() * 2.5
        torch.testing.assert_close(got_w[t], want, rtol=1e-12, atol=1e-12)
    # the bias never enters the weights: its gradient path is the scores only
    assert not router.expert_bias_E.requires_grad if bias else True


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_with_and_without_renormalisation(renormalize):
    """Mixtral: softmax over the top-k logits (= renormalised probabilities). OLMoE / Qwen3:
    the full softmax probabilities of the top k."""
    router = _router(k=3, renormalize=renormalize, num_groups=2, topk_groups=2)  # groups: the general path
    plain = _router(k=3, renormalize=renormalize)
    x = _x(seed=2)
    logits = x @ router.w_gate
    top_val, top_idx = logits.topk(3, dim=-1)
    want = torch.softmax(top_val, -1) if renormalize else torch.softmax(logits, -1).gather(1, top_idx)
    for r in (router(x), plain(x)):
        assert torch.equal(r.expert_idx_N.view(3, -1).t(), top_idx)
        torch.testing.assert_close(r.weight_N.view(3, -1).t(), want, rtol=1e-12, atol=1e-12)


def test_group_limit_masks_all_but_the_best_groups():
    select = torch.tensor([[0.9, 0.0, 0.5, 0.45, 0.1, 0.1, 0.3, 0.3]], dtype=torch.float64)
    out = limit_to_groups(select, num_groups=4, topk_groups=2)
    # group sums of the two best: 0.9, 0.95, 0.2, 0.6 -> groups 1 and 0 stay
    assert torch.isinf(out[0, 4:]).all() and torch.equal(out[0, :4], select[0, :4])


def test_bias_update_moves_against_the_load():
    router = _router(k=2, score_func="sigmoid", bias_balancing=True)
    load = torch.tensor([10, 0, 5, 5, 5, 5, 2, 8])  # mean 5
    router.update_bias(load, 0.01)
    want = 0.01 * torch.sign(5.0 - load.double())
    torch.testing.assert_close(router.expert_bias_E, want.to(router.expert_bias_E.dtype))
    assert "expert_bias_E" in router.state_dict()  # saved in checkpoints


def test_bias_balancing_evens_out_a_skewed_router():
    """A router whose logits favour two experts: with only the bias moving (no loss), the
    max/mean load falls from 4 (two experts take everything) to near 1. Sign updates on a fixed
    batch end in a small limit cycle, so the last few steps are averaged."""
    torch.manual_seed(0)
    router = TopKRouter(D, E, k=2, score_func="sigmoid", bias_balancing=True)
    with torch.no_grad():
        router.w_gate.normal_(0.0, 0.05)
        router.w_gate[:, :2] += 0.5
    x = torch.randn(512, D).abs()

    def imbalance():
        counts = torch.bincount(router(x).expert_idx_N, minlength=E).float()
        return (counts.max() / counts.mean()).item()

    before = imbalance()
    last = []
    for _ in range(300):
        router.update_bias(torch.bincount(router(x).expert_idx_N, minlength=E), 0.01)
        last = (last + [imbalance()])[-10:]
    assert before == 4.0 and sum(last) / len(last) < 1.6


def test_sequence_balance_loss_matches_the_paper():
    g = torch.Generator().manual_seed(3)
    B, T, k = 3, 7, 2
    scores = torch.rand(B * T, E, dtype=torch.float64, generator=g)
    share = scores / scores.sum(-1, keepdim=True)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * T)])
    want = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (k * T) * sum(int(i in index[t].tolist()) for t in rows)
            P = sum(share[t, i].item() for t in rows) / T
            want += f * P
    want /= B
    assert sequence_balance_loss(index, share, B).item() == pytest.approx(want, rel=1e-12)


def test_layer_uses_the_batch_rows_as_sequences():
    torch.manual_seed(0)
    layer = MoELayer(D, E, k=2, score_func="sigmoid", aux_loss=dict(seq=1.0), dropless=True, d_hidden=8,
                     backend="core").double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    _, stats = layer(x)
    r = layer.router(x.reshape(-1, D), num_sequences=3)
    assert stats.aux_losses["seq"].item() == pytest.approx(r.stats.seq_balance.item(), rel=1e-12)
    assert stats.aux_loss.item() == pytest.approx(r.stats.seq_balance.item(), rel=1e-6)
    per_sequence = layer.router(x.reshape(-1, D), num_sequences=1).stats.seq_balance
    assert per_sequence.item() != pytest.approx(stats.aux_losses["seq"].item())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_shared_experts_add_a_dense_mlp(activation):
    torch.manual_seed(0)
    layer = MoELayer(D, E, k=2, num_shared_experts=2, d_hidden=4, activation=activation, dropless=True,
                     backend="core").double()
    x = torch.randn(10, D, dtype=torch.float64)
    y, _ = layer(x)
    shared = layer.shared_experts
    assert shared.w1.shape == (D, 8)
    h = x @ shared.w1
    h = F.silu(h) * (x @ shared.w3) if activation == "swiglu" else F.gelu(h)
    layer.shared_experts = None
    routed, _ = layer(x)
    torch.testing.assert_close(y, routed + h @ shared.w2, rtol=1e-12, atol=1e-12)


def test_gated_shared_experts_scale_their_output_by_a_sigmoid_gate():
    """Qwen2-MoE: routed + sigmoid(x w_gate) * shared(x), one gate value per token."""
    torch.manual_seed(0)
    layer = MoELayer(D, E, k=2, num_shared_experts=1, shared_expert_gate=True, d_hidden=4, activation="swiglu",
                     dropless=True, backend="core").double()
    x = torch.randn(10, D, dtype=torch.float64)
    y, _ = layer(x)
    shared = layer.shared_experts
    assert shared.w_gate.shape == (D, 1)
    h = (F.silu(x @ shared.w1) * (x @ shared.w3)) @ shared.w2
    layer.shared_experts = None
    routed, _ = layer(x)
    torch.testing.assert_close(y, routed + torch.sigmoid(x @ shared.w_gate) * h, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoELayer(D, E, k=2, shared_expert_gate=True)


@pytest.mark.parametrize("bad,match", [
    (dict(score_func="tanh"), "score_func"),
    (dict(num_groups=3), "num_groups=3"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_groups=4, topk_groups=1, k=3), "k=3"),
    (dict(topk_groups=2), "num_groups"),
    (dict(route_scale=0.0), "route_scale"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(router="switch", k=1, score_func="sigmoid"), "score_func"),
    (dict(router="noisy_topk", bias_update_rate=0.001), "bias_update_rate"),
    (dict(router="switch", k=1, aux_loss=dict(seq=0.1)), "'seq'"),
])
def test_bad_routing_options_name_the_key(bad, match):
    options = dict(router="topk", k=2, **{k: v for k, v in bad.items() if k not in ("router", "k")})
    options.update({k: v for k, v in bad.items() if k in ("router", "k")})
    with pytest.raises(ValueError, match=match):
        MoELayer(D, E, **options)


def _balanced_bias(rank: int, world: int) -> list[float]:
    from moe_scale.distributed.mesh import build_mesh
    from moe_scale.distributed.parallelize import parallelize
    from moe_scale.train.balancing import ExpertBiasBalancer

    torch.manual_seed(0)
    layer = MoELayer(D, E, k=2, score_func="sigmoid", bias_update_rate=0.01, dropless=True, d_hidden=8,
                     backend="core")
    if world > 1:
        layer = parallelize(layer, build_mesh(ep_size=world))
    balancer = ExpertBiasBalancer(layer, torch.device("cpu"))
    shards = [torch.randn(16, D, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    mine = shards if world == 1 else shards[rank::world]
    for step in range(3):
        for x in mine:  # micro-batches of this rank
            _, stats = layer(x)
            balancer.add([stats])
        balancer.step(applied=True)
    return layer.router.expert_bias_E.tolist()


@pytest.mark.timeout(120)
def test_bias_updates_agree_at_ep1_and_ep2():
    """The step's load is summed over micro-batches and ranks before the update: two EP ranks
    with two micro-batches each end with the bias of one process that saw all four."""
    from moe_scale.distributed.launch import run_local

    want = _balanced_bias(0, 1)
    got = run_local(_balanced_bias, 2, timeout=100)
    assert got[0] == got[1] == want
    assert any(b != 0 for b in want)


def _global_layer(scope: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, k=2, router="topk", dropless=True, d_hidden=8, backend="core", balance_scope=scope,
                     aux_loss=dict(importance=1.0, switch=0.5)).double()
    return layer


def _batches(n: int):
    return [torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(n)]


def test_global_scope_sums_the_step_micro_batches():
    """The second micro-batch's importance CV^2 and first-choice fractions are those of both
    micro-batches' tokens together; a new step starts from zero."""
    layer, whole = _global_layer("global"), _global_layer("micro_batch")
    a, b = _batches(2)
    layer.balance_window.begin_step()
    layer(a)
    _, stats = layer(b)
    _, want = whole(torch.cat([a, b]))
    assert stats.aux_losses["importance"].item() == pytest.approx(want.aux_losses["importance"].item(), rel=1e-12)
    torch.testing.assert_close(stats.router_stats.top1_frac_E, want.router_stats.top1_frac_E)
    layer.balance_window.begin_step()
    _, fresh = layer(b)
    _, alone = whole(b)
    assert fresh.aux_losses["importance"].item() == pytest.approx(alone.aux_losses["importance"].item(), rel=1e-12)


def _global_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from moe_scale.train.balancing import ExpertBiasBalancer

    layer = _global_layer("global")
    balancer = ExpertBiasBalancer(layer, torch.device("cpu"))
    balancer.begin_step()
    x = _batches(world)[rank]
    _, stats = layer(x)
    stats.aux_losses["importance"].backward()
    grad = layer.router.w_gate.grad.clone()
    dist.all_reduce(grad)
    return {"loss": stats.aux_losses["importance"].item(), "grad": (grad / world).tolist()}


@pytest.mark.timeout(120)
def test_global_scope_over_ranks_is_the_full_batch_loss_and_gradient():
    """On 2 ranks the importance CV^2 is that of both ranks' tokens, and the ranks' gradients
    averaged (as data parallelism does) equal the gradient of the full-batch loss."""
    from moe_scale.distributed.launch import run_local

    whole = _global_layer("micro_batch")
    _, want = whole(torch.cat(_batches(2)))
    want.aux_losses["importance"].backward()
    results = run_local(_global_rank, 2, timeout=100)
    for r in results:
        assert r["loss"] == pytest.approx(want.aux_losses["importance"].item(), rel=1e-10)
        torch.testing.assert_close(torch.tensor(r["grad"], dtype=torch.float64), whole.router.w_gate.grad)
