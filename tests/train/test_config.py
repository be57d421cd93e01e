"""Training configs: typed YAML + dotted overrides; bad keys and impossible combinations fail early."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from moe_scale.train.backends import deepspeed_config
from moe_scale.train.config import Config, load_config, parse_override, save_config
from moe_scale.validation import ConfigError
from tests.trainer_utils import CONFIGS, cli

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"lm_debug.yaml", "lm_cpu_multirank.yaml"} <= names
    assert any("gpu" in n for n in names)
    assert len(list((CONFIGS / "deepspeed").glob("*.json"))) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    if cfg.parallel.deepspeed_config:
        ds_path = Path(__file__).resolve().parents[2] / cfg.parallel.deepspeed_config
        ds = deepspeed_config(str(ds_path), micro_batch=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
                              grad_clip=cfg.optim.grad_clip, bf16=False, world_size=8)
        assert ds["zero_optimization"]["stage"] in (1, 2)


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_merges(path):
    ds = deepspeed_config(str(path), micro_batch=4, grad_accum=2, grad_clip=1.0, bf16=True, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] in (1, 2)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "lm_debug.yaml", [
        "moe.num_experts=64", "optim.lr=3e-4", "optim.betas=0.8,0.99", "train.deterministic=true",
        "moe.aux_loss.importance=0.1", "logging.wandb_name=007", "data.max_documents=null", "moe.d_hidden=96",
    ])
    assert cfg.moe.num_experts == 64 and isinstance(cfg.moe.num_experts, int)
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.deterministic is True
    assert cfg.moe.aux_loss.importance == 0.1 and cfg.moe.aux_loss.switch == 0.01  # file value kept
    assert cfg.logging.wandb_name == "007"  # a str field keeps the raw text
    assert cfg.data.max_documents is None
    assert cfg.moe_config().d_hidden == 96


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "lm_debug.yaml", ["moe.num_experts=16", "optim.betas=[0.9, 0.98]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("override, message", [
    ("moe.num_expert=64", "unknown key moe.num_expert; did you mean moe.num_experts?"),
    ("optim.learning_rate=1", "unknown key optim.learning_rate"),
    ("modle.d_model=64", "unknown key modle; did you mean model?"),
    ("moe.aux_loss.swtch=0.1", "unknown key moe.aux_loss.swtch; did you mean moe.aux_loss.switch?"),
    ("train.max_steps=ten", "train.max_steps must be an integer, got 'ten'"),
    ("train.deterministic=maybe", "train.deterministic must be true or false"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("moe.router=soft", "router must be one of"),
    ("parallel.backend=jax", "parallel.backend must be one of"),
    ("optim.betas=0.9", "optim.betas must be a list of 2 values"),
    ("model.d_model", "must look like section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "lm_debug.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=128"], "data.seq_len=128 exceeds model.max_seq_len=64; raise model.max_seq_len or lower data.seq_len"),
    (["model.n_heads=5"], "model.d_model=96 is not divisible by model.n_heads=5"),
    (["moe.k=9"], "k=9 exceeds num_experts=8"),
    (["moe.router=switch"], "the switch router is top-1: set k=1"),
    (["parallel.ep_size=3"], "parallel.ep_size=3 must divide moe.num_experts=8"),
    (["moe.router=min_loss", "moe.k=1"], "moe.router=min_loss needs per-expert losses"),
    (["moe.router=hash", "moe.k=1"], "the 'switch' aux loss is not defined for the 'hash' router"),
    (["optim.min_lr=1.0"], "optim.min_lr must be in [0, optim.lr"),
    (["optim.warmup_steps=900"], "optim.warmup_steps=900 must be below train.max_steps=800"),
    (["model.moe_every=3"], "model.moe_every=3 > model.n_layers=2 leaves no MoE layer"),
    (["model.moe_every=0", "parallel.ep_size=2"], "parallel.ep_size > 1 needs MoE layers"),
    (["parallel.backend=deepspeed"], "parallel.backend=deepspeed needs parallel.deepspeed_config"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1"),
    (["train.num_threads=-1"], "train.num_threads must be >= 0"),
])
def test_impossible_combinations_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "lm_debug.yaml", overrides)
    assert message in str(err.value)


def test_values_are_never_evaluated(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train:\n  run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, [f"train.max_steps=__import__('os').system('touch {marker}')"])
    cfg = load_config(None, [f"train.run_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert cfg.train.run_dir.startswith("!!python")  # kept as text, never constructed
    assert not marker.exists()


def test_override_parsing():
    key, value = parse_override("moe.num_experts=64")
    assert key == "moe.num_experts" and value.value == 64 and value.text == "64"


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("train", str(CONFIGS / "lm_debug.yaml"), "moe.num_expert=64", f"train.run_dir={run_dir}")
    assert proc.returncode == 2
    assert "unknown key moe.num_expert; did you mean moe.num_experts?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
