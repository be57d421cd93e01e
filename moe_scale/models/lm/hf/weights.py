"""Hugging Face tensor names and layouts <-> the `MoELM` state dict, per family.

    ours = from_hf_weights(family, lm, moe, source)     # source: name -> tensor, read lazily
    hf = to_hf_weights(family, lm, moe, ours)           # the layout `save_pretrained` writes

Where the layouts differ:

    HF (nn.Linear: weight [out, in])             moe_scale
    self_attn.q_proj / k_proj / v_proj           attn.qkv [(H + 2G) * h, d]: the three stacked
    self_attn.o_proj                             attn.proj
    input_layernorm / post_attention_layernorm   ln1 / ln2
    mlp.gate_proj, up_proj, down_proj (dense)    ffn.gate, ffn.fc, ffn.proj (silu on gate)
    <moe>.gate.weight [E, d]                     ffn.router.w_gate [d, E]
    <moe>.experts.e.{gate,up,down}_proj [out, in] (Mixtral: w1, w3, w2; transformers 5 in
    memory: experts.gate_up_proj [E, 2I, d] and experts.down_proj [E, d, I])
                                                 ffn.experts.w1 [E, d, I] (silu), w3 [E, d, I], w2 [E, I, d]
    mlp.shared_expert.* / shared_expert_gate     ffn.shared_experts.w1, w3, w2 [in, out] / w_gate [d, 1]

Both HF expert layouts are read; the per-expert one is written, as `save_pretrained` does,
so older transformers read it too. Expert tensors are stacked in global expert order, so the
result loads at any expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from moe_scale.models.lm.hf.config import ConversionError

Source = Callable[[str], Tensor]


def _moe_prefix(family: str, layer: int, names: Iterable[str]) -> str:
    """Mixtral's checkpoints call the MoE block block_sparse_moe; transformers 5 calls it mlp in memory."""
    legacy = f"model.layers.{layer}.block_sparse_moe."
    if family == "mixtral" and any(n.startswith(legacy) for n in names):
        return legacy
    return f"model.layers.{layer}.mlp."


