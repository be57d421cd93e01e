"""The expert-parallel benchmark runs end to end on tiny shapes (1 and 2 ranks, both layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.peers
@pytest.mark.timeout(180)
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "ep.json"
    args = ["--ranks", "1", "2", "--steps", "1", "--warmup", "0", "--tokens-per-rank", "64",
            "--d-model", "16", "--d-hidden", "32", "--experts-per-rank", "2", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), *args],
                   check=True, env=env, timeout=170, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["ranks"]) for r in rows] == [("moe_scale", 1), ("moe_scale", 2), ("deepspeed", 1), ("deepspeed", 2)]
    two = next(r for r in rows if r["impl"] == "moe_scale" and r["ranks"] == 2)
    assert two["a2a_mb"] > 0 and two["cpu_ms"] > 0 and "speedup_vs_deepspeed_cpu" in two
    assert (tmp_path / "ep.md").read_text().startswith("Weak scaling")
