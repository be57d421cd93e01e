"""The MultiModel paper's two ablations on the stand-in tasks, over seeds, with a plot.

    PYTHONPATH=. python benchmarks/multimodel_ablations.py               # 2 seeds, ~30 min on 2 cores
    PYTHONPATH=. python benchmarks/multimodel_ablations.py --quick       # 1 seed, 400 joint steps

Per seed, with `benchmarks/multimodel_tasks.py` (one thread per run, `--workers` runs at once):
  joint MoE     all 8 tasks, `--steps` steps (about steps/8 per task), 8 experts, k=4, width 128
  joint dense   the same with a dense FFN of width 512 in place of each MoE layer (k x 128: the
                MoE's active compute), the paper's Table 4 ablation
  single-task   each of the tasks with the least training data (850 examples: speech and the
                translations; we run speech_numbers and translate_en_de) alone for steps/8 steps,
                the paper's Table 2/3 comparison at equal steps per task

Writes benchmarks/results/multimodel_ablations[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_TASKS = ("speech_numbers", "translate_en_de")
NUM_TASKS = 8


def run_tasks(argv: list[str]) -> dict:
    import contextlib
    import io

    import multimodel_tasks

    with contextlib.redirect_stdout(io.StringIO()):
        return multimodel_tasks.main(argv)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=0, help="joint steps (default 2000, 400 with --quick)")
    p.add_argument("--seeds", default="", help="comma-separated (default 0,1; 0 with --quick)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    steps = args.steps or (400 if args.quick else 2000)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    eval_examples = "60" if args.quick else "150"
    common = ["--eval-examples", eval_examples, "--threads", "1"]
    jobs = {}
    for seed in seeds:
        base = [*common, "--seed", str(seed)]
        jobs[("joint MoE", seed)] = [*base, "--steps", str(steps)]
        jobs[("joint dense", seed)] = [*base, "--steps", str(steps), "--no-moe", "--hidden", "512"]
        for task in SMALL_TASKS:
            jobs[(f"single {task}", seed)] = [*base, "--steps", str(steps // NUM_TASKS), "--tasks", task,
                                              "--warmup", str(max(steps // NUM_TASKS // 20, 1))]
    start = time.time()
    results = {}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {key: pool.submit(run_tasks, argv) for key, argv in jobs.items()}
        for (name, seed), fut in futures.items():
            summary = fut.result()
            results[f"{name}|{seed}"] = summary
            acc = {t: round(r["metrics"]["accuracy"], 3) for t, r in summary["results"].items()}
            print(f"[{(time.time() - start) / 60:5.1f} min] {name:24s} seed {seed}: {acc}", flush=True)

    tasks = list(results[f"joint MoE|{seeds[0]}"]["results"])
    chance = {t: results[f"joint MoE|{seeds[0]}"]["results"][t]["chance"].get("accuracy") for t in tasks}

    def acc(name: str, task: str, metric: str = "accuracy") -> list[float]:
        return [results[f"{name}|{s}"]["results"][task]["metrics"][metric] for s in seeds
                if f"{name}|{s}" in results and task in results[f"{name}|{s}"]["results"]]

    def cell(name: str, task: str) -> str:
        """Exact match / accuracy per seed, and token accuracy for sequence tasks."""
        values = acc(name, task)
        if not values:
            return "-"
        text = " / ".join(f"{x:.3f}" for x in values)
        first = results[f"{name}|{seeds[0]}"]["results"][task]["metrics"]
        if "token_accuracy" in first:
            text += " (tok " + " / ".join(f"{x:.3f}" for x in acc(name, task, "token_accuracy")) + ")"
        return text

    lines = [f"# MultiModel ablations ({'quick' if args.quick else 'full'} run)", "",
             f"Debug MultiModel, {steps} joint steps over {NUM_TASKS} tasks (about {steps // NUM_TASKS} per task), "
             f"seeds {seeds} (values per seed), exact match / class accuracy (token accuracy) on up to {eval_examples} held-out "
             f"examples per task. Wall time {(time.time() - start) / 60:.1f} min.", "",
             "| task | joint MoE | joint dense (width 512) | single-task MoE, equal steps | chance |", "|---|---|---|---|---|"]
    for t in tasks:
        shown = f"{chance[t]:.3f}" if chance[t] is not None else "-"
        lines.append(f"| {t} | {cell('joint MoE', t)} | {cell('joint dense', t)} | {cell(f'single {t}', t)} | {shown} |")
    mean = lambda name: sum(sum(acc(name, t)) / len(seeds) for t in tasks) / len(tasks)  # noqa: E731
    lines += ["", f"Mean over tasks: joint MoE {mean('joint MoE'):.3f}, joint dense {mean('joint dense'):.3f}.", ""]
    md = "\n".join(lines)

    stem = RESULTS / f"multimodel_ablations{'_quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"steps": steps, "seeds": seeds, "runs": results}, indent=1))
    stem.with_suffix(".md").write_text(md)
    plot(tasks, seeds, acc, chance, stem.with_suffix(".png"))
    print("\n" + md)
    return results


def plot(tasks, seeds, acc, chance, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.2))
    series = [("joint MoE", "C0"), ("joint dense", "C1")] + [(f"single {t}", "C3") for t in SMALL_TASKS]
    width = 0.27
    for i, t in enumerate(tasks):
        for j, (name, color) in enumerate(series[:2] + [("single", "C3")]):
            values = acc(name if name != "single" else f"single {t}", t)
            if not values:
                continue
            x = i + (j - 1) * width
            ax.bar(x, sum(values) / len(values), width=width, color=color,
                   label=(name if name != "single" else "single-task, equal steps") if i == 0 or (
                       name == "single" and t == SMALL_TASKS[0]) else None)
            ax.plot([x] * len(values), values, "k.", ms=4)
        if chance[t] is not None:
            ax.plot([i - 1.5 * width, i + 1.5 * width], [chance[t]] * 2, "k:", lw=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=15, fontsize=8)
    ax.set_ylabel("exact match / accuracy (dots: seeds)")
    ax.set_title(f"MultiModel: joint vs single-task, MoE vs dense ({len(seeds)} seed(s); dotted: majority baseline)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
