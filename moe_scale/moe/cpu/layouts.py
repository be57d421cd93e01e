"""Layouts of the CPU backend's expert MLP: rows sorted by expert, host-side counts.

    loop   one GEMM per non-empty expert on its row block; no padding. Best when experts hold
           many rows.
    bmm    rows scattered into a zero-padded `[E, C, d]` block (C = largest expert), batched
           GEMMs. Best when experts are many and small: a Python loop over thousands of tiny
           GEMMs costs more than the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Groups at least this large amortise the per-GEMM Python cost: `auto` loops over them; so
# does a layer with this few non-empty groups, where a loop costs little.
_LOOP_MIN_ROWS = 128
_LOOP_MAX_GROUPS = 64
# Past this padding factor (a few huge groups among many small ones, e.g. dropless at init)
# the padded block would waste more than the loop's per-group cost.
_MAX_PAD_FACTOR = 4.0


def choose_layout(counts: list[int]) -> str:
    """"loop" (one GEMM per non-empty expert) or "bmm" (rows padded to `[E, C, d]`)."""
    rows, nonempty = sum(counts), sum(1 for c in counts if c)
    if nonempty == 0:
        return "loop"
    if nonempty <= _LOOP_MAX_GROUPS or rows / nonempty >= _LOOP_MIN_ROWS:
        return "loop"
    padded = len(counts) * max(counts)
    return "bmm" if padded <= _MAX_PAD_FACTOR * rows else "loop"


class _ScatterRows(torch.autograd.Function):
    """out = zeros(n, d); out[slot] = x, with distinct slots: the backward is a gather."""

    @staticmethod
    def forward(ctx, x_Md: Tensor, slot_M: Tensor, num_rows: int):
        ctx.save_for_backward(slot_M)
        return x_Md.new_zeros(num_rows, x_Md.shape[-1]).index_copy_(0, slot_M, x_Md)

    @staticmethod
    def backward(ctx, grad_nd):
        (slot_M,) = ctx.saved_tensors
        return grad_nd.index_select(0, slot_M), None, None


class _GatherRows(torch.autograd.Function):
    """out = x[slot] with distinct slots: the backward writes rows back without accumulation."""

    @staticmethod
    def forward(ctx, x_nd: Tensor, slot_M: Tensor):
        ctx.save_for_backward(slot_M)
        ctx.num_rows = x_nd.shape[0]
        return x_nd.index_select(0, slot_M)

    @staticmethod
    def backward(ctx, grad_Md):
        (slot_M,) = ctx.saved_tensors
        return grad_Md.new_zeros(ctx.num_rows, grad_Md.shape[-1]).index_copy_(0, slot_M, grad_Md), None


class PaddedLayout:
    """Maps rows sorted by group to slots of a zero-padded `[G, C, ...]` block and back."""

    def __init__(self, counts: list[int], device: torch.device):
        self.groups = len(counts)
        self.capacity = max(max(counts, default=0), 1)
        counts_G = torch.tensor(counts, device=device)
        starts_G = torch.cumsum(counts_G, 0) - counts_G
        group_M = torch.repeat_interleave(torch.arange(self.groups, device=device), counts_G)
        rank_M = torch.arange(group_M.numel(), device=device) - starts_G[group_M]
        self.slot_M = group_M * self.capacity + rank_M

    def pad_(self, x_Mk: Tensor) -> Tensor:
        """`pad` outside autograd."""
        padded = x_Mk.new_zeros(self.groups * self.capacity, x_Mk.shape[-1])
        return padded.index_copy_(0, self.slot_M, x_Mk).view(self.groups, self.capacity, -1)

    def unpad_(self, x_GCn: Tensor) -> Tensor:
        """`unpad` outside autograd."""
        return x_GCn.reshape(-1, x_GCn.shape[-1]).index_select(0, self.slot_M)

    def pad(self, x_Mk: Tensor) -> Tensor:
        """`[M, k]` -> `[G, C, k]`, zeros in unused slots."""
        padded = _ScatterRows.apply(x_Mk, self.slot_M, self.groups * self.capacity)
        return padded.view(self.groups, self.capacity, -1)

    def unpad(self, x_GCn: Tensor) -> Tensor:
        """`[G, C, n]` -> `[M, n]`."""
        return _GatherRows.apply(x_GCn.reshape(-1, x_GCn.shape[-1]), self.slot_M)
