"""`GroupedExperts`: E feed-forward experts as stacked weights, run over rows sorted by expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.moe.autocast import outside_autocast
from moe_scale.moe.grouped_gemm import choose_method, grouped_linear
from moe_scale.moe.grouped_mlp import grouped_mlp

ACTIVATIONS = ("relu", "gelu", "swiglu")


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
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.method = activation, method
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

    def _act(self, h: Tensor, gate: Tensor | None) -> Tensor:
        if self.activation == "relu":
            return F.relu(h)
        if self.activation == "gelu":
            return F.gelu(h)
        return F.silu(h) * gate

    def forward(self, x_Md: Tensor, counts: list[int]) -> Tensor:
        """x_Md: rows sorted by expert, `counts[e]` rows for local expert e -> `[M, d]`."""
        if x_Md.shape[-1] != self.d_model:
            raise ValueError(f"expert input has d={x_Md.shape[-1]}, experts expect d_model={self.d_model}")
        (x_Md,), autocast_off = outside_autocast(x_Md)
        with autocast_off:
            return self._forward(x_Md, counts)

    def _forward(self, x_Md: Tensor, counts: list[int]) -> Tensor:
        dtype = x_Md.dtype
        w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
        w3 = self.w3.to(dtype) if self.w3 is not None else None
        b1 = self.b1.to(dtype) if self.b1 is not None else None
        b2 = self.b2.to(dtype) if self.b2 is not None else None
        method = choose_method(counts, x_Md.device, dtype, self.method)
        if method in ("loop", "bmm"):
            return grouped_mlp(x_Md, w1, w2, w3, b1, b2, counts, method, self.activation)
        # torch._grouped_mm (CUDA) composes with autograd directly.
        h = grouped_linear(x_Md, w1, counts, method)
        gate = grouped_linear(x_Md, w3, counts, method) if w3 is not None else None
        if b1 is not None:
            h = h + self._per_row(b1, counts)
        y = grouped_linear(self._act(h, gate), w2, counts, method)
        if b2 is not None:
            y = y + self._per_row(b2, counts)
        return y

    @staticmethod
    def _per_row(bias_En: Tensor, counts: list[int]) -> Tensor:
        counts_E = torch.tensor(counts, device=bias_En.device)
        return torch.repeat_interleave(bias_En, counts_E, dim=0)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, bias={self.b1 is not None}, method={self.method}"
        )
