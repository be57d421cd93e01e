"""Secrets never reach what a run writes: its directory (config, metrics, wandb files,
checkpoints) or its logs."""

from __future__ import annotations

from moe_scale.cli import main
from tests.trainer_utils import CONFIGS, SECRET, tiny


def test_api_key_never_reaches_the_run_directory(wandb_run):
    leaked = [p for p in wandb_run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked
    assert "WANDB" not in (wandb_run / "config.yaml").read_text()


def test_api_key_never_reaches_the_logs(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert main(["train", str(CONFIGS / "lm_debug.yaml"), *tiny(tmp_path / "run", "train.max_steps=5")]) == 0
    out, err = capfd.readouterr()
    assert "loss" in out + err and SECRET not in out + err
