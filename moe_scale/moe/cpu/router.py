"""The CPU backend's softmax top-k router (switch top-1, GShard top-2, top-k) in fused kernels.

The same function as the core router (moe/routing.py, `softmax_topk`), which is its reference
in tests. Autograd through `softmax(x @ W)` and `topk` keeps several `[S, E]` tensors; this
works chunk by chunk over tokens with csrc/router_kernels.cpp: each chunk of logits gives its
top-k, combine weights, log-sum-exp and probability column sums in one read, and only the
probabilities are kept (none at all past `_RECOMPUTE_MIN_BYTES`: backward recomputes them).
With up to 16 experts (k <= 2) the kernels run the router's GEMMs too, 16 tokens at a time:
one compiled call forward and one backward (`_GEMM_IN_KERNEL_MAX_EXPERTS`).

Outputs (all per call, S tokens, E experts, k choices):
    weight_N      combine weights of the k chosen experts, slot-major `[k * S]` (differentiable)
    index_Sk      chosen experts, best first (int64), ties to the lowest index
    prob_sum_E    sum over tokens of the full softmax probability (differentiable; P_i * S)
    lse_sq_sum    sum over tokens of logsumexp(logits)^2 (differentiable; z-loss * S)
    top1_count_E  first choices per expert, float32, where the kernel counted them (few
                  experts; else None)
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_scale.moe.autocast import outside_autocast
from moe_scale.moe.cpu.kernels import kernels_for

# Elements of a [chunk, E] block per kernel call: fewer, larger GEMMs and fewer weight-gradient
# accumulations than a cache-sized chunk, as the kernels read each row once.
_CHUNK_ELEMENTS = 1 << 21


# The fused path recomputes the probabilities in backward (one more `[chunk, d] x [d, E]` GEMM
# and exp per chunk) instead of keeping them when they would take at least this many bytes.
# Blocks that large come from mmap (glibc caps its threshold at 32 MiB, also under
# `keep_freed_host_memory`) and are page-faulted in again every step, which costs more than
# the recomputation; not keeping them also halves the router's peak memory
# (docs/performance.md has the measurements).
_RECOMPUTE_MIN_BYTES = 32 << 20


def _recompute(num_tokens: int, num_experts: int, itemsize: int) -> bool:
    return num_tokens * num_experts * itemsize >= _RECOMPUTE_MIN_BYTES


def _token_chunks(num_tokens: int, num_experts: int) -> list[tuple[int, int]]:
    step = max(64, _CHUNK_ELEMENTS // max(num_experts, 1))
    return [(s, min(s + step, num_tokens)) for s in range(0, num_tokens, step)]


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router works in float32 at least: bf16 / fp16 inputs are upcast, float64 is kept."""
    return torch.promote_types(dtype, torch.float32)


# With at most this many experts (and k <= 2) the fused kernels run the router's GEMMs too
# (`router_forward_gemm` in csrc/router_kernels.cpp): one call each way instead of three small
# ATen GEMMs and the Python around them.
_GEMM_IN_KERNEL_MAX_EXPERTS = 16


def _gemm_in_kernel(kernels, x_Sd: Tensor, w_dE: Tensor, k: int) -> bool:
    return (kernels is not None and w_dE.shape[1] <= _GEMM_IN_KERNEL_MAX_EXPERTS and k <= 2
            and w_dE.dtype == x_Sd.dtype and x_Sd.is_contiguous())


