"""Weak scaling of expert parallelism on gloo ranks: moe_scale vs DeepSpeed-MoE, side by side.

Every rank holds the same number of tokens and of experts whatever the number of ranks N, so
E = experts_per_rank * N and ideal weak scaling keeps the per-rank cost flat. Both layers route
top-2 with the same capacity factor (GShard capacity, tokens dropped), experts are
d -> h -> d GELU MLPs with biases, one forward + backward per step.

Measured per rank and step (median over the timed steps, then averaged over ranks):
    wall ms        wall-clock time of the step
    cpu ms         CPU time of the rank's process (time.process_time) during the step
    a2a MB / ms    bytes this rank sent to other ranks with all_to_all_single, and the wall time
                   spent inside those calls (forward and backward, counts included), measured
                   by wrapping torch.distributed.all_to_all_single for both implementations
    peak RSS MB    ru_maxrss of the rank at the end, and its growth from just before the model
                   was built

Oversubscription: this box may have fewer cores than ranks (2 cores, up to 4 ranks, and other
jobs). Each rank runs with one intra-op thread (torch.set_num_threads(1), OMP_NUM_THREADS=1),
so the 1-rank baseline uses the same single thread per rank as the N-rank runs. On a shared,
oversubscribed box wall time measures time-slicing as much as the code, so per-rank throughput
is computed from CPU time: tokens per rank / CPU seconds per step. CPU time counts what a rank
computes (including the copies and serialisation of its all-to-alls) and not the time it
sleeps waiting for a peer that the OS has not scheduled. Wall time and a2a wall time are
reported next to it for completeness; they are inflated at 4 ranks on 2 cores.

Host memory: every rank of both implementations first calls `keep_freed_host_memory()` (glibc
keeps freed blocks instead of returning them to the kernel, the effect PyTorch's CPU tuning
guide gets from jemalloc / tcmalloc). Without it the multi-MiB buffers an expert-parallel step
allocates are page-faulted in again every step, which cost about 10 ms of a 60 ms step at 2
ranks and 64 experts of h=256 per rank. `--no-keep-freed-memory` measures without it.

    python benchmarks/expert_parallel.py                    # 1, 2, 4 ranks, both implementations
    python benchmarks/expert_parallel.py --experts-per-rank 64 --d-hidden 256   # many small experts
    python benchmarks/expert_parallel.py --ranks 1 2 --impl moe_scale --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_scale.distributed.host_memory import keep_freed_host_memory
from moe_scale.distributed.launch import run_local

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    tokens_per_rank: int = 2048
    d_model: int = 256
    d_hidden: int = 512
    experts_per_rank: int = 4
    k: int = 2
    capacity_factor: float = 1.25
    steps: int = 8
    warmup: int = 2
    grouped_gemm: str = "auto"
    keep_freed_memory: bool = True


class _A2AMeter:
    """Wraps torch.distributed.all_to_all_single: bytes sent to other ranks and time inside."""

    def __init__(self):
        self.bytes = 0
        self.seconds = 0.0
        self._inner = dist.all_to_all_single
        dist.all_to_all_single = self._call

    def _call(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        start = time.perf_counter()
        work = self._inner(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        if async_op and work is not None:
            work.wait()
        self.seconds += time.perf_counter() - start
        n = dist.get_world_size(group)
        me = dist.get_rank(group)
        row = input[0].numel() * input.element_size() if input.dim() > 1 and input.shape[0] else input.element_size()
        rows = input_split_sizes if input_split_sizes else [input.shape[0] // n] * n
        self.bytes += (sum(rows) - rows[me]) * row
        return work

    def reset(self):
        self.bytes, self.seconds = 0, 0.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_moe_scale(setup: Setup, world: int):
    from moe_scale.distributed.mesh import build_mesh
    from moe_scale.distributed.parallelize import parallelize
    from moe_scale.moe import MoELayer

    E = setup.experts_per_rank * world
    layer = MoELayer(setup.d_model, E, d_hidden=setup.d_hidden, k=setup.k, router="topk", expert_bias=True,
                     capacity_factor=setup.capacity_factor, aux_loss=dict(switch=0.01),
                     grouped_gemm=setup.grouped_gemm)
    parallelize(layer, build_mesh(ep_size=world))

    def step(x):
        y, stats = layer(x)
        return y, stats.aux_loss

    return layer, step


def _build_deepspeed(setup: Setup, world: int):
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    E = setup.experts_per_rank * world
    expert = nn.Sequential(nn.Linear(setup.d_model, setup.d_hidden), nn.GELU(), nn.Linear(setup.d_hidden, setup.d_model))
    layer = MoE(setup.d_model, expert, num_experts=E, ep_size=world, k=setup.k, capacity_factor=setup.capacity_factor,
                eval_capacity_factor=setup.capacity_factor, min_capacity=4, drop_tokens=True, use_rts=False,
                top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()

    def step(x):
        y, l_aux, _ = layer(x)
        return y, l_aux

    return layer, step


def _rank_main(rank: int, world: int, impl: str, setup: Setup) -> dict:
    if setup.keep_freed_memory:
        keep_freed_host_memory()
    meter = _A2AMeter()
    torch.manual_seed(0)
    rss_before = _rss_mb()
    layer, step = (_build_moe_scale if impl == "moe_scale" else _build_deepspeed)(setup, world)
    layer.train()
    g = torch.Generator().manual_seed(rank)
    # The layer's input needs a gradient, as it does inside a network (both layers then run
    # every backward GEMM).
    x = torch.randn(1, setup.tokens_per_rank, setup.d_model, generator=g).requires_grad_()
    wall, cpu, a2a_bytes, a2a_s = [], [], [], []
    for i in range(setup.warmup + setup.steps):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        meter.reset()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        y, aux = step(x)
        (y.float().square().mean() + aux).backward()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= setup.warmup:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
            a2a_bytes.append(meter.bytes)
            a2a_s.append(meter.seconds)
    return dict(
        wall_ms=1e3 * statistics.median(wall),
        cpu_ms=1e3 * statistics.median(cpu),
        a2a_mb=statistics.median(a2a_bytes) / 2**20,
        a2a_ms=1e3 * statistics.median(a2a_s),
        peak_rss_mb=_rss_mb(),
        rss_growth_mb=_rss_mb() - rss_before,
    )


def _one_run(impl: str, n: int, setup: Setup) -> dict:
    per_rank = run_local(_rank_main, n, impl, setup, timeout=600, collective_timeout=300)
    run = {key: statistics.fmean(r[key] for r in per_rank) for key in per_rank[0]}
    run["per_rank"] = per_rank
    print(f"{impl:10s} ranks={n}  wall {run['wall_ms']:.1f} ms  cpu {run['cpu_ms']:.1f} ms  "
          f"a2a {run['a2a_mb']:.2f} MB {run['a2a_ms']:.1f} ms  rss {run['peak_rss_mb']:.0f} MB", flush=True)
    return run


def run(ranks: list[int], impls: list[str], setup: Setup, repeats: int = 1) -> list[dict]:
    """Every (impl, ranks) point `repeats` times, the implementations interleaved within each
    repeat so that a slow spell of the shared machine hits both; a row holds the median run
    (by CPU time) and every run's CPU time."""
    runs: dict[tuple[str, int], list[dict]] = {(impl, n): [] for n in ranks for impl in impls}
    for rep in range(repeats):
        for n in ranks:
            for impl in impls:
                runs[impl, n].append(_one_run(impl, n, setup))
    rows = []
    for (impl, n), done in runs.items():
        row = dict(sorted(done, key=lambda r: r["cpu_ms"])[len(done) // 2])
        row.update(impl=impl, ranks=n, experts=setup.experts_per_rank * n, cpu_ms_runs=[r["cpu_ms"] for r in done])
        row["tokens_per_cpu_s"] = setup.tokens_per_rank / (row["cpu_ms"] / 1e3)
        row["tokens_per_wall_s"] = setup.tokens_per_rank / (row["wall_ms"] / 1e3)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["impl"] == row["impl"] and r["ranks"] == min(ranks))
        row["cpu_efficiency"] = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        if row["impl"] != "moe_scale":
            continue
        peer = next((r for r in rows if r["impl"] == "deepspeed" and r["ranks"] == row["ranks"]), None)
        if peer:
            row["speedup_vs_deepspeed_cpu"] = peer["cpu_ms"] / row["cpu_ms"]
            row["speedup_vs_deepspeed_wall"] = peer["wall_ms"] / row["wall_ms"]
            # Per repeat (both runs from the same spell of the machine): the spread of the ratio.
            pairs = [p / o for p, o in zip(peer["cpu_ms_runs"], row["cpu_ms_runs"])]
            row["speedup_vs_deepspeed_cpu_runs"] = pairs
    return rows


def markdown(rows: list[dict], setup: Setup, repeats: int) -> str:
    lines = [
        f"Weak scaling, {setup.tokens_per_rank} tokens and {setup.experts_per_rank} experts per rank, "
        f"d={setup.d_model}, h={setup.d_hidden}, top-{setup.k}, capacity factor {setup.capacity_factor}, "
        f"fwd+bwd, 1 thread per rank, median of {setup.steps} steps, mean over ranks; each point "
        f"run {repeats} time(s), interleaved, the median run shown (vs DeepSpeed: range over the repeats).",
        "",
        "| impl | ranks | E | wall ms/step | CPU ms/step/rank | tokens/CPU-s/rank | vs 1 rank | a2a MB/rank | a2a ms | peak RSS MB | RSS growth MB | vs DeepSpeed (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs = ""
        if "speedup_vs_deepspeed_cpu" in r:
            runs = r["speedup_vs_deepspeed_cpu_runs"]
            vs = f"{r['speedup_vs_deepspeed_cpu']:.2f}x"
            vs += f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
        lines.append(
            f"| {r['impl']} | {r['ranks']} | {r['experts']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | "
            f"{r['tokens_per_cpu_s']:,.0f} | {r['cpu_efficiency']:.2f} | {r['a2a_mb']:.2f} | {r['a2a_ms']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {vs} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs of every point, interleaved")
    parser.add_argument("--impl", nargs="+", default=["moe_scale", "deepspeed"], choices=["moe_scale", "deepspeed"])
    for field, value in asdict(Setup()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default results/expert_parallel_<experts/rank>x<d_hidden>.json; .md beside)")
    args = parser.parse_args(argv)
    setup = Setup(**{f: getattr(args, f) for f in asdict(Setup())})
    out = args.out or RESULTS / f"expert_parallel_{setup.experts_per_rank}x{setup.d_hidden}.json"
    rows = run(args.ranks, args.impl, setup, args.repeats)
    table = markdown(rows, setup, args.repeats)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(setup=asdict(setup), repeats=args.repeats, torch=torch.__version__, machine=platform.machine(), cores=os.cpu_count(),
                load_average=os.getloadavg(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    out.write_text(json.dumps(dict(meta=meta, rows=rows, table=table), indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
