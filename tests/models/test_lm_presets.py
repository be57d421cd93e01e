"""The DeepSeek-V3 / OLMoE / Mixtral presets: the debug ones train a few steps on CPU, the GPU
ones are sized by `moe-scale plan`; `train.compile` compiles each block and trains the same."""

from __future__ import annotations

import math

import pytest
import torch

from moe_scale.train.config import load_config
from moe_scale.train.plan import plan
from moe_scale.train.trainer import Trainer
from tests.trainer_utils import CONFIGS, HF_CACHE, read_jsonl, tiny

PRESETS = ["deepseek_v3", "olmoe", "mixtral"]


def short(run_dir, *extra):
    return [f"train.run_dir={run_dir}", "data.max_documents=40", f"data.cache_dir={HF_CACHE}", "train.max_steps=3",
            "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=1", "checkpoint.every=0",
            "checkpoint.save_final=false", "logging.every=1", "logging.progress=false", *extra]


@pytest.mark.parametrize("name", PRESETS)
def test_debug_preset_trains(tmp_path, name):
    cfg = load_config(CONFIGS / f"{name}_debug.yaml", short(tmp_path / name))
    trainer = Trainer(cfg)
    blocks = trainer.model.blocks
    assert [b.is_moe for b in blocks] == [cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers)]
    assert (blocks[-1].ffn.shared_experts is not None) == (cfg.moe.num_shared_experts > 0)
    result = trainer.fit()
    assert math.isfinite(result["val_loss"])
    losses = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / name / "tokenizer.json").is_file()


@pytest.mark.parametrize("name, nodes", [("deepseek_v3", 1), ("olmoe", 1), ("mixtral", 2)])
def test_gpu_preset_is_sized_by_plan(name, nodes):
    cfg = load_config(CONFIGS / f"{name}_gpu.yaml")
    p = plan(cfg, nodes=nodes, gpus_per_node=8)
    assert p.active_params < p.total_params / 3  # sparse: most parameters sit in idle experts
    assert p.total_bytes < 70 * 2**30  # fits an 80 GB GPU by the plan's estimate


def test_compiled_blocks_train_like_eager_blocks(tmp_path):
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled_{compiled}"
        cfg = load_config(CONFIGS / "lm_debug.yaml", tiny(
            run, "model.arch=llama", "model.n_kv_heads=1", "moe.activation=swiglu", "moe.dropless=true",
            "train.max_steps=3", "optim.warmup_steps=1", "logging.every=1", f"train.compile={str(compiled).lower()}"))
        trainer = Trainer(cfg)
        assert all(hasattr(b, "_compiled_call_impl") and (b._compiled_call_impl is not None) == compiled
                   for b in trainer.model.blocks)
        trainer.fit()
        runs[compiled] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(runs[True]) == 3
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), atol=2e-3, rtol=1e-3)


def test_selective_checkpointing_modes_in_the_plan_and_the_config():
    from moe_scale.train.config import TrainConfig
    from moe_scale.validation import ConfigError

    def activations(mode: str) -> float:
        return plan(load_config(CONFIGS / "olmoe_gpu.yaml", [f"train.activation_checkpointing={mode}"])).activation_bytes

    act = {mode: activations(mode) for mode in ("none", "attention", "moe", "full")}
    assert act["full"] < act["moe"] < act["none"] and act["attention"] < act["none"]
    assert TrainConfig(activation_checkpointing="true").activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="train.activation_checkpointing must be one of"):
        TrainConfig(activation_checkpointing="mlp")
