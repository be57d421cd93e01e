"""Clean 2-rank gloo runs must all exit: run N short torchrun jobs, each bounded in time.

    python benchmarks/exit_loop.py --runs 50 [--steps 4] [--timeout 300]

A run that does not exit within --timeout is killed; it counts as hung at exit when rank 0 had
finished training (then the stuck ranks' c10d frames are shown, if gdb is installed), else as
too slow. Prints one line per run and a summary; exits 1 if any run hung or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
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
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ranks = _descendants(proc.pid)
            out.seek(0)
            finished = "done: step" in out.read()  # rank 0 finished training: what remains is the exit
            stacks = [_teardown_frames(pid) for pid in ranks] if finished else []
            for pid in [*ranks, proc.pid]:  # torchrun starts its ranks in their own sessions
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            status = "hung at exit" if finished else "timed out before the end of training (too slow?)"
            return status + "".join(f"\n    {s}" for s in stacks if s), time.monotonic() - t0
        out.seek(0)
        last = out.read().strip().splitlines()[-1:]
    status = "ok" if proc.returncode == 0 else f"rc={proc.returncode}: {last}"
    return status, time.monotonic() - t0


def _teardown_frames(pid: int) -> str:
    """The process-group and reducer frames of a stuck rank's threads (needs gdb; else empty)."""
    try:
        trace = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 16"],
                               capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    frames = sorted({m for m in re.findall(r"c10d::\w+::~?\w+", trace)})
    return f"pid {pid}: {', '.join(frames)}" if frames else ""


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
    hung = sum(r.startswith("hung") for r in results)
    print(f"{ok} of {args.runs} runs exited cleanly; {hung} hung at exit")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
