"""Reproduce the findings of "Outrageously Large Neural Networks" (Shazeer et al. 2017) at CPU scale.

    PYTHONPATH=. python benchmarks/shazeer_findings.py --quick      # < 10 min on 2 cores, one seed
    PYTHONPATH=. python benchmarks/shazeer_findings.py              # < 1 h on 2 cores, two seeds
    PYTHONPATH=. python benchmarks/shazeer_findings.py --only experts,balance
    PYTHONPATH=. python benchmarks/shazeer_findings.py --global-batch 4 --only experts,balance --seeds 0
    PYTHONPATH=. python benchmarks/shazeer_findings.py --global-batch 4 --steps 8000 --only experts --experts 4,16,64,256

Four experiments, each a set of training runs of the byte-level MoE LM (`model.name: lm`)
through moe_scale's own `Trainer` on the shipped offline corpus (the Python standard library
sources), one MoE layer (the second of two blocks), experts of width `Scale.hidden`:

  experts    1 (dense FFN of width k*h), 4, 16, 64, 256, 1024 experts at k=2: equal active
             parameters per token and equal tokens (Table 7's trend), with the top-2 softmax
             gate (every seed) and the paper's noisy top-2 gate (first seed). Plus a dense FFN
             whose FLOPs per token equal those of the 1024-expert top-2 model, router included.
  balance    64 experts, noisy top-2, dropless: no balancing loss / importance only / load only
             / both (Table 6); max/mean expert load and CV of load on held-out batches.
  hierarchy  1024 experts: flat noisy top-2 vs hierarchical gating (32 groups x 32 experts,
             1 group then 2 experts per token, appendix B); loss, and router time per call
             measured side by side after training on an idle machine.
  routers    64 experts, capacity factor 1.25: noisy top-2, switch top-1, top-2 (GShard),
             expert choice (2 experts per token on average), hash (top-1 on the byte id).

`--global-batch N` asks whether the noisy gate's failure in `experts` and `balance` comes from
forming the CV^2 losses over one 2048-token batch: it trains the noisy-gate sweep (with its
dense baseline) and the balance table again with the losses over each step's N micro-batches
(`balance_scope: global`, `grad_accum` N, N times fewer steps: the same tokens), plus the
per-micro-batch losses at that step schedule as a control, and adds them as a section and a
series of the existing results (a later invocation with other seeds adds to them; one with
other steps, e.g. `--steps 8000` for 2000 steps of 4 micro-batches, 4x the tokens, adds a
section of its own).

Runs go to a pool of `--workers` processes of one thread each (2 on this machine), so a run's
tokens/s is measured while another run shares the machine; compare them within one table.
Writes benchmarks/results/shazeer_findings[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import fmt_seeds, group, mean_of, run_pool, trained, wall_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENTS = ("experts", "balance", "hierarchy", "routers")


@dataclass
class Scale:
    """Model and budget of every run (one MoE layer in the second block)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 32
    hidden: int = 16  # width of one expert
    k: int = 2
    steps: int = 2000
    eval_batches: int = 40
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1)
    grad_accum: int = 1  # micro-batches per step
    balance_scope: str = "micro_batch"  # where the CV^2 statistics are summed (MoEConfig.balance_scope)

    @property
    def tokens(self) -> int:
        return self.steps * self.grad_accum * self.batch_size * self.seq_len

    def global_batch(self, micro_batches: int) -> "Scale":
        """The same tokens in `micro_batches` times fewer, larger steps, with the balancing losses
        formed over each step's whole batch."""
        return dataclasses.replace(self, steps=self.steps // micro_batches, grad_accum=micro_batches,
                                   balance_scope="global")


FULL = Scale()
QUICK = Scale(steps=400, eval_batches=16, seeds=(0,))


@dataclass
class Run:
    experiment: str
    name: str
    moe: dict
    seed: int = 0
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the runs


def balancing_losses(importance: float = 0.1, load: float = 0.1) -> dict:
    return {"importance": importance, "load": load, "switch": 0.0, "z": 0.0}


NO_AUX = balancing_losses(0.0, 0.0)


def dense(hidden: int) -> dict:
    """A single expert of width `hidden` behind a top-1 gate: its gate is exactly 1, so this is a dense FFN."""
    return {"num_experts": 1, "k": 1, "router": "topk", "d_hidden": hidden, "dropless": True, "aux_loss": NO_AUX}


def noisy(E: int, s: Scale, aux: dict | None = None, **extra) -> dict:
    """Noisy top-k gating (the paper's), importance and load losses at 0.1 unless `aux` says otherwise."""
    return {"num_experts": E, "k": s.k, "router": "noisy_topk", "d_hidden": s.hidden, "dropless": True,
            "aux_loss": aux or balancing_losses(), "balance_scope": s.balance_scope, **extra}


