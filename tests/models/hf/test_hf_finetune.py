"""Training from converted weights: `model.init_from` (a converted run or the HF directory itself),
resuming a converted run directory, and the same steps at EP=1 and EP=2 (gloo, real processes)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe_scale.distributed.launch import run_local  # noqa: E402
from moe_scale.convert import from_hf, to_hf  # noqa: E402
from moe_scale.train.config import ConfigError, load_config  # noqa: E402
from moe_scale.train.runtime import Runtime  # noqa: E402
from moe_scale.train.trainer import Trainer  # noqa: E402
from tests.models.hf.hf_tiny import hf_logits, sample_ids, save_tiny  # noqa: E402
from tests.trainer_utils import CONFIGS, HF_CACHE  # noqa: E402

TOL = 1e-4
STEPS = 3


def _config(run_dir, init_from, *extra):
    return load_config(CONFIGS / "finetune_debug.yaml", [
        f"model.init_from={init_from}", f"train.run_dir={run_dir}", f"data.cache_dir={HF_CACHE}",
        f"train.max_steps={STEPS}", "train.eval_every=0", "checkpoint.every=0", "logging.every=1",
        "logging.load_every=1", "logging.progress=false", "train.deterministic=true", "parallel.timeout_s=60", *extra])


def _logits(trainer, ids_BT):
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(ids_BT)[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf = save_tiny("mixtral", root / "hf")
    from_hf(hf, root / "run")
    return hf, root / "run"


@pytest.mark.parametrize("source", ["run", "hf"])
def test_init_from_starts_at_the_checkpoint_and_trains(tmp_path, converted, source):
    hf, run = converted
    trainer = Trainer(_config(tmp_path / "ft", run if source == "run" else hf))
    assert trainer.step == 0
    ids_BT = sample_ids()
    assert (_logits(trainer, ids_BT) - hf_logits(hf, ids_BT)).abs().max() < TOL
    assert (tmp_path / "ft" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    result = trainer.fit()
    assert trainer.step == STEPS and result["loss"] < 8.0
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("moe/drop_frac" in r and r["moe/drop_frac"] == 0.0 for r in rows)
    loads = [json.loads(line) for line in (tmp_path / "ft" / "expert_load.jsonl").read_text().splitlines()]
    assert loads and len(loads[-1]["tokens_per_expert"]) == 2 and len(loads[-1]["tokens_per_expert"][0]) == 4

    to_hf(tmp_path / "ft", tmp_path / "back")  # the fine-tuned weights, not the converted ones, go back
    tuned_BTV = _logits(trainer, ids_BT)
    assert (tuned_BTV - hf_logits(hf, ids_BT)).abs().max() > 1e-3
    assert (hf_logits(tmp_path / "back", ids_BT) - tuned_BTV).abs().max() < TOL


def test_a_converted_run_directory_resumes_with_a_fresh_optimizer(tmp_path, converted):
    import shutil

    hf, run = converted
    shutil.copytree(run, tmp_path / "run")
    cfg = load_config(tmp_path / "run" / "config.yaml", [
        f"data.cache_dir={HF_CACHE}", "data.max_documents=40", "data.seq_len=32", "data.batch_size=2",
        "train.max_steps=2", "optim.warmup_steps=1", "train.eval_every=0", "train.device=cpu", "logging.progress=false",
        f"train.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    ids_BT = sample_ids()
    assert trainer.step == 0 and (_logits(trainer, ids_BT) - hf_logits(hf, ids_BT)).abs().max() < TOL
    trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_a_config_that_differs_from_the_checkpoint_is_refused_by_key(tmp_path, converted):
    hf, _ = converted
    with pytest.raises(ConfigError, match="moe.d_hidden=64 but .* has 96; set moe.d_hidden=96"):
        Trainer(_config(tmp_path / "ft", hf, "moe.d_hidden=64"))


def _losses(rank: int, world: int, run_dir: str, init_from: str, ep: int) -> list[float]:
    trainer = Trainer(_config(run_dir, init_from, f"parallel.ep_size={ep}"),
                      runtime=Runtime(rank, world, rank, torch.device("cpu")))
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.metrics.close()
    return losses


def test_ep1_and_ep2_take_the_same_steps_from_converted_weights(tmp_path, converted):
    """Two ranks each: data parallel (every rank all 4 experts) and EP=2 (2 experts per rank) see
    the same batches from the same weights; each rank's loss agrees step by step.

    Tolerance: the layouts compute the same float32 sums in another order (the all-to-all
    regroups rows, the expert gradients are reduced over another group), ~1e-7 relative per
    operation; AdamW at lr 1e-4 moves the weights by ~1e-4 per step, so reordering noise in
    the updates stays orders below 1e-4 of a loss of ~6 after three steps. A wrong expert
    placement (an expert block loaded on the other rank) changes the very first loss by ~1e-1.
    """
    hf, run = converted  # each start path once: the converted run (DCP, resharded) and the HF files (sliced)
    dp = run_local(_losses, 2, str(tmp_path / "dp"), str(run), 1, timeout=150)
    ep = run_local(_losses, 2, str(tmp_path / "ep"), str(hf), 2, timeout=150)
    for rank in range(2):
        assert dp[rank][0] != dp[rank][-1]  # the steps moved the weights
        for a, b in zip(dp[rank], ep[rank]):
            assert abs(a - b) < 1e-4, (rank, dp, ep)
