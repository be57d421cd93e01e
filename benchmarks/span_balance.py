"""How the compiled span loop shares the experts between threads, fwd+bwd of the expert MLP on CPU.

`csrc/mlp_kernels.cpp` runs one group of experts per intra-op thread and the layer waits for
the slowest. `_SpanSchedule` makes the groups (moe/cpu/grouped_mlp.py):

- contiguous: neighbouring experts, about 1/threads of the rows each (bucketed spans need it);
- balanced: a partition of the experts by row count (exact for two groups);
- split: the balanced partition, then any excess over a group's share is cut off an expert
  and moved to another group, its weight gradients summed from float32 partials (here on
  any excess; the layer splits only past `CPUTuning.split_min_rows`).

Two routings of 8 experts x 8192 rows (d = 128, h = 512, ReLU): the counts of
benchmarks/moe_layer.py's 8 x 4096 row (top-2 of 4096 tokens, 797-1085 rows an expert) and one
hot expert with 6000 rows (a skewed or dropless routing). Same process, the variants
interleaved, median of timed steps per trial and median over trials.

    python benchmarks/span_balance.py
    python benchmarks/span_balance.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROUTINGS = {
    "moe_layer 8x4096": [1081, 797, 1034, 1085, 1058, 1063, 1053, 1021],
    "one hot expert": [6000, 300, 300, 300, 300, 300, 300, 392],
}
VARIANTS = ("contiguous", "balanced", "split")


def _tuning(variant: str):
    from moe_scale.moe.cpu import CPUTuning

    return CPUTuning(balance_max_blocks=0 if variant == "contiguous" else CPUTuning.balance_max_blocks,
                     split_min_rows=0 if variant == "split" else 10**9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "span_balance.json"))
    args = p.parse_args()

    from moe_scale.distributed.host_memory import keep_freed_host_memory
    from moe_scale.moe import cpu
    from moe_scale.moe.cpu import grouped_mlp
    from moe_scale.moe.experts import GroupedExperts

    keep_freed_host_memory()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    d = 128
    experts = GroupedExperts(8, d, 4 * d, "relu", fused=cpu.expert_mlp).to(dtype)  # the CPU backend
    rows = []
    print(f"| routing | threads | {' | '.join(f'{v} ms' for v in VARIANTS)} | heaviest group rows (contiguous, balanced, split) |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|")
    for name, counts in ROUTINGS.items():
        x = torch.randn(sum(counts), d, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        heaviest = {}
        for _ in range(args.trials):
            for variant in VARIANTS:
                tuning = _tuning(variant)
                schedule = grouped_mlp._SpanSchedule(tuple(counts), 0, torch.get_num_threads(), split=True,
                                                     balance_max_blocks=tuning.balance_max_blocks,
                                                     split_min_rows=tuning.split_min_rows)
                heaviest[variant] = max(sum(sp.gemm_end - sp.gemm_start for sp in schedule.spans[a:b])
                                        for a, b in zip(schedule.group_ptr, schedule.group_ptr[1:]))
                steps = []
                with cpu.use_tuning(tuning):
                    for i in range(args.steps + 3):
                        t0 = time.perf_counter()
                        experts(x, torch.tensor(counts)).backward(grad)
                        steps.append(time.perf_counter() - t0)
                times[variant].append(statistics.median(steps[3:]))
        row = {"routing": name, "counts": counts, "dtype": args.dtype, "threads": torch.get_num_threads(),
               **{f"{v}_ms": round(statistics.median(times[v]) * 1e3, 2) for v in VARIANTS},
               **{f"{v}_trials_ms": [round(t * 1e3, 2) for t in times[v]] for v in VARIANTS},
               "heaviest_group_rows": heaviest}
        rows.append(row)
        print(f"| {name} | {row['threads']} | " + " | ".join(f"{row[f'{v}_ms']:.2f}" for v in VARIANTS)
              + f" | {heaviest['contiguous']}, {heaviest['balanced']}, {heaviest['split']} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"trials": args.trials, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
