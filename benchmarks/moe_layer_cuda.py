"""MoE layer, forward + backward on one CUDA GPU: moe_scale vs DeepSpeed-MoE vs FairScale vs the floor.

The same implementations and floor as benchmarks/moe_layer.py (its `_build`), on the GPU: the
CPU benchmark's rows plus larger GPU-sized rows, float32 and bfloat16. Everything runs in one
process, one implementation at a time; between them the CUDA caching allocator is emptied and
its peak counter reset, so each implementation's peak (`torch.cuda.max_memory_allocated` above
the memory held before it was built: weights, grads, activations, transients) is its own. Time
is the median of timed steps after warm-up, each step closed by `torch.cuda.synchronize()`. An
implementation that runs out of GPU memory is reported as such.

    python benchmarks/moe_layer_cuda.py                       # every row, float32 and bfloat16
    python benchmarks/moe_layer_cuda.py --rows 64:65536:1024 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import ROWS, _build, _table, best_floor, floor_variants, impls_for_row, parse_rows  # noqa: E402

# GPU-sized rows: (E, S, d), h = 4d, k = 2.
GPU_ROWS = [(8, 16384, 1024), (64, 65536, 1024), (256, 65536, 1024)]
IMPLS = ["floor", "moe_scale", "moe_scale_hier", "deepspeed", "fairscale"]


def _cuda_median_seconds(step, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(impl: str, E: int, S: int, d: int, dtype_name: str, warmup: int, repeats: int) -> dict:
    import torch

    result = {"impl": impl, "E": E, "S": S, "d": d, "dtype": dtype_name, "variant": impl}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step = _build(impl, E, S, d, getattr(torch, dtype_name), device="cuda")
        time_s = _cuda_median_seconds(step, warmup, repeats)
        result.update(status="ok", time_s=time_s, peak_bytes=torch.cuda.max_memory_allocated() - base)
    except torch.OutOfMemoryError as err:
        result.update(status="oom", error=str(err)[:300])
    except Exception as err:  # a peer that fails on a shape is reported, not fatal
        result.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _run_row(E, S, d, dtype, impls, args) -> list[dict]:
    results = []
    for impl in impls:
        if impl == "floor":
            r = best_floor([_measure(v, E, S, d, dtype, args.warmup, args.repeats) for v in floor_variants(E)])
        else:
            r = _measure(impl, E, S, d, dtype, args.warmup, args.repeats)
        t = f"{r['time_s'] * 1e3:9.3f} ms" if r.get("status") == "ok" else r.get("status", "?").upper()
        m = f"{r['peak_bytes'] / 2**20:9.0f} MiB" if r.get("status") == "ok" else r.get("error", "")[:120]
        print(f"  {impl:15s} E={E:5d} S={S:6d} d={d:5d} {dtype:9s} {t}  {m}", file=sys.stderr, flush=True)
        results.append(r)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--rows", default="", help="E:S:d,... overrides the row list")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer_cuda.json"))
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        sys.exit("moe_layer_cuda.py needs a CUDA GPU; benchmarks/moe_layer.py is the CPU benchmark")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows are float32 for every implementation
    store_path = tempfile.mktemp(prefix="moe_bench_cuda_store_")
    os.environ["MOE_BENCH_STORE"] = store_path  # the peers need a process group (one rank, NCCL)
    results = []
    for E, S, d in parse_rows(args.rows, ROWS + GPU_ROWS):
        for dtype in args.dtypes.split(","):
            results += _run_row(E, S, d, dtype, impls_for_row(args.impls, E), args)
    print(_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "k": 2, "capacity_factor": 1.25, "warmup": args.warmup, "repeats": args.repeats,
                               "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": results}, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    Path(store_path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
