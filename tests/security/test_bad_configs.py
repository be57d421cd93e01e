"""Bad configs and bad surroundings end with one line naming the key or path and the fix (rc 2),
before the run dir is made or data read, and with no traceback unless --debug."""

from __future__ import annotations

import errno
import multiprocessing as mp
import tempfile
from pathlib import Path

import pytest
import torch

from moe_scale.cli import main
from moe_scale.train import checkpoint as ckpt_mod
from moe_scale.train.config import load_config
from moe_scale.validation import ConfigError
from tests.trainer_utils import CONFIGS, tiny

DEBUG = str(CONFIGS / "lm_debug.yaml")


def _train(capsys, config: str, *overrides: str, debug: bool = False) -> tuple[int, str]:
    rc = main([*(["--debug"] if debug else []), "train", config, *overrides])
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name, text, message", [
    ("empty.yaml", "", "is empty; give its sections"),
    ("comments.yaml", "# nothing here\n", "is empty; give its sections"),
    ("dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice (lines 2 and 3); keep one of them"),
    ("dup_section.yaml", "train:\n  max_steps: 3\ntrain:\n  seed: 1\n", "key 'train' is given twice (lines 1 and 3)"),
    ("latin1.yaml", b"train:\n  run_dir: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 21); save it as UTF-8"),
])
def test_bad_config_files_are_refused_with_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)
    rc, stderr = _train(capsys, str(path), *tiny(tmp_path / "run"))
    assert rc == 2 and message in _one_line(stderr)
    assert not (tmp_path / "run").exists()


def test_a_directory_as_config_is_refused(tmp_path, capsys):
    rc, err = _train(capsys, str(CONFIGS))
    assert rc == 2 and f"config {CONFIGS} is a directory; give a YAML file" in _one_line(err)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {max_steps: 30, seed: 1}\n  seed: 2\n")
    cfg = load_config(path)
    assert cfg.train.max_steps == 30 and cfg.train.seed == 2


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "optim.lr=inf", "optim.lr=-.inf",
                                      "moe.capacity_factor=.inf", "optim.betas=[0.9, .nan]"])
def test_non_finite_numbers_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}(\[1\])? must be a finite number"):
        load_config(DEBUG, [override])


@pytest.mark.parametrize("override", ["moe.num_experts=50000000", "model.d_model=1000000"])
def test_absurd_sizes_are_refused_from_the_plan_before_any_work(tmp_path, capsys, override):
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run"), override)
    line = _one_line(err)
    assert rc == 2 and "GiB per rank" in line and "see moe-scale plan" in line and override in line
    assert not (tmp_path / "run").exists()


def test_ep_size_beyond_the_ranks_is_refused_before_the_run_dir(tmp_path, capsys):
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run"), "parallel.ep_size=2")
    assert rc == 2
    assert "parallel.ep_size=2 needs a multiple of 2 ranks, this job has 1" in _one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run"), "train.device=cuda")
    assert rc == 2 and "train.device=cuda but CUDA is not available" in _one_line(err)
    assert not (tmp_path / "run").exists()


def test_a_missing_dataset_names_data_dataset(tmp_path, capsys):
    missing = tmp_path / "no_such_corpus"
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run"), f"data.dataset={missing}")
    assert rc == 2 and f"data.dataset='{missing}' cannot be read" in _one_line(err)


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    def full_disk(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(ckpt_mod.FileSystemWriter, "write_data", full_disk)
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run", "optim.warmup_steps=0", "train.max_steps=1"))
    line = _one_line(err)
    assert rc == 2 and "saving checkpoint step_00000001 failed: OSError: [Errno 28] No space left on device" in line
    assert "free space or fix permissions under" in line
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run2", "optim.warmup_steps=0", "train.max_steps=1"), debug=True)
    assert rc == 2 and "Traceback" in err  # --debug shows where


def test_a_full_disk_under_the_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    from moe_scale.train.metrics import MetricsLogger

    def full_disk(self, step, values):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "metrics.jsonl"))

    monkeypatch.setattr(MetricsLogger, "log", full_disk)
    rc, err = _train(capsys, DEBUG, *tiny(tmp_path / "run", "optim.warmup_steps=0", "train.max_steps=5"))
    line = _one_line(err)
    assert rc == 2 and f"No space left on device ({tmp_path / 'run' / 'metrics.jsonl'}); free space there" in line


def _rank(rank: int, store: str, lr: float, out) -> None:
    import torch.distributed as dist

    from moe_scale.train.preflight import check_same_config
    from moe_scale.train.runtime import Runtime

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        check_same_config(load_config(DEBUG, [f"optim.lr={lr}"]), Runtime(rank, 2, rank, torch.device("cpu")))
        out.put((rank, "ok"))
    except ConfigError as err:
        out.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_configs_are_stopped():
    """Every rank stops, naming the key; ranks with equal configs pass (every multi-rank run checks)."""
    lrs = (1e-3, 2e-3)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = Path(tempfile.mkdtemp()) / "store"
    procs = [ctx.Process(target=_rank, args=(r, str(store), lrs[r], out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=240) for _ in procs)  # two interpreter starts, on a machine that may be loaded
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r in range(2):
        assert "optim.lr: 0.001 on rank 0, 0.002 on rank 1" in results[r], results[r]
        assert "launch every rank with the same config" in results[r]
