"""Fused router for softmax top-k gating (switch top-1, GShard top-2, top-k).

Autograd through `softmax(x @ W)` followed by `topk` keeps several `[S, E]` tensors for
backward (logits, probabilities, their gradients). At thousands of experts those dominate the
layer's memory. This function works chunk by chunk over tokens: it computes a chunk of logits,
everything the gate and its losses need from it, and keeps only the probabilities. The full
logits never exist; backward rebuilds the logit gradient a chunk at a time from the saved
probabilities (no exp) and feeds it straight into the two matmul gradients. Peak memory is
one `[S, E]` tensor (in the input dtype) plus a cache-sized chunk. With the fused CPU kernels
and a large `[S, E]` (`_RECOMPUTE_MIN_BYTES`), not even that: backward recomputes each chunk's
logits and probabilities from the saved input, and only `[S, k]`-sized statistics are kept.
With up to 16 experts (k <= 2) the kernels run the router's GEMMs themselves, 16 tokens at a
time: one compiled call forward and one backward, where three small ATen GEMMs and the Python
around them took more of a layer step than their arithmetic (`_GEMM_IN_KERNEL_MAX_EXPERTS`).

Outputs (all per call, S tokens, E experts, k choices):
    weight_Sk     combine weights of the k chosen experts (differentiable; with `flat`,
                  slot-major `[k * S]`)
    index_Sk      chosen experts, best first (int64)
    prob_sum_E    sum over tokens of the full softmax probability (differentiable; P_i * S)
    lse_sq_sum    sum over tokens of logsumexp(logits)^2 (differentiable; z-loss * S)
    top1_count_E  first choices per expert, float32, where the kernel counted them (few
                  experts; else None)
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_scale.moe.autocast import outside_autocast
from moe_scale.moe.cpu_kernels import kernels_for

# Elements of a [chunk, E] block processed at once by the eager path: 2 MiB in float32, 1 MiB
# per core with two intra-op threads, so a block stays in L2 across the several passes over it,
# and the chunk GEMMs and per-chunk Python stay cheap (2^19 beat 2^18 by ~6% fwd+bwd at E=4096
# on CI's CPU). The fused kernels read each row once, so they take larger chunks: fewer, larger
# GEMMs, and fewer weight-gradient accumulations (2^21 vs 2^19: 20% less backward time at
# E=4096 bf16, forward a little faster).
_CHUNK_ELEMENTS = 1 << 19
_FUSED_CHUNK_ELEMENTS = 1 << 21


# The fused path recomputes the probabilities in backward (one more `[chunk, d] x [d, E]` GEMM
# and exp per chunk) instead of keeping them when they would take at least this many bytes.
# Blocks that large come from mmap (glibc caps its threshold at 32 MiB, also under
# `keep_freed_host_memory`) and are page-faulted in again every step: the faults alone took 61
# of 98 ms of the forward kernel at E=8192, S=16384 in bf16, and recomputing took the layer
# from 1.21x to 1.03x of the floor's time at E=4096 and halved its peak memory at E=8192.
# Where nothing faults (`keep_freed_host_memory(never_mmap=True)`), keeping them is ~6% faster
# at E=4096 bf16 (one in-process measurement); the memory saving stays.
_RECOMPUTE_MIN_BYTES = 32 << 20


def _recompute(num_tokens: int, num_experts: int, itemsize: int) -> bool:
    return num_tokens * num_experts * itemsize >= _RECOMPUTE_MIN_BYTES


def _token_chunks(num_tokens: int, num_experts: int, fused: bool = False) -> list[tuple[int, int]]:
    elements = _FUSED_CHUNK_ELEMENTS if fused else _CHUNK_ELEMENTS
    step = max(64, elements // max(num_experts, 1))
    return [(s, min(s + step, num_tokens)) for s in range(0, num_tokens, step)]


# Experts per segment of the segmented top-k (see `_top_k`).
_SEGMENT = 64


def _top2_by_max(block: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-1 / top-2 of each row as row maxima, first occurrence first (torch.max's tie rule)."""
    val1, idx1 = block.max(dim=-1, keepdim=True)
    if k == 1:
        return val1, idx1
    block.scatter_(1, idx1, float("-inf"))
    val2, idx2 = block.max(dim=-1, keepdim=True)
    block.scatter_(1, idx1, val1)
    return torch.cat([val1, val2], 1), torch.cat([idx1, idx2], 1)


