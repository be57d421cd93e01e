"""`.ci/gpu_check` on a machine without CUDA: valid bash, arguments checked, every GPU stage skipped cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer_utils import REPO

SCRIPT = REPO / ".ci" / "gpu_check"


def _run(*args: str, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    return subprocess.run([str(SCRIPT), *args], cwd="/", env=env, capture_output=True, text=True, timeout=120)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_every_gpu_stage_is_skipped_and_the_json_written(tmp_path):
    proc = _run("--budget-s", "60", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["env", "grouped_mm", "collectives", "layer", "train", "cuda_tests"]
    assert stages["env"]["status"] == "ok" and stages["env"]["cuda"] is False
    assert all(s["status"] == "skipped" and s["reason"] == "no CUDA device" for n, s in stages.items() if n != "env")


def test_an_unknown_stage_is_refused(tmp_path):
    proc = _run("--only", "env,nccl_magic", out=tmp_path)
    assert proc.returncode == 2 and "unknown stage(s) ['nccl_magic']" in proc.stderr


@pytest.mark.parametrize("probe", ["grouped_mm", "collectives", "layer"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_probes_skip_without_cuda(probe):
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "gpu_probes.py"), probe], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["status"] == "skipped"
