"""The CPU backend's ReLU kernels (moe/cpu/csrc/activation_kernels.cpp) against the ATen ops they
replace. (The combine / permute gather kernels this benchmark also timed were removed with the
core rewrite: the core path's dispatch runs on every device.)

In one process, interleaved, median of timed calls after warm-up, each op with its rows in
cache ("warm") and after a 64 MiB write that evicts them ("cold", as after the expert GEMMs
of a layer step):

    relu_                `kernels.relu_` vs `torch.relu_` on an expert block [1024, h=512]
    relu_backward_       `kernels.relu_backward_` vs ATen `threshold_backward`, same block

    python benchmarks/cpu_kernels.py                 # bf16 and float32
    python benchmarks/cpu_kernels.py --dtypes bfloat16 --trials 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _time_us(fn, flush, cold: bool, repeats: int = 30, warmup: int = 5) -> float:
    times = []
    for i in range(warmup + repeats):
        if cold:
            flush.fill_(1.0)
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _cases(dtype):
    """name -> (ATen fn, kernel fn)."""
    import torch

    from moe_scale.moe.cpu.kernels import load_kernels

    kernels = load_kernels()
    if kernels is None:
        raise SystemExit("the fused CPU kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(1024, 512, generator=g)).to(dtype)
    grad = torch.randn(1024, 512, generator=g).to(dtype)
    h = torch.randn(1024, 512, generator=g).to(dtype)

    return {
        "relu_": (lambda: torch.relu_(h), lambda: kernels.relu_(h)),
        "relu_backward_": (
            lambda: torch.ops.aten.threshold_backward.grad_input(grad, a, 0, grad_input=grad),
            lambda: kernels.relu_backward_(grad, a),
        ),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--trials", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_kernels.json"))
    args = p.parse_args()

    import torch

    from moe_scale.distributed.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
    flush = torch.empty(16 << 20)  # 64 MiB
    rows = []
    print("| op | dtype | cache | ATen us | kernel us | speed-up |\n|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        cases = _cases(getattr(torch, dtype_name))
        for name, (aten, kernel) in cases.items():
            for cold in (False, True):
                t_aten, t_kernel = [], []
                for _ in range(args.trials):
                    t_aten.append(_time_us(aten, flush, cold))
                    t_kernel.append(_time_us(kernel, flush, cold))
                row = dict(op=name, dtype=dtype_name, cache="cold" if cold else "warm",
                           aten_us=statistics.median(t_aten), kernel_us=statistics.median(t_kernel))
                rows.append(row)
                print(f"| {name} | {dtype_name} | {row['cache']} | {row['aten_us']:.0f} | {row['kernel_us']:.0f} | "
                      f"{row['aten_us'] / row['kernel_us']:.1f}x |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": args.trials, "threads": torch.get_num_threads(),
                               "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
