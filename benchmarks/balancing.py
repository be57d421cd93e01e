"""Expert balancing methods compared on a small Llama-style MoE LM: loss against balance.

    PYTHONPATH=. python benchmarks/balancing.py             # 10 runs, ~45 min on 2 shared cores
    PYTHONPATH=. python benchmarks/balancing.py --quick     # 100 steps, one seed: a smoke run
    PYTHONPATH=. python benchmarks/balancing.py --report    # rewrite .md / .png from the .json

Every run trains the byte-level `arch: llama` LM (RoPE, RMSNorm, SwiGLU) through `Trainer` on
the shipped corpus, every FFN an MoE layer of fine-grained SwiGLU experts, dropless, with the
same tokens, steps and micro-batches (`grad_accum` > 1, so a step's global batch is several
micro-batches). The methods:

  a  softmax top-k, switch loss 0.01 on each micro-batch                  (Switch / GShard)
  b  sigmoid scores, auxiliary-loss-free bias balancing, no balance loss  (DeepSeek-V3)
  c  b plus the sequence-wise balance loss                                (DeepSeek-V3)
  d  a with balance_scope global: the switch loss from the step's summed statistics
  e  the best of a-d by mean validation loss, with one shared expert: one routed expert fewer
     and k one lower, so total and active parameters stay those of a-d

Per run, on held-out batches after training: validation bits per byte (dropless, as trained);
max/mean expert load over a step's global batch (its micro-batches together) and within each
sequence, averaged over steps, sequences and MoE layers; the fraction of assignments dropped,
and the bits per byte, when the trained model is evaluated with capacity factor 1.25 per
micro-batch (position drop policy) instead of dropless.
Writes benchmarks/results/balancing[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import fmt_seeds, group, mean_of, run_pool, trained, wall_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_CAPACITY = 1.25
# DeepSeek-V3 uses 1e-4 on a loss whose balanced value (1) is that of the switch loss. Ten times
# that, a tenth of (a)'s switch weight: strong enough to act within a short run while the bias
# stays the main balancer, as the paper intends the loss as a backstop against extreme sequences.
SEQ_WEIGHT = 1e-3
BIAS_RATE = 1e-3  # DeepSeek-V3's gamma for most of its training


@dataclass
class Scale:
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    seq_len: int = 128
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 4
    num_experts: int = 16
    k: int = 4
    hidden: int = 32  # SwiGLU width of one expert
    steps: int = 1200
    eval_batches: int = 64  # micro-batches
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1)

    @property
    def tokens(self) -> int:
        return self.steps * self.grad_accum * self.batch_size * self.seq_len


FULL = Scale()
QUICK = Scale(steps=100, eval_batches=16, seeds=(0,))


def methods(s: Scale) -> dict[str, dict]:
    base = {"num_experts": s.num_experts, "k": s.k, "d_hidden": s.hidden, "activation": "swiglu",
            "router": "topk", "dropless": True}
    switch = {**base, "aux_loss": {"switch": 0.01}}
    sigmoid_bias = {**base, "score_func": "sigmoid", "bias_update_rate": BIAS_RATE}
    return {
        "a: softmax + switch 0.01": switch,
        "b: sigmoid + loss-free bias": sigmoid_bias,
        f"c: b + sequence loss {SEQ_WEIGHT:g}": {**sigmoid_bias, "aux_loss": {"seq": SEQ_WEIGHT}},
        "d: softmax + global-batch switch 0.01": {**switch, "balance_scope": "global"},
    }


def with_shared_expert(moe: dict) -> dict:
    """One always-on expert of the routed experts' width in place of one routed expert and one of
    the k choices: equal total and active expert parameters."""
    return {**moe, "num_shared_experts": 1, "num_experts": moe["num_experts"] - 1, "k": moe["k"] - 1}


def config_dict(moe: dict, s: Scale, seed: int) -> dict:
    return {
        "model": {"name": "lm", "arch": "llama", "d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads,
                  "max_seq_len": s.seq_len, "moe_every": 1},
        "moe": moe,
        "data": {"seq_len": s.seq_len, "batch_size": s.batch_size},
        "optim": {"lr": s.lr, "min_lr": s.lr / 10, "warmup_steps": max(s.steps // 20, 1)},
        "train": {"max_steps": s.steps, "grad_accum": s.grad_accum, "eval_every": 0, "eval_batches": s.eval_batches,
                  "device": "cpu", "num_threads": 1, "seed": seed},
        "checkpoint": {"every": 0, "save_final": False},
        "logging": {"every": max(s.steps // 10, 1), "load_every": s.steps, "progress": False},
    }


# ---------------------------------------------------------------- held-out measurements


def held_out_balance(trainer, s: Scale) -> dict:
    """Expert load of the trained model (eval mode, dropless) on the validation batches.

    step: per MoE layer, assignments per expert summed over `grad_accum` consecutive
    micro-batches (one step's global batch), max/mean. sequence: the same within each sequence.
    Both averaged over steps (or sequences) and layers.
    """
    import torch

    model, task = trainer.model, trainer.task
    model.eval()
    step_ratios, seq_ratios = [], []
    window: list[torch.Tensor] = []
    with torch.no_grad():
        for i, batch in enumerate(task.val_batches(s.eval_batches)):
            stats = task.loss(model, batch, trainer.rt.device).moe_stats
            counts_LE = torch.stack([st.routed_per_expert_E.double() for st in stats])
            window.append(counts_LE)
            for st in stats:
                seq_ratios.extend(per_sequence_max_mean(st, s.seq_len).tolist())
            if len(window) == s.grad_accum:
                step_LE = torch.stack(window).sum(0)
                step_ratios.extend((step_LE.max(-1).values / step_LE.mean(-1)).tolist())
                window = []
    return {"step_max_mean": sum(step_ratios) / len(step_ratios), "seq_max_mean": sum(seq_ratios) / len(seq_ratios)}


def per_sequence_max_mean(stats, seq_len: int):
    """max/mean of the assignments per expert within each sequence of a dropless call: `[B]`."""
    import torch

    plan, E = stats.plan, stats.routed_per_expert_E.shape[0]
    # The experts' input rows are grouped by expert in order, counts_E rows each.
    expert_R = torch.repeat_interleave(torch.arange(E, device=plan.counts_E.device), plan.counts_E)
    seq_R = plan.row_token_N // seq_len
    B = stats.num_tokens // seq_len
    counts_BE = torch.zeros(B * E, dtype=torch.float64, device=expert_R.device).index_add_(
        0, seq_R * E + expert_R, torch.ones_like(expert_R, dtype=torch.float64)).view(B, E)
    return counts_BE.max(-1).values / counts_BE.mean(-1)


def uniform_reference(s: Scale, k: int, E: int, draws: int = 200) -> dict:
    """The same max/mean ratios for routing drawn uniformly at random (k distinct experts per
    token): what perfect balance in expectation still shows at these counts."""
    import torch

    g = torch.Generator().manual_seed(0)

    def ratio(tokens: int) -> float:
        picks = torch.rand(draws, tokens, E, generator=g).topk(k, dim=-1).indices
        counts = torch.zeros(draws, E).scatter_add_(1, picks.reshape(draws, -1), torch.ones(draws, tokens * k))
        return float((counts.max(-1).values / counts.mean(-1)).mean())

    return {"step_max_mean": ratio(s.grad_accum * s.batch_size * s.seq_len), "seq_max_mean": ratio(s.seq_len)}


def capped_eval(trainer, s: Scale) -> dict:
    """Validation loss and dropped assignments with capacity factor EVAL_CAPACITY per micro-batch."""
    import torch

    from moe_scale.moe import MoELayer

    model, task = trainer.model, trainer.task
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.cfg.dropless, layer.cfg.eval_capacity_factor = False, EVAL_CAPACITY
    model.eval()
    loss, dropped, assignments = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in task.val_batches(s.eval_batches):
            out = task.loss(model, batch, trainer.rt.device)
            loss += float(out.loss)
            for st in out.moe_stats:
                dropped += float(st.num_dropped)
                assignments += float(st.num_assignments)
    for layer in layers:
        layer.cfg.dropless = True
    return {"capped_val_bpb": task.val_metrics(loss / s.eval_batches)["val_bpb"],
            "dropped_at_capacity": dropped / max(assignments, 1.0)}


# ---------------------------------------------------------------- one run (in a worker process)


def train_one(name: str, moe: dict, seed: int, s: Scale) -> dict:
    with trained(config_dict(moe, s, seed)) as (trainer, last, seconds):
        balance = held_out_balance(trainer, s)
        capped = capped_eval(trainer, s)
        params = sum(p.numel() for p in trainer.model.parameters())
        routed = sum(p.numel() for n, p in trainer.model.named_parameters() if ".experts." in n)
    return {"experiment": "balancing", "name": name, "seed": seed, "moe": moe,
            "val_bpb": last["val_bpb"], "val_loss_nats": last["val_loss"], "train_loss_nats": last["loss"],
            "tokens_per_s": s.tokens / seconds, "train_seconds": seconds,
            "params": params, "active_params": params - routed + moe["k"] * routed // moe["num_experts"],
            **balance, **capped}


def train_all(named: dict[str, dict], s: Scale, workers: int) -> list[dict]:
    jobs = [(name, moe, seed, s) for seed in s.seeds for name, moe in named.items()]
    return run_pool(train_one, jobs, workers, lambda job, r: (
        f"{r['name']:40s} seed {r['seed']}: {r['val_bpb']:.3f} bpb, step max/mean {r['step_max_mean']:.2f}, "
        f"seq {r['seq_max_mean']:.2f}, dropped@{EVAL_CAPACITY} {100 * r['dropped_at_capacity']:.1f}%, "
        f"{r['tokens_per_s']:.0f} tok/s"))


# ---------------------------------------------------------------- report


def random_floors(results: list[dict], s: Scale) -> dict[str, dict]:
    """`uniform_reference` for each (k, experts) of the runs, keyed "k/E"."""
    shapes = sorted({(r["moe"]["k"], r["moe"]["num_experts"]) for r in results})
    return {f"{k}/{E}": uniform_reference(s, k, E) for k, E in shapes}


def markdown(results: list[dict], s: Scale, floors: dict, timing: dict, label: str) -> str:
    lines = [f"# Expert balancing methods ({label} run)", "",
             f"Byte-level Llama-style LM (RoPE, RMSNorm, SwiGLU), d_model={s.d_model}, {s.n_layers} blocks, every FFN "
             f"an MoE of {s.num_experts} SwiGLU experts of width {s.hidden}, k={s.k}, dropless in training; "
             f"{s.steps} steps x {s.grad_accum} micro-batches x {s.batch_size} sequences x {s.seq_len} tokens = "
             f"{s.tokens / 1e6:.2f}M training tokens; seeds {list(s.seeds)} (values listed per seed). Held out: "
             f"{s.eval_batches} micro-batches ({s.eval_batches * s.batch_size * s.seq_len / 1e3:.0f}k bytes). "
             f"{wall_text(timing)}", "",
             f"Bias update rate {BIAS_RATE:g} per step (DeepSeek-V3's gamma). Sequence-loss weight {SEQ_WEIGHT:g}: ten "
             "times DeepSeek-V3's 1e-4 (the loss is 1 when balanced, like the switch loss), a tenth of a's switch "
             "weight, so that it can act within a short run while the bias stays the main balancer. e keeps total "
             "and active parameters: one always-on expert of the routed width replaces one routed expert and one of "
             "the k choices.", "",
             "| method | val bpb (per seed) | mean | step max/mean load | sequence max/mean load | "
             "random routing: step / sequence | "
             f"dropped at cf {EVAL_CAPACITY} | val bpb at cf {EVAL_CAPACITY} | active / total params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in group(results, "balancing").items():
        r0 = rows[0]
        floor = floors[f"{r0['moe']['k']}/{r0['moe']['num_experts']}"]
        dropped = " / ".join(f"{100 * r['dropped_at_capacity']:.1f}%" for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {fmt_seeds(rows, 'val_bpb')} | {mean_of(rows, 'val_bpb'):.3f} | "
                     f"{fmt_seeds(rows, 'step_max_mean', 2)} | {fmt_seeds(rows, 'seq_max_mean', 2)} | "
                     f"{floor['step_max_mean']:.2f} / {floor['seq_max_mean']:.2f} | {dropped} | "
                     f"{fmt_seeds(rows, 'capped_val_bpb')} | "
                     f"{r0['active_params'] / 1e6:.3f}M / {r0['params'] / 1e6:.3f}M |")
    lines += ["", "'Random routing': the same ratios for k distinct experts drawn uniformly per token at the "
              "same counts, the floor that sampling noise alone gives (e has k-1 of E-1 routed experts).", "",
              "Load ratios are averaged over held-out steps (or sequences) and MoE layers, measured in eval mode "
              f"with the trained router. 'At cf {EVAL_CAPACITY}': the same model evaluated with capacity "
              f"ceil(k x {s.batch_size * s.seq_len} / E x {EVAL_CAPACITY}) per expert per micro-batch, first come "
              "first kept; training was dropless.", ""]
    return "\n".join(lines)


def plot(results: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharey=True)
    keys = (("step_max_mean", "step max/mean expert load"), ("seq_max_mean", "sequence max/mean expert load"),
            ("dropped_at_capacity", f"assignments dropped at capacity factor {EVAL_CAPACITY}"))
    for ax, (key, label) in zip(axes, keys):
        for i, (name, rows) in enumerate(group(results, "balancing").items()):
            ax.scatter([r[key] for r in rows], [r["val_bpb"] for r in rows], color=f"C{i}", label=name,
                       marker="o")
        if key in reference:
            ax.axvline(reference[key], ls=":", color="gray", lw=1)
            ax.text(reference[key], ax.get_ylim()[1], " random routing", fontsize=7, color="gray", va="top")
        ax.set_xlabel(label)
    axes[0].set_ylabel("validation bits per byte (dropless)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Balancing methods: loss against balance (one point per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100 steps, one seed (a smoke run)")
    p.add_argument("--steps", type=int, default=0, help="override the steps per run")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="", help="output stem (default benchmarks/results/balancing[_quick])")
    p.add_argument("--report", action="store_true", help="rewrite the .md and .png from the stem's .json, no training")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.steps:
        s.steps = args.steps
    stem = Path(args.out) if args.out else RESULTS / f"balancing{'_quick' if args.quick else ''}"
    label = "quick" if args.quick else "full"
    if args.report:
        return write_report(json.loads(stem.with_suffix(".json").read_text()), stem, label)
    start = time.time()
    named = methods(s)
    print(f"{len(named) * len(s.seeds)} + {len(s.seeds)} runs of {s.steps} steps on {args.workers} workers", flush=True)
    results = train_all(named, s, args.workers)
    best = min(named, key=lambda n: mean_of([r for r in results if r["name"] == n], "val_bpb"))
    shared = {f"e: {best[0]} + shared expert": with_shared_expert(named[best])}
    results += train_all(shared, s, args.workers)
    timing = {"seconds": time.time() - start, "trained_runs": len(results)}
    results.sort(key=lambda r: (r["name"], r["seed"]))
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = {"scale": {**vars(s), "tokens": s.tokens}, "seq_weight": SEQ_WEIGHT, "bias_rate": BIAS_RATE,
               "best_of_a_to_d": best, "timing": timing, "runs": results}
    return write_report(summary, stem, label)


def write_report(summary: dict, stem: Path, label: str) -> dict:
    s = Scale(**{**{k: v for k, v in summary["scale"].items() if k != "tokens"}, "seeds": tuple(summary["scale"]["seeds"])})
    summary["random_routing"] = floors = random_floors(summary["runs"], s)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary["runs"], s, floors, summary["timing"], label)
    stem.with_suffix(".md").write_text(md)
    plot(summary["runs"], floors[f"{s.k}/{s.num_experts}"], stem.with_suffix(".png"))
    print("\n" + md)
    print(f"wrote {stem}.json, .md, .png")
    return summary


if __name__ == "__main__":
    main()
