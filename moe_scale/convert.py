"""`moe-scale convert`: a Hugging Face checkpoint directory <-> a moe_scale run directory.

    from_hf("mixtral-tiny/", "runs/mixtral-tiny")   # config.yaml + checkpoints/step_00000000 (DCP)
    to_hf("runs/mixtral-tiny", "mixtral-tiny-out/")  # config.json + model.safetensors

The run directory is one `moe-scale train` resumes (its optimizer starts fresh: the checkpoint
holds weights only), `moe-scale generate` samples from, and `model.init_from` starts a new run
from. Experts are stored by global index, so any expert-parallel size loads them. The
tokenizer files travel both ways; with a tokenizer.json the run's `data.tokenizer` is bpe and
the LM task reads it from the run directory. The source's config.json is kept as
RUN_DIR/hf_config.json, and its special token ids return with `to_hf`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moe_scale.models.lm.hf.config import ConversionError, from_hf_config, hf_family, infer_family, to_hf_config
from moe_scale.models.lm.hf.files import HFCheckpoint, copy_tokenizer, write_hf_dir
from moe_scale.models.lm.hf.weights import from_hf_weights, to_hf_weights
from moe_scale.models.lm.task import build_model
from moe_scale.train.checkpoint import Checkpointer, CheckpointError, latest_checkpoint, list_checkpoints
from moe_scale.train.config import from_dict, load_config, save_config
from moe_scale.validation import ConfigError

HF_CONFIG_COPY = "hf_config.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def run_config(hf: dict[str, Any], run_dir: str | Path, has_tokenizer: bool):
    """The moe_scale `Config` of a run over the HF model `hf` (config.json as a dict)."""
    model, moe = from_hf_config(hf)
    raw: dict[str, Any] = {"model": model, "data": {"tokenizer": "bpe" if has_tokenizer else "byte"},
                           "train": {"run_dir": str(run_dir)},
                           "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10}}  # fine-tuning, not pretraining
    if moe is not None:
        raw["moe"] = moe
    return from_dict(raw)


def from_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Write RUN_DIR (config.yaml, a weights-only checkpoint at step 0, tokenizer files) from HF_DIR."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if list_checkpoints(run_dir / "checkpoints"):
        raise ConversionError(f"{run_dir} already holds checkpoints; convert into a new directory")
    ckpt = HFCheckpoint.open(hf_dir)
    family = hf_family(ckpt.config)
    cfg = run_config(ckpt.config, run_dir, (hf_dir / "tokenizer.json").is_file())
    moe = cfg.moe_config() if cfg.model.num_moe_layers else None
    state = from_hf_weights(family, cfg.model, moe, ckpt.names, ckpt.get)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    shutil.copyfile(hf_dir / "config.json", run_dir / HF_CONFIG_COPY)
    copy_tokenizer(hf_dir, run_dir)
    Checkpointer(run_dir / "checkpoints").save(0, model, None, {"step": 0, "weights_only": True,
                                                                "converted_from": str(hf_dir)})
    return run_dir


def to_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write OUT_DIR (config.json, model.safetensors, tokenizer files) from RUN_DIR's newest checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml: give a moe_scale run directory")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.name != "lm":
        raise ConversionError(f"only the lm client converts to Hugging Face; {run_dir} is model.name={cfg.model.name}")
    root = run_dir / "checkpoints"
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{root} holds no complete checkpoint to convert")
    lm = cfg.model
    moe = cfg.moe_config() if lm.num_moe_layers else None
    hf = to_hf_config(lm, moe)  # refuses before any weight is read
    model = build_model(cfg)
    Checkpointer(root).load(path, model, None, restore_rng_state=False)
    source = run_dir / HF_CONFIG_COPY
    if source.is_file():
        original = json.loads(source.read_text())
        hf.update({k: original[k] for k in TOKEN_IDS if k in original})
    tensors = to_hf_weights(infer_family(lm, moe), lm, moe, model.state_dict())
    out = write_hf_dir(out_dir, hf, tensors)
    copy_tokenizer(run_dir, out)
    return out
