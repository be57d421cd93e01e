"""Driver of `.ci/gpu_check` (read that script's header): stages as bounded subprocesses, JSON as it goes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "grouped_mm", "collectives", "layer", "train", "cuda_tests")
LIMIT_S = {"grouped_mm": 90, "collectives": 90, "layer": 150, "train": 180, "cuda_tests": 240}
LM_TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "moe.num_experts=4", "data.batch_size=8",
           "data.max_documents=40", "train.device=cuda", "optim.warmup_steps=2", "train.eval_every=10",
           "train.eval_batches=2", "checkpoint.every=10", "logging.every=5", "logging.progress=false"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog=".ci/gpu_check", description="GPU check for a short slot on one CUDA GPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu"))
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock bound of the whole check")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="smaller layer rows and fewer training steps")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(args.only) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return args


def run(cmd, timeout_s: float, log: Path, env=None) -> tuple[int | None, str]:
    """(exit status or None on timeout, output); the output is kept in `log`."""
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {timeout_s:.0f} s]", None
        out = out if isinstance(out, str) else out.decode(errors="replace")
    log.write_text(out)
    return rc, out


def stage_env(_out, _limit, _quick) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"status": "ok", "torch": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else None, "grouped_mm": hasattr(torch, "_grouped_mm"),
            **{f"has_{m}": importlib.util.find_spec(m) is not None for m in ("deepspeed", "datasets", "pytest")}}


def _probe(name):
    def stage(out: Path, limit: float, quick: bool) -> dict:
        rc, text = run([sys.executable, ".ci/gpu_probes.py", name, *(["--quick"] if quick else [])], limit,
                       out / f"{name}.log")
        try:
            result = json.loads(text.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {"status": "failed", "reason": text[-2000:]}
        if rc is None:
            result = {"status": "failed", "reason": f"timed out after {limit:.0f} s"}
        return result

    return stage


def stage_train(out: Path, limit: float, quick: bool) -> dict:
    if importlib.util.find_spec("datasets") is None:
        return {"status": "skipped", "reason": "datasets is not installed (the LM reads its text through it)"}
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_lm_"))
    steps = 20 if quick else 40
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0", "--max-restarts=0", "-m", "moe_scale.cli", "train",
            "configs/lm_debug.yaml", *LM_TINY, f"train.run_dir={run_dir}"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    rc, first = run([*base, f"train.max_steps={steps // 2}"], limit / 2, out / "train.log", env)
    if rc != 0:
        return {"status": "failed", "phase": "first half", "tail": first[-2000:]}
    rc, second = run([*base, f"train.max_steps={steps}"], max(limit - (time.monotonic() - t0), 10),
                     out / "train_resume.log", env)
    resumed = "resumed from" in second
    losses = [float(x) for x in re.findall(r"step\s+\d+\s+loss ([\d.]+)", first + second)]
    report = run_dir / "final_metrics.json"
    return {"status": "ok" if rc == 0 and resumed else "failed", "resumed": resumed, "steps": steps,
            "losses": losses, "final": json.loads(report.read_text()) if report.is_file() else None,
            "tail": "" if rc == 0 else second[-2000:]}


def stage_cuda_tests(out: Path, limit: float, _quick) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed"}
    rc, text = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/moe/test_cuda.py"],
                   limit, out / "cuda_tests.log")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", text, re.M)
    status = "ok" if rc == 0 else ("failed" if rc is not None else "timed out")
    return {"status": status, "counts": counts, "skipped": skips, "tail": "" if rc == 0 else text[-2000:]}


RUNNERS = {"env": stage_env, "grouped_mm": _probe("grouped_mm"), "collectives": _probe("collectives"),
           "layer": _probe("layer"), "train": stage_train, "cuda_tests": stage_cuda_tests}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget_s,
              "stages": {}}
    path = out / "gpu_check.json"
    start = time.monotonic()
    cuda = stage_env(out, 0, args.quick)["cuda"]
    for name in [s for s in STAGES if s in args.only]:
        left = args.budget_s - (time.monotonic() - start)
        t0 = time.monotonic()
        if name != "env" and not cuda:
            result = {"status": "skipped", "reason": "no CUDA device"}
        elif left < 15:
            result = {"status": "skipped", "reason": f"out of time ({left:.0f} s of the budget left)"}
        else:
            result = RUNNERS[name](out, min(LIMIT_S.get(name, 30), left), args.quick)
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["stages"][name] = result
        report["seconds"] = round(time.monotonic() - start, 1)
        path.write_text(json.dumps(report, indent=1))
        print(f"{name:12s} {result['status']:8s} {result['seconds']:6.1f} s", flush=True)
    failed = [n for n, r in report["stages"].items() if r["status"] not in ("ok", "skipped")]
    print(f"wrote {path}; " + (f"failed: {failed}" if failed else "nothing failed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
