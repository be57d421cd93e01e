"""The layer's CPU step against the floor, for two revisions of the code, in one run.

    python benchmarks/compare_revisions.py --old 470167c --rows 8:4096:128 64:16384:128

Each revision is checked out into a temporary git worktree; every (trial, row, dtype, revision)
runs in a fresh interpreter with that worktree first on PYTHONPATH, one intra-op thread, and
measures CPU time (`time.process_time`) of forward + backward steps of the layer and of the
floor (the router GEMM plus the expert GEMMs with the k*S rows spread evenly, one `bmm` each way),
both in the same process, after warm-up. Trials interleave the revisions. The layer is built the
same way for both (`MoELayer(d, E, k=2, router="topk", capacity_factor=1.25, activation="relu",
d_hidden=4d)`), plus `--new-options` for the new revision (e.g. `backend=cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from moe_scale.moe import MoELayer
E, S, d = (int(v) for v in sys.argv[1].split(":"))
dtype = getattr(torch, sys.argv[2])
options = json.loads(sys.argv[3])
steps, warmup = int(sys.argv[4]), 3
torch.manual_seed(0)
layer = MoELayer(d, E, k=2, router="topk", capacity_factor=1.25, activation="relu", d_hidden=4 * d, **options)
layer = layer.to(dtype)
x = torch.randn(S, d, dtype=dtype, requires_grad=True)
g = torch.randn(S, d, dtype=dtype)
w_gate = torch.randn(d, E, dtype=dtype, requires_grad=True)
rows = 2 * S // E
w1 = torch.randn(E, d, 4 * d, dtype=dtype, requires_grad=True)
w2 = torch.randn(E, 4 * d, d, dtype=dtype, requires_grad=True)
xe = torch.randn(E, rows, d, dtype=dtype, requires_grad=True)

def layer_step():
    y, stats = layer(x)
    ((y * g).sum() + stats.aux_loss).backward()

def floor_step():
    logits = x @ w_gate
    y = torch.bmm(torch.relu(torch.bmm(xe, w1)), w2)
    (logits.sum() + y.sum()).backward()

def cpu_ms(fn):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1e3)
    return sorted(times)[len(times) // 2]

print(json.dumps({"layer_ms": cpu_ms(layer_step), "floor_ms": cpu_ms(floor_step)}))
"""


def _worktree(rev: str, tmp: Path) -> Path:
    path = tmp / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="git revision of the old code")
    p.add_argument("--new", default="HEAD", help="git revision of the new code (default HEAD)")
    p.add_argument("--new-options", default='{"backend": "cpu"}', help="JSON MoELayer options for the new code")
    p.add_argument("--rows", nargs="+", default=["8:4096:128", "64:16384:128"], help="E:S:d")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare_revisions.json"))
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="moe_scale_revs_") as tmp:
        trees = {"old": _worktree(args.old, Path(tmp)), "new": _worktree(args.new, Path(tmp))}
        options = {"old": "{}", "new": args.new_options}
        try:
            for row in args.rows:
                for dtype in args.dtypes:
                    ratios = {"old": [], "new": []}
                    for trial in range(args.trials):
                        for rev in ("old", "new"):
                            env = {**os.environ, "PYTHONPATH": str(trees[rev]), "OMP_NUM_THREADS": "1"}
                            out = subprocess.run([sys.executable, "-c", WORKER, row, dtype, options[rev],
                                                  str(args.steps)], env=env, capture_output=True, text=True,
                                                 timeout=1800)
                            if out.returncode:
                                raise SystemExit(f"{rev} {row} {dtype}: {out.stderr[-2000:]}")
                            r = json.loads(out.stdout.strip().splitlines()[-1])
                            ratios[rev].append(r["layer_ms"] / r["floor_ms"])
                            results.append({"row": row, "dtype": dtype, "trial": trial, "revision": rev, **r})
                            print(f"{row} {dtype} trial {trial} {rev}: layer {r['layer_ms']:.1f} ms, "
                                  f"floor {r['floor_ms']:.1f} ms, x{r['layer_ms'] / r['floor_ms']:.2f}", flush=True)
                    old, new = statistics.median(ratios["old"]), statistics.median(ratios["new"])
                    print(f"== {row} {dtype}: x floor old {old:.2f}, new {new:.2f}, change {new - old:+.2f}",
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    Path(args.out).write_text(json.dumps({"old": args.old, "new": args.new, "new_options": args.new_options,
                                          "protocol": "CPU time, 1 thread, median of steps; see docstring",
                                          "rows": results}, indent=1))


if __name__ == "__main__":
    main()
