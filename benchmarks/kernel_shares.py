"""What each CPU kernel of `moe_scale/moe/cpu/` buys the layer, one kernel at a time.

The committed results (`results/kernel_shares*.json`) also have a `router` variant: the fused
softmax top-k router of the time, since deleted for making the layer at most 1.12x faster.

    python benchmarks/kernel_shares.py --rows 8:4096:128 64:16384:128 --trials 3

Variants of the same layer (top-2, capacity factor 1.25, h = 4d, ReLU), each in a fresh
single-threaded process, trials interleaved, CPU time (`time.process_time`) of forward +
backward steps (median of the timed steps after warm-up):

    core          backend="core"
    mlp           the core layer with only the span-loop expert MLP (native bf16 GEMM and ReLU
                  kernels inside it where the CPU has them)
    mlp_aten      the same with the span loop's bf16 GEMMs by ATen (MOE_SCALE_BF16_GEMM=aten)
    cpu           backend="cpu"

The ratio core / variant says how much faster the layer is with that kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("core", "mlp", "mlp_aten", "cpu")

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from moe_scale.moe import MoELayer, cpu
E, S, d = (int(v) for v in sys.argv[1].split(":"))
dtype, variant, steps = getattr(torch, sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
layer = MoELayer(d, E, k=2, router="topk", capacity_factor=1.25, activation="relu", d_hidden=4 * d, backend="core")
if variant in ("mlp", "mlp_aten", "cpu"):
    layer.experts.fused = cpu.expert_mlp
layer = layer.to(dtype)
x = torch.randn(S, d, dtype=dtype, requires_grad=True)
g = torch.randn(S, d, dtype=dtype)

def step():
    y, stats = layer(x)
    ((y * g).sum() + stats.aux_loss).backward()

for _ in range(3):
    step()
times = []
for _ in range(steps):
    t = time.process_time()
    step()
    times.append((time.process_time() - t) * 1e3)
print(json.dumps({"ms": sorted(times)[len(times) // 2]}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["8:4096:128", "64:16384:128"], help="E:S:d")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kernel_shares.json"))
    args = p.parse_args()
    rows = []
    for row in args.rows:
        for dtype in args.dtypes:
            times = {v: [] for v in VARIANTS}
            for trial in range(args.trials):
                for variant in VARIANTS:
                    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
                    if variant == "mlp_aten":
                        env["MOE_SCALE_BF16_GEMM"] = "aten"
                    out = subprocess.run([sys.executable, "-c", WORKER, row, dtype, variant, str(args.steps)],
                                         env=env, capture_output=True, text=True, timeout=1800)
                    if out.returncode:
                        raise SystemExit(f"{row} {dtype} {variant}: {out.stderr[-2000:]}")
                    times[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append({"row": row, "dtype": dtype, "trials": times, "median_ms": med,
                         "core_over": {v: med["core"] / med[v] for v in VARIANTS}})
            print(f"{row} {dtype}: " + ", ".join(f"{v} {med[v]:.1f} ms (core/{v} {med['core'] / med[v]:.2f})"
                                                 for v in VARIANTS), flush=True)
            Path(args.out).write_text(json.dumps({"protocol": "CPU time, 1 thread; see docstring", "rows": rows},
                                                 indent=1))


if __name__ == "__main__":
    main()
