"""Training metrics behind one small interface, written by the logging rank only.

Sinks: a tqdm progress bar with loss, tokens/s and ETA; `metrics.jsonl` (one row of scalars
per log step) and `expert_load.jsonl` (per-layer tokens per expert) in the run directory,
always; wandb when `logging.wandb` is on, imported lazily and following `WANDB_MODE`.

MoE statistics are summaries, never one key per expert: per layer the fraction of assignments
dropped and max/mean expert load, overall the dead experts (none routed to them), the aux
losses (all of these over the logging step's micro-batches on every rank) and the all-to-all
bytes per step over the interval; the full `[layers, experts]` load goes to the
JSONL file and to wandb as a heatmap image.

`render_report(run_dir)` draws PNGs from the JSONL files with matplotlib, no wandb needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_scale.moe import MoELayer, MoEStats

METRICS_FILE = "metrics.jsonl"
LOAD_FILE = "expert_load.jsonl"


def moe_summary(tokens_LE: np.ndarray, routed_LE: np.ndarray, dropped_L: np.ndarray,
                assignments_L: np.ndarray) -> dict[str, float]:
    """Scalars from per-layer counts summed over a log interval (and over ranks).

    tokens_LE      assignments each expert computed (after drops)
    routed_LE      assignments routed to each expert (before drops)
    dropped_L      assignments dropped for capacity
    assignments_L  assignments before drops
    """
    out: dict[str, float] = {}
    ratios, drops = [], []
    for layer, (tokens_E, routed_E) in enumerate(zip(tokens_LE, routed_LE)):
        mean = float(tokens_E.mean())
        ratio = float(tokens_E.max()) / mean if mean > 0 else 0.0
        drop = float(dropped_L[layer]) / max(float(assignments_L[layer]), 1.0)
        out[f"moe/layer{layer}/max_mean_load"] = ratio
        out[f"moe/layer{layer}/drop_frac"] = drop
        out[f"moe/layer{layer}/dead_experts"] = float((routed_E == 0).sum())
        ratios.append(ratio)
        drops.append(drop)
    if ratios:
        out["moe/max_mean_load"] = max(ratios)
        out["moe/drop_frac"] = float(np.mean(drops))
        out["moe/dead_experts"] = float((routed_LE == 0).sum())
    return out


def expert_load_figure(load_LE: np.ndarray, title: str):
    """Heatmap of load / mean load, layers x experts (one row per MoE layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(load_LE, dtype=np.float64)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(4 + E / 16, 16), 1.5 + 0.4 * L))
    im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    return fig


