"""What the work around the expert GEMMs costs inside a CPU layer step.

Three measurements, one process, 8 experts x 4096 tokens, d = 128 (the row where that work
matters most next to the GEMMs), `keep_freed_host_memory()` as in moe_layer.py:

- small ops: the median time of a few tiny ATen ops (`torch.empty` of the layer's input
  shape, a sum over 8192 floats) right after a layer step (forward and backward), against the
  same ops repeated in a loop of their own. After a step the expert GEMMs have streamed tens
  of MiB through the caches, and every op meets cold code and data.
- the dispatch plan: `plan_dispatch` of the layer's routing (the core path's static-shape
  plan, the same on every backend), repeated in a loop.
- the fixed cost of a step: forward + backward of the same layer with 1024 tokens and experts
  of hidden size 2, where the GEMMs are next to nothing, with `backend="core"` and, where the
  CPU kernels run, `backend="cpu"` (the compiled expert loop runs: it takes 1024 x 2 rows > 8
  experts x d).

The layer of the first two is built with `backend="auto"` (cpu where the kernels run).

    python benchmarks/step_overheads.py
    python benchmarks/step_overheads.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _median_us(times: list[float]) -> float:
    return round(statistics.median(times) * 1e6, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overheads.json"))
    args = p.parse_args()

    from moe_scale import MoELayer
    from moe_scale.distributed.host_memory import keep_freed_host_memory
    from moe_scale.moe import cpu, dispatch

    keep_freed_host_memory()
    E, S, d, dtype = 8, 4096, 128, getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(S, d, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(S, d, dtype=dtype)
    layer = MoELayer(d, E, k=2, capacity_factor=1.25, activation="relu", aux_loss=dict(switch=0.01)).to(dtype)
    small = torch.randn(2 * S)
    ops = {"torch.empty(S, d)": lambda: torch.empty(S, d, dtype=dtype), "sum of 8192 floats": lambda: small.sum()}

    def step():
        y, stats = layer(x)
        torch.autograd.backward([y, stats.aux_loss], [grad_out, None])

    for _ in range(5):
        step()
    result = {"E": E, "S": S, "d": d, "dtype": args.dtype, "small_ops_us": {}}
    for name, op in ops.items():
        after, alone = [], []
        for _ in range(args.steps):
            step()
            t0 = time.perf_counter()
            op()
            after.append(time.perf_counter() - t0)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            op()
            alone.append(time.perf_counter() - t0)
        result["small_ops_us"][name] = {"after_a_step": _median_us(after), "in_a_loop": _median_us(alone)}

    with torch.no_grad():
        routing = layer.router(x.detach())
    capacity = layer.capacity(S)
    times = []
    for _ in range(args.steps * 5):
        t0 = time.perf_counter()
        dispatch.plan_dispatch(routing, capacity, layer.cfg.drop_policy)
        times.append(time.perf_counter() - t0)
    result["backend"] = layer.backend.name
    result["dispatch_plan_us"] = _median_us(times[args.steps:])

    tiny_x = torch.randn(1024, d, dtype=dtype, requires_grad=True)
    tiny_grad = torch.randn(1024, d, dtype=dtype)
    result["step_1024_tokens_hidden_2_us"] = {}
    for backend in ("core", "cpu") if cpu.available() else ("core",):
        tiny = MoELayer(d, E, k=2, capacity_factor=1.25, activation="relu", aux_loss=dict(switch=0.01),
                        d_hidden=2, backend=backend).to(dtype)
        times = []
        for i in range(args.steps * 5):
            t0 = time.perf_counter()
            y, stats = tiny(tiny_x)
            torch.autograd.backward([y, stats.aux_loss], [tiny_grad, None])
            times.append(time.perf_counter() - t0)
        result["step_1024_tokens_hidden_2_us"][backend] = _median_us(times[args.steps:])
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
