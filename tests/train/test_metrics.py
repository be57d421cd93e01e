"""Metrics: MoE summaries, JSONL always, wandb offline run files, no secrets, report PNGs."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

from moe_scale.cli import main
from moe_scale.train.metrics import MetricsLogger, moe_summary
from tests.trainer_utils import read_jsonl, read_wandb_history

def test_moe_summary():
    tokens = np.array([[4, 4, 4, 4], [10, 2, 0, 4]], dtype=float)
    routed = np.array([[5, 4, 4, 4], [12, 2, 0, 4]], dtype=float)
    out = moe_summary(tokens, routed, dropped_L=np.array([1, 2.0]), assignments_L=np.array([17, 18.0]))
    assert out["moe/layer0/max_mean_load"] == 1.0 and out["moe/layer1/max_mean_load"] == 2.5
    assert out["moe/layer0/drop_frac"] == pytest.approx(1 / 17) and out["moe/layer1/drop_frac"] == pytest.approx(2 / 18)
    assert out["moe/layer1/dead_experts"] == 1 and out["moe/dead_experts"] == 1
    assert out["moe/max_mean_load"] == 2.5


def test_jsonl_metrics_are_written(wandb_run):
    rows = read_jsonl(wandb_run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [5, 10]
    assert any("val_loss" in r for r in rows)
    loads = read_jsonl(wandb_run / "expert_load.jsonl")
    assert [r["step"] for r in loads] == [5, 10]
    assert np.array(loads[0]["tokens_per_expert"]).shape == (2, 4)  # layers x experts


def test_wandb_offline_run_holds_the_metrics(wandb_run):
    files = list((wandb_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = read_wandb_history(files[0])
    keys = set().union(*history)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux/switch", "aux/z", "moe/layer0/drop_frac",
                "moe/layer1/max_mean_load", "moe/dead_experts", "moe/max_mean_load", "val_loss"):
        assert key in keys, key
    assert not [k for k in keys if re.search(r"expert_?\d", k)]  # summaries, never a key per expert
    images = [row for row in history if row.get("moe/expert_load/_type") == "image-file"]
    assert len(images) == 2  # the expert-load heatmap at steps 5 and 10
    run = files[0].parent
    assert all((run / "files" / row["moe/expert_load/path"]).is_file() for row in images)
    losses = [row["loss"] for row in history if "loss" in row]
    jsonl = [r["loss"] for r in read_jsonl(wandb_run / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(jsonl)


def test_report_renders_pngs(wandb_run, tmp_path, capsys):
    assert main(["report", str(wandb_run), "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["expert_load.png", "expert_load_layer0.png", "expert_load_layer1.png", "training.png"]
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert main(["report", str(tmp_path / "nothing")]) == 2  # not a run dir: a message, not a traceback


def test_only_the_logging_rank_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False, total_steps=10)
    logger.log(1, {"loss": 1.0})
    logger.log_expert_load(1, np.ones((1, 4)))
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_log_lines_carry_an_eta_without_a_terminal(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=10, progress=True)
    logger.log(2, {"loss": 3.0})
    logger.close()
    assert re.search(r"step +2 +loss 3 +eta \d+m\d\ds", capsys.readouterr().out)


@pytest.mark.parametrize("torn", ['{"step": 4, "lo', '\x00\x00\x00\x00', '{"step": 3, "loss": 2.5}'])
def test_resume_drops_a_torn_last_line(tmp_path, torn):
    """A kill or a full disk mid-write leaves a partial last row; the restart drops it and appends cleanly."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n' + torn)
    parses = torn.startswith('{"step": 3')
    with pytest.warns(UserWarning, match="dropped 1 unreadable line") if not parses else contextlib.nullcontext():
        logger = MetricsLogger(tmp_path, enabled=True, total_steps=10, start_step=3, progress=False)
    logger.log(4, {"loss": 2.0})
    logger.close()
    steps = [r["step"] for r in read_jsonl(path)]
    assert steps == ([1, 2, 3, 4] if parses else [1, 2, 4])
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == len(steps)
