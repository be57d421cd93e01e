"""Body layers of the MultiModel over sequences `[B, T, C]` (channels last).

Paper section 2.3: a conv step is LayerNorm(SepConv(ReLU(x))); a conv block stacks four steps
(kernels 3, 3, 15, 15, the last dilated) with two residual connections; an attention block
attends from (timed, self-attended) targets to pointwise-projected sources. Every layer takes a
validity mask `mask_BT` (True = real position) and zeroes padding before each convolution, so
a padded sequence computes the same values at its real positions as the sequence alone.
Causal layers pad on the left only and never read a later position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.moe import MoELayer, MoEStats


def zero_padding(x_BT_: Tensor, mask_BT: Tensor | None) -> Tensor:
    """Zero the padded positions of `[B, T, ...]` (any trailing dims)."""
    if mask_BT is None:
        return x_BT_
    return x_BT_.masked_fill(~mask_BT.view(*mask_BT.shape, *([1] * (x_BT_.dim() - 2))), 0.0)


def timing_signal(length: int, channels: int, device=None, dtype=torch.float32) -> Tensor:
    """Sinusoids `[T, C]`: sin on the first half of the channels, cos on the second (t2t)."""
    half = channels // 2
    position_T = torch.arange(length, device=device, dtype=torch.float32)
    log_step = math.log(1.0e4) / max(half - 1, 1)
    inv_freq_H = torch.exp(-log_step * torch.arange(half, device=device, dtype=torch.float32))
    angle_TH = position_T[:, None] * inv_freq_H[None, :]
    signal_TC = torch.cat([angle_TH.sin(), angle_TH.cos()], dim=1)
    return F.pad(signal_TC, (0, channels - 2 * half)).to(dtype)


class SepConv1d(nn.Module):
    """Depthwise conv over time, then a pointwise projection: `[B, T, C_in] -> [B, T, C_out]`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, causal: bool = False):
        super().__init__()
        span = (kernel - 1) * dilation
        self.pad = (span, 0) if causal else (span // 2, span - span // 2)
        self.depthwise = nn.Conv1d(c_in, c_in, kernel, dilation=dilation, groups=c_in, bias=False)
        self.pointwise = nn.Linear(c_in, c_out)

    def forward(self, x_BTC: Tensor) -> Tensor:
        y_BCT = self.depthwise(F.pad(x_BTC.transpose(1, 2), self.pad))
        return self.pointwise(y_BCT.transpose(1, 2))


class ConvStep(nn.Module):
    """LayerNorm(SepConv(ReLU(x))) with padding zeroed first: `[B, T, C_in] -> [B, T, C_out]`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, causal: bool = False):
        super().__init__()
        self.conv = SepConv1d(c_in, c_out, kernel, dilation, causal)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x_BTC: Tensor, mask_BT: Tensor | None = None) -> Tensor:
        return self.norm(self.conv(zero_padding(F.relu(x_BTC), mask_BT)))


class ConvBlock(nn.Module):
    """Four conv steps, two residuals (paper eq. 2): `[B, T, d] -> [B, T, d]`.

    h1 = step(3)(x); h2 = x + step(3)(h1); h3 = step(K)(h2); h4 = h2 + step(K, dilation D)(h3);
    dropout on the output. K=15, D=8 in the paper.
    """

    def __init__(self, d: int, large_kernel: int, large_dilation: int, dropout: float, causal: bool = False):
        super().__init__()
        self.steps = nn.ModuleList(
            [
                ConvStep(d, d, 3, 1, causal),
                ConvStep(d, d, 3, 1, causal),
                ConvStep(d, d, large_kernel, 1, causal),
                ConvStep(d, d, large_kernel, large_dilation, causal),
            ]
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTd: Tensor, mask_BT: Tensor | None = None) -> Tensor:
        s1, s2, s3, s4 = self.steps
        h2 = x_BTd + s2(s1(x_BTd, mask_BT), mask_BT)
        h4 = h2 + s4(s3(h2, mask_BT), mask_BT)
        return self.dropout(h4)


class MultiHeadAttention(nn.Module):
    """Dot-product attention with H heads: query `[B, T, d]`, keys/values `[B, S, d]` -> `[B, T, d]`.

    key_mask_BS (True = attend) hides source padding; causal hides later positions (self-attention).
    """

    def __init__(self, d: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(
        self, query_BTd: Tensor, key_BSd: Tensor, value_BSd: Tensor, key_mask_BS: Tensor | None = None, causal=False
    ) -> Tensor:
        B, T, d = query_BTd.shape
        H = self.num_heads

        def heads(x: Tensor) -> Tensor:
            return x.view(B, -1, H, d // H).transpose(1, 2)

        q, k, v = heads(self.q(query_BTd)), heads(self.k(key_BSd)), heads(self.v(value_BSd))
        attn_mask = None if key_mask_BS is None else key_mask_BS[:, None, None, :]
        y_BHTD = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y_BHTD.transpose(1, 2).reshape(B, T, d))


class AttentionBlock(nn.Module):
    """Attention from targets `[B, T, d]` to a source `[B, S, d]` (paper Fig. 3) -> `[B, T, d]`.

    The targets get the timing signal, two causal conv steps and masked self-attention; the
    result queries the source, which two pointwise conv steps turn into keys and values.
    """

    def __init__(self, d: int, num_heads: int, dropout: float):
        super().__init__()
        self.target_steps = nn.ModuleList([ConvStep(d, d, 3, 1, causal=True) for _ in range(2)])
        self.self_attention = MultiHeadAttention(d, num_heads, dropout)
        self.self_norm = nn.LayerNorm(d)
        self.source_keys = ConvStep(d, d, 1)
        self.source_values = ConvStep(d, d, 1)
        self.attention = MultiHeadAttention(d, num_heads, dropout)

    def forward(self, target_BTd: Tensor, source_BSd: Tensor, source_mask_BS: Tensor | None) -> Tensor:
        t = target_BTd + timing_signal(target_BTd.shape[1], target_BTd.shape[2], target_BTd.device, target_BTd.dtype)
        for step in self.target_steps:
            t = step(t)
        t = self.self_norm(t + self.self_attention(t, t, t, causal=True))
        keys = self.source_keys(source_BSd, source_mask_BS)
        values = self.source_values(source_BSd, source_mask_BS)
        return self.attention(t, keys, values, source_mask_BS)


class FeedForward(nn.Module):
    """Dense `d -> h -> d` ReLU layer: stands in for the MoE layer in the no-MoE ablation."""

    def __init__(self, d: int, d_hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d))

    def forward(self, x_Nd: Tensor) -> Tensor:
        return self.net(x_Nd)


class ExpertsBlock(nn.Module):
    """x <- LayerNorm(x + dropout(MoE(x))) over the real positions only: `[B, T, d] -> [B, T, d]`.

    Only tokens with mask True are routed (padding neither costs expert compute nor skews the
    balancing losses). Returns the engine's `MoEStats`, or None for the dense ablation.
    """

    def __init__(self, d: int, moe: MoELayer | FeedForward, dropout: float):
        super().__init__()
        self.moe = moe
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTd: Tensor, mask_BT: Tensor | None) -> tuple[Tensor, MoEStats | None]:
        if mask_BT is None:
            mask_BT = torch.ones(x_BTd.shape[:2], dtype=torch.bool, device=x_BTd.device)
        x_Nd = x_BTd[mask_BT]
        if isinstance(self.moe, MoELayer):
            y_Nd, stats = self.moe(x_Nd)
        else:
            y_Nd, stats = self.moe(x_Nd), None
        y_BTd = x_BTd.new_zeros(x_BTd.shape).index_put((mask_BT,), y_Nd)
        return self.norm(x_BTd + self.dropout(y_BTd)), stats
