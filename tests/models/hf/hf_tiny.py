"""Tiny random transformers checkpoints of every convertible family, built offline.

    root = save_tiny("mixtral", tmp_path / "mixtral")          # config.json + safetensors + tokenizer.json
    logits_BTV = hf_logits(root, ids_BT)                        # transformers' own forward, float32, eval

Weights are drawn wider than transformers' init (std 0.02 would make every logit ~0 and every
router nearly uniform), norms are perturbed away from 1 and biases from 0, so a mapping that
swaps, transposes or drops a tensor changes the logits far beyond the 1e-4 the tests allow.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, D, LAYERS, SEQ = 300, 64, 2, 24
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=None)
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
DENSE_FAMILIES = ("llama", "qwen2")
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20


def hf_config(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                               rope_theta=1e6, rms_norm_eps=1e-5)
    elif family == "qwen3_moe":  # head_dim apart from hidden / heads, a dense first layer, renormalised top-k
        cfg = tf.Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                                rope_theta=1e6)
    elif family == "qwen2_moe":  # q/k/v bias, a gated shared expert of twice the routed width
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    elif family == "olmoe":  # QK-norm over the whole projection, top-k not renormalised
        cfg = tf.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    elif family == "llama":
        cfg = tf.LlamaConfig(**COMMON, intermediate_size=96, rope_theta=5e5)
    else:
        cfg = tf.Qwen2Config(**COMMON, intermediate_size=96)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tokenizer(root: Path) -> None:
    from moe_scale.data.tokenizer import BPETokenizer

    BPETokenizer.train(TEXTS, VOCAB).save(root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')


def save_tiny(family: str, root: Path, seed: int = 0, shard: bool = False, **overrides) -> Path:
    """save_pretrained of a tiny model (sharded into ~20 KB files if asked) plus a tokenizer."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(root, max_shard_size="20KB" if shard else "1GB")
    save_tokenizer(root)
    return root


def hf_logits(root: Path, ids_BT: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids_BT).logits


def sample_ids(batch: int = 3, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
