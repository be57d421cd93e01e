"""The training loop: loss falls, accumulation, skipped non-finite steps, bf16, DDP on 2 processes."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from torch import nn

from moe_scale.train.config import load_config
from moe_scale.train.trainer import Trainer, TrainingDiverged
from moe_scale.distributed.launch import run_with_progress
from tests.trainer_utils import CONFIGS, HF_CACHE, REPO, checkpoint_tensors, cli_env, read_jsonl, tiny


def make_trainer(tmp_path, *overrides, name="run"):
    return Trainer(load_config(CONFIGS / "lm_debug.yaml", tiny(tmp_path / name, *overrides)))


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_debug_config_trains_and_loss_falls(tmp_path):
    cfg = load_config(CONFIGS / "lm_debug.yaml", [
        f"train.run_dir={tmp_path / 'run'}", "train.max_steps=40", "logging.every=5", "logging.progress=false",
        "train.eval_every=40", "data.max_documents=40", f"data.cache_dir={HF_CACHE}"])
    result = Trainer(cfg).fit()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[0]["step"] == 5 and rows[-1]["step"] == 40
    assert rows[0]["loss"] > 5.0  # about ln(256) = 5.55 at the start
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert result["val_loss"] < 4.5
    assert (tmp_path / "run" / "checkpoints" / "step_00000040").is_dir()
    for key in ("lr", "grad_norm", "tokens_per_s", "aux/switch", "moe/layer0/drop_frac", "moe/max_mean_load",
                "moe/dead_experts", "moe/a2a_bytes_per_step"):
        assert key in rows[-1], key


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    # The switch loss multiplies two batch means, so it is not additive over micro-batches: off here.
    same = ["moe.dropless=true", "train.deterministic=true", "moe.aux_loss.switch=0"]
    a = make_trainer(tmp_path, "data.batch_size=8", *same, name="a")
    b = make_trainer(tmp_path, "data.batch_size=4", "train.grad_accum=2", *same, name="b")
    for _ in range(3):
        ra, rb = a.train_step(), b.train_step()
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    pa, pb = params(a), params(b)
    # The two sum their gradients in different orders; Adam's normalised step turns that float32
    # noise into differences of ~1e-6 where an element's gradient is near zero (measured up
    # to 1.5e-6 on weights of magnitude ~0.08).
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=5e-6, msg=name)


class _Poison(nn.Module):
    """Wraps the model; while `on`, its logits are NaN (as a blown-up activation would make them)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.on = model, False

    def forward(self, x):
        logits, stats = self.inner(x)
        return (logits * float("nan"), stats) if self.on else (logits, stats)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    t = make_trainer(tmp_path, "train.max_skipped_steps=3", "logging.every=1")
    poison = _Poison(t.backend.model)
    t.backend.model = poison
    assert t.train_step().stepped
    before = params(t)
    poison.on = True
    result = t.train_step()
    assert not result.stepped and t.skipped_steps == 1
    after = params(t)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no update, no weight decay
    assert all(p.grad is None for p in t.model.parameters())
    poison.on = False
    assert t.train_step().stepped and t.consecutive_skips == 0
    t._log(result)
    poison.on = True
    t.train_step(), t.train_step()
    with pytest.raises(TrainingDiverged, match="3 consecutive steps had a non-finite loss"):
        t.train_step()
    assert t.skipped_steps == 4
    t.metrics.close()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["skipped_steps"] == 1.0 and rows[-1]["loss"] is None  # NaN is written as null


def test_bf16_autocast_and_activation_checkpointing_train(tmp_path):
    t = make_trainer(tmp_path, "train.precision=bf16", "train.activation_checkpointing=true", "train.max_steps=4")
    assert t.bf16 and t.model.activation_checkpointing
    losses = [t.train_step().loss for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert t.evaluate()["val_loss"] < 6.0
    t.metrics.close()


def test_dense_model_trains(tmp_path):
    t = make_trainer(tmp_path, "model.moe_every=0")
    assert not t.model.moe_layers
    assert t.train_step().stepped
    t.metrics.close()


def _torchrun(nproc, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", *args]
    return run_with_progress(cmd, timeout, cwd=REPO, env=cli_env())


def _torchrun_script(nproc, config, *overrides, timeout=240):
    """launcher/torchrun.sh: one node, rendezvous on localhost:0 (a free port)."""
    env = cli_env(NPROC_PER_NODE=str(nproc), PYTHON=sys.executable)
    return run_with_progress([str(REPO / "launcher" / "torchrun.sh"), config, *overrides], timeout, cwd=REPO, env=env)


def test_ddp_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """Dense grads through DDP, expert grads through the EDP all-reduce: the same update as one process."""
    # The switch loss is computed per rank (as in GShard and DeepSpeed) and is not additive: off here.
    # Adam's eps is raised so that an element whose gradient is ~1e-8 (where Adam's update is lr * sign(g)
    # and so amplifies float summation-order differences) does not decide the comparison.
    common = ["moe.dropless=true", "moe.aux_loss.switch=0", "train.deterministic=true", "train.max_steps=4",
              "train.eval_every=4", "optim.eps=1e-5"]
    one = run_with_progress([sys.executable, "-m", "moe_scale.cli", "train", str(CONFIGS / "lm_debug.yaml"),
                             *tiny(tmp_path / "one", "data.batch_size=8", *common)], 240, cwd=REPO, env=cli_env())
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun_script(2, str(CONFIGS / "lm_debug.yaml"),
                           *tiny(tmp_path / "two", "data.batch_size=4", "parallel.dist_backend=gloo", *common))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a = checkpoint_tensors(tmp_path / "one" / "checkpoints" / "step_00000004")
    b = checkpoint_tensors(tmp_path / "two" / "checkpoints" / "step_00000004")
    model_keys = [k for k in a if k.startswith("model.")]
    assert any("experts.w1" in k for k in model_keys)
    for k in model_keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    rows_one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    rows_two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert rows_one[-1]["val_loss"] == pytest.approx(rows_two[-1]["val_loss"], rel=1e-3)


def test_a_failing_rank_stops_every_rank_with_a_message(tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\n"
        "from moe_scale.train import trainer\n"
        "orig = trainer.Trainer.train_step\n"
        "def step(self):\n"
        "    if self.rt.rank == 1 and self.step == 2:\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return orig(self)\n"
        "trainer.Trainer.train_step = step\n"
        "from moe_scale.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    t0 = time.monotonic()
    proc = _torchrun(2, str(script), "train", str(CONFIGS / "lm_debug.yaml"),
                     *tiny(tmp_path / "run", "parallel.dist_backend=gloo", "parallel.timeout_s=30",
                           "train.max_steps=50"), timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "[rank 1] training failed" in out and "injected failure on rank 1" in out
    assert time.monotonic() - t0 < 90
