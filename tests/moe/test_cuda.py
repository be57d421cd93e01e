"""The layer on a CUDA GPU: the same answers as the float64 dense reference on the CPU.

Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.

- float64 on CUDA, every deterministic routing policy and drop mode: output, every gradient and
  the counts equal the dense reference (tests/reference.py) computed on the CPU.
- bfloat16 on CUDA, where experts run through `torch._grouped_mm`: the output and gradients
  are within bf16 rounding of the float64 reference on the same bf16-rounded weights and
  inputs. Tokens whose k-th and (k+1)-th router logits are close are left out of the input, so
  that bf16 rounding cannot change a routing decision.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_scale.moe import MoELayer
from moe_scale.moe.grouped_gemm import grouped_mm_supported
from tests.reference import reference_moe
from tests.moe.test_routing_reference import CASES, TIGHT, call_inputs, grads, make_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Policies that draw random numbers in training (noise, jitter, sampled second expert) would
# draw different numbers on the GPU: those run in eval mode only, which the CPU suite covers too.
RANDOM_IN_TRAINING = ("noisy_topk-train", "switch-train-jitter", "topk2-random-second", "hierarchical-train",
                      "hierarchical-2groups-train")
CUDA_CASES = [(p, d) for p, d in CASES if p not in RANDOM_IN_TRAINING]


def _cuda(kwargs: dict) -> dict:
    return {k: v.cuda() for k, v in kwargs.items()}


@pytest.mark.parametrize("policy,drops", CUDA_CASES, ids=[f"{p}-{d}" for p, d in CUDA_CASES])
def test_float64_layer_on_cuda_matches_the_dense_reference(policy, drops):
    layer = make_layer(policy, drops)
    x, kwargs = call_inputs(policy)
    ref = reference_moe(layer, x, **kwargs)
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = grads(ref.y_Sd, x, layer, g)

    gpu = copy.deepcopy(layer).cuda()
    x_gpu = x.detach().cuda().requires_grad_()
    y, stats = gpu(x_gpu, **_cuda(kwargs))
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref.y_Sd, **TIGHT)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, w in zip(names, grads(y, x_gpu, gpu, g.cuda()), want):
        torch.testing.assert_close(got.cpu(), w, **TIGHT, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert stats.tokens_per_expert_E.tolist() == ref.tokens_per_expert_E
    assert stats.routed_per_expert_E.tolist() == ref.routed_per_expert_E
    assert int(stats.num_dropped) == ref.num_dropped
    assert int(stats.num_unrouted) == ref.num_unrouted


def _clear_margin_tokens(x_Sd: torch.Tensor, w_dE: torch.Tensor, k: int, margin: float) -> torch.Tensor:
    """Rows of x whose k-th best logit beats the (k+1)-th by at least `margin` (float64 math)."""
    top = (x_Sd.double() @ w_dE.double()).topk(k + 1, dim=-1).values
    return x_Sd[(top[:, k - 1] - top[:, k]) >= margin]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_bf16_layer_with_grouped_mm_matches_float64_reference(activation, monkeypatch):
    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16, 64, 128):
        pytest.skip("torch._grouped_mm does not serve this GPU / torch without a host sync")
    d, E, k = 64, 8, 2
    torch.manual_seed(0)
    layer = MoELayer(d, E, k=k, router="topk", d_hidden=128, activation=activation, dropless=True,
                     aux_loss=dict(switch=0.01, z=0.001))
    with torch.no_grad():
        layer.router.w_gate.normal_(0.0, 0.5)
        for p in layer.parameters():
            p.copy_(p.bfloat16().double())  # the reference sees exactly the bf16 weights
    layer.double()
    x_all = torch.randn(2048, d, dtype=torch.float64).bfloat16().double()
    x = _clear_margin_tokens(x_all, layer.router.w_gate.detach(), k, margin=0.1)[:1024].requires_grad_()
    assert x.shape[0] >= 512

    ref = reference_moe(layer, x)
    g = torch.randn(x.shape, dtype=torch.float64).bfloat16().double()
    want = grads(ref.y_Sd, x, layer, g)

    calls = []
    real_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real_grouped_mm(*a, **kw))
    gpu = copy.deepcopy(layer).to("cuda", torch.bfloat16)
    x_gpu = x.detach().to("cuda", torch.bfloat16).requires_grad_()
    y, stats = gpu(x_gpu)
    assert calls, "the bf16 CUDA experts must run through torch._grouped_mm"
    assert y.dtype == torch.bfloat16
    assert stats.tokens_per_expert_E.tolist() == ref.tokens_per_expert_E
    assert _rel_err(y, ref.y_Sd) < 2e-2
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, w in zip(names, grads(y, x_gpu, gpu, g.to("cuda", torch.bfloat16)), want):
        if w.norm() == 0:
            assert torch.count_nonzero(got) == 0, name
            continue
        assert _rel_err(got, w) < 3e-2, f"grad of {name}: relative error {_rel_err(got, w):.3g}"


def test_bf16_layer_trains_a_regression_on_cuda():
    """A few hundred Adam steps of a bf16 MoE regression on the GPU lower the loss 5x."""
    torch.manual_seed(0)
    d, E = 64, 16
    layer = MoELayer(d, E, k=2, router="topk", activation="swiglu", aux_loss=dict(switch=0.01)).cuda()
    target = torch.nn.Linear(d, d, bias=False).cuda().requires_grad_(False)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        x = torch.randn(512, d, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = layer(x)
        loss = torch.nn.functional.mse_loss(y.float(), torch.tanh(target(x)))
        opt.zero_grad()
        (loss + stats.aux_loss).backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 / 5
    assert int(stats.num_dropped) >= 0 and stats.tokens_per_expert_E.sum() > 0


@pytest.mark.parametrize("dropless", [True, False])
def test_bf16_layer_step_makes_no_host_sync(dropless):
    """Forward and backward of one layer at EP=1 under `torch.cuda.set_sync_debug_mode("error")`:
    any op that waits for the GPU (item, tolist, nonzero, bincount, ...) raises."""
    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16, 64, 128):
        pytest.skip("torch._grouped_mm does not serve this GPU / torch without a host sync")
    torch.manual_seed(0)
    layer = MoELayer(64, 8, k=2, router="topk", d_hidden=128, activation="swiglu", dropless=dropless,
                     aux_loss=dict(switch=0.01, z=0.001)).to("cuda", torch.bfloat16)
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)[0].sum().backward()  # warm-up outside the check (allocator, kernel loading)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, stats = layer(x)
        (y.float().square().mean() + stats.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.tokens_per_expert_E.sum().item() > 0


def test_layer_at_thousands_of_experts_on_cuda_matches_the_cpu():
    """E=4096, float64: on the GPU the router and the expert GEMMs (the loop in float64) give
    the CPU's outputs, counts, aux loss and gradients."""
    d, E, S_big = 32, 4096, 8192
    torch.manual_seed(0)
    layer = MoELayer(d, E, k=2, router="topk", d_hidden=64, activation="relu", capacity_factor=1.25,
                     aux_loss=dict(switch=0.01, z=0.001)).double()
    with torch.no_grad():
        layer.router.w_gate.normal_(0.0, 1.0)
    x = torch.randn(S_big, d, dtype=torch.float64, requires_grad=True)
    y_ref, st_ref = layer(x)
    g = torch.randn_like(y_ref)
    want = grads(y_ref, x, layer, g)

    gpu = copy.deepcopy(layer).cuda()
    x_gpu = x.detach().cuda().requires_grad_()
    y, st = gpu(x_gpu)
    torch.testing.assert_close(y.cpu(), y_ref, **TIGHT)
    assert st.tokens_per_expert_E.tolist() == st_ref.tokens_per_expert_E.tolist()
    torch.testing.assert_close(st.aux_loss.cpu(), st_ref.aux_loss, **TIGHT)
    for got, w in zip(grads(y, x_gpu, gpu, g.cuda()), want):
        torch.testing.assert_close(got.cpu(), w, **TIGHT)


