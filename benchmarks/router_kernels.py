"""Softmax top-k router, forward + backward on CPU: the CPU backend's fused kernels vs the core path.

Times the softmax top-k of the `topk` / `switch` layers (logits GEMM, top-k, softmax,
log-sum-exp, probability column sums, and the logit gradient with its two GEMMs) as the CPU
backend runs it (`moe_scale.moe.cpu.router.fused_softmax_topk`, moe/cpu/csrc/router_kernels.cpp;
mode "fused") and as the core path runs it (`moe_scale.moe.routing.softmax_topk`; mode
"eager"), each in its own process, interleaved, median of the timed steps per process and the
median over trials. Every process calls `keep_freed_host_memory()` first, as the layer
benchmark does.

    python benchmarks/router_kernels.py                       # E=4096 S=16384 d=64, both dtypes
    python benchmarks/router_kernels.py --shape 8192:65536:64 --trials 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("auto", "eager")  # the CPU backend's fused router, the core path's


def _worker(E: int, S: int, d: int, dtype_name: str, k: int, warmup: int, repeats: int, mode: str) -> None:
    import importlib

    import torch
    from moe_layer import median_step_seconds  # benchmarks/ is on sys.path: this file runs as a script
    from moe_scale.distributed.host_memory import keep_freed_host_memory
    from moe_scale.moe.cpu.kernels import kernels_for
    from moe_scale.moe.routing import softmax_topk

    cpu_router = importlib.import_module("moe_scale.moe.cpu.router")

    keep_freed_host_memory()
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(S, d, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(d, E, dtype=dtype)).requires_grad_()
    fused = mode == "auto" and kernels_for(x) is not None

    def route():
        if fused:
            weight, _, prob_sum, lse_sq, _ = cpu_router.fused_softmax_topk(x, w, k, True)
            return weight, prob_sum, lse_sq
        weight, _, prob_sum, lse = softmax_topk(x, w, k, True)
        return weight, prob_sum, (lse * lse).sum()

    def step():
        weight, prob_sum, lse_sq = route()
        (weight.sum() + 1e-3 * prob_sum.sum() + 1e-3 * lse_sq).backward()

    time_s = median_step_seconds(step, warmup, repeats)
    print("RESULT " + json.dumps({"fused": fused, "time_s": time_s}), flush=True)


def _run(mode: str, args, dtype: str) -> dict:
    E, S, d = args.shape
    cmd = [sys.executable, __file__, "--worker", str(E), str(S), str(d), dtype, "--k", str(args.k),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--mode", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096:16384:64", help="E:S:d")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", nargs=4, metavar=("E", "S", "D", "DTYPE"))
    p.add_argument("--mode", choices=MODES, default="auto", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "router_kernels.json"))
    args = p.parse_args()
    if args.worker:
        E, S, d, dtype = args.worker
        _worker(int(E), int(S), int(d), dtype, args.k, args.warmup, args.repeats, args.mode)
        return
    args.shape = tuple(int(v) for v in args.shape.split(":"))
    rows = []
    print("| E | S | d | dtype | fused ms | eager ms | eager / fused (per trial) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        trials = {m: [] for m in MODES}
        for _ in range(args.trials):
            for mode in MODES:
                trials[mode].append(_run(mode, args, dtype))
        if not all(r["fused"] for r in trials["auto"]):
            print(f"warning: the fused kernels were not used for {dtype} (no compiler?)", file=sys.stderr)
        fused = statistics.median(r["time_s"] for r in trials["auto"])
        eager = statistics.median(r["time_s"] for r in trials["eager"])
        ratios = [e["time_s"] / f["time_s"] for f, e in zip(trials["auto"], trials["eager"])]
        E, S, d = args.shape
        rows.append(dict(E=E, S=S, d=d, dtype=dtype, k=args.k, fused_s=fused, eager_s=eager, ratios=ratios))
        print(f"| {E} | {S} | {d} | {dtype} | {fused * 1e3:.1f} | {eager * 1e3:.1f} | {eager / fused:.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"trials": args.trials, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