def _top_k(block: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`torch.topk(block, k, dim=-1)` for `[C, E]`, ties to the lowest index.

    For k <= 2 at hundreds of experts or more, one pass of segment maxima (`amax` over
    segments of 64 experts, ~2.5x faster on CPU than `max` with indices, which is itself
    several times faster than `topk`) finds the k segments that hold the answer: the largest
    element lies in the segment with the largest maximum, the second largest in that segment
    or in the one with the next largest maximum. The exact top-k is then taken over those k
    segments' elements, kept in index order so ties resolve as in a full-row `max`.
    """
    if k > 2:
        return torch.topk(block, k, dim=-1)
    C, E = block.shape
    if E % _SEGMENT or E < 4 * _SEGMENT:
        return _top2_by_max(block, k)
    segments = block.view(C, E // _SEGMENT, _SEGMENT)
    _, seg_idx = _top2_by_max(segments.amax(-1), k)  # [C, k]
    if k == 2:
        seg_idx = seg_idx.sort(dim=-1).values  # index order, so first occurrence still wins ties
    candidates = segments.gather(1, seg_idx[:, :, None].expand(C, k, _SEGMENT)).view(C, k * _SEGMENT)
    top_val, cand_idx = _top2_by_max(candidates, k)
    top_idx = seg_idx.gather(1, cand_idx // _SEGMENT) * _SEGMENT + cand_idx % _SEGMENT
    return top_val, top_idx


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router works in float32 at least: bf16 / fp16 inputs are upcast, float64 is kept."""
    return torch.promote_types(dtype, torch.float32)


def _forward_chunk_eager(logits: Tensor, prob_out: Tensor | None, weight_out: Tensor, index_out: Tensor,
                         lse_out: Tensor, k: int, renormalize: bool) -> Tensor:
    """`router_forward` of csrc/router_kernels.cpp in ATen: top-k and its combine weights,
    softmax into `prob_out`, log-sum-exp, accumulated in `router_dtype`; returns the
    probability column sums."""
    acc = router_dtype(logits.dtype)
    block = logits.to(acc)
    top_val, top_idx = _top_k(block, k)
    # One fused softmax pass (ATen's vectorised kernel: max, exp, sum, scale); its output goes
    # straight into the saved probabilities when they are kept in `acc`.
    prob = prob_out if prob_out is not None and prob_out.dtype == acc else torch.empty_like(block)
    torch._softmax(block, -1, False, out=prob)
    # The row max has probability exp(max - lse) = 1 / sum: lse = max - log(p_max).
    lse = top_val[:, 0] - prob.gather(1, top_idx[:, :1]).squeeze(1).log()
    if prob_out is not None and prob_out.dtype != acc:
        prob_out.copy_(prob)
    weight_out.copy_(torch.softmax(top_val, dim=-1) if renormalize else torch.exp(top_val - lse[:, None]))
    index_out.copy_(top_idx)
    lse_out.copy_(lse)
    return prob.sum(0)


def _logit_grad_eager(prob, g_prob_E, g_lse_sq, lse, dense_shift, index, sparse, acc) -> Tensor:
    """Logit gradient of one chunk, in the probabilities' dtype (see `router_backward` in
    csrc/router_kernels.cpp for the fused form of the same formula)."""
    out_dtype, prob = prob.dtype, prob.to(acc)
    # prob_sum term: p (gP - p.gP); z term: 2 lse p g_z; dense part of the weight term.
    prob_gP = prob * g_prob_E
    coef = (2.0 * g_lse_sq) * lse - prob_gP.sum(-1) - dense_shift
    grad = prob_gP.addcmul_(prob, coef[:, None])
    grad.scatter_add_(1, index, sparse)
    return grad.to(out_dtype)


# With at most this many experts (and k <= 2) the fused kernels run the router's GEMMs too
# (`router_forward_gemm` in csrc/router_kernels.cpp): one call each way instead of three small
# ATen GEMMs and the Python around them.
_GEMM_IN_KERNEL_MAX_EXPERTS = 16


def _gemm_in_kernel(kernels, x_Sd: Tensor, w_dE: Tensor, k: int) -> bool:
    return (kernels is not None and w_dE.shape[1] <= _GEMM_IN_KERNEL_MAX_EXPERTS and k <= 2
            and w_dE.dtype == x_Sd.dtype and x_Sd.is_contiguous())


class _TopKSoftmaxRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Sd: Tensor, w_dE: Tensor, k: int, renormalize: bool):
        S, E = x_Sd.shape[0], w_dE.shape[1]
        kernels = kernels_for(x_Sd)
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
        recompute = kernels is not None and _recompute(S, E, x_Sd.element_size())
        prob_SE = None if recompute else x_Sd.new_empty(S, E)
        # One chunk of logits -> its top-k, combine weights and log-sum-exp (written into the
        # outputs' rows) and its probability column sums, writing the probabilities: one pass
        # per row in L1, or per 16 rows with few experts (csrc/router_kernels.cpp), or ATen.
        forward_chunk = kernels.router_forward if kernels is not None else _forward_chunk_eager
        for s, e in _token_chunks(S, E, fused=kernels is not None):
            prob_out = None if recompute else prob_SE[s:e]
            prob_sum_E += forward_chunk(x_Sd[s:e] @ w_dE, prob_out, weight_Sk[s:e], index_Sk[s:e], lse_S[s:e], k,
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
            return grad_x, grad_w, None, None
        if kernels is None:  # the sparse and dense terms of the weights' gradient (the kernel's, in ATen)
            sparse_Sk, dense_shift_S = _weight_grad_terms(weight_Sk, g_weight_Sk, ctx.renormalize)
        grad_x = torch.empty_like(x_Sd) if need_x else None
        chunks = _token_chunks(S, E, fused=kernels is not None)
        grad_w_Ed = None  # [E, d]: (g^T x) rather than x^T g, which oneDNN ran 2x slower in bf16 at E = 8
        for s, e in chunks:
            if kernels is not None:
                # from the saved probabilities, or (prob_SE None) from the recomputed logits, in place
                source = x_Sd[s:e] @ w_dE if prob_SE is None else prob_SE[s:e]
                grad_logits = source if prob_SE is None else torch.empty_like(source)
                kernels.router_backward(source, g_prob_E, lse_S[s:e], g_lse_sq, index_Sk[s:e],
                                        weight_Sk[s:e], None if g_weight_Sk is None else g_weight_Sk[s:e],
                                        ctx.renormalize, grad_logits, prob_SE is None)
            else:
                grad_logits = _logit_grad_eager(prob_SE[s:e], g_prob_E, g_lse_sq, lse_S[s:e], dense_shift_S[s:e],
                                                index_Sk[s:e], sparse_Sk[s:e], acc)
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
        return grad_x, grad_w, None, None


def _weight_grad_terms(weight_Sk: Tensor, g_weight_Sk: Tensor | None, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(sparse_Sk, dense_shift_S) of the combine weights' gradient: the term on each chosen
    logit and the amount taken from every logit's p-weighted share."""
    g = torch.zeros_like(weight_Sk) if g_weight_Sk is None else g_weight_Sk
    wg_Sk = weight_Sk * g
    if renormalize:
        # d softmax(top_val): w_j (g_j - sum_i w_i g_i), landing on the chosen logits only.
        return wg_Sk - weight_Sk * wg_Sk.sum(-1, keepdim=True), torch.zeros_like(wg_Sk[:, 0])
    # w_j = p[idx_j]: chosen logit gets w_j g_j, every logit gets -p sum_j w_j g_j.
    return wg_Sk, wg_Sk.sum(-1)


def topk_softmax_router(
    x_Sd: Tensor, w_dE: Tensor, k: int, renormalize: bool, flat: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Route `x_Sd` with logits `x_Sd @ w_dE`; see the module docstring for the outputs. With
    `flat` the weights come slot-major as `[k * S]` (`weight_N`, the routing's own layout),
    without the two autograd views of the `[S, k]` form."""
    (x_Sd, w_dE), autocast_off = outside_autocast(x_Sd, w_dE)
    with autocast_off:
        weight_N, *rest = _TopKSoftmaxRouter.apply(x_Sd, w_dE, k, renormalize)
    return (weight_N if flat else weight_N.view(k, -1).t(), *rest)
