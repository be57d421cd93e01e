"""`GroupedExperts`: E feed-forward experts as stacked weights, run over rows sorted by expert."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.moe.autocast import autocast_disabled
from moe_scale.moe.grouped_gemm import group_ends, grouped_linear, row_groups, rows_in_groups

ACTIVATIONS = ("relu", "gelu", "swiglu")

# (experts, x_Md, counts_E) -> y_Md, or None where it does not apply: a backend's fused expert
# MLP (moe/cpu/__init__.py).
FusedExpertMLP = Callable[["GroupedExperts", Tensor, Tensor], Tensor | None]


def activate(activation: str, h: Tensor, gate: Tensor | None = None) -> Tensor:
    """The experts' nonlinearity: relu(h), gelu(h) or, for SwiGLU, silu(h) * gate."""
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    return F.silu(h) * gate


class GroupedExperts(nn.Module):
    """E independent MLPs `d -> h -> d` with weights stacked on a leading expert axis.

    w1 `[E, d, h]`, w2 `[E, h, d]` (and w3 `[E, d, h]` for SwiGLU: silu(x w1) * (x w3));
    optional biases b1 `[E, h]`, b2 `[E, d]`. Each expert is initialised as `nn.Linear` would
    initialise it. The expert axis is global-expert order, so sharding it over ranks is a
    slice (see distributed/parallelize.py).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        method: str = "auto",
        fused: FusedExpertMLP | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.method, self.fused = activation, method, fused
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden)) if activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2), (self.w3, None)):
            if w is None:
                continue
            bound = 1.0 / math.sqrt(w.shape[1])
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)

    def forward(self, x_Md: Tensor, counts_E: Tensor) -> Tensor:
        """x_Md: rows sorted by expert, `counts_E[e]` (a device tensor) rows for local expert e
        first; rows past their sum belong to no expert and come out zero. -> `[M, d]` in x's dtype."""
        if x_Md.shape[-1] != self.d_model:
            raise ValueError(f"expert input has d={x_Md.shape[-1]}, experts expect d_model={self.d_model}")
        with autocast_disabled(x_Md.device):
            if self.fused is not None:
                y = self.fused(self, x_Md, counts_E)
                if y is not None:
                    return y
            return self._forward(x_Md, group_ends(counts_E))

    def weights(self, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        """(w1, w2, w3, b1, b2) in `dtype` (None where absent)."""
        return tuple(None if p is None else p.to(dtype) for p in (self.w1, self.w2, self.w3, self.b1, self.b2))

    def _forward(self, x_Md: Tensor, ends_E: Tensor) -> Tensor:
        """The three GEMMs share one set of int32 offsets (`ends_E`)."""
        w1, w2, w3, b1, b2 = self.weights(x_Md.dtype)
        h = grouped_linear(x_Md, w1, ends_E, self.method)
        gate = grouped_linear(x_Md, w3, ends_E, self.method) if w3 is not None else None
        expert_M = row_groups(ends_E, x_Md.shape[0]) if b1 is not None else None
        if b1 is not None:
            h = h + b1.index_select(0, expert_M)
        y = grouped_linear(activate(self.activation, h, gate), w2, ends_E, self.method)
        if b2 is not None:
            in_group = rows_in_groups(ends_E, x_Md.shape[0])
            y = y + torch.where(in_group, b2.index_select(0, expert_M), 0)
        return y

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, bias={self.b1 is not None}, method={self.method}"
        )


class SharedExperts(nn.Module):
    """Always-on experts beside the routed ones (DeepSeekMoE, Qwen2-MoE): `n` experts of width
    h as one dense MLP `d -> n*h -> d` applied to every token. Dense parameters: replicated and
    averaged over the whole data-parallel world like any other.

    w1 `[d, n*h]`, w2 `[n*h, d]` (and w3 `[d, n*h]` for SwiGLU), nn.Linear's init. With
    `gated`, w_gate `[d, 1]` scales each token's output by sigmoid(x w_gate) (Qwen2-MoE), so
    the model learns per token how much of the shared path to add.
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu", gated: bool = False):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w2 = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(d_model, d_hidden)) if activation == "swiglu" else None
        self.w_gate = nn.Parameter(torch.empty(d_model, 1)) if gated else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3, self.w_gate):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[0])
                w.uniform_(-bound, bound)

    def forward(self, x_Sd: Tensor) -> Tensor:
        """x `[S, d]` -> `[S, d]`."""
        gate = x_Sd @ self.w3 if self.w3 is not None else None
        y_Sd = activate(self.activation, x_Sd @ self.w1, gate) @ self.w2
        if self.w_gate is not None:
            y_Sd = torch.sigmoid(x_Sd @ self.w_gate) * y_Sd
        return y_Sd
