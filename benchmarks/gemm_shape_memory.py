"""Resident memory that each new bf16 GEMM shape costs on CPU (oneDNN's JIT-compiled kernels).

oneDNN compiles kernels for every new GEMM shape and keeps them, also per thread. This runs
the expert MLP's forward span loop (csrc/mlp_kernels.cpp: an up and a down GEMM per span)
over row counts it has not seen yet and reports the growth of the process's resident set per
new GEMM shape, when one thread runs each shape (one group: the GEMMs use every core from the
calling thread) and when two threads run it (two groups of one expert each, as the
expert-parallel loop does); with the GEMMs by ATen (oneDNN) and by csrc/bf16_gemm.cpp, which
is compiled ahead of time and should cost nothing per shape.

    python benchmarks/gemm_shape_memory.py
    python benchmarks/gemm_shape_memory.py --dtype float32 --shapes 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def _rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def kib_per_shape(kernels, groups: int, first_rows: int, shapes: int, dtype, native: bool, d: int = 128,
                  h: int = 512) -> float:
    """RSS growth per new GEMM shape over `shapes` new row counts (multiples of 64)."""
    rows_max = first_rows + 64 * shapes
    x = torch.randn(groups * rows_max, d, dtype=dtype)
    w1 = torch.randn(groups, d, h, dtype=dtype) / d**0.5
    w2 = torch.randn(groups, h, d, dtype=dtype) / h**0.5

    def run(rows: int):
        spans = torch.tensor([[g, g * rows, (g + 1) * rows, g * rows, (g + 1) * rows] for g in range(groups)])
        kernels.mlp_forward(x[: groups * rows], w1, w2, None, None, None, spans, list(range(groups + 1)), 0, native)

    run(rows_max)  # the largest buffers once, so that later growth is the kernel caches
    run(64)
    before = _rss_kib()
    for i in range(shapes):
        run(first_rows + 64 * i)
    return (_rss_kib() - before) / (2 * shapes)  # two GEMM shapes (up, down) per row count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shapes", type=int, default=30)
    p.add_argument("--groups", type=int, default=0, help=argparse.SUPPRESS)  # one measurement, in this process
    p.add_argument("--gemm", default="aten", choices=["aten", "native"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemm_shape_memory.json"))
    args = p.parse_args()
    if args.groups:
        from moe_scale.distributed.host_memory import keep_freed_host_memory
        from moe_scale.moe.cpu.kernels import load_kernels

        keep_freed_host_memory()  # freed buffers stay in the heap: the growth is the caches
        kernels = load_kernels()
        if kernels is None:
            raise SystemExit("the fused CPU kernels are not available here")
        dtype = getattr(torch, args.dtype)
        native = args.gemm == "native"
        if native and not kernels.can_run_native_bf16_gemm(torch.zeros(1, 2, dtype=dtype), torch.zeros(1, 2, 2, dtype=dtype)):
            print(-1)  # not available for this dtype / CPU
            return
        print(round(kib_per_shape(kernels, args.groups, 256, args.shapes, dtype, native)))
        return
    # Each measurement in a fresh process, over the same new row counts.
    result = {"dtype": args.dtype, "threads": torch.get_num_threads(), "new_shapes": args.shapes}
    for gemm in ("aten", "native"):
        for name, groups in (("one_thread", 1), ("two_threads", 2)):
            cmd = [sys.executable, __file__, "--dtype", args.dtype, "--shapes", str(args.shapes), "--groups", str(groups),
                   "--gemm", gemm]
            kib = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
            result[f"{gemm}_kib_per_shape_{name}"] = kib if kib >= 0 else None
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
