"""Clean 2-rank gloo runs must all exit: run N short torchrun jobs, each bounded in time.

    python benchmarks/exit_loop.py --runs 50 [--steps 4] [--timeout 300]

A run that does not exit within --timeout (a rank stuck in process-group teardown) counts as
hung and is killed. Prints one line per run and a summary; exits 1 if any run hung or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(run_dir: Path, steps: int, timeout: float) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", "-m", "moe_scale.cli", "train", str(REPO / "configs/lm_cpu_multirank.yaml"),
           f"train.max_steps={steps}", "optim.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1",
           "data.max_documents=40", "logging.progress=false", "checkpoint.every=0", f"train.run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun starts its ranks in their own sessions
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            return "hung", time.monotonic() - t0
        err.seek(0)
        last = err.read().strip().splitlines()[-1:]
    status = "ok" if proc.returncode == 0 else f"rc={proc.returncode}: {last}"
    return status, time.monotonic() - t0


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take before it counts as hung")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            status, seconds = one_run(Path(tmp) / f"run{i}", args.steps, args.timeout)
            results.append(status)
            print(f"run {i + 1:3d}/{args.runs}: {status} ({seconds:.1f} s)", flush=True)
    ok = results.count("ok")
    print(f"{ok} of {args.runs} runs exited cleanly; {results.count('hung')} hung")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
