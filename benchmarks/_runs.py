"""What the training-run benchmarks share: train one config through `Trainer` quietly, run many
in a pool of one-thread worker processes, and summarise runs that differ only by seed.

Used by shazeer_findings.py and balancing.py.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Iterator


@contextlib.contextmanager
def trained(config: dict) -> Iterator[tuple[object, dict, float]]:
    """Train `config` (its `train.run_dir` is replaced by a temporary directory) on one thread and
    yield (trainer, last metrics, training seconds); the run directory lives until the block ends."""
    import torch

    from moe_scale.train.config import from_dict
    from moe_scale.train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="run_") as run_dir, contextlib.redirect_stdout(io.StringIO()):
        config = {**config, "train": {**config["train"], "run_dir": run_dir}}
        trainer = Trainer(from_dict(config))
        start = time.perf_counter()
        last = trainer.fit()
        yield trainer, last, time.perf_counter() - start


def run_pool(fn: Callable, jobs: list, workers: int, describe: Callable[[object, dict], str]) -> list[dict]:
    """`fn(*job)` for every job on `workers` spawned processes, in order; one progress line per
    result, `describe(job, result)` after the elapsed minutes."""
    start = time.time()
    results = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for job, fut in zip(jobs, futures):
            result = fut.result()
            results.append(result)
            print(f"[{(time.time() - start) / 60:5.1f} min] {describe(job, result)}", flush=True)
    return results


def mean_of(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def group(results: list[dict], experiment: str) -> dict[str, list[dict]]:
    """The runs of one experiment by name, in first-seen order (one row per seed)."""
    out: dict[str, list[dict]] = {}
    for r in results:
        if r["experiment"] == experiment:
            out.setdefault(r["name"], []).append(r)
    return out


def fmt_seeds(rows: list[dict], key: str, digits: int = 3) -> str:
    return " / ".join(f"{r[key]:.{digits}f}" for r in sorted(rows, key=lambda r: r["seed"]))


def wall_text(timing: dict) -> str:
    text = f"{timing['trained_runs']} runs trained in {timing['seconds'] / 60:.1f} min"
    if timing.get("reused_runs"):
        text += f"; {timing['reused_runs']} more taken from an earlier invocation of the same scale (--reuse)"
    return text + "."
