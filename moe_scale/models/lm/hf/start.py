"""Starting weights of a run: `model.init_from` (fine-tuning) and `model.upcycle_from` (upcycling).

    load_start_weights(model, cfg, runs, ep_rank=0, ep_size=1)

The trainer calls it (through the LM task) once, at step 0 of a run with no checkpoint, after
its experts are placed and before any wrapper (DDP, FSDP, DeepSpeed) copies the parameters.
`runs` reads moe_scale run directories (`train.runs.RunReader`: the trainer's checkpoints, so
this client code needs nothing of the trainer).

init_from      a moe_scale run directory (its newest checkpoint, read as any resume reads
               it: experts by global index, so any EP size) or an HF checkpoint directory
               (converted in memory; its config.json must describe cfg's model)
upcycle_from   a dense HF (Llama / Qwen2) or moe_scale run directory. Sparse upcycling
               (Komatsuzaki et al. 2022): attention, norms and embeddings are copied; every
               expert of an MoE layer is a copy of that layer's dense FFN, plus Gaussian noise
               of std `upcycle_noise` * std(weight) if asked; routers keep their fresh init.
               With renormalised top-k weights (they sum to one) and no noise, the MoE
               model computes exactly what the dense one did.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_scale.models.lm.hf.config import DENSE_FAMILIES, ConversionError, from_hf_config, hf_family, renormalizes
from moe_scale.models.lm.hf.files import HFCheckpoint, is_hf_dir
from moe_scale.models.lm.hf.weights import from_hf_weights
from moe_scale.validation import ConfigError


def load_start_weights(model: nn.Module, cfg, runs, *, ep_rank: int = 0, ep_size: int = 1) -> str | None:
    """Load cfg.model.init_from / upcycle_from into `model` (this rank's experts); say what was loaded.

    runs: `runs.load_weights(run_dir, model) -> checkpoint path` loads a run's newest checkpoint
    into `model` (this rank's experts), `runs.read(run_dir) -> (Config, full state dict)`.
    """
    m = cfg.model
    for key, start in (("init_from", m.init_from), ("upcycle_from", m.upcycle_from)):
        if start is not None and not Path(start).is_dir():
            raise ConfigError(f"model.{key}={start} is not a directory; give a moe_scale run directory or a "
                              f"Hugging Face checkpoint directory")
    if m.init_from is not None and not is_hf_dir(m.init_from):
        return f"weights of {runs.load_weights(m.init_from, model)}"
    if m.init_from is not None:
        state, keep = _hf_state(m.init_from, cfg), set[str]()
        what = f"weights of {m.init_from}"
    elif m.upcycle_from is not None:
        state, keep = upcycled_state(cfg, runs), {n for n, _ in model.named_parameters() if ".router." in n}
        what = f"{m.upcycle_from} upcycled to {cfg.moe.num_experts} experts per MoE layer"
    else:
        return None
    load_full_state(model, state, ep_rank, ep_size, keep=keep)
    return what


def _mismatch(key: str, ours: Any, theirs: Any, source: str) -> ConfigError:
    return ConfigError(f"{key}={ours!r} but {source} has {theirs!r}; set {key}={theirs!r} to start from it")


def _hf_state(root: str, cfg) -> dict[str, Tensor]:
    """Our full state dict of the HF checkpoint at `root`, which must match cfg's model."""
    ckpt = HFCheckpoint.open(root)
    family = hf_family(ckpt.config)
    model_sec, moe_sec = from_hf_config(ckpt.config)
    lm = cfg.model
    moe = cfg.moe_config() if lm.num_moe_layers else None
    has_dense = any(not lm.is_moe_layer(i) for i in range(lm.n_layers))
    for key, theirs in model_sec.items():
        if key == "max_seq_len" or (key == "d_ff" and not has_dense):
            continue
        ours = lm.dense_hidden if key == "d_ff" else getattr(lm, key)
        if ours != theirs:
            raise _mismatch(f"model.{key}", ours, theirs, root)
    for key, theirs in (moe_sec or {}).items():
        if key in ("aux_loss", "dropless"):
            continue
        ours = renormalizes(moe) if key == "renormalize" else getattr(moe, key)
        if ours != theirs:
            raise _mismatch(f"moe.{key}", ours, theirs, root)
    return from_hf_weights(family, lm, moe, ckpt.names, ckpt.get)


def _dense_source(root: str, runs) -> tuple[Any, dict[str, Tensor]]:
    """(LMConfig, full state dict) of the dense model at `root` (HF or moe_scale run directory)."""
    from moe_scale.models.lm.config import LMConfig

    if is_hf_dir(root):
        ckpt = HFCheckpoint.open(root)
        family = hf_family(ckpt.config)
        if family not in DENSE_FAMILIES:
            raise ConfigError(f"model.upcycle_from={root} is a {family} MoE model; upcycling starts from a dense "
                              f"one ({', '.join(DENSE_FAMILIES)}); fine-tune it with model.init_from instead")
        model_sec, _ = from_hf_config(ckpt.config)
        dense = LMConfig(**model_sec)
        return dense, from_hf_weights(family, dense, None, ckpt.names, ckpt.get)
    run_cfg, state = runs.read(root)
    if run_cfg.model.num_moe_layers:
        raise ConfigError(f"model.upcycle_from={root} is an MoE run; upcycling starts from a dense one "
                          f"(model.moe_every=0); fine-tune it with model.init_from instead")
    return run_cfg.model, state


SHARED_FIELDS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "position",
                 "norm", "ffn_activation", "qk_norm", "qk_norm_scope", "qkv_bias", "bias", "rope_theta", "norm_eps",
                 "tie_embeddings")


def upcycled_state(cfg, runs) -> dict[str, Tensor]:
    """The MoE model's full state dict from cfg.model.upcycle_from (routers left out: they start fresh)."""
    lm, root = cfg.model, cfg.model.upcycle_from
    if not lm.num_moe_layers:
        raise ConfigError("model.upcycle_from builds MoE layers from dense ones: set model.moe_every >= 1")
    moe = cfg.moe_config()
    dense, sd = _dense_source(root, runs)
    for key in SHARED_FIELDS:
        if getattr(lm, key) != getattr(dense, key):
            raise _mismatch(f"model.{key}", getattr(lm, key), getattr(dense, key), root)
    if moe.d_hidden != dense.dense_hidden:
        raise _mismatch("moe.d_hidden", moe.d_hidden, dense.dense_hidden, root)
    if lm.d_ff is not None and lm.n_dense_layers and lm.dense_hidden != dense.dense_hidden:
        raise _mismatch("model.d_ff", lm.d_ff, dense.dense_hidden, root)
    if (moe.activation == "swiglu") != (dense.ffn_activation == "swiglu") or moe.expert_bias != dense.bias:
        raise ConfigError(f"moe.activation={moe.activation} / moe.expert_bias={moe.expert_bias} must match the dense "
                          f"FFN of {root} (activation {dense.ffn_activation}, bias {dense.bias}) for experts to copy it")
    if moe.num_shared_experts:
        raise ConfigError("model.upcycle_from copies the dense FFN into every routed expert; shared experts would "
                          "add it a second time: set moe.num_shared_experts=0")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    out: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        prefix, _, rest = name.partition(".ffn.")
        if not rest or not lm.is_moe_layer(int(prefix.split(".")[1])):
            out[name] = tensor
            continue
        ffn = f"{prefix}.ffn."
        if rest in ("gate.weight", "fc.weight", "proj.weight"):
            expert = {"gate.weight": "w1", "fc.weight": "w3", "proj.weight": "w2"}[rest]
            if dense.ffn_activation != "swiglu":
                expert = {"fc.weight": "w1", "proj.weight": "w2"}[rest]
            out[ffn + "experts." + expert] = _copies(tensor.t(), moe.num_experts, lm.upcycle_noise, generator)
        elif rest in ("fc.bias", "proj.bias"):
            out[ffn + "experts." + {"fc.bias": "b1", "proj.bias": "b2"}[rest]] = _copies(
                tensor, moe.num_experts, lm.upcycle_noise, generator)
    return out


def _copies(weight: Tensor, num_experts: int, noise: float, generator: torch.Generator) -> Tensor:
    """`[E, *weight.shape]`: E copies, each plus N(0, (noise * std(weight))^2) noise when noise > 0."""
    stacked = weight.float().unsqueeze(0).repeat(num_experts, *[1] * weight.dim()).contiguous()
    if noise > 0:
        stacked += noise * weight.float().std() * torch.randn(stacked.shape, generator=generator)
    return stacked


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, Tensor], ep_rank: int = 0, ep_size: int = 1,
                    keep: Collection[str] = ()) -> None:
    """Copy a full state dict (every expert) into `model`, whose expert stacks may hold only this
    rank's block `[E / ep_size, ...]`. Parameters in `keep` keep their values; any other one
    missing from `state`, or of another shape, is an error."""
    for name, param in model.named_parameters():
        if name in keep:
            continue
        if name not in state:
            raise ConversionError(f"the starting weights have no {name}; the config describes another model")
        source = state[name]
        if source.shape != param.shape and ep_size > 1 and source.shape[0] == param.shape[0] * ep_size:
            n = param.shape[0]
            source = source[ep_rank * n:(ep_rank + 1) * n]
        if source.shape != param.shape:
            raise ConversionError(f"{name} has shape {tuple(param.shape)} in the model but {tuple(source.shape)} in "
                                  f"the starting weights; the config describes another model")
        param.copy_(source)
