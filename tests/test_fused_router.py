"""Fused CPU router kernels (csrc/router_kernels.cpp) against the eager router they replace."""

import shutil
import warnings

import pytest
import torch

from moe_scale.moe import fused_router
from moe_scale.moe.topk_softmax import topk_softmax_router

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")


def _route(x, w, k, renormalize, mode, monkeypatch):
    """Outputs and gradients of the router under MOE_SCALE_ROUTER_KERNEL=mode."""
    monkeypatch.setenv("MOE_SCALE_ROUTER_KERNEL", mode)
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    weight, index, prob_sum, lse_sq = topk_softmax_router(x, w, k, renormalize)
    gen = torch.Generator().manual_seed(1)
    g_weight = torch.randn(weight.shape, generator=gen)
    g_prob = torch.randn(prob_sum.shape, generator=gen)
    ((weight * g_weight).sum() + (prob_sum * g_prob).sum() + 0.3 * lse_sq).backward()
    return weight, index, prob_sum, lse_sq, x.grad, w.grad


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [8, 100, 1024])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_router_matches_eager(dtype, num_experts, k, renormalize, monkeypatch):
    assert fused_router.load_kernels() is not None, "the fused router kernels failed to build"
    torch.manual_seed(num_experts + k)
    x = torch.randn(300, 32, dtype=dtype)
    w = torch.randn(32, num_experts, dtype=dtype)
    w[:, 5] = w[:, 3]  # exact ties between experts 3 and 5 in every row
    fused = _route(x, w, k, renormalize, "auto", monkeypatch)
    eager = _route(x, w, k, renormalize, "eager", monkeypatch)
    logits = (x @ w).float()
    if k <= 2:  # both break ties to the lowest index; eager uses torch.topk (no tie rule) for k > 2
        assert torch.equal(fused[1], eager[1])
    else:
        assert torch.equal(logits.gather(1, fused[1]), logits.gather(1, eager[1]))
        # the combine weights and every gradient follow the tie order (bf16 logits tie often);
        # the softmax sums do not
        fused, eager = fused[2:4], eager[2:4]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for got, want in zip(fused, eager):
        if got.dtype != torch.long:
            torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_compiler
def test_fused_top_k_breaks_ties_to_the_lowest_index():
    kernels = fused_router.load_kernels()
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    prob = torch.empty_like(logits)
    top_val, top_idx, lse, prob_sum = kernels.router_forward(logits, prob, 3)
    assert top_idx.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert top_val.tolist() == [[2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]
    torch.testing.assert_close(prob, torch.softmax(logits, -1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(prob_sum, torch.softmax(logits, -1).sum(0))


def test_eager_mode_does_not_use_the_kernels(monkeypatch):
    monkeypatch.setenv("MOE_SCALE_ROUTER_KERNEL", "eager")
    assert fused_router.fused_kernels_for(torch.zeros(2, 2)) is None


def test_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MOE_SCALE_ROUTER_KERNEL", "fast")
    with pytest.raises(ValueError, match="MOE_SCALE_ROUTER_KERNEL must be one of"):
        fused_router.fused_kernels_for(torch.zeros(2, 2))


def test_kernels_apply_to_cpu_float32_and_bfloat16_only(monkeypatch):
    monkeypatch.setattr(fused_router, "load_kernels", lambda: "kernels")
    assert fused_router.fused_kernels_for(torch.zeros(2, 2)) == "kernels"
    assert fused_router.fused_kernels_for(torch.zeros(2, 2, dtype=torch.bfloat16)) == "kernels"
    assert fused_router.fused_kernels_for(torch.zeros(2, 2, dtype=torch.float64)) is None
    assert fused_router.fused_kernels_for(torch.zeros(2, 2, dtype=torch.float16)) is None


def test_a_failed_build_warns_and_the_router_stays_eager(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("no compiler here")

    fused_router.load_kernels.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.warns(UserWarning, match="fused router kernels unavailable"):
            assert fused_router.fused_kernels_for(torch.zeros(2, 2)) is None
        x, w = torch.randn(16, 8), torch.randn(8, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every call
            weight, index, _, _ = topk_softmax_router(x, w, 2, True)
        assert torch.equal(index, torch.topk(x @ w, 2).indices)
    finally:
        fused_router.load_kernels.cache_clear()