SWITCH_AUX = {"importance": 0.0, "load": 0.0, "switch": 0.01, "z": 0.001}


def softmax_topk(E: int, s: Scale, **extra) -> dict:
    """Top-k of the softmax, renormalised (GShard's top-2) with the switch/GShard balancing loss."""
    return {**noisy(E, s, **extra), "router": "topk", "aux_loss": SWITCH_AUX}


SERIES = {"top-2 softmax": softmax_topk, "noisy top-2": noisy}


def router_macs(moe: dict, d: int) -> int:
    """Multiply-adds per token of the gate (noise projection included in training)."""
    E = moe["num_experts"]
    if moe["router"] == "hash":
        return 0
    if moe["router"] == "noisy_topk":
        return 2 * d * E
    if moe["router"] == "hierarchical":
        a = moe["hierarchical_groups"]
        return 2 * d * (a + moe.get("hierarchical_k_groups", 1) * (E // a))
    return d * E if E > 1 else 0


def ffn_macs(moe: dict, d: int) -> int:
    """Multiply-adds per token of the MoE layer: gate plus the experts a token visits."""
    k = moe["k"] * moe.get("hierarchical_k_groups", 1)
    return router_macs(moe, d) + k * 2 * d * moe["d_hidden"]


EXPERT_COUNTS = (4, 16, 64, 256, 1024)


def balance_variants() -> dict[str, dict]:
    """Table 6's loss settings, by name: none, importance only, load only, both, both weak."""
    return {"none": NO_AUX, "importance": balancing_losses(0.2, 0.0), "load": balancing_losses(0.0, 0.2),
            "both": balancing_losses(0.1, 0.1), "both, weak": balancing_losses(0.01, 0.01)}


def plan_runs(s: Scale, only: set[str]) -> list[Run]:
    runs: list[Run] = []
    if "experts" in only:
        # The headline series (top-2 softmax gate) on every seed, the paper's noisy gate on the first.
        largest = softmax_topk(EXPERT_COUNTS[-1], s)
        matched = (ffn_macs(largest, s.d_model)) // (2 * s.d_model)
        for seed in s.seeds:
            runs.append(Run("experts", "1 (dense)", dense(s.k * s.hidden), seed, {"experts": 1, "series": "dense"}))
            runs.append(Run("experts", f"dense, FLOPs of {EXPERT_COUNTS[-1]}", dense(matched), seed,
                            {"experts": 1, "flop_matched": EXPERT_COUNTS[-1], "series": "dense"}))
            for series, gate in SERIES.items():
                if series == "noisy top-2" and seed != s.seeds[0]:
                    continue
                for E in EXPERT_COUNTS:
                    runs.append(Run("experts", f"{E}, {series}", gate(E, s), seed, {"experts": E, "series": series}))
    if "balance" in only:
        for seed in s.seeds:
            for name, aux in balance_variants().items():
                runs.append(Run("balance", name, noisy(64, s, aux), seed, {"aux": aux}))
    if "hierarchy" in only:
        E = EXPERT_COUNTS[-1]
        a = int(math.isqrt(E))
        for seed in s.seeds[:1]:
            if "experts" not in only:
                runs.append(Run("hierarchy", f"{E}, noisy top-2", noisy(E, s), seed))
            runs.append(Run("hierarchy", f"hierarchical {a}x{E // a}",
                            noisy(E, s, router="hierarchical", hierarchical_groups=a, hierarchical_k_groups=1), seed))
    if "routers" in only:
        capped = {"dropless": False, "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "min_capacity": 4}
        policies = {
            "noisy top-2": noisy(64, s, **capped),
            "switch top-1": {**noisy(64, s, **capped), "router": "switch", "k": 1, "aux_loss": SWITCH_AUX},
            "top-2 (GShard)": softmax_topk(64, s, **capped),
            "expert choice": {**noisy(64, s, **capped), "router": "expert_choice", "aux_loss": {**NO_AUX, "z": 0.001}},
            "hash": {**noisy(64, s, **capped), "router": "hash", "k": 1, "aux_loss": NO_AUX},
        }
        for seed in s.seeds[:1]:
            for name, moe in policies.items():
                runs.append(Run("routers", name, moe, seed))
    return runs


def plan_global_runs(s: Scale, only: set[str], counts: tuple[int, ...] = EXPERT_COUNTS,
                     control: bool = False) -> list[Run]:
    """The noisy-gate experts sweep and the balance table with the CV^2 losses over each step's
    global batch; the dense baselines and a per-micro-batch control at the same step schedule
    (in the sweep too with `control`)."""
    runs: list[Run] = []
    if "experts" in only:
        for seed in s.seeds:
            runs.append(Run("experts", "1 (dense)", dense(s.k * s.hidden), seed, {"experts": 1, "series": "dense"}))
            for E in counts:
                runs.append(Run("experts", f"{E}, noisy top-2", noisy(E, s), seed,
                                {"experts": E, "series": "noisy top-2"}))
                if control:
                    runs.append(Run("experts", f"{E}, noisy top-2, CV^2 per micro-batch",
                                    noisy(E, s, balance_scope="micro_batch"), seed,
                                    {"experts": E, "series": "noisy top-2, CV^2 per micro-batch"}))
    if "balance" in only:
        for seed in s.seeds:
            for name, aux in balance_variants().items():
                runs.append(Run("balance", name, noisy(64, s, aux), seed, {"aux": aux}))
            per_micro_batch = noisy(64, s, balancing_losses(), balance_scope="micro_batch")
            runs.append(Run("balance", "both, per micro-batch", per_micro_batch, seed, {"aux": balancing_losses()}))
    return runs


# ---------------------------------------------------------------- one run (in a worker process)


def config_dict(run: Run, s: Scale) -> dict:
    return {
        "model": {"name": "lm", "d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads,
                  "max_seq_len": s.seq_len, "moe_every": 2},
        "moe": run.moe,
        "data": {"seq_len": s.seq_len, "batch_size": s.batch_size},
        "optim": {"lr": s.lr, "min_lr": s.lr / 10, "warmup_steps": max(s.steps // 20, 1)},
        "train": {"max_steps": s.steps, "grad_accum": s.grad_accum, "eval_every": 0, "eval_batches": s.eval_batches,
                  "device": "cpu", "num_threads": 1, "seed": run.seed},
        "checkpoint": {"every": 0, "save_final": False},
        "logging": {"every": max(s.steps // 10, 1), "load_every": s.steps, "progress": False},
    }


def held_out_routing(trainer, batches: int, micro_batches: int = 1) -> dict:
    """Expert load as training sees it (train mode: router noise, train capacity) on held-out batches.

    Per batch: max/mean and coefficient of variation (std/mean) of the assignments routed to each
    expert (before capacity), as in the paper's Table 6; with `micro_batches` > 1 also the max/mean
    over each step's global batch (that many consecutive batches); over all batches: dropped assignments and
    tokens left with no expert; for noisy top-k gates, the spread (std over experts) of a token's
    clean logits and the mean noise std softplus(x W_noise): routing is learned only where the
    first is not small against the second.
    """
    import torch

    import torch.nn.functional as F

    from moe_scale.moe.routing import NOISE_EPSILON, NoisyTopKRouter

    model, task = trainer.model, trainer.task
    model.train()
    ratios, cvs, dropped, assignments, unrouted, tokens = [], [], 0.0, 0.0, 0.0, 0
    step_ratios, window = [], []
    gate: dict[str, list[float]] = {"gate_logit_std": [], "gate_noise_std": []}

    def noisy_gate_scales(layer, args, kwargs):
        """How far apart the clean gate logits of one token are, against the noise added to them."""
        x_Sd = args[0].reshape(-1, layer.cfg.d_model)
        gate["gate_logit_std"].append(float((x_Sd @ layer.router.w_gate).std(-1).mean()))
        gate["gate_noise_std"].append(float((F.softplus(x_Sd @ layer.router.w_noise) + NOISE_EPSILON).mean()))

    hooks = [m.register_forward_pre_hook(noisy_gate_scales, with_kwargs=True) for m in model.modules()
             if isinstance(getattr(m, "router", None), NoisyTopKRouter)]
    with torch.no_grad():
        for batch in task.val_batches(batches):
            stats = task.loss(model, batch, trainer.rt.device).moe_stats
            window.append(torch.stack([st.routed_per_expert_E.double() for st in stats]))
            if len(window) == micro_batches:
                step_LE = torch.stack(window).sum(0)
                step_ratios.extend((step_LE.max(-1).values / step_LE.mean(-1)).tolist())
                window = []
            for st in stats:
                load = st.routed_per_expert_E.double()
                ratios.append(float(load.max() / load.mean()))
                cvs.append(float(load.std(unbiased=False) / load.mean()))
                dropped += float(st.num_dropped)
                assignments += float(st.num_assignments)
                unrouted += float(st.num_unrouted)
                tokens += st.num_tokens
    for h in hooks:
        h.remove()
    model.eval()
    n = max(len(ratios), 1)
    if micro_batches > 1 and step_ratios:
        gate["max_mean_load_step"] = step_ratios
    return {"max_mean_load": sum(ratios) / n, "cv_load": sum(cvs) / n,
            "dropped_assignments": dropped / max(assignments, 1.0), "unrouted_tokens": unrouted / max(tokens, 1),
            **{k: sum(v) / len(v) for k, v in gate.items() if v}}


def train_one(run: Run, s: Scale) -> dict:
    with trained(config_dict(run, s)) as (trainer, last, seconds):
        routing = held_out_routing(trainer, min(s.eval_batches, 16), s.grad_accum) if run.moe["num_experts"] > 1 else {}
        params = sum(p.numel() for p in trainer.model.parameters())
        expert_params = sum(p.numel() for n, p in trainer.model.named_parameters() if ".experts." in n)
    one_expert = expert_params // run.moe["num_experts"]
    k = run.moe["k"] * run.moe.get("hierarchical_k_groups", 1)
    return {
        "experiment": run.experiment, "name": run.name, "seed": run.seed, "moe": run.moe, **run.meta,
        "val_bpb": last["val_bpb"], "train_loss_nats": last["loss"],
        "tokens_per_s": s.tokens / seconds, "train_seconds": seconds,
        "params": params, "active_params": params - expert_params + min(k, run.moe["num_experts"]) * one_expert,
        "moe_macs_per_token": ffn_macs(run.moe, s.d_model), **routing,
    }


# ---------------------------------------------------------------- router timing (main process)


def router_time_ms(s: Scale, repeats: int = 30) -> dict:
    """Forward + backward of the gate alone (with its balancing losses) at 1024 and 4096 experts,
    flat vs hierarchical, interleaved, median ms per call on one thread."""
    import torch

    from moe_scale.moe import MoELayer
    from moe_scale.moe.losses import aux_losses, weighted_total

    torch.set_num_threads(1)
    S = s.batch_size * s.seq_len
    out = {}
    for E in (1024, 4096):
        a = int(math.isqrt(E))
        layers = {
            "flat": MoELayer(s.d_model, **noisy(E, s)),
            "hierarchical": MoELayer(s.d_model, **noisy(E, s, router="hierarchical", hierarchical_groups=a)),
        }
        x = torch.randn(S, s.d_model, requires_grad=True)
        times = {name: [] for name in layers}
        for _ in range(repeats):
            for name, layer in layers.items():
                for p in layer.router.parameters():
                    torch.nn.init.normal_(p, std=0.02)
                t0 = time.perf_counter()
                r = layer.router(x)
                loss = r.weight_N.sum() + weighted_total(aux_losses(r.stats, E), layer.cfg.aux_loss, x)
                loss.backward()
                times[name].append(time.perf_counter() - t0)
        out[str(E)] = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}
    return out


# ---------------------------------------------------------------- report


def flat_rows(results: list[dict]) -> list[dict]:
    """The flat noisy-gated model with the most experts (from the experts or the hierarchy runs)."""
    name = f"{EXPERT_COUNTS[-1]}, noisy top-2"
    return group(results, "experts").get(name) or group(results, "hierarchy").get(name, [])


def gate_scales(r: dict) -> str:
    return f"{r['gate_logit_std']:.3f} vs {r['gate_noise_std']:.2f}" if "gate_logit_std" in r else "-"


def markdown(results: list[dict], router_ms: dict | None, s: Scale, timing: dict, label: str,
             global_batches: tuple[dict, ...] = ()) -> str:
    lines = [f"# Shazeer et al. 2017 findings at CPU scale ({label} run)", "",
             f"Byte-level LM, d_model={s.d_model}, {s.n_layers} blocks (MoE in the second), experts of width "
             f"{s.hidden}, k={s.k}; {s.steps} steps x {s.batch_size * s.seq_len} tokens = {s.tokens / 1e6:.2f}M "
             f"training tokens; validation bits per byte on {s.eval_batches * s.batch_size * s.seq_len / 1e3:.0f}k "
             f"held-out bytes; seeds {list(s.seeds)} (values listed per seed). {wall_text(timing)}", ""]
    if any(r["experiment"] == "experts" for r in results):
        lines += ["## More experts at equal active compute (Table 7 trend)", "",
                  "| experts, gate | val bpb (per seed) | mean | total params | active params | MoE MACs/token | tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        for name, rows in group(results, "experts").items():
            r0 = rows[0]
            lines.append(f"| {name} | {fmt_seeds(rows, 'val_bpb')} | {mean_of(rows, 'val_bpb'):.3f} | "
                         f"{r0['params'] / 1e6:.2f}M | {r0['active_params'] / 1e6:.3f}M | {r0['moe_macs_per_token'] / 1e3:.0f}k | "
                         f"{mean_of(rows, 'tokens_per_s'):.0f} |")
        lines.append("")
    if any(r["experiment"] == "balance" for r in results):
        lines += ["## Balancing losses (Table 6), 64 experts, noisy top-2, dropless", "",
                  "| loss | w_importance | w_load | val bpb (per seed) | max/mean load | CV(load) | clean-logit spread vs noise std |",
                  "|---|---|---|---|---|---|---|"]
        for name, rows in group(results, "balance").items():
            aux = rows[0]["aux"]
            lines.append(f"| {name} | {aux['importance']} | {aux['load']} | {fmt_seeds(rows, 'val_bpb')} | "
                         f"{fmt_seeds(rows, 'max_mean_load', 2)} | {fmt_seeds(rows, 'cv_load', 2)} | "
                         f"{'; '.join(gate_scales(r) for r in sorted(rows, key=lambda r: r['seed']))} |")
        lines += ["", "Paper (Table 6): max/mean load 17.8 without balancing losses, 1.07-1.47 with them.", ""]
    if any(r["experiment"] in ("hierarchy", "experts") for r in results) and router_ms:
        lines += ["## Hierarchical vs flat gating", "",
                  "| gate | val bpb (per seed) | tokens/s | MoE MACs/token | max/mean load |", "|---|---|---|---|---|"]
        rows_by = {f"flat {EXPERT_COUNTS[-1]}, noisy top-2": flat_rows(results),
                   **{n: rows for n, rows in group(results, "hierarchy").items() if n.startswith("hier")}}
        for name, rows in rows_by.items():
            if rows:
                lines.append(f"| {name} | {fmt_seeds(rows, 'val_bpb')} | {mean_of(rows, 'tokens_per_s'):.0f} | "
                             f"{rows[0]['moe_macs_per_token'] / 1e3:.0f}k | {fmt_seeds(rows, 'max_mean_load', 2)} |")
        lines += ["", f"Router forward+backward per call ({s.batch_size * s.seq_len} tokens, d={s.d_model}, one thread, "
                  "median of interleaved repeats):", "", "| experts | flat ms | hierarchical ms | ratio |", "|---|---|---|---|"]
        for E, t in router_ms.items():
            lines.append(f"| {E} | {t['flat']:.2f} | {t['hierarchical']:.2f} | {t['hierarchical'] / t['flat']:.2f}x |")
        lines.append("")
    if any(r["experiment"] == "routers" for r in results):
        lines += ["## Routing policies at 64 experts, capacity factor 1.25", "",
                  "| router | val bpb | dropped assignments | tokens with no expert | MoE MACs/token | tokens/s |",
                  "|---|---|---|---|---|---|"]
        for name, rows in group(results, "routers").items():
            r = rows[0]
            lines.append(f"| {name} | {r['val_bpb']:.3f} | {100 * r['dropped_assignments']:.1f}% | "
                         f"{100 * r['unrouted_tokens']:.1f}% | {r['moe_macs_per_token'] / 1e3:.0f}k | {r['tokens_per_s']:.0f} |")
        lines.append("")
    for g in global_batches:
        lines += global_markdown(g, results, s)
    return "\n".join(lines)


def global_markdown(g: dict, base: list[dict], s: Scale) -> list[str]:
    """The section of the `--global-batch` runs, beside the per-micro-batch runs above (scale `s`)."""
    gs = g["scale"]
    micro = gs["batch_size"] * gs["seq_len"]
    tokens = "the same tokens as" if gs["tokens"] == s.tokens else f"{gs['tokens'] / s.tokens:g}x the tokens of"
    lines = [f"## Noisy top-2 with the CV^2 losses over each step's global batch ({gs['steps']} steps)", "",
             f"The same model, {tokens} the runs above: {gs['steps']} steps x {gs['grad_accum']} micro-batches x "
             f"{micro} tokens = {gs['tokens'] / 1e6:.2f}M. The importance and load CV^2 are formed from statistics "
             f"summed over the step's micro-batches (`balance_scope: global`; micro-batch m sees micro-batches 1..m, "
             f"the last all {gs['grad_accum'] * micro} tokens) instead of over each {micro}-token batch (rows marked "
             f"'CV^2 per micro-batch': over each batch, at the same schedule, as a control). Seeds {gs['seeds']} "
             f"(values listed per seed). {wall_text(g['timing'])} Max/mean load on held-out data, in train mode, "
             f"per {micro}-token batch and per {gs['grad_accum']}-batch step.", ""]
    per_micro = group(base, "experts")
    experts = group(g["runs"], "experts")
    if experts:
        lines += [f"| experts | val bpb (per seed) | mean | above: CV^2 per batch, {s.steps} x {micro} tokens (mean bpb) | "
                  "max/mean load, batch | max/mean load, step | clean-logit spread vs noise std |",
                  "|---|---|---|---|---|---|---|"]
        for name, rows in experts.items():
            before = per_micro.get(name)
            prior = f"{mean_of(before, 'val_bpb'):.3f}" if before else "-"
            batch, step = (fmt_seeds(rows, key, 2) if key in rows[0] else "-"
                           for key in ("max_mean_load", "max_mean_load_step"))
            gates = "; ".join(gate_scales(r) for r in sorted(rows, key=lambda r: r["seed"])) if batch != "-" else "-"
            lines.append(f"| {name} | {fmt_seeds(rows, 'val_bpb')} | {mean_of(rows, 'val_bpb'):.3f} | {prior} | "
                         f"{batch} | {step} | {gates} |")
        lines.append("")
    balance = group(g["runs"], "balance")
    if balance:
        lines += ["| loss (64 experts) | CV^2 over | w_importance | w_load | val bpb (per seed) | max/mean load, batch | "
                  "max/mean load, step | CV(load) | clean-logit spread vs noise std |", "|---|---|---|---|---|---|---|---|---|"]
        for name, rows in balance.items():
            aux, scope = rows[0]["aux"], rows[0]["moe"]["balance_scope"]
            over = f"{gs['grad_accum']} micro-batches" if scope == "global" else "each micro-batch"
            lines.append(f"| {name} | {over if aux['importance'] or aux['load'] else '-'} | {aux['importance']} | "
                         f"{aux['load']} | {fmt_seeds(rows, 'val_bpb')} | {fmt_seeds(rows, 'max_mean_load', 2)} | "
                         f"{fmt_seeds(rows, 'max_mean_load_step', 2)} | {fmt_seeds(rows, 'cv_load', 2)} | "
                         f"{'; '.join(gate_scales(r) for r in sorted(rows, key=lambda r: r['seed']))} |")
        lines.append("")
    return lines


def balance_bars(ax, balance: dict[str, list[dict]], title: str) -> None:
    names = list(balance)
    for j, key in enumerate(("max_mean_load", "cv_load")):
        vals = [mean_of(balance[n], key) for n in names]
        ax.bar([i + 0.4 * j for i in range(len(names))], vals, width=0.4, label=key.replace("_", " "))
    for i, n in enumerate(names):
        top = max(mean_of(balance[n], key) for key in ("max_mean_load", "cv_load"))
        ax.text(i + 0.2, top * 1.05, f"{mean_of(balance[n], 'val_bpb'):.3f} bpb", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot(results: list[dict], router_ms: dict | None, path: Path, global_batches: tuple[dict, ...] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    global_balance = next((g for g in global_batches if group(g["runs"], "balance")), None)
    global_experts = [g for g in global_batches if group(g["runs"], "experts")]
    panels = 4 + bool(global_experts) + (global_balance is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.4))
    ax = axes[0]
    experts = group(results, "experts")
    lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
    dense_bpb = {}
    for rows in experts.values():
        for r in rows:
            if "flop_matched" in r:
                ax.axhline(r["val_bpb"], ls=":", lw=1, color="gray")
                ax.text(EXPERT_COUNTS[-1], r["val_bpb"], f"dense, FLOPs of {r['flop_matched']}", fontsize=6,
                        ha="right", va="bottom", color="gray")
            elif r["series"] == "dense":
                dense_bpb[r["seed"]] = r["val_bpb"]
            else:
                lines.setdefault((r["series"], r["seed"]), []).append((r["experts"], r["val_bpb"]))
    for i, ((series, seed), pts) in enumerate(sorted(lines.items())):
        pts = sorted(pts + ([(1, dense_bpb[seed])] if seed in dense_bpb else []))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if seed == 0 else "s--",
                color="C0" if series.startswith("top") else "C3", label=f"{series}, seed {seed}")
    ax.set_xscale("log", base=4)
    ax.set_xticks([1, *EXPERT_COUNTS], ["1", *map(str, EXPERT_COUNTS)])
    ax.set_xlabel("experts (1 = dense, same active params)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("More experts, equal active compute")
    ax.legend(fontsize=7)

    ax = axes[4] if global_experts else None
    for color, g in zip(("C1", "C4", "C2"), global_experts):
        gs = g["scale"]
        by_series: dict[tuple[bool, int], list[tuple[int, float]]] = {}
        for r in g["runs"]:
            if r["experiment"] == "experts":
                per_micro_batch = "per micro-batch" in r["series"]
                if r["series"] == "dense":  # the start of both series
                    by_series.setdefault((True, r["seed"]), []).append((1, r["val_bpb"]))
                by_series.setdefault((per_micro_batch, r["seed"]), []).append((r["experts"], r["val_bpb"]))
        for (per_micro_batch, seed), pts in sorted(by_series.items()):
            if len(pts) < 2:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ("x:" if per_micro_batch else "^-") if seed == 0
                    else "v--", color=color, label=f"{gs['steps']} steps x {gs['grad_accum']} micro-batches"
                    + (", CV^2 per micro-batch" if per_micro_batch else "") + f", seed {seed}")
    if global_experts:
        ax.set_xscale("log", base=4)
        ax.set_xticks([1, *EXPERT_COUNTS], ["1", *map(str, EXPERT_COUNTS)])
        ax.set_xlabel("experts (1 = dense, same active params and steps)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("Noisy top-2, CV^2 over each step's micro-batches", fontsize=9)
        ax.legend(fontsize=7)

    balance_bars(axes[1], group(results, "balance"), "Balancing losses (64 experts)")
    if global_balance is not None:
        gs = global_balance["scale"]
        balance_bars(axes[-1], group(global_balance["runs"], "balance"),
                     f"Balancing losses, CV^2 over {gs['grad_accum']} micro-batches, {gs['steps']} steps (64 experts)")

    ax = axes[2]
    if router_ms:
        Es = list(router_ms)
        for j, gate in enumerate(("flat", "hierarchical")):
            ax.bar([i + 0.4 * j for i in range(len(Es))], [router_ms[E][gate] for E in Es], width=0.4, label=gate)
        ax.set_xticks([i + 0.2 for i in range(len(Es))], [f"{E} experts" for E in Es])
        ax.set_ylabel("router fwd+bwd ms / call")
        hier = group(results, "hierarchy")
        flat = flat_rows(results)
        text = [f"flat: {mean_of(flat, 'val_bpb'):.3f} bpb"] if flat else []
        text += [f"{n}: {mean_of(rows, 'val_bpb'):.3f} bpb" for n, rows in hier.items()
                 if n.startswith("hier")]
        ax.set_title("Hierarchical vs flat gate\n" + "; ".join(text), fontsize=9)
        ax.legend(fontsize=7)

    ax = axes[3]
    routers = group(results, "routers")
    names = list(routers)
    ax.bar(range(len(names)), [routers[n][0]["val_bpb"] for n in names], color="C2")
    for i, n in enumerate(names):
        r = routers[n][0]
        ax.text(i, r["val_bpb"], f"dropped {100 * r['dropped_assignments']:.0f}%\nno expert {100 * r['unrouted_tokens']:.0f}%",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    if names:
        lo = min(routers[n][0]["val_bpb"] for n in names)
        ax.set_ylim(lo - 0.15, max(routers[n][0]["val_bpb"] for n in names) + 0.1)
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Routing policies (64 experts, cf 1.25)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="400 steps, one seed (< 10 min on 2 cores)")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated subset of {EXPERIMENTS}")
    p.add_argument("--steps", type=int, default=0, help="override the steps per run")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="", help="output stem (default benchmarks/results/shazeer_findings[_quick])")
    p.add_argument("--reuse", default="", help="a previous JSON of the same scale: its runs are taken, not trained again")
    p.add_argument("--global-batch", type=int, default=0, metavar="N",
                   help="instead: the noisy-gate experts and balance runs with the CV^2 losses over each step's N "
                        "micro-batches (balance_scope global, grad_accum N, steps / N: the same tokens); added as a "
                        "section of the existing results")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the scale's)")
    p.add_argument("--control", action="store_true", help="--global-batch: the sweep also with the CV^2 losses per "
                                                            "micro-batch at the same step schedule")
    p.add_argument("--report", action="store_true", help="rewrite the .md and .png from the stem's .json, no training")
    p.add_argument("--experts", default="", help="--global-batch: comma-separated expert counts of the sweep "
                                                  f"(default {','.join(map(str, EXPERT_COUNTS))})")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(EXPERIMENTS):
        raise SystemExit(f"unknown experiment(s) {sorted(only - set(EXPERIMENTS))}; choose from {EXPERIMENTS}")
    s = QUICK if args.quick else FULL
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        s.seeds = tuple(int(x) for x in args.seeds.split(","))
    stem = Path(args.out) if args.out else RESULTS / f"shazeer_findings{'_quick' if args.quick else ''}"
    if args.report:
        return write_report(json.loads(stem.with_suffix(".json").read_text()), stem, "quick" if args.quick else "full")
    if args.global_batch > 1:
        if args.reuse:
            raise SystemExit("--reuse applies to the per-micro-batch runs, not --global-batch")
        counts = tuple(int(E) for E in args.experts.split(",")) if args.experts else EXPERT_COUNTS
        return add_global_batch(s.global_batch(args.global_batch), only, counts, args.control, args.workers, stem,
                                args.quick)
    runs = plan_runs(s, only)
    reused = []
    if args.reuse:
        previous = json.loads(Path(args.reuse).read_text())
        if {**PER_MICRO_BATCH, **previous["scale"]} != {**vars(s), "seeds": list(s.seeds), "tokens": s.tokens}:
            raise SystemExit(f"{args.reuse} was run at another scale: {previous['scale']}")
        done = {(r["experiment"], r["name"], r["seed"]) for r in previous["runs"]}
        reused = [r for r in previous["runs"] if r["experiment"] in only]
        runs = [r for r in runs if (r.experiment, r.name, r.seed) not in done]
    # Longest first, so the pool does not end on one slow run.
    runs.sort(key=lambda r: -ffn_macs(r.moe, s.d_model) * r.moe["num_experts"] ** 0.5)
    print(f"{len(runs)} runs of {s.steps} steps on {args.workers} workers", flush=True)
    start = time.time()
    results = list(reused) + run_pool(train_one, [(run, s) for run in runs], args.workers, lambda job, r: (
        f"{r['experiment']:9s} {r['name']:22s} seed {r['seed']}: {r['val_bpb']:.3f} bpb, {r['tokens_per_s']:.0f} tok/s"
        + (f", max/mean load {r['max_mean_load']:.2f}" if "max_mean_load" in r else "")))
    router_ms = None
    if "hierarchy" in only:
        router_ms = (previous.get("router_ms") if reused else None) or router_time_ms(s)
    timing = {"seconds": time.time() - start, "trained_runs": len(runs), "reused_runs": len(reused)}
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    results.sort(key=lambda r: (order[r["experiment"]], r.get("series", ""), r.get("experts", 0), r["name"], r["seed"]))
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = {"scale": {**vars(s), "tokens": s.tokens}, "timing": timing, "router_ms": router_ms, "runs": results}
    if stem.with_suffix(".json").exists():
        # The global-batch runs are separate trainings: a rerun of these keeps them.
        earlier = json.loads(stem.with_suffix(".json").read_text()).get("global_batches")
        if earlier:
            summary["global_batches"] = earlier
    return write_report(summary, stem, "quick" if args.quick else "full")


# Scale fields added after the first results were written, at the values those runs used.
PER_MICRO_BATCH = {"grad_accum": 1, "balance_scope": "micro_batch"}


def scale_from(stored: dict) -> Scale:
    values = {**PER_MICRO_BATCH, **{k: v for k, v in stored.items() if k != "tokens"}}
    return Scale(**{**values, "seeds": tuple(values["seeds"])})


def add_global_batch(s: Scale, only: set[str], counts: tuple[int, ...], control: bool, workers: int, stem: Path,
                     quick: bool) -> dict:
    """Train the global-batch runs that the results at `stem` do not hold yet and add them there."""
    path = stem.with_suffix(".json")
    summary = json.loads(path.read_text()) if path.exists() else {"scale": None, "timing": None, "router_ms": None,
                                                                    "runs": []}
    scale = {**vars(s), "seeds": list(s.seeds), "tokens": s.tokens}
    entries = summary.setdefault("global_batches", [])
    earlier = next((g for g in entries if {**g["scale"], "seeds": None} == {**scale, "seeds": None}), None)
    held = {(r["experiment"], r["name"], r["seed"]) for r in earlier["runs"]} if earlier else set()
    runs = [r for r in plan_global_runs(s, only, counts, control) if (r.experiment, r.name, r.seed) not in held]
    runs.sort(key=lambda r: -ffn_macs(r.moe, s.d_model) * r.moe["num_experts"] ** 0.5)
    print(f"{len(runs)} runs of {s.steps} steps x {s.grad_accum} micro-batches on {workers} workers", flush=True)
    start = time.time()
    results = run_pool(train_one, [(run, s) for run in runs], workers, lambda job, r: (
        f"{r['experiment']:9s} {r['name']:22s} seed {r['seed']}: {r['val_bpb']:.3f} bpb, {r['tokens_per_s']:.0f} tok/s"
        + (f", max/mean load {r['max_mean_load']:.2f}" if "max_mean_load" in r else "")
        + (f", logits {gate_scales(r)}" if "gate_logit_std" in r else "")))
    timing = {"seconds": time.time() - start, "trained_runs": len(runs)}
    if earlier:
        # Another seed (or experiment) at the same scale: keep the earlier runs it does not redo.
        done = {(r["experiment"], r["name"], r["seed"]) for r in results}
        results = [r for r in earlier["runs"] if (r["experiment"], r["name"], r["seed"]) not in done] + results
        scale["seeds"] = sorted(set(earlier["scale"]["seeds"]) | set(s.seeds))
        timing = {k: timing[k] + earlier["timing"][k] for k in timing}
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    results.sort(key=lambda r: (order[r["experiment"]], r.get("series", "") != "dense", r.get("experts", 0),
                                r["name"], r["seed"]))
    entry = {"scale": scale, "timing": timing, "runs": results}
    # One entry per step schedule, shortest first.
    entries[:] = sorted([g for g in entries if g is not earlier] + [entry], key=lambda g: g["scale"]["steps"])
    stem.parent.mkdir(parents=True, exist_ok=True)
    return write_report(summary, stem, "quick" if quick else "full")


def write_report(summary: dict, stem: Path, label: str) -> dict:
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    gb = tuple(summary.get("global_batches", ()))
    s = scale_from(summary["scale"] or gb[0]["scale"])
    md = markdown(summary["runs"], summary["router_ms"], s, summary["timing"] or gb[0]["timing"], label, gb)
    stem.with_suffix(".md").write_text(md)
    plot(summary["runs"], summary["router_ms"], stem.with_suffix(".png"), gb)
    print("\n" + md)
    print(f"wrote {stem}.json, .md, .png")
    return summary


if __name__ == "__main__":
    main()
