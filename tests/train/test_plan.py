"""`moe-scale plan`: exact parameter counts, memory and all-to-all estimates that scale as they should."""

from __future__ import annotations

import pytest

from moe_scale.cli import main
from moe_scale.train.config import load_config
from moe_scale.validation import ConfigError
from moe_scale.train.plan import plan
from moe_scale.models.lm.task import build_model
from tests.trainer_utils import CONFIGS


def test_parameter_counts_match_the_model():
    cfg = load_config(CONFIGS / "lm_debug.yaml")
    p = plan(cfg, nodes=1, gpus_per_node=1)
    model = build_model(cfg)
    assert p.total_params == sum(q.numel() for q in model.parameters())
    E, k = cfg.moe.num_experts, cfg.moe.k
    assert p.active_params == p.dense_params + p.expert_params * k // E < p.total_params
    assert p.a2a_bytes_per_step == 0  # one rank holds every expert


def test_expert_parallelism_divides_expert_memory_and_costs_traffic():
    one = plan(load_config(CONFIGS / "lm_gpu_1node.yaml", ["parallel.ep_size=1"]), 1, 8)
    eight = plan(load_config(CONFIGS / "lm_gpu_1node.yaml"), 1, 8)
    assert eight.ep_size == 8 and eight.edp_size == 1
    assert eight.weights_bytes == pytest.approx(4 * (eight.dense_params + eight.expert_params / 8))
    assert one.weights_bytes > 5 * eight.weights_bytes
    assert one.a2a_bytes_per_step == 0 < eight.a2a_bytes_per_step


def test_zero_partitions_optimizer_state():
    ds = plan(load_config(CONFIGS / "lm_gpu_deepspeed.yaml"), 2, 8)
    torch_ = plan(load_config(CONFIGS / "lm_gpu_deepspeed.yaml", ["parallel.backend=torch"]), 2, 8)
    assert ds.zero_stage == 2
    assert ds.optimizer_bytes == pytest.approx(torch_.optimizer_bytes / 16)
    assert ds.grads_bytes == pytest.approx(torch_.grads_bytes / 16)


def test_activation_checkpointing_saves_activation_memory():
    on = plan(load_config(CONFIGS / "lm_gpu_1node.yaml"), 1, 8)
    off = plan(load_config(CONFIGS / "lm_gpu_1node.yaml", ["train.activation_checkpointing=false"]), 1, 8)
    assert on.activation_bytes < off.activation_bytes / 2


def test_layout_errors_and_cli(capsys):
    with pytest.raises(ConfigError, match="parallel.ep_size=8 must divide the world size 4"):
        plan(load_config(CONFIGS / "lm_gpu_1node.yaml"), 1, 4)
    assert main(["plan", str(CONFIGS / "lm_gpu_multinode.yaml"), "--nodes", "4", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "32 = EP 16 x EDP 2" in out and "all-to-all per rank per step" in out and "activations" in out
