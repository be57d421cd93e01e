"""The expert MLP's six bf16 GEMMs: csrc/bf16_gemm.cpp against ATen (oneDNN), one thread.

For one expert block of `rows` tokens (d -> h -> d): the up and down products of the forward
(ReLU fused in ours, ATen's `relu_` kernel after its GEMM), the hidden gradient with ReLU's
backward (fused in ours), both weight gradients and the input gradient. Each product is
timed on the same operands every call ("warm": they stay in cache) and cycling through 16
sets of operands ("cold": each call meets operands evicted from the caches, as the span loop
does expert after expert). Median of the timed calls; ratios are ours / ATen's.

    python benchmarks/bf16_gemm.py
    python benchmarks/bf16_gemm.py --rows 512 --d 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from moe_scale.moe.cpu.kernels import load_kernels


def _median_us(fn, sets, calls: int) -> float:
    it = itertools.cycle(sets)
    for _ in range(len(sets)):
        fn(next(it))
    times = []
    for _ in range(calls):
        s = next(it)
        t0 = time.perf_counter()
        fn(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_gemm.json"))
    args = p.parse_args()
    kernels = load_kernels()
    probe = torch.zeros(1, 2, 2, dtype=torch.bfloat16)
    if kernels is None or not kernels.can_run_native_bf16_gemm(probe[0], probe):
        raise SystemExit("the native bf16 GEMM is not built for this CPU (needs AVX512-BF16)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    M, d, h, bf = args.rows, args.d, 4 * args.d, torch.bfloat16

    def operands():
        return dict(x=torch.randn(M, d, dtype=bf), w1=torch.randn(d, h, dtype=bf), w2=torch.randn(h, d, dtype=bf),
                    a=torch.randn(M, h, dtype=bf).relu(), gy=torch.randn(M, d, dtype=bf),
                    ga=torch.randn(M, h, dtype=bf), out_h=torch.empty(M, h, dtype=bf),
                    out_d=torch.empty(M, d, dtype=bf), g_w1=torch.empty(d, h, dtype=bf),
                    g_w2=torch.empty(h, d, dtype=bf))

    products = {
        "up + relu": (lambda s: kernels.bf16_mm(s["out_h"], s["x"], s["w1"], None, True),
                      lambda s: kernels.relu_(torch.mm(s["x"], s["w1"], out=s["out_h"]))),
        "down": (lambda s: kernels.bf16_mm(s["out_d"], s["a"], s["w2"], None, False),
                 lambda s: torch.mm(s["a"], s["w2"], out=s["out_d"])),
        "hidden grad + relu backward": (
            lambda s: kernels.bf16_mm_t(s["out_h"], s["gy"], s["w2"], s["a"], False),
            lambda s: kernels.relu_backward_(torch.mm(s["gy"], s["w2"].t(), out=s["out_h"]), s["a"])),
        "weight grad down": (lambda s: kernels.bf16_wgrad(s["g_w2"], s["a"], s["gy"]),
                             lambda s: torch.mm(s["a"].t(), s["gy"], out=s["g_w2"])),
        "weight grad up": (lambda s: kernels.bf16_wgrad(s["g_w1"], s["x"], s["ga"]),
                           lambda s: torch.mm(s["x"].t(), s["ga"], out=s["g_w1"])),
        "input grad": (lambda s: kernels.bf16_mm_t(s["out_d"], s["ga"], s["w1"], None, False),
                       lambda s: torch.mm(s["ga"], s["w1"].t(), out=s["out_d"])),
    }
    warm, cold = [operands()], [operands() for _ in range(16)]
    rows = []
    for name, (ours, aten) in products.items():
        row = {"product": name}
        for label, sets in (("warm", warm), ("cold", cold)):
            row[f"{label}_ours_us"] = round(_median_us(ours, sets, args.calls), 1)
            row[f"{label}_aten_us"] = round(_median_us(aten, sets, args.calls), 1)
            row[f"{label}_ratio"] = round(row[f"{label}_ours_us"] / row[f"{label}_aten_us"], 3)
        rows.append(row)
        print(f"{name:28s} warm {row['warm_ours_us']:7.1f} vs {row['warm_aten_us']:7.1f} us ({row['warm_ratio']:.2f}x)"
              f"   cold {row['cold_ours_us']:7.1f} vs {row['cold_aten_us']:7.1f} us ({row['cold_ratio']:.2f}x)")
    totals = {label: round(sum(r[f"{label}_ours_us"] for r in rows) / sum(r[f"{label}_aten_us"] for r in rows), 3)
              for label in ("warm", "cold")}
    print(f"all six: warm {totals['warm']:.2f}x, cold {totals['cold']:.2f}x of ATen's time")
    result = {"rows_per_expert": M, "d": d, "h": h, "threads": 1, "products": rows, "total_ratio": totals}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
