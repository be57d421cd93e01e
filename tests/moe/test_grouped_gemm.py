"""Grouped GEMM (moe/grouped_gemm.py) with device-side offsets, both methods, against a float64
per-row reference: empty groups, odd group sizes, rows past the last group; and GroupedExperts
equals a per-expert nn.Linear MLP with nn.Linear's initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_scale.moe import GroupedExperts
from moe_scale.moe.grouped_gemm import choose_method, group_ends, grouped_linear, grouped_mm_supported

COUNTS = {
    "empty-groups": [3, 0, 5, 0, 1],
    "one-group": [0, 0, 7, 0],
    "all-empty": [0, 0, 0],
    "uneven": [1, 6, 2, 9],
}


def _per_group(x_Mk, w_Gkn, counts):
    """Row by row: row m of group g is x[m] @ w[g]; rows past the groups are zero."""
    group_M = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    rows = [x_Mk[m] @ w_Gkn[int(group_M[m])] for m in range(sum(counts))]
    rows += [x_Mk.new_zeros(w_Gkn.shape[-1])] * (x_Mk.shape[0] - sum(counts))
    connected = 0 * (x_Mk.sum() + w_Gkn.sum())  # all-zero gradients rather than none
    return (torch.stack(rows) if rows else x_Mk.new_zeros(0, w_Gkn.shape[-1])) + connected


@pytest.mark.parametrize("parked", [0, 3], ids=["exact", "rows-past-the-end"])
@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
def test_loop_matches_per_row_reference_in_float64(counts, parked):
    g = torch.Generator().manual_seed(0)
    M, K, N = sum(counts) + parked, 5, 3
    x = torch.randn(M, K, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(len(counts), K, N, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(M, N, dtype=torch.float64, generator=g)

    y = grouped_linear(x, w, group_ends(torch.tensor(counts)), "auto")  # float64: the loop
    ref = _per_group(x, w, counts)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad((y * up).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * up).sum(), (x, w), allow_unused=True)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw if rw is not None else torch.zeros_like(w), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(gx[sum(counts):]) == 0
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gw[e]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("counts", [[3, 0, 5, 0, 1], [0, 0, 7, 0], [0, 0, 0], [1, 6, 2, 9], [17, 0, 0, 33]],
                         ids=["empty", "one", "all-empty", "odd", "wide"])
def test_grouped_mm_matches_a_float64_loop(dtype, counts):
    """`torch._grouped_mm` on CPU (aligned shapes) with empty and odd groups and rows parked
    past the last group: output and input gradient zero there, empty groups' weight gradients
    exactly zero, the rest within the rounding of `dtype` products of length K (K eps)."""
    assert grouped_mm_supported(torch.device("cpu"), dtype, 16, 8)
    g = torch.Generator().manual_seed(1)
    parked, K, N = 4, 16, 8
    M = sum(counts) + parked
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(len(counts), K, N, generator=g).to(dtype)
    up = torch.randn(M, N, generator=g).to(dtype)
    ends = group_ends(torch.tensor(counts))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear(xg, wg, ends, "grouped_mm")
    (y.float() * up.float()).sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = _per_group(x64, w64, counts)
    (ref * up.double()).sum().backward()
    eps = torch.finfo(dtype).eps
    # Each output is a length-K dot product of O(1) terms: error <= K * eps * sum|terms|,
    # plus the rounding of the output itself (gradients: length K or N, or M for dW).
    for got, want, length in ((y, ref, K), (xg.grad, x64.grad, N), (wg.grad, w64.grad, M)):
        bound = length * eps * (want.abs().max().item() + 1) * 4
        assert (got.double() - want).abs().max().item() <= bound
    assert torch.count_nonzero(y[sum(counts):]) == 0 and torch.count_nonzero(xg.grad[sum(counts):]) == 0
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(wg.grad[e]) == 0


def test_choose_method_follows_the_documented_rules():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert choose_method(cpu, torch.float32, (16, 8)) == "grouped_mm"
    assert choose_method(cpu, torch.bfloat16, (16, 8)) == "grouped_mm"
    assert choose_method(cpu, torch.bfloat16, (12, 8)) == "loop"  # 24-byte rows
    assert choose_method(cpu, torch.float32, (12, 8)) == "grouped_mm"  # 48-byte rows
    assert choose_method(cpu, torch.float64, (16, 8)) == "loop"
    assert choose_method(meta, torch.bfloat16, (16, 8)) == "grouped_mm"
    assert choose_method(meta, torch.float32, (16, 8)) == "loop"
    assert choose_method(cpu, torch.float32, (16, 8), "loop") == "loop"
    with pytest.raises(ValueError, match="grouped GEMM method"):
        choose_method(cpu, torch.float32, (16, 8), "bmm")


def test_cuda_rules_need_bf16_and_a_hopper_class_device(monkeypatch):
    from moe_scale.moe.grouped_gemm import cuda_capability

    cuda = torch.device("cuda", 0)
    for capability, expected in (((9, 0), True), ((10, 0), True), ((8, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        cuda_capability.cache_clear()
        assert grouped_mm_supported(cuda, torch.bfloat16, 16, 8) is expected
        assert grouped_mm_supported(cuda, torch.float32, 16, 8) is False
    cuda_capability.cache_clear()  # the patched answers must not outlive this test


def _assert_matches_reference(y, ref, x, up, experts, mods, tol: float = 1e-12) -> None:
    """Outputs, input gradients (of sum(y * up)) and expert weight gradients of the experts
    equal those of the float64 nn.Linear reference `mods` run on the same x."""
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    (y * up).sum().backward()
    x_grad = x.grad.clone()
    x.grad = None
    (ref * up).sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=tol, atol=tol)
    _assert_expert_grads_match(experts, mods, rtol=tol, atol=tol)


def _linear_reference(experts: GroupedExperts):
    """The same experts as nn.Linear modules: lin1 (+ gate lin3 for SwiGLU), lin2."""
    bias = experts.b1 is not None
    mods = []
    for e in range(experts.num_experts):
        lin1 = nn.Linear(experts.d_model, experts.d_hidden, bias=bias).double()
        lin2 = nn.Linear(experts.d_hidden, experts.d_model, bias=bias).double()
        lin3 = nn.Linear(experts.d_model, experts.d_hidden, bias=False).double() if experts.w3 is not None else None
        with torch.no_grad():
            lin1.weight.copy_(experts.w1[e].t())
            lin2.weight.copy_(experts.w2[e].t())
            if bias:
                lin1.bias.copy_(experts.b1[e])
                lin2.bias.copy_(experts.b2[e])
            if lin3 is not None:
                lin3.weight.copy_(experts.w3[e].t())
        mods.append((lin1, lin2, lin3))
    return mods


def _run_reference(mods, activation, x_Md, counts):
    outs = []
    for (lin1, lin2, lin3), x in zip(mods, torch.split(x_Md[: sum(counts)], counts)):
        h = lin1(x)
        if activation == "relu":
            h = F.relu(h)
        elif activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.silu(h) * lin3(x)
        outs.append(lin2(h))
    outs.append(x_Md.new_zeros(x_Md.shape[0] - sum(counts), lin2.out_features))
    return torch.cat(outs)


def _assert_expert_grads_match(experts: GroupedExperts, mods, **tol) -> None:
    """Every expert parameter's gradient equals its nn.Linear twin's (from `_linear_reference`);
    a twin without a gradient (an expert with no rows) counts as zero."""
    pairs = [("w1", 0, "weight"), ("w2", 1, "weight")]
    pairs += [("b1", 0, "bias"), ("b2", 1, "bias")] if experts.b1 is not None else []
    pairs += [("w3", 2, "weight")] if experts.w3 is not None else []
    for name, which, attr in pairs:
        got = getattr(experts, name).grad.double()
        for e, m in enumerate(mods):
            want = getattr(m[which], attr).grad
            want = torch.zeros_like(got[e]) if want is None else want.t() if attr == "weight" else want
            torch.testing.assert_close(got[e], want, **tol, msg=lambda s, n=name, e=e: f"{n}[{e}]: {s}")


@pytest.mark.parametrize("counts", [[4, 0, 7, 1, 3], [2, 5, 0, 4]])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_grouped_experts_equal_per_expert_linear(activation, bias, counts):
    """The core path in float64 (the loop), with two rows parked past the experts' rows."""
    torch.manual_seed(0)
    experts = GroupedExperts(len(counts), 6, 10, activation=activation, bias=bias).double()
    mods = _linear_reference(experts)
    M = sum(counts) + 2
    x = torch.randn(M, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(M, 6, dtype=torch.float64)

    y = experts(x, torch.tensor(counts))
    ref = _run_reference(mods, activation, x, counts)
    _assert_matches_reference(y, ref, x, up, experts, mods)


def test_grouped_experts_init_matches_nn_linear_bounds():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every weight and bias, independently per expert."""
    torch.manual_seed(0)
    E, d, h = 8, 64, 256
    experts = GroupedExperts(E, d, h, activation="swiglu", bias=True)
    for name, fan_in in (("w1", d), ("w3", d), ("b1", d), ("w2", h), ("b2", h)):
        t = getattr(experts, name).detach()
        bound = 1.0 / math.sqrt(fan_in)
        assert t.abs().max() <= bound, name
        assert t.abs().max() > 0.95 * bound, name  # fills the range: not a narrower init
        if t.numel() >= 8192:
            assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name  # uniform
        assert not torch.equal(t[0], t[1]), f"{name}: experts must be initialised independently"
    linear = nn.Linear(d, h)
    assert linear.weight.abs().max() <= 1 / math.sqrt(d) < 1.05 * linear.weight.abs().max()
