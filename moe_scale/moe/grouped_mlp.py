"""Fused grouped expert MLP: `y = act(x w1 [+ b1]) w2 [+ b2]` per expert, one autograd node.

Composing the MLP from autograd ops costs copies (split / cat, scatter-add backwards) and
keeps extra activations. This function runs exactly the GEMMs the math needs, forward and
backward, writing into preallocated buffers, and saves only the input rows and what the
activation's backward needs:

    relu     saves x and a = relu(h)             (h is recomputed as nothing: a > 0 is the mask)
    gelu     saves x and h                       (a = gelu(h) is recomputed for dW2)
    swiglu   saves x, h1 = x w1 and h3 = x w3    (a = silu(h1) * h3 recomputed for dW2)

Two exact layouts (see grouped_gemm.py): "loop" runs one GEMM per non-empty expert on its row
block; "bmm" pads rows into `[E, C, d]` once per pass and runs batched GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_scale.moe.grouped_gemm import PaddedLayout


def _act_forward(activation: str, h: Tensor, h3: Tensor | None) -> Tensor:
    if activation == "relu":
        return torch.relu_(h)
    if activation == "gelu":
        return F.gelu(h)
    return F.silu(h) * h3


class _Blocks:
    """Row blocks of the sorted input, one per non-empty expert: (expert, start, end)."""

    def __init__(self, counts: tuple[int, ...]):
        self.spans = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                self.spans.append((e, start, start + c))
            start += c


def _mm_blocks(a: Tensor, w: Tensor, blocks: _Blocks, out: Tensor, transpose_w: bool = False) -> Tensor:
    """out[s:e] = a[s:e] @ w[g] (or w[g]^T) for every block."""
    for g, s, e in blocks.spans:
        torch.mm(a[s:e], w[g].t() if transpose_w else w[g], out=out[s:e])
    return out


def _weight_grad_blocks(a: Tensor, g: Tensor, blocks: _Blocks, out: Tensor) -> Tensor:
    """out[g] = a[s:e]^T @ g[s:e] for every block (other experts keep zero)."""
    for grp, s, e in blocks.spans:
        torch.mm(a[s:e].t(), g[s:e], out=out[grp])
    return out


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Md, w1, w2, w3, b1, b2, counts: tuple[int, ...], method: str, activation: str):
        M, d = x_Md.shape
        h_dim = w1.shape[-1]
        if method == "bmm":
            layout = PaddedLayout(list(counts), x_Md.device)
            x = layout.pad_(x_Md)
            h = torch.bmm(x, w1) if b1 is None else torch.baddbmm(b1[:, None], x, w1)
            h3 = torch.bmm(x, w3) if w3 is not None else None
        else:
            blocks = _Blocks(counts)
            h = _mm_blocks(x_Md, w1, blocks, x_Md.new_empty(M, h_dim))
            if b1 is not None:
                h += torch.repeat_interleave(b1, torch.tensor(counts, device=b1.device), dim=0)
            h3 = _mm_blocks(x_Md, w3, blocks, x_Md.new_empty(M, h_dim)) if w3 is not None else None
        saved_h = None if activation == "relu" else h
        a = _act_forward(activation, h, h3)
        if method == "bmm":
            y = torch.bmm(a, w2) if b2 is None else torch.baddbmm(b2[:, None], a, w2)
            y_Md = layout.unpad_(y)
            # Keep only real rows for backward: the same memory as the unpadded floor.
            a_saved = layout.unpad_(a) if activation == "relu" else None
            h_saved = layout.unpad_(saved_h) if saved_h is not None else None
            h3_saved = layout.unpad_(h3) if h3 is not None else None
            ctx.layout = layout
        else:
            y_Md = _mm_blocks(a, w2, blocks, x_Md.new_empty(M, d))
            if b2 is not None:
                y_Md += torch.repeat_interleave(b2, torch.tensor(counts, device=b2.device), dim=0)
            a_saved = a if activation == "relu" else None
            h_saved, h3_saved = saved_h, h3
            ctx.blocks = blocks
        ctx.save_for_backward(x_Md, w1, w2, w3, a_saved, h_saved, h3_saved)
        ctx.method, ctx.activation, ctx.counts = method, activation, counts
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return y_Md

    @staticmethod
    def backward(ctx, g_y):
        x, w1, w2, w3, a, h, h3 = ctx.saved_tensors
        g_y = g_y.contiguous()
        act = ctx.activation
        if ctx.method == "bmm":
            L = ctx.layout
            x, g_y = L.pad_(x), L.pad_(g_y)
            a, h, h3 = (L.pad_(t) if t is not None else None for t in (a, h, h3))

            def mm(p, q):
                return torch.bmm(p, q)

            def mm_t(p, q):  # p @ q^T per expert
                return torch.bmm(p, q.transpose(1, 2))

            def wgrad(p, q):  # p^T @ q per expert
                return torch.bmm(p.transpose(1, 2), q)

        else:
            blocks = ctx.blocks

            def mm(p, q):
                return _mm_blocks(p, q, blocks, p.new_empty(p.shape[0], q.shape[-1]))

            def mm_t(p, q):
                return _mm_blocks(p, q, blocks, p.new_empty(p.shape[0], q.shape[-2]), transpose_w=True)

            def wgrad(p, q):
                return _weight_grad_blocks(p, q, blocks, p.new_zeros(len(ctx.counts), p.shape[-1], q.shape[-1]))

        if act == "gelu":
            a = F.gelu(h)
        elif act == "swiglu":
            a = F.silu(h) * h3
        g_w2 = wgrad(a, g_y)
        g_a = mm_t(g_y, w2)
        g_h3 = g_w3 = None
        if act == "relu":
            g_h = torch.ops.aten.threshold_backward(g_a, a, 0)
        elif act == "gelu":
            g_h = torch.ops.aten.gelu_backward(g_a, h)
        else:
            g_h3 = g_a * F.silu(h)
            g_h = torch.ops.aten.silu_backward(g_a * h3, h)
        g_w1 = wgrad(x, g_h)
        g_x = mm_t(g_h, w1)
        if g_h3 is not None:
            g_w3 = wgrad(x, g_h3)
            g_x += mm_t(g_h3, w3)
        g_b1 = _bias_grad(g_h, ctx) if ctx.has_b1 else None
        g_b2 = _bias_grad(g_y, ctx) if ctx.has_b2 else None
        if ctx.method == "bmm":
            g_x = ctx.layout.unpad_(g_x)
        return g_x, g_w1, g_w2, g_w3, g_b1, g_b2, None, None, None


def _bias_grad(g: Tensor, ctx) -> Tensor:
    """Per-expert sum of row gradients: `[E, n]` (padded rows carry zero gradient)."""
    if ctx.method == "bmm":
        return g.sum(1)
    counts_E = torch.tensor(ctx.counts, device=g.device)
    group_M = torch.repeat_interleave(torch.arange(len(ctx.counts), device=g.device), counts_E)
    return g.new_zeros(len(ctx.counts), g.shape[-1]).index_add_(0, group_M, g)


def grouped_mlp(
    x_Md: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    b1: Tensor | None,
    b2: Tensor | None,
    counts: list[int],
    method: str,
    activation: str,
) -> Tensor:
    """Rows sorted by expert (`counts[e]` rows for expert e) through their experts: `[M, d]`."""
    return _GroupedMLP.apply(x_Md, w1, w2, w3, b1, b2, tuple(counts), method, activation)
