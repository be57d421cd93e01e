"""Train the debug MultiModel on the stand-in tasks with a plain AdamW loop; print per-task metrics.

    PYTHONPATH=. python benchmarks/multimodel_tasks.py                        # joint, all tasks
    PYTHONPATH=. python benchmarks/multimodel_tasks.py --tasks speech_numbers --steps 250   # single task
    PYTHONPATH=. python benchmarks/multimodel_tasks.py --no-moe               # dense FFN instead of MoE

Joint training draws each step's task by weight (uniform by default), so a joint run of S steps
over N tasks gives each task about S/N steps: compare it with a single-task run of S/N steps
(the paper's Table 2/3) and with `--no-moe` at the same steps (Table 4; `--no-moe --hidden 512`
gives the dense FFN the compute of k=4 experts of width 128). Chance is the
majority baseline of `metrics.majority_baseline`. The vocabulary is always built over all the
stand-in tasks, so single-task and joint models have the same embedding tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import torch

from moe_scale.data.multimodel.metrics import majority_baseline
from moe_scale.data.multimodel.sampler import JointSampler
from moe_scale.data.multimodel.standins import STANDINS, standin_sources
from moe_scale.data.multimodel.tasks import TARGET_SPACES, build_tasks
from moe_scale.models.multimodel import MultiModel, MultiModelConfig
from moe_scale.models.multimodel.evaluate import evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help=f"comma-separated subset of {list(STANDINS)}")
    p.add_argument("--weights", default="", help="task=weight,... (default uniform)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--no-moe", action="store_true", help="dense FFN of the experts' width instead of each MoE layer")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128,
                   help="width of each expert (or of the dense FFN with --no-moe: k x this matches the MoE's compute)")
    p.add_argument("--eval-examples", type=int, default=150, help="per task")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write config, per-task metrics and chance here")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    all_tasks = build_tasks(standin_sources(seed=args.seed))
    names = list(STANDINS) if args.tasks == "all" else args.tasks.split(",")
    tasks = [t for t in all_tasks if t.name in names]
    if len(tasks) != len(names):
        raise SystemExit(f"unknown task in {names}; choose from {list(STANDINS)}")
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(",") if kv)} or None

    cfg = MultiModelConfig.debug(
        vocab_size=len(all_tasks[0].vocab),
        num_target_spaces=len(TARGET_SPACES),
        class_heads={t.spec.head: t.spec.num_classes for t in all_tasks if t.spec.is_classification},
        use_moe=not args.no_moe,
        num_experts=args.experts,
        moe_k=args.k,
        moe_hidden=args.hidden,
    )
    model = MultiModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"MultiModel debug: {params / 1e6:.2f}M parameters, {'dense FFN' if args.no_moe else f'MoE {args.experts} experts k={args.k}'}; "
          f"tasks: {', '.join(t.name for t in tasks)}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sampler = JointSampler(tasks, args.batch_size, weights, seed=args.seed)
    running, steps_per_task, expert_load = defaultdict(list), defaultdict(int), {}
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = next(sampler)
        loss, task_loss, out = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running[batch.task].append(float(task_loss.detach()))
        steps_per_task[batch.task] += 1
        for name, stats in zip(("encoder", "decoder"), out.moe_stats):
            expert_load[name] = expert_load.get(name, 0) + stats.tokens_per_expert_E.detach().float()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            losses = "  ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in sorted(running.items()))
            print(f"step {step + 1:5d}  {time.time() - start:6.0f}s  aux={float(out.aux_loss.detach()):.4f}  {losses}", flush=True)
            running.clear()
    train_s = time.time() - start
    for name, load in expert_load.items():
        share = load / load.sum()
        print(f"{name} MoE: share of routed tokens per expert {[round(float(x), 3) for x in share]}")

    results = {}
    print(f"\ntrained {args.steps} steps in {train_s:.0f}s; evaluation on up to {args.eval_examples} held-out examples per task")
    print(f"{'task':16s} {'steps':>5s}  {'metric':15s} {'model':>7s} {'chance':>7s}")
    for task in tasks:
        metrics = evaluate(model, task, max_examples=args.eval_examples)
        chance = majority_baseline(task, args.eval_examples)
        results[task.name] = {"steps": steps_per_task[task.name], "metrics": metrics, "chance": chance}
        for i, (k, v) in enumerate(metrics.items()):
            c = f"{chance[k]:7.3f}" if k in chance else f"{'':7s}"
            print(f"{task.name if i == 0 else '':16s} {steps_per_task[task.name] if i == 0 else '':>5}  {k:15s} {v:7.3f} {c}")
    summary = {"args": vars(args), "params": params, "train_seconds": train_s, "results": results,
               "expert_share": {k: (v / v.sum()).tolist() for k, v in expert_load.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