class _TopKSoftmaxRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Sd: Tensor, w_dE: Tensor, k: int, renormalize: bool, kernels):
        S, E = x_Sd.shape[0], w_dE.shape[1]
        ctx.renormalize, ctx.kernels = renormalize, kernels
        ctx.gemm_in_kernel = _gemm_in_kernel(kernels, x_Sd, w_dE, k)
        if ctx.gemm_in_kernel:
            weight_kS, index_kS, lse_S, prob_SE, prob_sum_E, lse_sq_sum, top1_E = kernels.router_forward_gemm(
                x_Sd, w_dE, k, renormalize)
            weight_Sk, index_Sk = weight_kS.t(), index_kS.t()
            ctx.save_for_backward(x_Sd, w_dE, prob_SE, lse_S, weight_Sk, index_Sk)
            ctx.mark_non_differentiable(index_Sk, top1_E)
            return weight_kS.view(-1), index_Sk, prob_sum_E, lse_sq_sum, top1_E
        acc = router_dtype(x_Sd.dtype)
        # Choice-major storage, handed out as [S, k] views: flattening the choices slot-major
        # (routing.py) is then a view, not a copy.
        weight_Sk = x_Sd.new_empty(k, S, dtype=acc).t()
        index_Sk = torch.empty(k, S, dtype=torch.long, device=x_Sd.device).t()
        lse_S = x_Sd.new_empty(S, dtype=acc)
        prob_sum_E = torch.zeros(E, dtype=acc, device=x_Sd.device)
        # Large probability tensors are not kept: backward recomputes them (see `_recompute`).
        recompute = _recompute(S, E, x_Sd.element_size())
        prob_SE = None if recompute else x_Sd.new_empty(S, E)
        # One chunk of logits -> its top-k, combine weights and log-sum-exp (written into the
        # outputs' rows) and its probability column sums, writing the probabilities: one pass
        # per row in L1, or per 16 rows with few experts (csrc/router_kernels.cpp).
        for s, e in _token_chunks(S, E):
            prob_out = None if recompute else prob_SE[s:e]
            prob_sum_E += kernels.router_forward(x_Sd[s:e] @ w_dE, prob_out, weight_Sk[s:e], index_Sk[s:e], lse_S[s:e], k,
                                        renormalize)
        ctx.save_for_backward(x_Sd, w_dE, prob_SE, lse_S, weight_Sk, index_Sk)
        ctx.mark_non_differentiable(index_Sk)
        return weight_Sk.t().view(-1), index_Sk, prob_sum_E, (lse_S * lse_S).sum(), None

    @staticmethod
    def backward(ctx, g_weight_N, _g_index, g_prob_sum_E, g_lse_sq, _g_top1):
        x_Sd, w_dE, prob_SE, lse_S, weight_Sk, index_Sk = ctx.saved_tensors
        S, E = x_Sd.shape[0], w_dE.shape[1]
        acc, kernels = weight_Sk.dtype, ctx.kernels
        g_weight_Sk = None if g_weight_N is None else g_weight_N.view(weight_Sk.shape[1], S).t()
        if g_weight_Sk is not None:  # in the strides of weight_Sk, as the kernel reads them
            g_weight_Sk = g_weight_Sk.to(acc)
            if g_weight_Sk.stride() != weight_Sk.stride():
                g_weight_Sk = torch.empty_like(weight_Sk).copy_(g_weight_Sk)
        g_prob_E = torch.zeros(E, dtype=acc, device=x_Sd.device) if g_prob_sum_E is None else g_prob_sum_E.to(acc)
        g_prob_E = g_prob_E.contiguous()
        g_lse_sq = 0.0 if g_lse_sq is None else float(g_lse_sq)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.gemm_in_kernel:
            grad_x, grad_w = kernels.router_backward_gemm(x_Sd, w_dE, prob_SE, g_prob_E, lse_S, g_lse_sq, index_Sk,
                                                          weight_Sk, g_weight_Sk, ctx.renormalize, need_x, need_w)
            return grad_x, grad_w, None, None, None
        grad_x = torch.empty_like(x_Sd) if need_x else None
        chunks = _token_chunks(S, E)
        grad_w_Ed = None  # [E, d]: (g^T x) rather than x^T g, the layout oneDNN runs well in bf16
        for s, e in chunks:
            # from the saved probabilities, or (prob_SE None) from the recomputed logits, in place
            source = x_Sd[s:e] @ w_dE if prob_SE is None else prob_SE[s:e]
            grad_logits = source if prob_SE is None else torch.empty_like(source)
            kernels.router_backward(source, g_prob_E, lse_S[s:e], g_lse_sq, index_Sk[s:e],
                                    weight_Sk[s:e], None if g_weight_Sk is None else g_weight_Sk[s:e],
                                    ctx.renormalize, grad_logits, prob_SE is None)
            if need_x:
                torch.mm(grad_logits, w_dE.t(), out=grad_x[s:e])
            if need_w and grad_w_Ed is None:
                part = grad_logits.t() @ x_Sd[s:e]
                grad_w_Ed = part if len(chunks) == 1 else part.to(acc)
            elif need_w and grad_logits.dtype == acc:
                grad_w_Ed.addmm_(grad_logits.t(), x_Sd[s:e])  # accumulates inside the GEMM
            elif need_w:
                grad_w_Ed += (grad_logits.t() @ x_Sd[s:e]).to(acc)
        if need_w and grad_w_Ed is None:  # no tokens
            grad_w_Ed = torch.zeros_like(w_dE.t())
        grad_w = grad_w_Ed.t().to(w_dE.dtype).contiguous() if need_w else None
        return grad_x, grad_w, None, None, None


def fused_softmax_topk(
    x_Sd: Tensor, w_dE: Tensor, k: int, renormalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None] | None:
    """Route `x_Sd` with logits `x_Sd @ w_dE` in the kernels (see the module docstring for the
    outputs), or None where they do not apply (not CPU float32 / bfloat16, or compiling)."""
    (x_Sd, w_dE), autocast_off = outside_autocast(x_Sd, w_dE)
    kernels = kernels_for(x_Sd, w_dE)
    if kernels is None:
        return None
    with autocast_off:
        return _TopKSoftmaxRouter.apply(x_Sd, w_dE.to(x_Sd.dtype), k, renormalize, kernels)