@pytest.mark.parametrize("a2a", ["flat", "hierarchical"])
def test_nccl_all_to_all_path_on_one_rank_equals_the_local_layer(a2a, tmp_path):
    """The expert-parallel exchange over NCCL (one rank: the GPU machine has one GPU) gives the
    local layer's output and gradients bitwise, in bf16 through `torch._grouped_mm`."""
    import torch.distributed as dist

    from moe_scale.distributed.comm import AllToAllComm

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        d, E = 64, 8
        local = MoELayer(d, E, k=2, router="topk", capacity_factor=1.0, activation="swiglu").to("cuda", torch.bfloat16)
        ep = copy.deepcopy(local)
        world = dist.group.WORLD
        ep.comm = AllToAllComm(E, intra_group=world, inter_group=dist.new_group([0])) if a2a == "hierarchical" \
            else AllToAllComm(E, world)
        x = torch.randn(4, 128, d, device="cuda", dtype=torch.bfloat16)
        outs = []
        for layer in (local, ep):
            xi = x.clone().requires_grad_()
            y, stats = layer(xi)
            (y.float().square().sum() + stats.aux_loss).backward()
            outs.append((y, xi.grad, [p.grad for p in layer.parameters()], stats))
        (y0, gx0, gp0, s0), (y1, gx1, gp1, s1) = outs
        assert int(s0.num_dropped) > 0, "capacity 1.0 should drop some assignments"
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
        for a, b in zip(gp0, gp1):
            assert torch.equal(a, b)
        assert ep.comm.counters.calls > 0
    finally:
        if own_group:
            dist.destroy_process_group()
