"""Grouped matrix multiplication over rows sorted by group.

`x_Mk` holds M rows sorted by group, `counts[g]` rows for group g; group g is multiplied by
`w_Gkn[g]`. Three exact methods, chosen per device and shape (see `choose_method`):

    loop        one GEMM per non-empty group; no padding. Best when groups hold many rows.
    bmm         scatter rows into a zero-padded `[G, C, k]` block (C = largest group), one
                batched GEMM. Best on CPU when groups are many and small: a Python loop over
                thousands of tiny GEMMs costs more than the padding.
    grouped_mm  `torch._grouped_mm` (CUDA, bf16): variable-size groups in one kernel.

Measured on the 2-core CPU (benchmarks/moe_layer.py): bmm beats `_grouped_mm` fwd+bwd at
2048+ groups of 5-16 rows, and the loop wins at 64 groups of 256+ rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("auto", "loop", "bmm", "grouped_mm")

# Groups at least this large amortise the per-GEMM Python cost: `auto` loops over them; so
# does a layer with this few non-empty groups, where a loop costs little.
_LOOP_MIN_ROWS = 128
_LOOP_MAX_GROUPS = 64
# Past this padding factor (a few huge groups among many small ones, e.g. dropless at init)
# the padded block would waste more than the loop's per-group cost.
_MAX_PAD_FACTOR = 4.0


def has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def choose_method(counts: list[int], device: torch.device, dtype: torch.dtype, method: str = "auto") -> str:
    """Pick the grouped-GEMM method for these group sizes (see module docstring)."""
    if method not in METHODS:
        raise ValueError(f"grouped GEMM method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if has_grouped_mm(device, dtype):
        return "grouped_mm"
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


def _loop(x_Mk: Tensor, w_Gkn: Tensor, counts: list[int]) -> Tensor:
    # unbind, not w_Gkn[g]: each select's backward would allocate and add a full [G, k, n] grad.
    w_g = w_Gkn.unbind(0)
    pieces = [x @ w_g[g] for g, x in enumerate(torch.split(x_Mk, counts)) if counts[g]]
    if not pieces:  # no rows at all: an empty product keeps the autograd graph connected
        return x_Mk @ w_Gkn[0]
    return torch.cat(pieces)


def grouped_linear(x_Mk: Tensor, w_Gkn: Tensor, counts: list[int], method: str = "auto") -> Tensor:
    """`[M, k]` rows sorted by group times per-group `[k, n]` weights -> `[M, n]`."""
    if sum(counts) != x_Mk.shape[0] or len(counts) != w_Gkn.shape[0]:
        raise ValueError(
            f"counts must have one entry per group ({w_Gkn.shape[0]}) summing to the rows ({x_Mk.shape[0]})"
        )
    method = choose_method(counts, x_Mk.device, x_Mk.dtype, method)
    if method == "loop":
        return _loop(x_Mk, w_Gkn, counts)
    if method == "grouped_mm":
        offs = torch.cumsum(torch.tensor(counts, device=x_Mk.device), 0).to(torch.int32)
        return torch._grouped_mm(x_Mk, w_Gkn, offs=offs)
    layout = PaddedLayout(counts, x_Mk.device)
    return layout.unpad(torch.bmm(layout.pad(x_Mk), w_Gkn))