def _expert_names(family: str) -> tuple[str, str, str]:
    """Per-expert (gate, up, down) projection names."""
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def from_hf_weights(family: str, lm, moe, names: set[str], get: Source) -> dict[str, Tensor]:
    """Our state dict (float32, every expert) from an HF checkpoint's tensors.

    lm: LMConfig, moe: MoEConfig or None; names: the checkpoint's tensor names; get(name) reads one.
    """
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in names:
            raise ConversionError(f"the checkpoint has no tensor {name}, which a {family} model of this config.json "
                                  f"holds; is config.json the checkpoint's own?")
        used.add(name)
        return get(name).float()

    sd: dict[str, Tensor] = {"tok_emb.weight": take("model.embed_tokens.weight"),
                             "ln_f.weight": take("model.norm.weight")}
    sd["lm_head.weight"] = sd["tok_emb.weight"] if lm.tie_embeddings else take("lm_head.weight")
    if lm.tie_embeddings:
        used.add("lm_head.weight")
    for i in range(lm.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        sd[ours + "ln1.weight"] = take(hf + "input_layernorm.weight")
        sd[ours + "ln2.weight"] = take(hf + "post_attention_layernorm.weight")
        attn = hf + "self_attn."
        sd[ours + "attn.qkv.weight"] = torch.cat([take(f"{attn}{p}_proj.weight") for p in "qkv"])
        if lm.qkv_bias:
            sd[ours + "attn.qkv.bias"] = torch.cat([take(f"{attn}{p}_proj.bias") for p in "qkv"])
        sd[ours + "attn.proj.weight"] = take(attn + "o_proj.weight")
        if lm.qk_norm:
            sd[ours + "attn.q_norm.weight"] = take(attn + "q_norm.weight")
            sd[ours + "attn.k_norm.weight"] = take(attn + "k_norm.weight")
        if not lm.is_moe_layer(i):
            mlp = hf + "mlp."
            sd[ours + "ffn.gate.weight"] = take(mlp + "gate_proj.weight")
            sd[ours + "ffn.fc.weight"] = take(mlp + "up_proj.weight")
            sd[ours + "ffn.proj.weight"] = take(mlp + "down_proj.weight")
            continue
        block = _moe_prefix(family, i, names)
        sd[ours + "ffn.router.w_gate"] = take(block + "gate.weight").t()
        if block + "experts.gate_up_proj" in names:
            gate_up_EId = take(block + "experts.gate_up_proj")  # [E, 2I, d]: gate rows, then up rows
            gate_EId, up_EId = gate_up_EId.chunk(2, dim=1)
            down_EdI = take(block + "experts.down_proj")
        else:
            g, u, dn = _expert_names(family)
            experts = range(moe.num_experts)
            gate_EId = torch.stack([take(f"{block}experts.{e}.{g}.weight") for e in experts])
            up_EId = torch.stack([take(f"{block}experts.{e}.{u}.weight") for e in experts])
            down_EdI = torch.stack([take(f"{block}experts.{e}.{dn}.weight") for e in experts])
        sd[ours + "ffn.experts.w1"] = gate_EId.transpose(1, 2).contiguous()
        sd[ours + "ffn.experts.w3"] = up_EId.transpose(1, 2).contiguous()
        sd[ours + "ffn.experts.w2"] = down_EdI.transpose(1, 2).contiguous()
        if moe.num_shared_experts:
            shared = block + "shared_expert."
            sd[ours + "ffn.shared_experts.w1"] = take(shared + "gate_proj.weight").t().contiguous()
            sd[ours + "ffn.shared_experts.w3"] = take(shared + "up_proj.weight").t().contiguous()
            sd[ours + "ffn.shared_experts.w2"] = take(shared + "down_proj.weight").t().contiguous()
            if moe.shared_expert_gate:
                sd[ours + "ffn.shared_experts.w_gate"] = take(block + "shared_expert_gate.weight").t().contiguous()
    unused = sorted(n for n in set(names) - used if not n.endswith("rotary_emb.inv_freq"))  # recomputed, not learned
    if unused:
        raise ConversionError(f"the checkpoint holds tensors a {family} model of this config.json has no place for "
                              f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); refusing to drop them")
    return sd


def to_hf_weights(family: str, lm, moe, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF tensors (per-expert layout, contiguous) of our full state dict `sd`."""
    out: dict[str, Tensor] = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not lm.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    H, G, h = lm.n_heads, lm.n_kv_heads, lm.head_dim
    for i in range(lm.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "ln1.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ln2.weight"]
        attn = hf + "self_attn."
        for p, part in zip("qkv", sd[ours + "attn.qkv.weight"].split([H * h, G * h, G * h])):
            out[f"{attn}{p}_proj.weight"] = part
        if lm.qkv_bias:
            for p, part in zip("qkv", sd[ours + "attn.qkv.bias"].split([H * h, G * h, G * h])):
                out[f"{attn}{p}_proj.bias"] = part
        out[attn + "o_proj.weight"] = sd[ours + "attn.proj.weight"]
        if lm.qk_norm:
            out[attn + "q_norm.weight"] = sd[ours + "attn.q_norm.weight"]
            out[attn + "k_norm.weight"] = sd[ours + "attn.k_norm.weight"]
        if not lm.is_moe_layer(i):
            out[hf + "mlp.gate_proj.weight"] = sd[ours + "ffn.gate.weight"]
            out[hf + "mlp.up_proj.weight"] = sd[ours + "ffn.fc.weight"]
            out[hf + "mlp.down_proj.weight"] = sd[ours + "ffn.proj.weight"]
            continue
        block = hf + ("block_sparse_moe." if family == "mixtral" else "mlp.")
        out[block + "gate.weight"] = sd[ours + "ffn.router.w_gate"].t()
        g, u, dn = _expert_names(family)
        for e in range(moe.num_experts):
            out[f"{block}experts.{e}.{g}.weight"] = sd[ours + "ffn.experts.w1"][e].t()
            out[f"{block}experts.{e}.{u}.weight"] = sd[ours + "ffn.experts.w3"][e].t()
            out[f"{block}experts.{e}.{dn}.weight"] = sd[ours + "ffn.experts.w2"][e].t()
        if moe.num_shared_experts:
            shared = block + "shared_expert."
            out[shared + "gate_proj.weight"] = sd[ours + "ffn.shared_experts.w1"].t()
            out[shared + "up_proj.weight"] = sd[ours + "ffn.shared_experts.w3"].t()
            out[shared + "down_proj.weight"] = sd[ours + "ffn.shared_experts.w2"].t()
            out[block + "shared_expert_gate.weight"] = sd[ours + "ffn.shared_experts.w_gate"].t()
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
