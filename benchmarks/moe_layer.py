"""MoE layer, forward + backward: moe_scale (core path and CPU kernel backend) vs DeepSpeed-MoE vs
FairScale vs the floor, on the CPU (default) or on one CUDA GPU (`--device cuda`).

Implementations (`--impls`):
    floor            the work any flat-gated top-k layer must do, alone (below)
    moe_scale        MoELayer(backend="core"): the plain-PyTorch core path (moe/*.py)
    moe_scale_cpu    MoELayer(backend="cpu"): the CPU kernel backend (moe/cpu/), CPU only
    moe_scale_hier   the hierarchical gate on the core path, from HIER_MIN_EXPERTS experts up
    deepspeed, fairscale   the peers (`pip install moe_scale[peers]`)
    titan            GPU only: torchtitan-style dropless routing (see `--device cuda` below)

The floor is the work any flat-gated top-k layer must do, alone: the router matmul
`[S, d] x [d, E]` and the expert GEMMs `[E, kS/E, d] x [E, d, h]`, `[E, kS/E, h] x [E, h, d]`
with the k*S routed tokens spread evenly over the experts, forward and backward.

Every (row, dtype, implementation) runs in its own process so its peak memory (ru_maxrss
above the process's RSS after its imports, before the layer is built: weights, grads,
activations, transients) is its own. Each process does warm-up steps (at least --warmup and at
least --min-seconds of them) and reports the median of timed steps (at least --repeats and at
least --min-seconds of them): a layer with 10 ms steps is measured in a steady state, one with
2 s steps still in a few steps. A peer
that fails (out of memory under the address-space limit, or past the time limit) is
reported as such. Every worker first calls `keep_freed_host_memory()` (glibc keeps freed blocks
rather than returning them to the kernel, as jemalloc / tcmalloc would): otherwise each step
page-faults its fresh multi-MiB buffers in again, at a cost that depends on glibc's adaptive
mmap threshold, i.e. on the order of earlier allocations, for the floor as much as for the
layers (`--no-keep-freed-memory` to measure without). Blocks of 32 MiB and more are still
mmapped and faulted in every step (glibc's cap); `--never-mmap` serves those from the heap too,
so that no implementation pays page faults. Prints a markdown table with ratios to the floor and to DeepSpeed, and
writes the rows to benchmarks/results/moe_layer.json.

    python benchmarks/moe_layer.py                  # every row, float32 and bfloat16
    python benchmarks/moe_layer.py --quick          # two small rows
    python benchmarks/moe_layer.py --impls floor,moe_scale,moe_scale_hier --trials 3   # spread vs the floor
    python benchmarks/moe_layer.py --vary-input     # a new input every step (loads change, as in training)
    python benchmarks/moe_layer.py --never-mmap     # no page faults for anyone
    python benchmarks/moe_layer.py --impls floor,moe_scale,moe_scale_cpu --rows 8:4096:128 --trials 3

`--device cuda` (moe_layer_cuda.py is the same): bfloat16, dropless, SwiGLU experts, everything
in one process, implementations in turn, the caching allocator emptied and its peak reset
between them. The floor there is the router GEMM and three bare `torch._grouped_mm` calls
(w1, w3, w2) on the counts the layer routes the same input to; `titan` is torchtitan-style
dropless routing (router GEMM, softmax, top-k, counts by a scatter-add on the device, argsort
permute, three `_grouped_mm` calls, weighted scatter-add combine: no host read). For each it
reports the median step time (steps closed by `torch.cuda.synchronize()`), the peak memory
above what was allocated before it was built, and the host syncs of one step (the warnings of
`torch.cuda.set_sync_debug_mode("warn")`); the JSON is rewritten after every row.

    python benchmarks/moe_layer.py --device cuda                      # GPU rows, bfloat16
    python benchmarks/moe_layer.py --device cuda --rows 64:65536:1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = [
    (8, 4096, 128),
    (512, 4096, 128),
    (2048, 4096, 128),
    (64, 16384, 128),
    (64, 32768, 128),
    (4096, 16384, 64),
    (8192, 65536, 64),
]
QUICK_ROWS = [(8, 4096, 128), (512, 4096, 128)]
K, CAPACITY_FACTOR = 2, 1.25
IMPLS = ["floor", "moe_scale", "moe_scale_cpu", "moe_scale_hier", "deepspeed", "fairscale"]
# The layer's backend for each moe_scale implementation (MoELayer's `backend` option).
BACKENDS = {"moe_scale": "core", "moe_scale_cpu": "cpu", "moe_scale_hier": "core"}
# The hierarchical gate replaces the flat router; it is timed where the router dominates.
HIER_MIN_EXPERTS = 4096
# A per-expert GEMM loop can beat one bmm only when experts are few and large.
LOOP_FLOOR_MAX_EXPERTS = 64


def _loadavg() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other users' work included)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- workers


def _build(impl: str, E: int, S: int, d: int, dtype, vary_input: bool = False, device: str = "cpu"):
    """Return (step_fn) that runs one forward + backward (on a new input each call if vary_input)."""
    import torch
    from torch import nn

    h = 4 * d
    torch.manual_seed(0)
    # The same input every step, or a new one (new routing, new expert loads) in turn.
    inputs = [torch.randn(S, d, dtype=dtype, device=device, requires_grad=True) for _ in range(8 if vary_input else 1)]
    next_x = itertools.cycle(inputs).__next__
    x = inputs[0]
    grad_out = torch.randn(S, d, dtype=dtype, device=device)

    if impl in ("floor_bmm", "floor_loop"):
        n = K * S // E
        w_gate = torch.randn(d, E, dtype=dtype, device=device, requires_grad=True)
        w1 = torch.randn(E, d, h, dtype=dtype, device=device, requires_grad=True)
        w2 = torch.randn(E, h, d, dtype=dtype, device=device, requires_grad=True)
        xe = torch.randn(E, max(n, 1), d, dtype=dtype, device=device, requires_grad=True)
        g_logits = torch.randn(S, E, dtype=dtype, device=device)
        g_y = torch.randn(E, max(n, 1), d, dtype=dtype, device=device)

        def experts_bmm():
            return torch.bmm(torch.bmm(xe, w1), w2)

        def experts_loop():
            return torch.stack([x_ @ a @ b for x_, a, b in zip(xe.unbind(0), w1.unbind(0), w2.unbind(0))])

        experts = experts_bmm if impl == "floor_bmm" else experts_loop

        def step():
            logits = next_x() @ w_gate  # the same inputs (and their grads) as the layers
            torch.autograd.backward([logits, experts()], [g_logits, g_y])

        return step

    if impl in BACKENDS:
        from moe_scale import MoELayer

        opts = dict(k=K, capacity_factor=CAPACITY_FACTOR, activation="relu", aux_loss=dict(switch=0.01),
                    backend=BACKENDS[impl])
        if impl == "moe_scale_hier":
            groups = max(g for g in range(1, int(E**0.5) + 1) if E % g == 0)
            opts.update(router="hierarchical", hierarchical_groups=groups, hierarchical_k_groups=1,
                        aux_loss=dict(importance=0.01, load=0.01))
        layer = MoELayer(d, E, **opts).to(device, dtype)
        if layer.backend.name != BACKENDS[impl]:
            raise RuntimeError(f"{impl}: the layer runs backend {layer.backend.name!r}")

        def step():
            y, stats = layer(next_x())
            torch.autograd.backward([y, stats.aux_loss], [grad_out, None])

        return step

    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.FileStore(os.environ["MOE_BENCH_STORE"], 1)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
    def make_expert():
        return nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, d, bias=False))

    if impl == "deepspeed":
        from deepspeed.moe.layer import MoE

        layer = MoE(hidden_size=d, expert=make_expert(), num_experts=E, ep_size=1, k=K,
                    capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                    min_capacity=4, drop_tokens=True, use_rts=False).to(device, dtype)

        def step():
            y, l_aux, _ = layer(next_x()[None])
            torch.autograd.backward([y[0], l_aux], [grad_out, None])

        return step

    if impl == "fairscale":
        from fairscale.nn.moe import MOELayer, Top2Gate

        # FairScale wants [groups, tokens, d] with groups divisible by the local experts.
        layer = MOELayer(Top2Gate(d, E), nn.ModuleList(make_expert() for _ in range(E))).to(device, dtype)
        def step():
            y = layer(next_x().view(E, S // E, d))
            torch.autograd.backward([y.reshape(S, d), layer.l_aux], [grad_out, None])

        return step

    raise ValueError(f"unknown implementation {impl}")


def median_step_seconds(step, warmup: int, repeats: int, min_seconds: float = 0.0) -> float:
    """Median wall time of at least `repeats` calls of `step` (and at least `min_seconds` of
    them) after at least `warmup` untimed ones (and at least `min_seconds` of those)."""
    return median_step_times(step, warmup, repeats, min_seconds)[0]


def median_step_times(step, warmup: int, repeats: int, min_seconds: float = 0.0) -> tuple[float, float]:
    """(median wall time, median CPU time of the process, all its threads) of the timed steps of
    `median_step_seconds`. On a shared machine the CPU time is the steadier of the two: a
    step that waits for a core does not count the wait (spinning threads still count)."""
    t_end, n = time.perf_counter() + min_seconds, 0
    while n < warmup or time.perf_counter() < t_end:
        step()
        n += 1
    times: list[float] = []
    cpu_times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < t_end:
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu_times)


def _warm_kernels(dtype) -> None:
    import torch

    a = torch.randn(4, 64, 64, dtype=dtype, requires_grad=True)
    (torch.bmm(a, a) @ a[0]).sum().backward()


def _import(impl: str) -> None:
    if impl.startswith("moe_scale"):
        import moe_scale  # noqa: F401
        if impl == "moe_scale_cpu":
            from moe_scale.moe.cpu import kernels

            if not kernels.available():
                raise RuntimeError("the CPU kernel backend does not run here (see moe/cpu/kernels.py)")
            kernels.load_kernels()  # the compiled extension is a module import too
    elif impl == "deepspeed":
        import deepspeed.moe.layer  # noqa: F401
    elif impl == "fairscale":
        import fairscale.nn.moe  # noqa: F401


def _worker(impl: str, E: int, S: int, d: int, dtype_name: str, warmup: int, repeats: int, mem_limit: int,
            keep_freed_memory: bool, vary_input: bool, never_mmap: bool = False, min_seconds: float = 0.0,
            threads: int = 0):
    import torch

    if threads:
        torch.set_num_threads(threads)

    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    if keep_freed_memory:
        from moe_scale.distributed.host_memory import keep_freed_host_memory

        keep_freed_host_memory(never_mmap=never_mmap)
    dtype = getattr(torch, dtype_name)
    _import(impl)  # module imports are not the layer's memory: load them before the baseline
    _warm_kernels(dtype)  # nor is the one-time initialisation of the GEMM libraries
    base = _rss_bytes()
    result = {"impl": impl, "E": E, "S": S, "d": d, "dtype": dtype_name, "threads": torch.get_num_threads()}
    try:
        step = _build(impl, E, S, d, dtype, vary_input)
        time_s, cpu_time_s = median_step_times(step, warmup, repeats, min_seconds)
        result.update(status="ok", variant=impl, time_s=time_s, cpu_time_s=cpu_time_s, peak_bytes=_peak_bytes() - base)
    except (MemoryError, RuntimeError) as err:
        oom = isinstance(err, MemoryError) or "alloc" in str(err).lower() or "memory" in str(err).lower()
        result.update(status="oom" if oom else "error", error=str(err)[:300])
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def floor_variants(E: int) -> list[str]:
    """The floor's expert GEMMs as one bmm, and for few experts also as a per-expert loop."""
    return ["floor_bmm", "floor_loop"] if E <= LOOP_FLOOR_MAX_EXPERTS else ["floor_bmm"]


