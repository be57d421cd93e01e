"""Trainer step time at 2 and 4 gloo ranks: gradient sync after backward vs overlapped with it.

    before   the torch backend as it was: each expert gradient all-reduced on its own after
             backward, the norm one `pow(2).sum()` per gradient, clipping one `mul_` per
             gradient, AdamW's per-parameter loop
    after    `TorchBackend` as it is: expert gradients packed in buckets whose all-reduce starts
             from backward's post-accumulate-grad hooks, foreach norm and clipping, foreach AdamW

Same model, data and layout (parallel.ep_size=2, so at 4 ranks every expert block has an EDP
replica to reduce with); dense gradients go through DDP's buckets in both. Per rank the median
over the timed steps of the trainer's own step time (`StepResult.seconds`), then the slowest
rank. Both variants run in the same invocation, interleaved by rank count. On a shared box with
fewer cores than ranks, wall time also counts time-slicing: compare the two variants of one
row, not rows of different rank counts.

    python benchmarks/grad_sync_overlap.py [--ranks 2 4] [--steps 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=64", "moe.num_experts=8",
         "moe.d_hidden=512", "data.seq_len=64", "data.batch_size=8", "data.max_documents=60",
         "parallel.ep_size=2", "parallel.timeout_s=120", "train.eval_every=0", "checkpoint.every=0",
         "checkpoint.save_final=false", "logging.progress=false", "logging.every=1000", "optim.warmup_steps=1",
         "optim.grad_clip=1.0"]


def _use_the_old_sync() -> None:
    """Patch the torch backend and AdamW back to the per-parameter code (this process only)."""
    import torch
    import torch.distributed as dist

    from moe_scale.train import backends, trainer

    def finish_grads(self):
        for p in self.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            for p in self.expert:
                dist.all_reduce(p.grad, group=self.mesh.edp_group)
                p.grad.div_(self.world)
        grads = [p.grad.detach().float() for p in self.dense + self.expert if p.grad is not None]
        dense = [p.grad.detach().float() for p in self.dense if p.grad is not None]
        expert_sq = torch.stack([g.pow(2).sum() for g in grads[len(dense):]]).sum()
        if self.mesh.ep_size > 1:
            dist.all_reduce(expert_sq, group=self.mesh.ep_group)
        self._norm = (torch.stack([g.pow(2).sum() for g in dense]).sum() + expert_sq).sqrt()
        return self._norm

    def step(self, lr, skip):
        norm = self._norm
        if not skip:
            scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            for p in self.dense + self.expert:
                if p.grad is not None:
                    p.grad.mul_(scale)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return not skip, float(norm)

    init = backends.TorchBackend.__init__

    def old_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.expert_sync is not None:
            self.expert_sync.remove()
            self.expert_sync = None

    backends.TorchBackend.__init__ = old_init
    backends.TorchBackend.finish_grads = finish_grads
    backends.TorchBackend.step = step
    trainer.build_optimizer = lambda groups, o, device: torch.optim.AdamW(
        groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=False)


def _rank(rank: int, world: int, variant: str, steps: int, warmup: int, run_dir: str) -> float:
    import torch

    from moe_scale.train.config import load_config
    from moe_scale.train.runtime import Runtime
    from moe_scale.train.trainer import Trainer

    if variant == "before":
        _use_the_old_sync()
    cfg = load_config(str(REPO / "configs" / "lm_cpu_multirank.yaml"),
                      [*MODEL, f"train.max_steps={steps + warmup}", f"train.run_dir={run_dir}"])
    t = Trainer(cfg, runtime=Runtime(rank, world, rank, torch.device("cpu")))
    times = [t.train_step().seconds for _ in range(warmup + steps)][warmup:]
    t.metrics.close()
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grad_sync_overlap.json"))
    args = ap.parse_args(argv)
    from moe_scale.distributed.launch import run_local

    rows = []
    load_before = os.getloadavg()[0]
    for world in args.ranks:
        for variant in ("before", "after"):
            with tempfile.TemporaryDirectory() as run_dir:
                per_rank = run_local(_rank, world, variant, args.steps, args.warmup, run_dir, timeout=900,
                                     collective_timeout=300)
            rows.append({"ranks": world, "ep_size": 2, "variant": variant, "step_ms_slowest_rank": 1e3 * max(per_rank),
                         "step_ms_per_rank": [round(1e3 * s, 2) for s in per_rank]})
            print(f"{world} ranks  {variant:6s}  {rows[-1]['step_ms_slowest_rank']:8.1f} ms/step", flush=True)
    result = {"benchmark": "grad_sync_overlap", "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "warmup": args.warmup, "cpu_cores": os.cpu_count(),
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "model": MODEL, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
