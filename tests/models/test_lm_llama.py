"""The Llama-style LM blocks: RoPE, grouped-query attention, QK-norm and RMSNorm against float64
references written from their definitions; layer placement, shared experts, checkpointing modes."""

from __future__ import annotations

import math

import pytest
import torch

from moe_scale.models.lm import LMConfig, MoELM, lm_loss
from moe_scale.models.lm.model import CausalSelfAttention, make_norm
from moe_scale.moe import MoEConfig, MoELayer
from tests.models.test_lm import assert_causal


def llama(n_layers=3, moe_every=1, n_dense_layers=1, num_shared_experts=1, **moe):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, num_experts=4, k=2, d_hidden=16, activation="swiglu",
                    num_shared_experts=num_shared_experts, **{"aux_loss": dict(switch=0.01), **moe})
    return MoELM(arch="llama", d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, qk_norm=True,
                 max_seq_len=16, moe_every=moe_every, n_dense_layers=n_dense_layers, moe=cfg)


def reference_attention(attn: CausalSelfAttention, x_BTd: torch.Tensor, theta: float) -> torch.Tensor:
    """Causal GQA with RoPE and RMS QK-norm (per head, or over the whole projection when the norm
    weights span it, OLMoE) in float64, one head at a time; q/k/v bias where the projection has one.

    RoPE from its definition: the pair (x[i], x[i + h/2]) is the complex number x[i] + j x[i + h/2],
    multiplied by exp(j * t * theta^(-2i/h)) at position t.
    """
    B, T, d = x_BTd.shape
    H, G, h = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W = attn.qkv.weight.double()
    x = x_BTd.double()
    qkv = x @ W.T + (attn.qkv.bias.double() if attn.qkv.bias is not None else 0)
    q_all, k_all, v_all = qkv.split([H * h, G * h, G * h], dim=-1)
    per_head = attn.q_norm.weight.shape[0] == h

    def rms(v, weight):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * weight.double()

    def rope(v_Th):
        i = torch.arange(h // 2, dtype=torch.float64)
        t = torch.arange(T, dtype=torch.float64)[:, None]
        z = torch.complex(v_Th[:, : h // 2], v_Th[:, h // 2 :]) * torch.exp(1j * t * theta ** (-2 * i / h))
        return torch.cat([z.real, z.imag], dim=-1)

    out = torch.zeros(B, T, H * h, dtype=torch.float64)
    for b in range(B):
        for head in range(H):
            g = head // (H // G)
            if per_head:
                q = rope(rms(q_all[b, :, head * h : (head + 1) * h], attn.q_norm.weight))
                k = rope(rms(k_all[b, :, g * h : (g + 1) * h], attn.k_norm.weight))
            else:
                q = rope(rms(q_all[b], attn.q_norm.weight)[:, head * h : (head + 1) * h])
                k = rope(rms(k_all[b], attn.k_norm.weight)[:, g * h : (g + 1) * h])
            v = v_all[b, :, g * h : (g + 1) * h]
            scores = q @ k.T / math.sqrt(h)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[b, :, head * h : (head + 1) * h] = scores.softmax(-1) @ v
    return out @ attn.proj.weight.double().T


def test_rope_gqa_qknorm_attention_matches_a_float64_reference():
    model = llama()
    attn = model.blocks[0].attn
    with torch.no_grad():  # non-trivial norm weights, so a missing QK-norm would show
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32)
    from moe_scale.models.lm.model import rope_tables

    got = attn(x, rope_tables(torch.arange(7), attn.head_dim, 10000.0))
    torch.testing.assert_close(got.double(), reference_attention(attn, x, 10000.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [
    dict(head_dim=12),  # Qwen3-MoE: head size apart from d_model / n_heads
    dict(qk_norm_scope="projection"),  # OLMoE: one norm over all heads' queries, one over the keys
    dict(qkv_bias=True),  # Qwen2: bias on q, k, v only
])
def test_attention_options_of_converted_models_match_the_reference(options):
    cfg = LMConfig(arch="llama", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, qk_norm=True, **options)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    H, G, h = 4, 2, cfg.head_dim
    assert attn.qkv.weight.shape == ((H + 2 * G) * h, 32) and attn.proj.weight.shape == (32, H * h)
    assert (attn.qkv.bias is not None) == cfg.qkv_bias and attn.proj.bias is None
    scope = options.get("qk_norm_scope", "head")
    assert attn.k_norm.weight.shape == ((G * h,) if scope == "projection" else (h,))
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
        if attn.qkv.bias is not None:
            attn.qkv.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 7, 32)
    from moe_scale.models.lm.model import rope_tables

    got = attn(x, rope_tables(torch.arange(7), h, 10000.0))
    torch.testing.assert_close(got.double(), reference_attention(attn, x, 10000.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options,match", [
    (dict(qk_norm_scope="layer"), "model.qk_norm_scope"),
    (dict(init_from="a", upcycle_from="b"), "keep one of them"),
    (dict(upcycle_noise=0.1), "model.upcycle_from"),
    (dict(d_model=30, n_heads=4), "model.head_dim"),
])
def test_new_model_options_are_checked(options, match):
    from moe_scale.train.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        LMConfig(**{"arch": "llama", "d_model": 32, "n_heads": 4, **options})


def test_rmsnorm_matches_its_formula():
    norm = make_norm("rmsnorm", 8, 1e-6, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm.double()(x), expected)


def test_dense_first_layers_shared_experts_and_shapes():
    model = llama(n_layers=4, moe_every=1, n_dense_layers=2, num_shared_experts=2)
    assert [b.is_moe for b in model.blocks] == [False, False, True, True]
    shared = model.blocks[2].ffn.shared_experts
    assert shared.w1.shape == shared.w3.shape == (32, 2 * 16)  # num_shared * d_hidden
    assert model.blocks[0].ffn.gate is not None  # dense FFNs are SwiGLU in the llama arch
    assert model.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 8  # 4 query heads, 2 kv heads of 8
    logits, stats = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256) and len(stats) == 2
    every_other = LMConfig(n_layers=6, n_dense_layers=1, moe_every=2)
    assert [i for i in range(6) if every_other.is_moe_layer(i)] == [2, 4]


def test_shared_experts_contribute_to_the_output():
    model = llama().eval()
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        before, _ = model(idx)
        model.blocks[1].ffn.shared_experts.w2.zero_()
        after, _ = model(idx)
    assert not torch.allclose(before, after)


def test_causal_with_rope():
    assert_causal(llama(dropless=True).eval())


def test_tied_and_untied_embeddings():
    tied = llama()
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = MoELM(arch="llama", d_model=32, n_layers=1, n_heads=4, moe_every=0, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.pos_emb is None  # RoPE: no learned positions


@pytest.mark.parametrize("mode", ["attention", "moe", "full"])
def test_selective_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    idx = torch.randint(0, 256, (2, 16))
    results = []
    for ckpt in ("none", mode):
        model = llama(router="noisy_topk", aux_loss=dict(importance=0.1, load=0.1))
        model.activation_checkpointing = ckpt
        torch.manual_seed(1)  # the router noise is re-drawn identically when recomputed
        logits, stats = model(idx)
        loss = lm_loss(logits[:, :-1], idx[:, 1:]) + sum(s.aux_loss for s in stats)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss0, loss1)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], msg=name)


