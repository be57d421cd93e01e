"""The focus selector: K experts, each a Bernoulli focus over the source tokens, trained by hard EM.

    x_BS -> embeddings [word; answer; feature] -> Bi-GRU -> h_BSH, summary s_BH = tanh(W final)
    focus logit of expert k at token t = MLP([h_t; s; e_k])           (Cho et al. 2019, eq. 4)

Hard EM (sec. 3.3) is the engine's min-loss routing policy with one "token" per example:
    E-step  with gradients off, expert_losses_BK = per-example BCE(focus_k, guidance);
            `MinLossRouter` sends each example to its argmin expert
    M-step  the BCE of the chosen expert only, so the other experts get no gradient
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.models.selector.config import SelectorConfig
from moe_scale.models.selector.encoder import BiGRUEncoder
from moe_scale.moe.routing import MinLossRouter, Routing

PAD = 0
NUM_ANSWER_TAGS = 3  # BIO


@dataclass
class SelectorLoss:
    """What one hard-EM step computed (B examples, K experts).

    loss            M-step loss: BCE of each example's chosen expert, mean over real tokens
    routing         the min-loss routing: example `token_idx_N[i]` -> expert `expert_idx_N[i]`
    expert_bce_BK   E-step losses (no gradient)
    wins_K          examples each expert won in this batch
    """

    loss: Tensor
    routing: Routing
    expert_bce_BK: Tensor
    wins_K: Tensor


def masked_bce_BK(logits_BKS: Tensor, focus_BS: Tensor, mask_BS: Tensor) -> Tensor:
    """Per-example, per-expert BCE, mean over the example's real tokens."""
    bce_BKS = F.binary_cross_entropy_with_logits(
        logits_BKS, focus_BS[:, None].expand_as(logits_BKS), reduction="none"
    )
    mask_B1S = mask_BS[:, None].to(bce_BKS.dtype)
    return (bce_BKS * mask_B1S).sum(-1) / mask_B1S.sum(-1).clamp(min=1)


class Selector(nn.Module):
    def __init__(self, cfg: SelectorConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.answer_embed = nn.Embedding(NUM_ANSWER_TAGS, cfg.answer_dim) if cfg.answer_dim else None
        self.feature_embed = nn.Embedding(cfg.num_features, cfg.feature_dim) if cfg.num_features else None
        input_dim = cfg.embed_dim + cfg.answer_dim + (cfg.feature_dim if cfg.num_features else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = BiGRUEncoder(input_dim, H)
        self.summary = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.experts = nn.Embedding(cfg.num_experts, cfg.expert_dim)
        nn.init.normal_(self.experts.weight, std=1.0)
        # First layer of MLP([h_t; s; e_k]) split by input block, so all K experts cost
        # one [B, S, H] projection plus broadcasting, not K copies of the concatenation.
        self.head_h = nn.Linear(H, H)
        self.head_s = nn.Linear(H, H, bias=False)
        self.head_e = nn.Linear(cfg.expert_dim, H, bias=False)
        self.head_out = nn.Linear(H, 1)
        self.router = MinLossRouter(cfg.num_experts)

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    def encode(
        self, src_BS: Tensor, mask_BS: Tensor, answer_BS: Tensor | None = None, features_BS: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Token states h_BSH and the summary vector s_BH."""
        parts = [self.embed(src_BS)]
        if self.answer_embed is not None:
            parts.append(self.answer_embed(answer_BS if answer_BS is not None else torch.zeros_like(src_BS)))
        if self.feature_embed is not None:
            if features_BS is None:
                raise ValueError("this selector has num_features > 0: pass features_BS")
            parts.append(self.feature_embed(features_BS))
        h_BSH, final_BH = self.encoder(self.dropout(torch.cat(parts, dim=-1)), mask_BS)
        return h_BSH, self.summary(final_BH)

    def focus_logits(self, h_BSH: Tensor, s_BH: Tensor, expert_NK: Tensor) -> Tensor:
        """Logits `[B, K', S]` of the experts `expert_NK` (`[K']` for all examples or `[B, K']`)."""
        e_H = self.head_e(self.experts(expert_NK))
        e_BKH = e_H[None] if e_H.dim() == 2 else e_H
        pre_BKSH = self.head_h(h_BSH)[:, None] + self.head_s(s_BH)[:, None, None] + e_BKH[:, :, None]
        return self.head_out(torch.tanh(pre_BKSH)).squeeze(-1)

    def forward(self, src_BS, mask_BS, answer_BS=None, features_BS=None) -> Tensor:
        """Focus logits of every expert, `[B, K, S]`."""
        h_BSH, s_BH = self.encode(src_BS, mask_BS, answer_BS, features_BS)
        return self.focus_logits(h_BSH, s_BH, torch.arange(self.num_experts, device=src_BS.device))

    def hard_em_loss(self, src_BS, mask_BS, focus_BS, answer_BS=None, features_BS=None) -> SelectorLoss:
        h_BSH, s_BH = self.encode(src_BS, mask_BS, answer_BS, features_BS)
        with torch.no_grad():
            all_experts_K = torch.arange(self.num_experts, device=src_BS.device)
            expert_bce_BK = masked_bce_BK(self.focus_logits(h_BSH, s_BH, all_experts_K), focus_BS, mask_BS)
        routing = self.router(s_BH.detach(), expert_losses=expert_bce_BK)
        # MinLossRouter is top-1 over examples: token_idx_N is arange(B), one expert each.
        chosen_B1 = routing.expert_idx_N[routing.token_idx_N.argsort()][:, None]
        logits_BS = self.focus_logits(h_BSH, s_BH, chosen_B1)[:, 0]
        bce_BS = F.binary_cross_entropy_with_logits(logits_BS, focus_BS, reduction="none")
        mask = mask_BS.to(bce_BS.dtype)
        loss = (bce_BS * mask).sum() / mask.sum().clamp(min=1)
        wins_K = torch.bincount(routing.expert_idx_N, minlength=self.num_experts)
        return SelectorLoss(loss, routing, expert_bce_BK, wins_K)

    @torch.no_grad()
    def select(
        self, src_BS, mask_BS, answer_BS=None, features_BS=None, threshold: float | None = None, sample: bool = False
    ) -> Tensor:
        """Binary focus of every expert, `[B, K, S]` (0 on padding): thresholded, or sampled."""
        prob_BKS = torch.sigmoid(self(src_BS, mask_BS, answer_BS, features_BS))
        if sample:
            focus_BKS = torch.bernoulli(prob_BKS)
        else:
            focus_BKS = (prob_BKS > (self.cfg.threshold if threshold is None else threshold)).to(prob_BKS.dtype)
        return focus_BKS * mask_BS[:, None].to(prob_BKS.dtype)
