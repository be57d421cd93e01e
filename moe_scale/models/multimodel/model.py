"""The MultiModel (Kaiser et al. 2017, "One Model To Learn Them All").

    inputs --modality net--> [B, S, d] --encoder--> encoded [B, S, d]
        classification: encoded --categorical net--> logits [B, C]
        sequence:       shifted targets [B, T, d] (task embedding first)
                        --I/O mixer (attention to encoded, causal conv merge)--> [B, T, d]
                        --decoder (causal conv + attention blocks, MoE in the middle)--> [B, T, d]
                        --language net--> logits [B, T, V]

Encoder: conv blocks, an MoE layer, conv blocks. Everything after the targets enter is causal.
The MoE layers are the engine's `MoELayer` (noisy top-k, importance and load losses, dropless by
default, so no token's output depends on another's capacity); the model holds no process group.

Where this follows tensor2tensor rather than the paper's text, or neither:
- the timing signal is added to the encoder inputs (t2t), so attention can tell positions apart
  in flattened images;
- the categorical net runs on the encoder's flattened sequence `[B, S, 1, d]`, and the audio net
  folds the frequency bins into the channels before projecting to d (not t2t's S*F positions);
- without MoE (the paper's Table 4 ablation) each MoE layer becomes one dense FFN of an
  expert's width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_scale.models.multimodel.config import MultiModelConfig
from moe_scale.models.multimodel.layers import (
    AttentionBlock,
    ConvBlock,
    ConvStep,
    ExpertsBlock,
    FeedForward,
    timing_signal,
)
from moe_scale.models.multimodel.modalities import (
    PAD_ID,
    AudioInput,
    CategoricalOutput,
    ImageInput,
    LanguageInput,
    LanguageOutput,
)
from moe_scale.moe import MoELayer, MoEStats

EOS_ID = 1


@dataclass
class MultiModelOutput:
    """logits `[B, T, V]` (language targets) or `[B, C]` (classes); aux_loss: summed MoE losses."""

    logits: Tensor
    aux_loss: Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)


def _experts(cfg: MultiModelConfig) -> ExpertsBlock:
    layer = MoELayer.from_config(cfg.moe_config()) if cfg.use_moe else FeedForward(cfg.d_model, cfg.moe_hidden)
    return ExpertsBlock(cfg.d_model, layer, cfg.dropout)


def _conv_blocks(cfg: MultiModelConfig, n: int, causal: bool) -> nn.ModuleList:
    return nn.ModuleList(
        ConvBlock(cfg.d_model, cfg.large_kernel, cfg.large_dilation, cfg.dropout, causal) for _ in range(n)
    )


class Encoder(nn.Module):
    """Conv blocks, MoE, conv blocks: `[B, S, d]`, mask `[B, S]` -> (`[B, S, d]`, stats)."""

    def __init__(self, cfg: MultiModelConfig):
        super().__init__()
        half = cfg.encoder_blocks // 2
        self.before = _conv_blocks(cfg, half, causal=False)
        self.experts = _experts(cfg)
        self.after = _conv_blocks(cfg, cfg.encoder_blocks - half, causal=False)

    def forward(self, x_BSd: Tensor, mask_BS: Tensor | None) -> tuple[Tensor, list[MoEStats]]:
        x = x_BSd + timing_signal(x_BSd.shape[1], x_BSd.shape[2], x_BSd.device, x_BSd.dtype)
        for block in self.before:
            x = block(x, mask_BS)
        x, stats = self.experts(x, mask_BS)
        for block in self.after:
            x = block(x, mask_BS)
        return x, [stats] if stats is not None else []


class Mixer(nn.Module):
    """I/O mixer: attention from shifted targets to the encoding, merged with the targets.

    `[B, T, d]` targets, `[B, S, d]` encoded, mask `[B, S]` -> `[B, T, d]`: a causal conv step
    over concat(attention, targets) `[B, T, 2d]`, then causal conv blocks.
    """

    def __init__(self, cfg: MultiModelConfig):
        super().__init__()
        d = cfg.d_model
        self.attention = AttentionBlock(d, cfg.num_heads, cfg.dropout)
        self.merge = ConvStep(2 * d, d, 3, causal=True)
        self.blocks = _conv_blocks(cfg, cfg.mixer_blocks, causal=True)

    def forward(self, shifted_BTd: Tensor, encoded_BSd: Tensor, enc_mask_BS: Tensor | None) -> Tensor:
        attended = self.attention(shifted_BTd, encoded_BSd, enc_mask_BS)
        x = self.merge(torch.cat([attended, shifted_BTd], dim=-1))
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """Causal conv block + attention to the encoding, repeated; MoE after block (n-1)//2.

    `[B, T, d]` mixer output, `[B, S, d]` encoded, masks -> (`[B, T, d]`, stats).
    """

    def __init__(self, cfg: MultiModelConfig):
        super().__init__()
        n, d = cfg.decoder_blocks, cfg.d_model
        self.blocks = _conv_blocks(cfg, n, causal=True)
        self.attentions = nn.ModuleList(AttentionBlock(d, cfg.num_heads, cfg.dropout) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        self.experts = _experts(cfg)
        self.moe_after = (n - 1) // 2

    def forward(
        self, x_BTd: Tensor, encoded_BSd: Tensor, enc_mask_BS: Tensor | None, target_mask_BT: Tensor
    ) -> tuple[Tensor, list[MoEStats]]:
        stats = []
        for i, (block, attention, norm) in enumerate(zip(self.blocks, self.attentions, self.norms)):
            x_BTd = block(x_BTd)
            x_BTd = norm(x_BTd + attention(x_BTd, encoded_BSd, enc_mask_BS))
            if i == self.moe_after:
                x_BTd, s = self.experts(x_BTd, target_mask_BT)
                stats += [s] if s is not None else []
        return x_BTd, stats


class MultiModel(nn.Module):
    """One model, many modalities and tasks.

    forward(inputs, input_modality, target_space_B `[B]`, targets_BT `[B, T]`, target_modality,
    input_mask) -> MultiModelOutput. input_modality is "language" (tokens `[B, S]`), "image"
    (`[B, H, W, C]`) or "audio" (`[B, S, F]`, mask `[B, S]`); target_modality is "language"
    (targets_BT end in EOS, 0 = padding) or "class:<head>" (no targets needed).
    """

    def __init__(self, cfg: MultiModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.language_in = LanguageInput(cfg.vocab_size, d)
        self.inputs = nn.ModuleDict(
            {
                "image": ImageInput(
                    cfg.image_channels, d, cfg.image_stem_filters, cfg.image_block_filters, cfg.image_stem_stride
                ),
                "audio": AudioInput(cfg.audio_bins, d, cfg.audio_block_filters),
            }
        )
        self.language_out = LanguageOutput(d, cfg.vocab_size, cfg.label_smoothing)
        self.class_heads = nn.ModuleDict(
            {name: CategoricalOutput(d, n, cfg.categorical_filters, cfg.label_smoothing) for name, n in cfg.class_heads.items()}
        )
        self.target_space = nn.Embedding(cfg.num_target_spaces, d)
        nn.init.normal_(self.target_space.weight, std=d**-0.5)
        self.encoder = Encoder(cfg)
        self.mixer = Mixer(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, inputs: Tensor, input_modality: str, input_mask: Tensor | None = None):
        """Modality net + encoder -> (encoded `[B, S, d]`, mask `[B, S]` or None, stats)."""
        if input_modality == "language":
            x, mask = self.language_in(inputs, input_mask)
        elif input_modality in self.inputs:
            x, mask = self.inputs[input_modality](inputs, input_mask)
        else:
            raise ValueError(f"unknown input modality {input_modality!r}; use language, image or audio")
        encoded, stats = self.encoder(x, mask)
        return encoded, mask, stats

    def decode(
        self, encoded_BSd: Tensor, enc_mask_BS: Tensor | None, targets_BT: Tensor, target_space_B: Tensor,
        target_mask_BT: Tensor | None = None,
    ) -> tuple[Tensor, list[MoEStats]]:
        """Teacher-forced decoder: position t sees the task embedding and targets[:, :t] -> logits `[B, T, V]`."""
        embedded, _ = self.language_in(targets_BT[:, :-1])
        task_B1d = self.target_space(target_space_B).unsqueeze(1)
        shifted_BTd = torch.cat([task_B1d, embedded], dim=1)
        if target_mask_BT is None:
            target_mask_BT = targets_BT != PAD_ID
        x = self.mixer(shifted_BTd, encoded_BSd, enc_mask_BS)
        x, stats = self.decoder(x, encoded_BSd, enc_mask_BS, target_mask_BT)
        return self.language_out(x), stats

    def forward(
        self,
        inputs: Tensor,
        *,
        input_modality: str,
        target_space_B: Tensor,
        targets_BT: Tensor | None = None,
        target_modality: str = "language",
        input_mask: Tensor | None = None,
    ) -> MultiModelOutput:
        encoded, enc_mask, stats = self.encode(inputs, input_modality, input_mask)
        if target_modality == "language":
            if targets_BT is None:
                raise ValueError("language targets need targets_BT (teacher forcing); use greedy_decode to generate")
            logits, dec_stats = self.decode(encoded, enc_mask, targets_BT, target_space_B)
            stats = stats + dec_stats
        else:
            logits = self._class_head(target_modality)(encoded, enc_mask)
        aux = sum((s.aux_loss for s in stats), encoded.new_zeros(()))
        return MultiModelOutput(logits, aux, stats)

    def task_loss(self, out: MultiModelOutput, targets: Tensor, target_modality: str) -> Tensor:
        """Label-smoothed cross entropy of the task (without the MoE aux loss)."""
        if target_modality == "language":
            return self.language_out.loss(out.logits, targets)
        return self._class_head(target_modality).loss(out.logits, targets)

    def loss(self, batch) -> tuple[Tensor, Tensor, MultiModelOutput]:
        """(task loss + aux loss, task loss, output) for a batch with the fields of `data.multimodel.Batch`."""
        language = batch.target_modality == "language"
        out = self(
            batch.inputs,
            input_modality=batch.input_modality,
            target_space_B=batch.target_space,
            targets_BT=batch.targets if language else None,
            target_modality=batch.target_modality,
            input_mask=batch.input_mask,
        )
        task = self.task_loss(out, batch.targets, batch.target_modality)
        return task + out.aux_loss, task, out

    @torch.no_grad()
    def greedy_decode(
        self, inputs: Tensor, *, input_modality: str, target_space_B: Tensor, max_len: int,
        input_mask: Tensor | None = None,
    ) -> Tensor:
        """Argmax decoding -> tokens `[B, L]` (L <= max_len), EOS included, padding after it."""
        encoded, enc_mask, _ = self.encode(inputs, input_modality, input_mask)
        B = encoded.shape[0]
        out_BT = torch.zeros(B, 0, dtype=torch.long, device=encoded.device)
        done_B = torch.zeros(B, dtype=torch.bool, device=encoded.device)
        for _ in range(max_len):
            step_targets = torch.cat([out_BT, out_BT.new_zeros(B, 1)], dim=1)
            logits, _ = self.decode(encoded, enc_mask, step_targets, target_space_B, torch.ones_like(step_targets, dtype=torch.bool))
            next_B = logits[:, -1].argmax(-1).masked_fill(done_B, PAD_ID)
            out_BT = torch.cat([out_BT, next_B[:, None]], dim=1)
            done_B |= next_B == EOS_ID
            if done_B.all():
                break
        return out_BT

    def _class_head(self, target_modality: str) -> CategoricalOutput:
        head = target_modality.removeprefix("class:")
        if not target_modality.startswith("class:") or head not in self.class_heads:
            raise ValueError(
                f"unknown target modality {target_modality!r}; use 'language' or one of "
                f"{['class:' + h for h in self.class_heads]}"
            )
        return self.class_heads[head]