def best_floor(runs: list[dict]) -> dict:
    """The faster floor variant (never a weak floor), reported as impl "floor"."""
    ok = [r for r in runs if r.get("status") == "ok"]
    best = dict(min(ok, key=lambda r: r["time_s"]) if ok else runs[0])
    best.update(impl="floor", variant=best["impl"])
    return best


def parse_rows(spec: str, default: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """`E:S:d,...` -> rows, or `default` for an empty spec."""
    return [tuple(int(v) for v in r.split(":")) for r in spec.split(",")] if spec else default


def impls_for_row(impls: str, E: int) -> list[str]:
    """The implementations of a comma list that run on a row (the hierarchical gate from
    HIER_MIN_EXPERTS experts up)."""
    return [i for i in impls.split(",") if not (i == "moe_scale_hier" and E < HIER_MIN_EXPERTS)]


def _run_one(impl, E, S, d, dtype, args) -> dict:
    """One implementation on one row, in a fresh process. The floor's variants each run in
    their own process (a second variant in the same process would start with a warm heap)."""
    if impl == "floor":
        return best_floor([_run_process(variant, E, S, d, dtype, args) for variant in floor_variants(E)])
    return _run_process(impl, E, S, d, dtype, args)


def _run_process(impl, E, S, d, dtype, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(E), str(S), str(d), dtype,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--mem-limit-gb", str(args.mem_limit_gb),
           "--min-seconds", str(args.min_seconds), "--threads", str(args.threads)]
    cmd += [] if args.keep_freed_memory else ["--no-keep-freed-memory"]
    cmd += ["--vary-input"] if args.vary_input else []
    cmd += ["--never-mmap"] if args.never_mmap else []
    env = dict(os.environ, MOE_BENCH_STORE=f"/tmp/moe_bench_store_{os.getpid()}_{impl}_{E}_{S}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "E": E, "S": S, "d": d, "dtype": dtype, "status": "timeout"}
    finally:
        Path(env["MOE_BENCH_STORE"]).unlink(missing_ok=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    status = "oom" if proc.returncode in (-9, 137) else "error"
    return {"impl": impl, "E": E, "S": S, "d": d, "dtype": dtype, "status": status,
            "error": (proc.stderr or "")[-300:]}


def _fmt_time(r):
    return f"{r['time_s'] * 1e3:,.1f}" if r.get("status") == "ok" else r.get("status", "-").upper()


def _fmt_mem(r):
    return f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("status") == "ok" else "-"


def _ratio(a, b, key):
    if a.get("status") == "ok" and b.get("status") == "ok" and b[key] > 0:
        return f"{a[key] / b[key]:.2f}"
    return "-"


def _table(results: list[dict]) -> str:
    """Markdown rows: time and peak memory, each against the floor, DeepSpeed and the layer's
    core path (moe_scale) of the same row; on the GPU also the host syncs of one step."""
    gpu = any("syncs_per_step" in r for r in results)
    head = "| E | S | d | dtype | impl | ms fwd+bwd | x floor time | x DeepSpeed time | x core time | peak MiB | x floor mem |"
    lines = [head + (" host syncs / step |" if gpu else ""), "|---" * (head.count("|") - 1 + gpu) + "|"]
    keyed = {(r["E"], r["S"], r["d"], r["dtype"], r["impl"]): r for r in results}
    for r in results:
        row = (r["E"], r["S"], r["d"], r["dtype"])
        floor, ds = keyed.get(row + ("floor",), {}), keyed.get(row + ("deepspeed",), {})
        core = keyed.get(row + ("moe_scale",), {})
        vs_floor = _ratio(r, floor, "time_s")
        if r.get("floor_time_ratio_trials"):
            vs_floor += f" ({min(r['floor_time_ratio_trials']):.2f}-{max(r['floor_time_ratio_trials']):.2f})"
        line = (f"| {r['E']} | {r['S']} | {r['d']} | {r['dtype']} | {r['impl']} | {_fmt_time(r)} | "
                f"{vs_floor} | {_ratio(r, ds, 'time_s')} | {_ratio(r, core, 'time_s')} | {_fmt_mem(r)} | "
                f"{_ratio(r, floor, 'peak_bytes')} |")
        lines.append(line + (f" {r.get('syncs_per_step', '-')} |" if gpu else ""))
    return "\n".join(lines)


def _median_trials(runs: dict[str, list[dict]]) -> list[dict]:
    """One result per implementation: the time of its median-time trial and the median of its
    trials' peaks (a process's peak moves by several MiB from trial to trial: the floor's own
    bf16 8-expert peak took 69-78 MiB over five trials), with every trial's time and peak
    memory and, next to the floor of the same trial, every trial's ratio to the floor."""
    floor = runs.get("floor")
    out = []
    for impl, trials in runs.items():
        ok = sorted((r for r in trials if r.get("status") == "ok"), key=lambda r: r["time_s"])
        r = dict(ok[len(ok) // 2]) if ok else dict(trials[-1])
        if ok:
            r["peak_bytes"] = int(statistics.median(t["peak_bytes"] for t in ok))
            if all("cpu_time_s" in t for t in ok):
                r["cpu_time_s"] = statistics.median(t["cpu_time_s"] for t in ok)
        core = runs.get("moe_scale")
        if core and impl != "moe_scale":  # the core path's time over this one's, trial by trial
            pairs = [(c, t) for c, t in zip(core, trials) if c.get("status") == "ok" and t.get("status") == "ok"]
            r["core_over_this_time_trials"] = [c["time_s"] / t["time_s"] for c, t in pairs]
            if all("cpu_time_s" in c and "cpu_time_s" in t for c, t in pairs):
                r["core_over_this_cpu_time_trials"] = [c["cpu_time_s"] / t["cpu_time_s"] for c, t in pairs]
        if len(trials) > 1:
            r["trial_times_s"] = [t.get("time_s") for t in trials]
            r["trial_cpu_times_s"] = [t.get("cpu_time_s") for t in trials]
            r["trial_peak_bytes"] = [t.get("peak_bytes") for t in trials]
            if floor and impl != "floor":
                r["floor_time_ratio_trials"] = [
                    t["time_s"] / f["time_s"] for t, f in zip(trials, floor)
                    if t.get("status") == "ok" and f.get("status") == "ok"
                ]
        out.append(r)
    return out


# ----------------------------------------------------------------------------- GPU mode

# GPU-sized rows: (E, S, d); SwiGLU experts with hidden size h = 2d (`_gpu_hidden`).
GPU_ROWS = [(8, 16384, 1024), (64, 65536, 1024), (256, 65536, 1024)]
GPU_IMPLS = ["floor", "moe_scale", "titan"]


def _gpu_hidden(d: int) -> int:
    return 2 * d


def _gpu_build(impl: str, E: int, S: int, d: int, dtype):
    """(step, layer-or-None) for one GPU implementation: a forward + backward on one input."""
    import torch
    import torch.nn.functional as F

    dev, h = "cuda", _gpu_hidden(d)
    torch.manual_seed(0)
    x = torch.randn(S, d, dtype=dtype, device=dev, requires_grad=True)
    grad_out = torch.randn(S, d, dtype=dtype, device=dev)

    def param(*shape, fan_in):
        return (torch.randn(*shape, device=dev) * fan_in**-0.5).to(dtype).requires_grad_()

    if impl in ("moe_scale", "floor"):
        from moe_scale import MoELayer

        layer = MoELayer(d, E, k=K, dropless=True, activation="swiglu", d_hidden=h, backend="core",
                         aux_loss=dict(switch=0.01)).to(dev, dtype)

        def layer_step():
            y, stats = layer(x)
            torch.autograd.backward([y, stats.aux_loss], [grad_out, None])

        if impl == "moe_scale":
            return layer_step
        # The floor: the router GEMM and the three expert GEMMs (with the SwiGLU between them)
        # on the counts the layer routes this input to, nothing else.
        with torch.no_grad():
            counts_E = layer(x)[1].tokens_per_expert_E
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        M = K * S
        w_gate = param(d, E, fan_in=d)
        w1, w3, w2 = param(E, d, h, fan_in=d), param(E, d, h, fan_in=d), param(E, h, d, fan_in=h)
        x_M = torch.randn(M, d, dtype=dtype, device=dev, requires_grad=True)
        g_logits = torch.randn(S, E, dtype=dtype, device=dev)
        g_y = torch.randn(M, d, dtype=dtype, device=dev)
        del layer

        def floor_step():
            logits = x @ w_gate
            a = F.silu(torch._grouped_mm(x_M, w1, offs=offs)) * torch._grouped_mm(x_M, w3, offs=offs)
            torch.autograd.backward([logits, torch._grouped_mm(a, w2, offs=offs)], [g_logits, g_y])

        return floor_step

    if impl == "titan":
        # torchtitan-style dropless token choice: softmax over the router logits, top-k scores
        # as combine weights, per-expert counts by a scatter-add on the device, tokens
        # permuted by a stable argsort, three `_grouped_mm` calls on the device offsets, the
        # weighted outputs scattered back (index_add). No value leaves the device. (torchtitan
        # also pads each expert's rows to an aligned multiple; not done here.)
        w_gate = param(d, E, fan_in=d)
        w1, w3, w2 = param(E, d, h, fan_in=d), param(E, d, h, fan_in=d), param(E, h, d, fan_in=h)

        def titan_step():
            scores = torch.softmax((x @ w_gate).float(), -1)
            top_scores, top_idx = scores.topk(K, -1)
            flat = top_idx.reshape(-1)
            counts = torch.zeros(E, dtype=torch.int32, device=dev).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32))
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            order = torch.argsort(flat, stable=True)
            token = order // K
            x_M = x.index_select(0, token)
            a = F.silu(torch._grouped_mm(x_M, w1, offs=offs)) * torch._grouped_mm(x_M, w3, offs=offs)
            y_M = torch._grouped_mm(a, w2, offs=offs) * top_scores.reshape(-1)[order, None].to(dtype)
            y = torch.zeros_like(x).index_add(0, token, y_M)
            y.backward(grad_out)

        return titan_step

    raise ValueError(f"unknown GPU implementation {impl} (GPU mode runs {GPU_IMPLS})")


def cuda_median_seconds(step, warmup: int, repeats: int) -> float:
    """Median wall time of `repeats` calls of `step` after `warmup` untimed ones, each call
    waited for on the device."""
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


def count_host_syncs(step) -> int:
    """Host syncs of one call of `step`: the warnings `torch.cuda.set_sync_debug_mode("warn")`
    raises for each synchronizing CUDA call (item, tolist, nonzero, copies to the host, ...)."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _gpu_measure(impl: str, E: int, S: int, d: int, dtype_name: str, warmup: int, repeats: int) -> dict:
    import gc

    import torch

    result = {"impl": impl, "variant": impl, "E": E, "S": S, "d": d, "h": _gpu_hidden(d), "dtype": dtype_name}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = None
    try:
        step = _gpu_build(impl, E, S, d, getattr(torch, dtype_name))
        step()  # first call: kernel selection and allocator growth, outside the sync count
        syncs = count_host_syncs(step)
        time_s = cuda_median_seconds(step, warmup, repeats)
        result.update(status="ok", time_s=time_s, peak_bytes=torch.cuda.max_memory_allocated() - base,
                      syncs_per_step=syncs)
    except torch.OutOfMemoryError as err:
        result.update(status="oom", error=str(err)[:300])
    except Exception as err:  # an implementation that fails on a shape is reported, not fatal
        result.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _write_json(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))
    tmp.replace(out)


def gpu_main(args) -> int:
    """`--device cuda`: every row and implementation in this process, the JSON rewritten after each."""
    try:
        import torch
    except ImportError:
        print("moe_layer.py --device cuda needs torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("moe_layer.py --device cuda: no CUDA device here; nothing measured "
              "(the CPU benchmark is `python benchmarks/moe_layer.py`)", file=sys.stderr)
        return 2
    if not hasattr(torch, "_grouped_mm"):
        print(f"moe_layer.py --device cuda: torch {torch.__version__} has no torch._grouped_mm", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    impls = [i for i in args.impls.split(",") if i in GPU_IMPLS] if args.impls != ",".join(IMPLS) else GPU_IMPLS
    dtypes = args.dtypes.split(",") if args.dtypes_given else ["bfloat16"]
    out = Path(args.out if args.out_given else Path(__file__).parent / "results" / "moe_layer_cuda.json")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "k": K, "dropless": True,
            "activation": "swiglu", "warmup": args.warmup, "repeats": args.repeats}
    results: list[dict] = []
    for E, S, d in parse_rows(args.rows, GPU_ROWS):
        for dtype in dtypes:
            for impl in impls:
                r = _gpu_measure(impl, E, S, d, dtype, max(args.warmup, 3), max(args.repeats, 10))
                t = f"{r['time_s'] * 1e3:9.3f} ms" if r.get("status") == "ok" else r.get("status", "?").upper()
                m = (f"{r['peak_bytes'] / 2**20:9.0f} MiB  {r['syncs_per_step']} syncs" if r.get("status") == "ok"
                     else r.get("error", "")[:120])
                print(f"  {impl:10s} E={E:5d} S={S:6d} d={d:5d} {dtype:9s} {t}  {m}", file=sys.stderr, flush=True)
                results.append(r)
                _write_json(out, meta, results)  # row by row: a crash keeps what was measured
    print(_table(results))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=5, metavar=("IMPL", "E", "S", "D", "DTYPE"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the GPU mode (see the module docstring), bfloat16 unless --dtypes is given")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--rows", default="", help="E:S:d,... overrides the row list")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="warm-up and timed steps each last at least this long (the fast rows then reach "
                        "a steady state: at 8 experts bf16 the layer's 3rd-7th steps took 11.1 ms, "
                        "its steps after 20 warm-up ones 10.2 ms, the floor's 8.9 and 8.6 ms)")
    p.add_argument("--trials", type=int, default=1,
                   help="processes per implementation and row, interleaved; the median is reported "
                        "and the range of the per-trial ratio to the floor")
    p.add_argument("--timeout", type=int, default=900, help="seconds per implementation and row")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of every worker (torch.set_num_threads); 0: torch's default")
    p.add_argument("--mem-limit-gb", type=float, default=20.0)
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="every worker (floor and peers alike) keeps freed host memory (see module docstring)")
    p.add_argument("--never-mmap", action="store_true",
                   help="every worker also serves blocks of 32 MiB and more from the heap (no page faults "
                        "for anyone, see moe_scale/distributed/host_memory.py); default: only smaller ones")
    p.add_argument("--vary-input", action="store_true",
                   help="a new input (new routing, new expert loads) every step, as in training; "
                        "default: the same input every step")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    args = p.parse_args()
    args.dtypes_given = any(a.startswith("--dtypes") for a in sys.argv[1:])
    args.out_given = any(a.startswith("--out") for a in sys.argv[1:])
    if args.device == "cuda":
        return gpu_main(args)
    if args.worker:
        impl, E, S, d, dtype = args.worker
        _worker(impl, int(E), int(S), int(d), dtype, args.warmup, args.repeats, int(args.mem_limit_gb * 2**30),
                args.keep_freed_memory, args.vary_input, args.never_mmap, args.min_seconds, args.threads)
        return
    results = []
    out = Path(args.out)
    meta = {"k": K, "capacity_factor": CAPACITY_FACTOR, "keep_freed_memory": args.keep_freed_memory,
            "never_mmap": args.never_mmap, "trials": args.trials, "vary_input": args.vary_input,
            "warmup": args.warmup, "repeats": args.repeats, "min_seconds": args.min_seconds,
            "threads": args.threads, "impls": args.impls, "loadavg_before": _loadavg()}
    for E, S, d in parse_rows(args.rows, QUICK_ROWS if args.quick else ROWS):
        for dtype in args.dtypes.split(","):
            impls = impls_for_row(args.impls, E)
            runs = {impl: [] for impl in impls}
            for _ in range(args.trials):  # implementations interleaved within each trial
                for impl in impls:
                    r = _run_one(impl, E, S, d, dtype, args)
                    cpu_ms = f"{r['cpu_time_s'] * 1e3:10,.1f} ms CPU" if r.get("status") == "ok" else ""
                    print(f"  {impl:15s} E={E:5d} S={S:6d} d={d:4d} {dtype:9s} {_fmt_time(r):>10s} ms  {cpu_ms}  "
                          f"{_fmt_mem(r):>8s} MiB", file=sys.stderr, flush=True)
                    runs[impl].append(r)
            results += _median_trials(runs)
            # row by row: a run cut short (a timeout, a crash) keeps the rows it measured
            _write_json(out, {**meta, "loadavg_after": _loadavg(), "complete": False}, results)
    _write_json(out, {**meta, "loadavg_after": _loadavg(), "complete": True}, results)
    print(_table(results))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
