"""A finished or running training run, read back from its directory: RUN_DIR/config.yaml, the
newest complete checkpoint and the tokenizer (`moe-scale generate` samples from it)."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_scale.data.tokenizer import run_tokenizer
from moe_scale.train.checkpoint import Checkpointer, CheckpointError, latest_checkpoint
from moe_scale.train.config import load_config
from moe_scale.train.tasks import get_task
from moe_scale.validation import ConfigError


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """The model of RUN_DIR's newest checkpoint, its tokenizer and config: (MoELM, tokenizer, Config).

    Reads RUN_DIR/config.yaml and the checkpoint through `train.checkpoint` (verified against its
    manifest; experts saved under any expert-parallel size load whole).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.yaml: is it a run directory of moe-scale train?")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.name != "lm":
        raise ConfigError(f"moe-scale generate samples from the lm client; {run_dir} trained "
                          f"model.name={cfg.model.name}")
    root = run_dir / "checkpoints"
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{root} holds no complete checkpoint; train with checkpoint.save_final=true")
    model = get_task(cfg.model.name).build_model(cfg)
    Checkpointer(root).load(path, model, None, restore_rng_state=False)
    return model.to(device).eval(), run_tokenizer(run_dir, cfg.data.tokenizer), cfg
