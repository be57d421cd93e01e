"""Hugging Face `config.json` <-> the `model:` and `moe:` sections of an lm run.

    family = hf_family(hf)                    # "mixtral", "qwen3_moe", ... from hf["model_type"]
    model, moe = from_hf_config(hf)           # plain dicts, as they appear in config.yaml
    hf = to_hf_config(lm_cfg, moe_cfg)        # the family inferred from the features used

Families and what tells them apart in our configuration:

    family      attention                          routed experts          shared expert
    llama       GQA, no bias                       (dense)                 -
    qwen2       GQA, q/k/v bias                    (dense)                 -
    mixtral     GQA                                softmax top-k, renorm.  -
    qwen3_moe   GQA, per-head QK-norm, head_dim    softmax top-k, norm_topk_prob   -
    qwen2_moe   GQA, q/k/v bias                    softmax top-k, norm_topk_prob   one, sigmoid-gated
    olmoe       MHA, QK-norm over the projection   softmax top-k, norm_topk_prob   -

Every HF option our model cannot reproduce exactly (sliding windows, scaled RoPE, other
activations, clipped q/k/v, DeepSeek-V3's multi-head latent attention) is refused with the
option named, never approximated.
"""

from __future__ import annotations

from typing import Any

from moe_scale.validation import ConfigError

MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
DENSE_FAMILIES = ("llama", "qwen2")
FAMILIES = MOE_FAMILIES + DENSE_FAMILIES
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
}


class ConversionError(ConfigError):
    """A checkpoint or run that cannot be converted exactly; the message names the option and why."""


def _refuse(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


def hf_family(hf: dict[str, Any]) -> str:
    family = hf.get("model_type")
    _refuse(family not in ("deepseek_v3", "deepseek_v2"),
            f"model_type={family}: DeepSeek attention is multi-head latent attention (MLA, low-rank compressed "
            f"keys and values), which moe_scale does not build; its weights have no place in our attention. "
            f"Convertible: {', '.join(FAMILIES)}")
    _refuse(family in FAMILIES, f"model_type={family!r} is not convertible; convertible: {', '.join(FAMILIES)}")
    return family


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _refuse(kind == "default" and not hf.get("rope_scaling"),
            f"rope_type={kind} (rope_scaling={hf.get('rope_scaling')}): scaled RoPE is not built; only plain RoPE converts")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: dict[str, Any], family: str) -> None:
    _refuse(hf.get("hidden_act", "silu") == "silu",
            f"hidden_act={hf.get('hidden_act')}: the experts and FFNs are SwiGLU (silu); only silu converts")
    sliding = hf.get("use_sliding_window", False) or "sliding_attention" in (hf.get("layer_types") or ())
    if family == "mixtral":  # a window as long as the context changes nothing
        window = hf.get("sliding_window")
        sliding = sliding or (window is not None and window < hf.get("max_position_embeddings", 0))
    _refuse(not sliding, f"sliding-window attention (sliding_window={hf.get('sliding_window')}) is not built; "
                         f"only full causal attention converts (set use_sliding_window=false / sliding_window=null "
                         f"if the model was trained without it)")
    _refuse(hf.get("clip_qkv") is None, f"clip_qkv={hf.get('clip_qkv')}: clipped q/k/v is not built")
    _refuse(not hf.get("attention_bias", False) and not hf.get("mlp_bias", False),
            "attention_bias / mlp_bias: biases on the output or FFN projections are not built (q/k/v bias is, Qwen2)")
    _refuse(not hf.get("pretraining_tp", 1) > 1, "pretraining_tp > 1 is not converted")