class MetricsLogger:
    """Rank-0 metrics sinks; every method is a no-op when `enabled` is False."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, wandb_options: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._bar = self._wandb = None
        self._files: dict[str, Any] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, LOAD_FILE):
            _drop_rows_after(self.run_dir / name, start_step)
            self._files[name] = open(self.run_dir / name, "a", buffering=1)
        self.total_steps, self._t0, self._start_step = total_steps, time.monotonic(), start_step
        if progress and sys.stderr.isatty():  # logs (CI, SLURM) get the plain lines below, with an ETA
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        if wandb_options is not None:
            self._wandb = _start_wandb(self.run_dir, wandb_options, config or {})

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite_or_none(v) for k, v in values.items()}}
        self._files[METRICS_FILE].write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        line = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if "/" not in k)
        if line:  # rows of only namespaced keys (moe/..., final/...) go to the files alone
            self.write(f"step {step:6d}  {line}{self._eta(step)}")

    def log_expert_load(self, step: int, load_LE: np.ndarray) -> None:
        if not self.enabled or len(load_LE) == 0:
            return
        row = {"step": step, "tokens_per_expert": np.asarray(load_LE).astype(int).tolist()}
        self._files[LOAD_FILE].write(json.dumps(row) + "\n")
        if self._wandb is not None:
            import matplotlib.pyplot as plt
            import wandb

            fig = expert_load_figure(load_LE, f"expert load, step {step}")
            self._wandb.log({"moe/expert_load": wandb.Image(fig)}, step=step)
            plt.close(fig)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if self._bar is not None or done <= 0 or step >= self.total_steps:
            return ""
        left = (time.monotonic() - self._t0) / done * (self.total_steps - step)
        return f"  eta {int(left // 60)}m{int(left % 60):02d}s"

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)  # redraws at most once per mininterval

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _drop_rows_after(path: Path, step: int) -> None:
    """On resume, drop rows a killed run wrote after its last checkpoint (they will be redone),
    and lines it left torn: appending after a line with no newline would tear the next row too."""
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    rows, bad = _parse_rows(text)
    if bad:
        warnings.warn(f"{path}: dropped {len(bad)} unreadable line(s) ({', '.join(map(str, bad))}), left by a run "
                      f"killed mid-write or a full disk", stacklevel=3)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows) or bad or (text and not text.endswith("\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def _parse_rows(text: str) -> tuple[list[dict], list[int]]:
    """The JSON rows of a JSONL text and the numbers of the lines that are not JSON objects."""
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def _start_wandb(run_dir: Path, options: dict[str, Any], config: dict[str, Any]):
    """wandb run in RUN_DIR/wandb; the run id is kept so a resumed job continues the same run."""
    import wandb

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    id_file.write_text(run_id)
    (run_dir / "wandb").mkdir(exist_ok=True)
    return wandb.init(
        project=options.get("project"), entity=options.get("entity"), name=options.get("name"),
        dir=str(run_dir), id=run_id, resume="allow", config=config,
    )


# ---- report ----------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return _parse_rows(path.read_text(errors="replace"))[0]


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNG plots of a run from its JSONL files: training curves and expert-load heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / METRICS_FILE)
    loads = read_jsonl(run_dir / LOAD_FILE)
    if not rows and not loads:
        raise FileNotFoundError(f"{run_dir} holds no {METRICS_FILE} or {LOAD_FILE}; is it a run directory?")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    panels = [("loss", ["loss", "val_loss"]), ("learning rate", ["lr"]), ("grad norm", ["grad_norm"]),
              ("tokens/s", ["tokens_per_s"]), ("max/mean expert load", ["moe/max_mean_load"]),
              ("fraction dropped", ["moe/drop_frac"])]
    panels = [(t, [k for k in keys if any(r.get(k) is not None for r in rows)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
        for ax, (title, keys) in zip(axes[:, 0], panels):
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend()
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        written.append(_save(fig, out / "training.png"))

    if loads:
        last = loads[-1]
        fig = expert_load_figure(np.array(last["tokens_per_expert"]), f"expert load, step {last['step']}")
        written.append(_save(fig, out / "expert_load.png"))
        steps = [r["step"] for r in loads]
        stack_TLE = np.array([r["tokens_per_expert"] for r in loads], dtype=np.float64)
        for layer in range(stack_TLE.shape[1]):
            load_TE = stack_TLE[:, layer]
            rel = load_TE / np.maximum(load_TE.mean(axis=1, keepdims=True), 1e-12)
            fig, ax = plt.subplots(figsize=(7, 3.5))
            im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0,
                           extent=(-0.5, rel.shape[1] - 0.5, steps[-1], steps[0]))
            ax.set_xlabel("expert")
            ax.set_ylabel("step")
            ax.set_title(f"MoE layer {layer}: load / mean over training")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(_save(fig, out / f"expert_load_layer{layer}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class MoEAccumulator:
    """Per-layer MoE counts of the logging steps, kept on the device until the log (no host sync
    per step); `packed()` flattens them for one all-reduce.

    The layers' statistics are read on the micro-batches of logging steps only (the trainer
    calls `add` there), so the lazily computed ones (unweighted aux losses, unrouted tokens)
    cost nothing on the other steps. The all-to-all traffic is the layers' own counter
    (`ExpertComm.bytes_sent`, host numbers) over the whole interval, evaluation excluded.
    """

    def __init__(self, layers: list[MoELayer], device: torch.device):
        self.layers, self.L, self.device = layers, len(layers), device
        self.E = layers[0].cfg.num_experts if layers else 0
        self.aux_names: list[str] = []
        self.reset()

    def _bytes_sent(self) -> int:
        return sum(layer.comm.bytes_sent for layer in self.layers)

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.tokens_LE, self.routed_LE = zeros(self.L, self.E), zeros(self.L, self.E)
        self.dropped_L, self.assign_L = zeros(self.L), zeros(self.L)
        self.aux = zeros(len(self.aux_names))
        self.calls = 0
        self._bytes_at_reset, self._bytes_excluded = self._bytes_sent(), 0

    @contextlib.contextmanager
    def traffic_excluded(self):
        """All-to-all bytes sent inside this block (evaluation) do not count as training traffic."""
        before = self._bytes_sent()
        try:
            yield
        finally:
            self._bytes_excluded += self._bytes_sent() - before

    def add(self, stats: list[MoEStats]) -> None:
        if not stats:
            return
        if not self.aux_names:  # every layer of a model reports the same losses
            self.aux_names = sorted(stats[0].aux_losses)
            self.aux = torch.zeros(len(self.aux_names), dtype=torch.float64, device=self.device)
        self.calls += 1
        for i, s in enumerate(stats):
            self.tokens_LE[i] += s.tokens_per_expert_E.detach().double()
            self.routed_LE[i] += s.routed_per_expert_E.detach().double()
            self.dropped_L[i] += s.num_dropped.detach().double()
            self.assign_L[i] += s.num_assignments
            for j, name in enumerate(self.aux_names):
                self.aux[j] += s.aux_losses[name].detach().double() / len(stats)

    def packed(self) -> torch.Tensor:
        sent = float(self._bytes_sent() - self._bytes_at_reset - self._bytes_excluded)
        a2a = torch.tensor([sent], dtype=torch.float64, device=self.device)
        return torch.cat([self.tokens_LE.flatten(), self.routed_LE.flatten(), self.dropped_L, self.assign_L,
                          a2a, self.aux])

    def unpack(self, packed: torch.Tensor, world_size: int):
        """Summed-over-ranks counts as numpy arrays, all-to-all bytes, and aux-loss means over ranks."""
        L, E = self.L, self.E
        tokens, routed, dropped, assign, a2a, aux = packed.cpu().split([L * E, L * E, L, L, 1, len(self.aux_names)])
        aux_means = {f"aux/{n}": float(v) / max(self.calls, 1) / world_size for n, v in zip(self.aux_names, aux)}
        return (tokens.reshape(L, E).numpy(), routed.reshape(L, E).numpy(), dropped.numpy(), assign.numpy(),
                float(a2a), aux_means)
