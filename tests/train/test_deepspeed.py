"""DeepSpeed backend: ZeRO-2 with dense/expert AdamW groups trains and resumes from its DCP checkpoint."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.distributed as dist

from moe_scale.distributed.launch import run_with_progress
from tests.trainer_utils import CONFIGS, REPO, checkpoint_tensors, cli_env, read_jsonl, tiny

pytest.importorskip("deepspeed")

from moe_scale.train.config import load_config  # noqa: E402
from moe_scale.train.trainer import Trainer  # noqa: E402

DS = ["parallel.backend=deepspeed", f"parallel.deepspeed_config={CONFIGS / 'deepspeed' / 'zero2.json'}",
      "train.precision=fp32", "train.deterministic=true", "train.max_steps=6", "moe.router=noisy_topk",
      "moe.aux_loss.switch=0", "moe.aux_loss.load=0.1"]


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """DeepSpeed needs a process group; a one-rank gloo group through a FileStore (no port).

    One per module: DeepSpeed caches the groups it derives from the first one it sees.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCAL_RANK", "0")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    mp.undo()


def _trainer(tmp_path, name, *extra):
    return Trainer(load_config(CONFIGS / "lm_debug.yaml", tiny(tmp_path / name, *DS, *extra)))


def test_zero2_trains_and_resumes_exactly(tmp_path, one_rank_group):
    from moe_scale.train.backends import DeepSpeedBackend

    straight = _trainer(tmp_path, "straight")
    assert isinstance(straight.backend, DeepSpeedBackend)
    groups = {g["name"]: g for g in straight.optimizer.optimizer.param_groups}
    assert groups.keys() == {"dense_decay", "dense_no_decay", "experts"}
    results = [straight.train_step() for _ in range(6)]
    assert all(r.stepped for r in results) and results[-1].loss < results[0].loss
    assert all(0 < r.grad_norm < 100 for r in results)

    first = _trainer(tmp_path, "resumed")
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    first.metrics.close()
    second = _trainer(tmp_path, "resumed")
    assert second.step == 3
    for _ in range(3):
        second.train_step()
    for (name, p), q in zip(second.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(p, q), name
    straight.metrics.close()
    second.metrics.close()


def test_a_non_finite_loss_leaves_the_parameters_alone(tmp_path, one_rank_group):
    t = _trainer(tmp_path, "nan")
    t.train_step()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    real = t.backend.model

    def poisoned(x):
        logits, stats = real(x)
        return logits * float("nan"), stats

    t.backend.model = poisoned
    assert not t.train_step().stepped and t.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    t.backend.model = real
    assert t.train_step().stepped
    t.metrics.close()


def _free_port() -> int:
    # The deepspeed launcher has no "pick a free port" option: ask the OS for one just before.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [str(REPO / "launcher" / "deepspeed.sh"), str(CONFIGS / "lm_cpu_deepspeed.yaml"),
           *tiny(run, "parallel.dist_backend=gloo", "train.max_steps=6", "train.eval_every=6")]
    env = cli_env(NUM_GPUS="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
    proc = run_with_progress(cmd, 300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [5, 6] and any("val_loss" in r for r in rows)
    ck = checkpoint_tensors(run / "checkpoints" / "step_00000006")
    assert {"zero.rank_0.fp32.0", "zero.rank_1.fp32.0"} <= ck.keys()  # one ZeRO partition per rank
    assert any(k.startswith("model.") and "experts.w1" in k for k in ck)
