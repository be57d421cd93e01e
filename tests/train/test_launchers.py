"""Launchers: scripts and configs are well formed; torchrun / deepspeed / accelerate runs are in
test_trainer.py, test_deepspeed.py and below; the runtime reads every launcher's rank variables."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from moe_scale.distributed.launch import RankFailure, run_local, run_with_progress
from moe_scale.train.runtime import launcher_ranks
from tests.trainer_utils import CONFIGS, REPO, cli_env, read_jsonl, tiny

LAUNCHER = REPO / "launcher"


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_scripts_parse_and_are_executable(script):
    path = LAUNCHER / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & 0o111


def test_slurm_script_runs_torchrun_per_node():
    text = (LAUNCHER / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--rdzv-id=\"$SLURM_JOB_ID\"" in text
    assert "-m moe_scale.cli train" in text


def test_multi_node_torchrun_needs_a_rendezvous_endpoint():
    env = cli_env(NNODES="2", NPROC_PER_NODE="1", PYTHON=sys.executable)
    env.pop("RDZV_ENDPOINT", None)
    proc = subprocess.run([str(LAUNCHER / "torchrun.sh"), str(CONFIGS / "lm_debug.yaml")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr


def test_hostfiles_and_accelerate_configs():
    for line in (LAUNCHER / "hostfile").read_text().splitlines():
        assert line.startswith("#") or len(line.split()) == 2 and line.split()[1].startswith("slots=")
    cpu = yaml.safe_load((LAUNCHER / "accelerate_multi_cpu.yaml").read_text())
    assert cpu["distributed_type"] == "MULTI_CPU" and cpu["use_cpu"] is True
    assert (REPO / cpu["mpirun_config"]["mpirun_hostfile"]).read_text().strip() == "localhost slots=2"
    gpu = yaml.safe_load((LAUNCHER / "accelerate_multi_gpu.yaml").read_text())
    assert gpu["distributed_type"] == "MULTI_GPU" and gpu["mixed_precision"] == "no"


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),  # torchrun, deepspeed
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, 2, 1)),
    ({"PMI_RANK": "5", "PMI_SIZE": "6"}, (5, 6, 5)),  # Intel MPI / MPICH
])
def test_launcher_rank_variables(env, expected):
    assert launcher_ranks(env) == expected


def _free_port() -> int:
    with socket.socket() as s:  # accelerate's mpirun path takes a port, not "0": ask the OS for one
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="accelerate's MULTI_CPU launch needs mpirun (openmpi-bin)")
def test_accelerate_multi_cpu_launch_runs_two_ranks(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCHER / "accelerate_multi_cpu.yaml"), "--main_process_port", str(_free_port()),
           "-m", "moe_scale.cli", "train", str(CONFIGS / "lm_cpu_multirank.yaml"),
           *tiny(run, "train.max_steps=5", "data.batch_size=4")]
    env = cli_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = run_with_progress(cmd, 240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["tokens_seen"] == 5 * 4 * 32 * 2  # steps x batch x seq_len x 2 ranks
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000005").glob("rank_*.json")) == \
        ["rank_0.json", "rank_1.json"]


def _busy(rank: int, world: int, seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return rank


def _one_rank_sleeps(rank: int, world: int) -> int:
    import torch.distributed as dist

    if rank == 1:
        time.sleep(30)
    dist.barrier()
    return rank


def test_run_local_lets_working_ranks_run_past_the_timeout():
    """A slow (or slowed-down) run keeps going while its ranks use CPU time."""
    assert run_local(_busy, 2, 6.0, timeout=3.0) == [0, 1]


def test_run_local_stops_ranks_that_make_no_progress():
    started = time.monotonic()
    with pytest.raises(RankFailure, match="no progress"):
        run_local(_one_rank_sleeps, 2, timeout=3.0)
    assert time.monotonic() - started < 25


def test_run_with_progress_follows_cpu_time_not_wall_time():
    busy = [sys.executable, "-c", "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass"]
    assert run_with_progress(busy, 2.0).returncode == 0  # 4 s of work against a 2 s stall timeout
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_with_progress([sys.executable, "-c", "import time; time.sleep(60)"], 2.0)
    assert time.monotonic() - started < 30