def test_checkpointing_mode_recomputes_the_chosen_sublayers():
    """Count entries into attention and MoE: a recomputed sublayer starts twice per step (pre-hooks, as
    recomputation stops once the tensors backward needs are rebuilt, before a forward hook would fire)."""
    counts = {}
    for mode, attn_calls, moe_calls in (("none", 3, 2), ("attention", 6, 2), ("moe", 3, 4), ("full", 6, 4)):
        model = llama()
        model.activation_checkpointing = mode
        calls = {"attn": 0, "moe": 0}
        for m in model.modules():
            key = "attn" if isinstance(m, CausalSelfAttention) else "moe" if isinstance(m, MoELayer) else None
            if key:
                m.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        logits, _ = model(torch.randint(0, 256, (1, 8)))
        logits.sum().backward()
        counts[mode] = (calls["attn"], calls["moe"])
        assert counts[mode] == (attn_calls, moe_calls), mode


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        model = llama(n_layers=2)
    assert all(p.is_meta for p in model.parameters())


def test_config_errors_name_the_key():
    from moe_scale.validation import ConfigError

    with pytest.raises(ConfigError, match="model.n_kv_heads=3 must divide model.n_heads=4"):
        LMConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="model.arch"):
        LMConfig(arch="gpt5")
    with pytest.raises(ConfigError, match="model.n_dense_layers"):
        LMConfig(n_layers=2, n_dense_layers=3)
    cfg = LMConfig(arch="llama", norm="layernorm")
    assert (cfg.position, cfg.norm, cfg.ffn_activation) == ("rope", "layernorm", "swiglu")


def test_gpt2_arch_keeps_the_byte_level_model_and_its_parameter_names():
    """Checkpoints of the byte-level model load into the gpt2 configuration: same keys, same shapes."""
    model = MoELM(d_model=32, n_layers=1, n_heads=4, max_seq_len=16, moe=MoEConfig(d_model=32, num_experts=4))
    names = {n for n in model.state_dict() if ".ffn." not in n}
    assert names == {"tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.attn.qkv.weight",
                     "blocks.0.attn.proj.weight", "blocks.0.ln2.weight", "ln_f.weight", "lm_head.weight"}
    assert isinstance(model.blocks[0].ln1, torch.nn.LayerNorm) and model.blocks[0].attn.qkv.out_features == 96
    assert isinstance(model.blocks[0].ffn, MoELayer) and model.blocks[0].ffn.shared_experts is None


def test_compiled_blocks_with_selective_checkpointing_match_eager_blocks():
    idx = torch.randint(0, 256, (2, 16))
    results = []
    for mode, compiled in (("none", False), ("attention", True)):
        model = llama(dropless=True)
        model.activation_checkpointing = mode
        if compiled:
            model.compile_blocks()
        logits, stats = model(idx)
        loss = lm_loss(logits[:, :-1], idx[:, 1:]) + sum(s.aux_loss for s in stats)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-4, msg=name)
