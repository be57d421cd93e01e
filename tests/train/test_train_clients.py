"""The MultiModel and the Selector trained through `moe-scale train`'s Trainer: a few steps, resume,
and EP=1 vs EP=2 on real gloo processes."""

from __future__ import annotations

import json

import pytest
import torch

from moe_scale.distributed.launch import run_local
from moe_scale.train.config import load_config
from moe_scale.validation import ConfigError
from moe_scale.train.runtime import Runtime
from moe_scale.train.trainer import REPORT_FILE, Trainer
from tests.trainer_utils import CONFIGS, read_jsonl

QUIET = ["train.eval_every=0", "train.eval_batches=2", "logging.progress=false", "checkpoint.every=0",
         "train.device=cpu"]
MM_TINY = [*QUIET, "data.batch_size=8", "data.eval_examples=8", "data.tasks=[digits_cls,translate_en_de]",
           "optim.warmup_steps=2", "train.deterministic=true"]
SEL_TINY = [*QUIET, "data.train_sources=200", "data.test_sources=10", "data.batch_size=16", "model.hidden_dim=32",
            "model.embed_dim=32", "model.expert_dim=16", "optim.warmup_steps=2", "optim.lr=5e-3"]


def multimodel(run_dir, *extra):
    return Trainer(load_config(CONFIGS / "multimodel_debug.yaml", [*MM_TINY, f"train.run_dir={run_dir}", *extra]))


def test_multimodel_trains_and_reports_per_task_metrics(tmp_path):
    result = multimodel(tmp_path / "run", "train.max_steps=30", "logging.every=10").fit()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "loss/digits_cls" in rows[-1] or "loss/translate_en_de" in rows[-1]
    assert "moe/layer1/drop_frac" in rows[-1] and "aux/importance" in rows[-1]
    assert "val_loss" in result
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert set(report["tasks"]) == {"digits_cls", "translate_en_de"}
    assert {"accuracy", "log_ppl"} <= set(report["tasks"]["digits_cls"]["metrics"])
    assert {"token_accuracy", "accuracy", "bleu"} <= set(report["tasks"]["translate_en_de"]["metrics"])
    final = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "final/tasks/digits_cls/metrics/accuracy" in final


def test_multimodel_resume_continues_the_same_run(tmp_path):
    steps = ["train.max_steps=6", "checkpoint.save_final=false"]
    a = multimodel(tmp_path / "a", *steps)
    for _ in range(3):
        a.train_step()
    a.save_checkpoint()
    losses_a = [a.train_step().loss for _ in range(3)]
    a.metrics.close()
    b = multimodel(tmp_path / "a", *steps)  # resumes from step 3 of the same run dir, RNG included
    assert b.step == 3 and b.task.batches_drawn == 3
    assert [b.train_step().loss for _ in range(3)] == pytest.approx(losses_a, rel=1e-5)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    b.metrics.close()


def _fixed_batches(trainer):
    """One classification batch (only the encoder's MoE runs) and one translation batch (both)."""
    from moe_scale.data.multimodel.tasks import collate

    return [collate(t.spec, t.train[:8]) for t in trainer.task.tasks]


def _eval_losses(trainer) -> list[float]:
    trainer.model.eval()
    with torch.no_grad():
        return [float(trainer.task.loss(trainer.model, b, trainer.rt.device).total)
                for b in _fixed_batches(trainer)]


def _ep_rank(rank, world, run_dir):
    cfg = load_config(CONFIGS / "multimodel_debug.yaml", [*MM_TINY, f"train.run_dir={run_dir}", "parallel.ep_size=2",
                                                          "train.max_steps=4"])
    trainer = Trainer(cfg, Runtime(rank, world, rank, torch.device("cpu")))
    assert trainer.mesh.ep_size == 2
    before = _eval_losses(trainer)
    trainer.train_step()  # a training step runs through DDP (unused modality nets) and the all-to-all
    trainer.metrics.close()
    return before


def test_multimodel_ep1_and_ep2_give_the_same_loss(tmp_path):
    one = multimodel(tmp_path / "one", "train.max_steps=4")
    expected = _eval_losses(one)
    one.metrics.close()
    for rank_losses in run_local(_ep_rank, 2, tmp_path / "two", timeout=120):
        assert rank_losses == pytest.approx(expected, rel=1e-5)


def test_selector_trains_and_reports_diversity(tmp_path):
    cfg = load_config(CONFIGS / "selector_debug.yaml",
                      [*SEL_TINY, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=30", "logging.every=10"])
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"selector_loss", "generator_loss", "wins/expert0"} <= set(rows[-1])
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert {"top1_bleu", "oracle_bleu", "self_bleu"} <= set(report)
    assert report["oracle_bleu"] >= report["top1_bleu"]
    assert sum(report["expert_wins"]) == 30 * 16 and len(report["expert_wins"]) == 3


@pytest.mark.parametrize("overrides, message", [
    (["model.name=nope"], "model.name must be one of"),
    (["model.n_layers=2"], "unknown key model.n_layers"),
    (["data.tasks=[digits_cls,nope]"], "unknown task"),
    (["moe.aux_loss.switch=0.01"], "moe.aux_loss.switch=0"),
    (["parallel.ep_size=3"], "must divide moe.num_experts"),
])
def test_multimodel_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "multimodel_debug.yaml", overrides)


def test_selector_config_errors():
    with pytest.raises(ConfigError, match="parallel.ep_size=1"):
        load_config(CONFIGS / "selector_debug.yaml", ["parallel.ep_size=2"])
    with pytest.raises(ConfigError, match="unknown key data.seq_len"):
        load_config(CONFIGS / "selector_debug.yaml", ["data.seq_len=3"])
