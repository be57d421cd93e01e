"""A byte-level decoder-only transformer whose FFNs are MoE layers (every layer or every other).

    model = MoELM(d_model=128, n_layers=4, n_heads=4, max_seq_len=256, moe_every=1,
                  moe=MoEConfig(d_model=128, num_experts=8, k=2))
    logits_BTV, stats = model(idx_BT)          # stats: one MoEStats per MoE layer
    loss = lm_loss(logits_BTV, targets_BT) + sum(s.aux_loss for s in stats)

Pre-norm blocks as in GPT-2 / nanoGPT: x + attn(ln(x)), then x + ffn(ln(x)). The MoE layer
zeroes the output of a token whose assignments were all dropped, and the residual carries it.
No process group in here: expert parallelism is applied afterwards by
`moe_scale.distributed.parallelize`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_scale.moe import MoEConfig, MoELayer, MoEStats
from moe_scale.moe.experts import GroupedExperts


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x_BTd: Tensor) -> Tensor:
        B, T, d = x_BTd.shape
        q, k, v = self.qkv(x_BTd).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y_BHTh = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y_BHTh.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """The dense FFN: d -> d_ff -> d with GELU."""

    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, moe: MoEConfig | None, dropout: float, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.ffn = MoELayer.from_config(moe) if moe is not None else MLP(d_model, d_ff, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTd: Tensor, idx_BT: Tensor) -> tuple[Tensor, MoEStats | None]:
        x_BTd = x_BTd + self.drop(self.attn(self.ln1(x_BTd)))
        h = self.ln2(x_BTd)
        if isinstance(self.ffn, MoELayer):
            y, stats = self.ffn(h, token_ids=idx_BT)  # token ids feed the hash router, others ignore them
        else:
            y, stats = self.ffn(h), None
        return x_BTd + self.drop(y), stats


class MoELM(nn.Module):
    """Decoder-only LM over `vocab_size` byte tokens.

    moe_every  1: every FFN is `MoELayer(moe)`; 2: every other (layers 1, 3, ...); 0: all dense
    d_ff       hidden size of the dense FFNs (default 4 * d_model)
    activation_checkpointing  recompute each block in backward (set by the trainer)
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        max_seq_len: int = 256,
        d_ff: int | None = None,
        moe_every: int = 1,
        moe: MoEConfig | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        if moe_every and moe is None:
            raise ValueError("moe_every > 0 needs an MoEConfig (moe=...); use moe_every=0 for a dense model")
        if moe is not None and moe.d_model != d_model:
            raise ValueError(f"moe.d_model={moe.d_model} must equal d_model={d_model}")
        self.max_seq_len = max_seq_len
        self.activation_checkpointing = False
        d_ff = d_ff or 4 * d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, moe if moe_every and i % moe_every == moe_every - 1 else None, dropout, bias)
            for i in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self, n_layers: int) -> None:
        """GPT-2 init: N(0, 0.02), output projections N(0, 0.02 / sqrt(2 * n_layers)), zero biases.

        Experts get the same init as the dense FFN they replace (w1, w3 like `fc`, w2 like `proj`,
        as torchtitan does), so an MoE block starts at the scale of a dense one; routers keep the
        engine's init (zero for the noisy top-k gate, as in the paper).
        """
        out_std = 0.02 / math.sqrt(2 * n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=out_std if name.endswith(".proj") else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                for w, std in ((module.w1, 0.02), (module.w3, 0.02), (module.w2, out_std)):
                    if w is not None:
                        nn.init.normal_(w, std=std)
                for b in (module.b1, module.b2):
                    if b is not None:
                        nn.init.zeros_(b)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx_BT: Tensor) -> tuple[Tensor, list[MoEStats]]:
        """idx_BT: byte ids `[B, T]` -> logits `[B, T, vocab]`, one MoEStats per MoE layer."""
        T = idx_BT.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTd = self.drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        stats: list[MoEStats] = []
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x_BTd, s = checkpoint(block, x_BTd, idx_BT, use_reentrant=False)
            else:
                x_BTd, s = block(x_BTd, idx_BT)
            if s is not None:
                stats.append(s)
        return self.lm_head(self.ln_f(x_BTd)), stats


def lm_loss(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Mean next-byte cross-entropy in nats (float32 whatever the autocast dtype)."""
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))