def from_hf_config(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The `model:` section and the `moe:` section (None for a dense family) of an HF config."""
    family = hf_family(hf)
    _check_supported(hf, family)
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    model: dict[str, Any] = {
        "arch": "llama", "vocab_size": int(hf["vocab_size"]), "d_model": d, "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads, "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d // heads), "max_seq_len": int(hf.get("max_position_embeddings", 4096)),
        "rope_theta": _rope_theta(hf), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qk_norm": family in ("qwen3_moe", "olmoe"),
        "qk_norm_scope": "projection" if family == "olmoe" else "head",
        "qkv_bias": family == "qwen2" or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "moe_every": 0 if family in DENSE_FAMILIES else 1,
    }
    if family in DENSE_FAMILIES or family in ("qwen3_moe", "qwen2_moe"):
        model["d_ff"] = int(hf["intermediate_size"])
    if family in DENSE_FAMILIES:
        return model, None
    if family in ("qwen3_moe", "qwen2_moe"):
        step, dense = int(hf.get("decoder_sparse_step", 1)), sorted(hf.get("mlp_only_layers") or [])
        _refuse(not dense or (step == 1 and dense == list(range(len(dense)))),
                f"mlp_only_layers={dense} with decoder_sparse_step={step}: only the first n layers can be dense "
                f"(model.n_dense_layers) and then every later layer is MoE")
        model["moe_every"], model["n_dense_layers"] = step, len(dense)
    experts = int(hf.get("num_local_experts") or hf["num_experts"])  # transformers 5 may write either name
    hidden = int(hf["intermediate_size"] if family in ("mixtral", "olmoe") else hf["moe_intermediate_size"])
    moe: dict[str, Any] = {
        "num_experts": experts, "k": int(hf["num_experts_per_tok"]), "d_hidden": hidden, "activation": "swiglu",
        "router": "topk", "dropless": True,
        "renormalize": True if family == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        "aux_loss": {"switch": float(hf.get("router_aux_loss_coef", 0.0))},
    }
    if family == "qwen2_moe":
        shared = int(hf["shared_expert_intermediate_size"])
        _refuse(shared % hidden == 0,
                f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={hidden}: "
                f"our shared experts are num_shared_experts experts of width moe.d_hidden")
        moe["num_shared_experts"], moe["shared_expert_gate"] = shared // hidden, True
    return model, moe


def renormalizes(moe) -> bool:
    """Whether the topk router divides the kept scores by their sum (its default when unset)."""
    return moe.renormalize if moe.renormalize is not None else (moe.k > 1 or moe.score_func == "sigmoid")


def infer_family(lm, moe) -> str:
    """The HF family that reproduces `lm` (LMConfig) and `moe` (MoEConfig, None for a dense model)."""
    if not lm.num_moe_layers:
        return "qwen2" if lm.qkv_bias else "llama"
    if moe.shared_expert_gate:
        return "qwen2_moe"
    if lm.qk_norm:
        return "olmoe" if lm.qk_norm_scope == "projection" else "qwen3_moe"
    return "mixtral"


def _check_representable(lm, moe, family: str) -> None:
    want = {"model.arch=llama / position=rope": lm.position == "rope", "model.norm=rmsnorm": lm.norm == "rmsnorm",
            "model.ffn_activation=swiglu": lm.ffn_activation == "swiglu", "model.bias=false": not lm.bias,
            "model.qkv_bias": lm.qkv_bias == (family == "qwen2") or family == "qwen2_moe",  # its qkv_bias option
            "model.qk_norm": lm.qk_norm == (family in ("qwen3_moe", "olmoe"))}
    if moe is not None and lm.num_moe_layers:
        want.update({
            "moe.router=topk": moe.router == "topk", "moe.activation=swiglu": moe.activation == "swiglu",
            "moe.score_func=softmax": moe.score_func == "softmax", "moe.route_scale=1": moe.route_scale == 1.0,
            "moe.num_groups=0": moe.num_groups <= 1, "moe.bias_update_rate=0": moe.bias_update_rate == 0,
            "moe.expert_bias=false": not moe.expert_bias,
            "moe.num_shared_experts": (moe.num_shared_experts > 0) == (family == "qwen2_moe"),
            "model.moe_every / n_dense_layers": (lm.moe_every == 1 and lm.n_dense_layers == 0) or (
                family in ("qwen3_moe", "qwen2_moe") and (lm.moe_every == 1 or lm.n_dense_layers == 0)),
        })
        if family == "mixtral":
            want["moe.renormalize=true (Mixtral renormalises its top-k)"] = renormalizes(moe)
    bad = [key for key, ok in want.items() if not ok]
    _refuse(not bad, f"the run cannot be written as {ARCHITECTURES[family]}: {', '.join(bad)} differ(s) from what "
                     f"that architecture computes")


def to_hf_config(lm, moe) -> dict[str, Any]:
    """The config.json of the HF model computing what `lm` / `moe` compute."""
    family = infer_family(lm, moe)
    _check_representable(lm, moe, family)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": lm.vocab_size,
        "hidden_size": lm.d_model, "num_hidden_layers": lm.n_layers, "num_attention_heads": lm.n_heads,
        "num_key_value_heads": lm.n_kv_heads, "head_dim": lm.head_dim, "max_position_embeddings": lm.max_seq_len,
        "rms_norm_eps": lm.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "hidden_act": "silu", "tie_word_embeddings": lm.tie_embeddings, "attention_dropout": 0.0,
        "dtype": "float32", "use_cache": True,
    }
    if family == "olmoe":
        del hf["head_dim"]  # OLMoE derives it from hidden_size / heads
        _refuse(lm.head_dim * lm.n_heads == lm.d_model, "model.head_dim must be d_model / n_heads for OLMoE")
    if family in DENSE_FAMILIES:
        hf["intermediate_size"] = lm.dense_hidden
        if family == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        return hf
    hf.update(num_experts_per_tok=moe.k, router_aux_loss_coef=moe.aux_loss.switch, output_router_logits=False)
    if family == "mixtral":
        hf.update(num_local_experts=moe.num_experts, intermediate_size=moe.d_hidden, sliding_window=None)
        return hf
    hf.update(num_experts=moe.num_experts, norm_topk_prob=renormalizes(moe))
    if family == "olmoe":
        hf.update(intermediate_size=moe.d_hidden, clip_qkv=None, attention_bias=False)
        return hf
    hf.update(moe_intermediate_size=moe.d_hidden, intermediate_size=lm.dense_hidden,
              decoder_sparse_step=lm.moe_every, mlp_only_layers=list(range(lm.n_dense_layers)),
              use_sliding_window=False, sliding_window=None)
    if family == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=moe.num_shared_experts * moe.d_hidden, qkv_bias=lm.qkv_bias)
    else:
        hf["attention_bias"] = False
    return hf
