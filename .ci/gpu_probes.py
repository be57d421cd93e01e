"""The in-process probes of `.ci/gpu_check`: one per call, its result as JSON on the last stdout line.

    python .ci/gpu_probes.py grouped_mm | collectives | layer [--quick]

Each needs CUDA and only torch and moe_scale (no deepspeed, no datasets, no network).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def grouped_mm() -> dict:
    """`torch._grouped_mm` (bf16, the experts' GEMM) with empty and odd groups against a float32 loop."""
    if not hasattr(torch, "_grouped_mm"):
        return {"status": "skipped", "reason": f"torch {torch.__version__} has no torch._grouped_mm"}
    cases = []
    for sizes in ([0, 3, 17, 0, 5], [1, 0, 0, 31], [0, 0, 0, 8], [64, 1, 127, 0]):
        d, n = 64, 128
        g = torch.Generator(device="cuda").manual_seed(len(cases))
        x = torch.randn(sum(sizes), d, device="cuda", generator=g).bfloat16()
        w = torch.randn(len(sizes), d, n, device="cuda", generator=g).bfloat16()
        offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
        got = torch._grouped_mm(x, w, offs=offs).float()
        want = torch.cat([x[a:b].float() @ w[e].float() for e, (a, b) in
                          enumerate(zip([0, *offs.tolist()[:-1]], offs.tolist()))])
        err = float((got - want).abs().max()) if want.numel() else 0.0
        scale = float(want.abs().max()) if want.numel() else 1.0
        cases.append({"sizes": sizes, "max_abs_err": err, "ok": err <= 1e-2 * max(scale, 1.0)})
    return {"status": "ok" if all(c["ok"] for c in cases) else "failed", "cases": cases}


def collectives() -> dict:
    """NCCL serves CUDA tensors only: a host tensor in a plain NCCL group fails; our paths do not."""
    import torch.distributed as dist

    from moe_scale.distributed import collectives as ours
    from moe_scale.distributed.mesh import build_mesh
    from moe_scale.train.runtime import process_group_backend

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", store=dist.FileStore(os.path.join(tmp, "a"), 1), rank=0, world_size=1,
                                device_id=dev)
        try:
            dist.all_reduce(torch.ones(2, dtype=torch.float64))
            out["plain_nccl_rejects_host_tensor"] = False
        except Exception as err:  # noqa: BLE001 - which exception NCCL raises varies by version
            out["plain_nccl_rejects_host_tensor"] = True
            out["plain_nccl_error"] = str(err).splitlines()[0][:200]
        reduced = ours.all_reduce(torch.ones(2, dtype=torch.float64), dev)
        out["helper_under_plain_nccl_device"] = str(reduced.device)
        mesh = build_mesh(ep_size=1, device_type="cuda")
        out["build_mesh_under_plain_nccl"] = mesh.ep_size == 1
        dist.destroy_process_group()

        backend = process_group_backend("auto", dev)
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "b"), 1), rank=0, world_size=1,
                                device_id=dev)
        host = torch.ones(2)
        dist.all_reduce(host)  # gloo serves it under the device map
        objects = [None]
        dist.all_gather_object(objects, {"rank": 0})
        out["device_map"] = backend
        out["device_map_serves_host_and_objects"] = objects == [{"rank": 0}]
        dist.destroy_process_group()
    ok = (out["plain_nccl_rejects_host_tensor"] and out["helper_under_plain_nccl_device"].startswith("cuda")
          and out["build_mesh_under_plain_nccl"] and out["device_map_serves_host_and_objects"])
    return {"status": "ok" if ok else "failed", **out}


def layer(quick: bool) -> dict:
    """The MoE layer, forward + backward in bf16: time, TFLOP/s, host syncs per step, peak memory
    (measured as `benchmarks/moe_layer.py --device cuda` measures)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # a site package is also named benchmarks
    from moe_layer import count_host_syncs, cuda_median_seconds
    from moe_scale.moe import MoELayer

    rows = [(8, 4096, 1024)] if quick else [(8, 16384, 1024), (64, 16384, 1024)]
    results = []
    for E, S, d in rows:
        h, k = 4 * d, 2
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layer_ = MoELayer(d, E, d_hidden=h, router="topk", k=k).cuda().to(torch.bfloat16)
        x = torch.randn(S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def step():
            y, stats = layer_(x)
            (y.float().square().mean() + stats.aux_loss).backward()

        for _ in range(3):
            step()
        syncs = count_host_syncs(step)
        seconds = cuda_median_seconds(step, warmup=0, repeats=10)
        flops = 3 * 2 * S * k * d * h * 2  # two GEMMs per expert (gelu), backward twice forward
        results.append({"E": E, "S": S, "d": d, "h": h, "k": k, "dtype": "bfloat16", "seconds": seconds,
                        "tflops": flops / seconds / 1e12, "syncs_per_step": syncs,
                        "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20})
        del layer_, x
    return {"status": "ok", "rows": results}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("grouped_mm", "collectives", "layer"):
        print("usage: gpu_probes.py grouped_mm | collectives | layer [--quick]", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device"}
    elif argv[0] == "layer":
        result = layer("--quick" in argv)
    else:
        result = globals()[argv[0]]()
    print(json.dumps(result))
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
