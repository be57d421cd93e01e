"""Modality nets (paper section 2.2): map each modality into and out of the shared `[B, T, d]`.

Inputs return `(x_BTd, mask_BT)` (mask True = real position). Images and spectrograms are 2-D
maps `[B, H, W, C]` (channels last) run through Xception's entry flow and flattened row-major
into sequences; padding is along H (time for audio) and is zeroed before every convolution.

    LanguageInput      tokens [B, T] (0 = padding)      -> embedding * sqrt(d)
    ImageInput         image [B, H, W, C] in [0, 1]     -> strided conv stem + Xception blocks
    AudioInput         features [B, T, F] (F=1: wave)   -> Xception blocks striding time only
    LanguageOutput     [B, T, d]                        -> logits [B, T, V], label-smoothed loss
    CategoricalOutput  [B, T, d]                        -> Xception block, 2 conv steps, GAP, logits [B, C]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.models.multimodel.layers import zero_padding

PAD_ID = 0


def masked_mean(x_BTd: Tensor, mask_BT: Tensor | None) -> Tensor:
    """Mean over the real positions: `[B, T, d] -> [B, d]`."""
    if mask_BT is None:
        return x_BTd.mean(1)
    w_BT1 = mask_BT.unsqueeze(-1).to(x_BTd.dtype)
    return (x_BTd * w_BT1).sum(1) / w_BT1.sum(1).clamp_min(1.0)


class ConvStep2d(nn.Module):
    """LayerNorm(Conv(ReLU?(x))) on `[B, H, W, C_in] -> [B, H/s0, W/s1, C_out]`.

    separable: depthwise k x k then pointwise (Xception); otherwise a plain convolution.
    mask_BH marks the real rows (time steps); padded rows are zeroed before the convolution.
    """

    def __init__(self, c_in, c_out, kernel=3, stride=(1, 1), separable=True, first_relu=True):
        super().__init__()
        pad = kernel // 2
        if separable:
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, c_in, kernel, stride, pad, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1)
            )
        else:
            self.conv = nn.Conv2d(c_in, c_out, kernel, stride, pad)
        self.first_relu = first_relu
        self.norm = nn.LayerNorm(c_out)  # over channels, per position

    def forward(self, x_BHWC: Tensor, mask_BH: Tensor | None = None) -> Tensor:
        if self.first_relu:
            x_BHWC = F.relu(x_BHWC)
        x_BCHW = zero_padding(x_BHWC, mask_BH).permute(0, 3, 1, 2)
        return self.norm(self.conv(x_BCHW).permute(0, 2, 3, 1))


class StridedPointwise(nn.Module):
    """LayerNorm(1x1 conv with stride s of ReLU?(x)): `[B, H, W, C_in] -> [B, ceil(H/s0), ceil(W/s1), C_out]`.

    Written as a strided slice and a linear map: the same function as `nn.Conv2d(kernel_size=1,
    stride=s)`, whose CPU backward on channels-last inputs corrupts memory in torch 2.13.
    """

    def __init__(self, c_in: int, c_out: int, stride=(2, 2), first_relu: bool = True):
        super().__init__()
        self.stride, self.first_relu = stride, first_relu
        self.proj = nn.Linear(c_in, c_out)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x_BHWC: Tensor) -> Tensor:
        if self.first_relu:
            x_BHWC = F.relu(x_BHWC)
        return self.norm(self.proj(x_BHWC[:, :: self.stride[0], :: self.stride[1]]))


class XceptionBlock(nn.Module):
    """Two separable 3x3 conv steps + 3x3 max-pool, plus a strided 1x1 conv shortcut.

    `[B, H, W, C_in] -> [B, ceil(H/s0), ceil(W/s1), C_out]`; mask_BH -> mask of the strided rows.
    """

    def __init__(self, c_in: int, c_out: int, stride=(2, 2), shortcut_relu: bool = True):
        super().__init__()
        self.stride = stride
        self.steps = nn.ModuleList([ConvStep2d(c_in, c_out), ConvStep2d(c_out, c_out)])
        self.shortcut = StridedPointwise(c_in, c_out, stride, shortcut_relu)

    def forward(self, x_BHWC: Tensor, mask_BH: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        y = x_BHWC
        for step in self.steps:
            y = step(y, mask_BH)
        if mask_BH is not None:  # padding never wins the max (finite: an all -inf window breaks max_pool backward)
            y = y.masked_fill(~mask_BH[:, :, None, None], torch.finfo(y.dtype).min)
        y = F.max_pool2d(y.permute(0, 3, 1, 2), 3, self.stride, 1).permute(0, 2, 3, 1)
        out_mask = None if mask_BH is None else mask_BH[:, :: self.stride[0]]
        y = zero_padding(y, out_mask) + self.shortcut(x_BHWC)
        return y, out_mask


class LanguageInput(nn.Module):
    """Token embedding scaled by sqrt(d): tokens `[B, T]` -> (`[B, T, d]`, mask `[B, T]`).

    The same table embeds the decoder's target tokens (one shared vocabulary, as in t2t).
    """

    def __init__(self, vocab_size: int, d: int):
        super().__init__()
        self.d = d
        self.embedding = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        nn.init.normal_(self.embedding.weight, std=d**-0.5)
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()

    def forward(self, tokens_BT: Tensor, mask_BT: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask_BT = tokens_BT != PAD_ID if mask_BT is None else mask_BT
        return self.embedding(tokens_BT) * math.sqrt(self.d), mask_BT


class ImageInput(nn.Module):
    """Xception entry flow: image `[B, H, W, C]` -> (`[B, H'*W', d]`, None).

    Stem: 3x3 conv (stride `stem_stride`) then 3x3 conv; then one XceptionBlock (stride 2)
    per entry of `block_filters`; a final pointwise projection to d when the widths differ.
    """

    def __init__(self, channels: int, d: int, stem_filters=(32, 64), block_filters=(128, 256, 728), stem_stride=2):
        super().__init__()
        s = stem_stride
        self.stem = nn.ModuleList(
            [
                ConvStep2d(channels, stem_filters[0], stride=(s, s), separable=False, first_relu=False),
                ConvStep2d(stem_filters[0], stem_filters[1], separable=False),
            ]
        )
        widths = [stem_filters[1], *block_filters]
        self.blocks = nn.ModuleList(
            XceptionBlock(c_in, c_out, (2, 2), shortcut_relu=(i == 0)) for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))
        )
        self.proj = nn.Linear(widths[-1], d) if widths[-1] != d else nn.Identity()

    def forward(self, image_BHWC: Tensor, mask_BH: Tensor | None = None) -> tuple[Tensor, None]:
        x = image_BHWC
        for step in self.stem:
            x = step(x)
        for block in self.blocks:
            x, _ = block(x)
        B, H, W, C = x.shape
        return self.proj(x.reshape(B, H * W, C)), None


class AudioInput(nn.Module):
    """Xception blocks over audio `[B, T, F]` (F mel bins, or F=1 for a waveform) striding time only.

    Returns (`[B, T', d]`, mask `[B, T']`) with T' = T / 2^blocks: the frequency bins of the last
    block's `[B, T', F, C]` map are folded into the channels and projected to d.
    """

    def __init__(self, feature_bins: int, d: int, block_filters=(32, 64)):
        super().__init__()
        widths = [1, *block_filters]
        self.blocks = nn.ModuleList(
            XceptionBlock(c_in, c_out, (2, 1), shortcut_relu=(i > 0)) for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))
        )
        self.proj = nn.Linear(feature_bins * widths[-1], d)

    def forward(self, audio_BTF: Tensor, mask_BT: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = audio_BTF.unsqueeze(-1)
        mask = mask_BT
        for block in self.blocks:
            x, mask = block(x, mask)
        B, T, Fb, C = x.shape
        return self.proj(x.reshape(B, T, Fb * C)), mask


class LanguageOutput(nn.Module):
    """Linear + softmax over the vocabulary: `[B, T, d] -> logits [B, T, V]`."""

    def __init__(self, d: int, vocab_size: int, label_smoothing: float):
        super().__init__()
        self.proj = nn.Linear(d, vocab_size)
        self.label_smoothing = label_smoothing

    def forward(self, x_BTd: Tensor) -> Tensor:
        return self.proj(x_BTd)

    def loss(self, logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
        """Label-smoothed cross entropy, mean over the non-padding target tokens."""
        return F.cross_entropy(
            logits_BTV.flatten(0, 1).float(),
            targets_BT.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=self.label_smoothing,
        )


class CategoricalOutput(nn.Module):
    """Paper's categorical net on the encoder output `[B, T, d]` (mask `[B, T]`) -> logits `[B, C]`.

    Xception block (stride 2 in T) to `filters[0]`, conv steps to `filters[1]` and `filters[2]`,
    global average pooling over the real positions, linear to the classes.
    """

    def __init__(self, d: int, num_classes: int, filters=(1024, 1536, 2048), label_smoothing: float = 0.0):
        super().__init__()
        self.block = XceptionBlock(d, filters[0], (2, 1))
        self.steps = nn.ModuleList([ConvStep2d(filters[0], filters[1]), ConvStep2d(filters[1], filters[2])])
        self.proj = nn.Linear(filters[2], num_classes)
        self.label_smoothing = label_smoothing

    def forward(self, x_BTd: Tensor, mask_BT: Tensor | None = None) -> Tensor:
        x, mask = self.block(x_BTd.unsqueeze(2), mask_BT)
        for step in self.steps:
            x = step(x, mask)
        return self.proj(masked_mean(F.relu(x.squeeze(2)), mask))

    def loss(self, logits_BC: Tensor, labels_B: Tensor) -> Tensor:
        return F.cross_entropy(logits_BC.float(), labels_B, label_smoothing=self.label_smoothing)
