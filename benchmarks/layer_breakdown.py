"""Where a CPU layer step goes: the expert MLP (forward, backward) against everything else.

One process per row, `keep_freed_host_memory()` as in moe_layer.py, the same input every
step, median over timed steps after warm-up. The expert MLP is timed from the call of
`GroupedExperts` to its output (forward) and from the arrival of its output gradient to the
departure of its input gradient (backward, autograd hooks); "rest" is the step minus both:
routing, the dispatch plan, the gathers, the losses and autograd's own work. The bare GEMMs of
the floor (moe_layer.py's `floor_bmm`) run in the same process, interleaved, for scale.

    python benchmarks/layer_breakdown.py                          # 8x4096 and 64x16384, bf16
    python benchmarks/layer_breakdown.py --rows 64:32768:128 --dtypes float32,bfloat16
    python benchmarks/layer_breakdown.py --backend core         # the core path (default: auto)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moe_layer import CAPACITY_FACTOR, K, _build, parse_rows


def breakdown(E: int, S: int, d: int, dtype: torch.dtype, warmup: int, repeats: int, backend: str = "auto") -> dict:
    from moe_scale import MoELayer

    torch.manual_seed(0)
    x = torch.randn(S, d, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(S, d, dtype=dtype)
    layer = MoELayer(d, E, k=K, capacity_factor=CAPACITY_FACTOR, activation="relu",
                     aux_loss=dict(switch=0.01), backend=backend).to(dtype)
    experts_forward = layer.experts.forward
    marks: dict[str, float] = {}
    times: dict[str, list[float]] = {"step": [], "mlp_forward": [], "mlp_backward": []}

    def timed_experts(x_Md, counts):
        t0 = time.perf_counter()
        y = experts_forward(x_Md, counts)
        times["mlp_forward"].append(time.perf_counter() - t0)
        y.register_hook(lambda g: marks.__setitem__("backward", time.perf_counter()))
        x_Md.register_hook(lambda g: times["mlp_backward"].append(time.perf_counter() - marks["backward"]))
        return y

    layer.experts.forward = timed_experts
    floor = _build("floor_bmm", E, S, d, dtype)
    floor_times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        y, stats = layer(x)
        torch.autograd.backward([y, stats.aux_loss], [grad_out, None])
        times["step"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        floor()
        floor_times.append(time.perf_counter() - t0)
    med = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    med["rest"] = med["step"] - med["mlp_forward"] - med["mlp_backward"]
    med["floor_bmm"] = statistics.median(floor_times[warmup:])
    return {"E": E, "S": S, "d": d, "dtype": str(dtype).removeprefix("torch."), "backend": layer.backend.name,
            **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="8:4096:128,64:16384:128", help="E:S:d,...")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--backend", default="auto", choices=["auto", "core", "cpu"], help="MoELayer's backend option")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_breakdown.json"))
    args = p.parse_args()

    from moe_scale.distributed.host_memory import keep_freed_host_memory

    keep_freed_host_memory()
    rows = []
    print("| E | S | d | dtype | step ms | MLP fwd ms | MLP bwd ms | rest ms | floor bmm ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for E, S, d in parse_rows(args.rows, []):
        for name in args.dtypes.split(","):
            r = breakdown(E, S, d, getattr(torch, name), args.warmup, args.repeats, args.backend)
            rows.append(r)
            print(f"| {E} | {S} | {d} | {r['dtype']} | {r['step_ms']:.2f} | {r['mlp_forward_ms']:.2f} | "
                  f"{r['mlp_backward_ms']:.2f} | {r['rest_ms']:.2f} | {r['floor_bmm_ms']:.2f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
