"""A finished or running training run, read back from its directory: RUN_DIR/config.yaml, the
newest complete checkpoint and the tokenizer (`moe-scale generate` samples from it; a client's
starting weights come from another run through `RunReader`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class RunReader:
    """Reads other runs' checkpoints for a client's starting weights, as this rank resumes its own:
    experts by global index, this rank's block only (`sharding`: the EP layout; None at EP=1)."""

    rank: int = 0
    world_size: int = 1
    sharding: Any = None

    def load_weights(self, run_dir: str | Path, model: nn.Module) -> Path:
        """Load the newest checkpoint of `run_dir` into `model` (weights only); its path."""
        root = Path(run_dir) / "checkpoints"
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"{run_dir} is neither a Hugging Face directory (config.json) nor a run "
                                  f"directory with a checkpoint (none under {root})")
        Checkpointer(root, rank=self.rank, world_size=self.world_size, sharding=self.sharding).load(
            path, model, None, restore_rng_state=False)
        return path

    def read(self, run_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
        """(Config, full state dict) of `run_dir`'s newest checkpoint, on the CPU."""
        model, _, cfg = load_run(run_dir)
        return cfg, {k: v.detach() for k, v in model.state_dict().items()}
