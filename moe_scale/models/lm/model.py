"""A decoder-only transformer whose FFNs are dense or MoE layers: GPT-2-style or Llama-style blocks.

    model = MoELM.from_config(LMConfig(arch="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
                              moe=MoEConfig(d_model=128, num_experts=8, k=2, activation="swiglu"))
    logits_BTV, stats = model(idx_BT)          # stats: one MoEStats per MoE layer
    loss = lm_loss(logits_BTV, targets_BT) + sum(s.aux_loss for s in stats)

Pre-norm blocks: x + attn(norm(x)), then x + ffn(norm(x)). The GPT-2 configuration (learned
positions, LayerNorm, GELU, full multi-head attention) is the byte-level 2017-style model; the
Llama configuration (RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QK-norm) gives
Mixtral, OLMoE and DeepSeek-V3 shapes together with dense-first layers and shared experts.
The MoE layer zeroes the output of a token whose assignments were all dropped, and the
residual carries it. No process group in here: expert parallelism is applied afterwards by
`moe_scale.distributed.parallelize`.

Incremental decoding passes a `KVCache`: each attention layer appends its keys and values
and attends over everything cached, so `model(idx_BT[:, -1:], cache=cache)` costs one
position instead of the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_scale.models.lm.config import LMConfig
from moe_scale.moe import MoEConfig, MoELayer, MoEStats
from moe_scale.moe.experts import GroupedExperts

CHECKPOINTING = ("none", "attention", "moe", "full")


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, per layer: `[B, n_kv_heads, P, head_dim]`."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        """Positions cached (read before a forward: each layer appends as the forward runs)."""
        return self.cached(0)

    def cached(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def append(self, layer: int, k_BHTh: Tensor, v_BHTh: Tensor) -> tuple[Tensor, Tensor]:
        """Add this call's keys and values; return all of the layer's `[B, n_kv_heads, P + T, head_dim]`."""
        if self.keys[layer] is not None:
            k_BHTh = torch.cat([self.keys[layer], k_BHTh], dim=2)
            v_BHTh = torch.cat([self.values[layer], v_BHTh], dim=2)
        self.keys[layer], self.values[layer] = k_BHTh, v_BHTh
        return k_BHTh, v_BHTh


def rope_tables(positions_T: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin `[T, head_dim / 2]` (float32) of rotary position embedding at `positions_T`.

    Computed per call rather than stored, so nothing depends on the device the model was built on.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions_T.device, dtype=torch.float32) / head_dim)
    angles_TF = positions_T.float()[:, None] * inv_freq[None, :]
    return angles_TF.cos(), angles_TF.sin()


def apply_rope(x_BHTh: Tensor, cos_TF: Tensor, sin_TF: Tensor) -> Tensor:
    """Rotate each (x[i], x[i + h/2]) pair by position * inv_freq[i] (the Llama / GPT-NeoX layout)."""
    x1, x2 = x_BHTh.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_TF - x2 * sin_TF, x2 * cos_TF + x1 * sin_TF], dim=-1)
    return rotated.to(x_BHTh.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class CausalSelfAttention(nn.Module):
    """Multi-head or grouped-query causal attention through `F.scaled_dot_product_attention`.

    One fused projection `qkv` gives n_heads query heads and n_kv_heads key and value heads of
    head_dim each; each key/value head serves n_heads / n_kv_heads query heads. QK-norm is per
    head (q_norm `[head_dim]`) or over the whole projection (q_norm `[n_heads * head_dim]`,
    k_norm `[n_kv_heads * head_dim]`), by `qk_norm_scope`.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout, self.rope, self.rope_theta = cfg.dropout, cfg.position == "rope", cfg.rope_theta
        H, G, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * G) * h, bias=cfg.qkv_bias)
        self.proj = nn.Linear(H * h, cfg.d_model, bias=cfg.bias)
        self.norm_heads = cfg.qk_norm_scope == "head"
        q_width, k_width = (h, h) if self.norm_heads else (H * h, G * h)
        self.q_norm = nn.RMSNorm(q_width, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(k_width, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BTd: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x `[B, T, d]` -> `[B, T, d]`; rope: cos, sin `[T, head_dim / 2]` of these positions."""
        B, T, _ = x_BTd.shape
        H, G, h = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTd).split([H * h, G * h, G * h], dim=-1)
        if self.q_norm is not None and not self.norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTh = q.view(B, T, H, h).transpose(1, 2)
        k_BGTh = k.view(B, T, G, h).transpose(1, 2)
        v_BGTh = v.view(B, T, G, h).transpose(1, 2)
        if self.q_norm is not None and self.norm_heads:
            q_BHTh, k_BGTh = self.q_norm(q_BHTh), self.k_norm(k_BGTh)
        if self.rope:
            q_BHTh, k_BGTh = apply_rope(q_BHTh, *rope), apply_rope(k_BGTh, *rope)
        past = 0
        if cache is not None:
            past = cache.cached(layer)
            k_BGTh, v_BGTh = cache.append(layer, k_BGTh, v_BGTh)
        mask = None
        if past and T > 1:  # queries sit at positions past..past+T-1 of the P+T keys
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTd.device).tril(diagonal=past)
        gqa = {"enable_gqa": True} if G != H else {}  # enable_gqa needs torch >= 2.5; MHA keeps older torch
        y_BHTh = F.scaled_dot_product_attention(
            q_BHTh, k_BGTh, v_BGTh, attn_mask=mask, is_causal=mask is None and past == 0,
            dropout_p=self.dropout if self.training else 0.0, **gqa,
        )
        return self.proj(y_BHTh.transpose(1, 2).reshape(B, T, H * h))


class MLP(nn.Module):
    """The dense FFN `[..., d] -> [..., d]`: proj(gelu(fc(x))), or proj(silu(gate(x)) * fc(x)) for swiglu."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return self.proj(F.gelu(self.fc(x)))
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class Block(nn.Module):
    """One pre-norm transformer block; `checkpointing` picks the sublayers recomputed in backward.

    ffn      `MoELayer` (with its shared experts when `moe.num_shared_experts` > 0) or dense `MLP`
    The norms keep GPT-2's names (ln1, ln2) whichever kind they are, so checkpoints of the
    byte-level model keep their keys.
    """

    def __init__(self, cfg: LMConfig, moe: MoEConfig | None, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if moe is not None:
            self.ffn: nn.Module = MoELayer.from_config(moe)
        else:
            self.ffn = MLP(cfg.d_model, cfg.dense_hidden, cfg.ffn_activation, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpointing = "none"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def _attention(self, x_BTd: Tensor, rope, cache: KVCache | None) -> Tensor:
        return x_BTd + self.drop(self.attn(self.ln1(x_BTd), rope, cache, self.layer))

    def _ffn(self, x_BTd: Tensor, idx_BT: Tensor) -> tuple[Tensor, MoEStats | None]:
        h_BTd = self.ln2(x_BTd)
        if not self.is_moe:
            return x_BTd + self.drop(self.ffn(h_BTd)), None
        y_BTd, stats = self.ffn(h_BTd, token_ids=idx_BT)  # token ids feed the hash router, others ignore them
        return x_BTd + self.drop(y_BTd), stats

    def forward(self, x_BTd: Tensor, idx_BT: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, MoEStats | None]:
        """x `[B, T, d]`, token ids `[B, T]` -> `[B, T, d]`, the MoE layer's stats (None if dense)."""
        recompute = self.training and cache is None
        if recompute and self.checkpointing == "attention":
            x_BTd = checkpoint(self._attention, x_BTd, rope, None, use_reentrant=False)
        else:
            x_BTd = self._attention(x_BTd, rope, cache)
        if recompute and self.checkpointing == "moe" and self.is_moe:
            return checkpoint(self._ffn, x_BTd, idx_BT, use_reentrant=False)
        return self._ffn(x_BTd, idx_BT)


class MoELM(nn.Module):
    """Decoder-only LM over `vocab_size` tokens (bytes or BPE).

    Build with `MoELM.from_config(LMConfig, MoEConfig)` or keyword arguments (LMConfig's fields).
    activation_checkpointing  none, attention, moe or full (set by the trainer; True means full)
    """

    def __init__(self, *, moe: MoEConfig | None = None, **options):
        super().__init__()
        self.cfg = cfg = LMConfig(**options)
        if cfg.num_moe_layers and moe is None:
            raise ValueError("a model with MoE layers needs an MoEConfig (moe=...); use moe_every=0 for a dense model")
        if moe is not None and moe.d_model != cfg.d_model:
            raise ValueError(f"moe.d_model={moe.d_model} must equal d_model={cfg.d_model}")
        self.max_seq_len = cfg.max_seq_len
        self._checkpointing = "none"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, moe if cfg.is_moe_layer(i) else None, i) for i in range(cfg.n_layers)
        )
        self.ln_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights(cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @classmethod
    def from_config(cls, cfg: LMConfig, moe: MoEConfig | None = None) -> "MoELM":
        options = {k: v for k, v in vars(cfg).items() if k != "name"}
        return cls(moe=moe if cfg.num_moe_layers else None, **options)

    @property
    def activation_checkpointing(self) -> str:
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str | bool) -> None:
        mode = {True: "full", False: "none"}.get(mode, mode) if isinstance(mode, bool) else mode
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        self._checkpointing = mode
        for block in self.blocks:
            block.checkpointing = mode if mode in ("attention", "moe") else "none"

    def compile_blocks(self, **options) -> None:
        """Compile each block with `torch.compile` (in place, so parameter names and checkpoints do not
        change): the block is the unit activation checkpointing recomputes, and a graph break in one
        block leaves the others whole."""
        for block in self.blocks:
            block.compile(**options)

    @torch.no_grad()
    def _init_weights(self, n_layers: int) -> None:
        """GPT-2 init: N(0, 0.02), output projections N(0, 0.02 / sqrt(2 * n_layers)), zero biases.

        Experts get the same init as the dense FFN they replace (w1, w3 like `fc`, w2 like `proj`,
        as torchtitan does), so an MoE block starts at the scale of a dense one; routers keep the
        engine's init (zero for the noisy top-k gate, as in the paper). Norms keep ones and zeros.
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
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, idx_BT: Tensor, cache: KVCache | None = None) -> tuple[Tensor, list[MoEStats]]:
        """Token ids `[B, T]` -> logits `[B, T, vocab]`, one MoEStats per MoE layer.

        With a cache, the ids continue the cached positions and their keys and values join it.
        """
        T = idx_BT.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.max_seq_len}")
        pos_T = torch.arange(start, start + T, device=idx_BT.device)
        x_BTd = self.tok_emb(idx_BT)
        rope = None
        if self.pos_emb is not None:
            x_BTd = x_BTd + self.pos_emb(pos_T)
        else:
            rope = rope_tables(pos_T, self.cfg.head_dim, self.cfg.rope_theta)
        x_BTd = self.drop(x_BTd)
        stats: list[MoEStats] = []
        for block in self.blocks:
            if self._checkpointing == "full" and self.training and cache is None:
                x_BTd, s = checkpoint(block, x_BTd, idx_BT, rope, use_reentrant=False)
            else:
                x_BTd, s = block(x_BTd, idx_BT, rope, cache)
            if s is not None:
                stats.append(s)
        return self.lm_head(self.ln_f(x_BTd)), stats


def lm_loss(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats (float32 whatever the autocast dtype)."""
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))
