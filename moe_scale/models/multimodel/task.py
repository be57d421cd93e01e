"""`model.name: multimodel` for the trainer: joint multi-task training of the MultiModel.

    model:  the MultiModel's sizes (`MultiModelSection`: `MultiModelConfig` minus what the data
            fixes and the MoE options), defaults = `MultiModelConfig.debug()`
    moe:    its MoE layers (num_experts, k, d_hidden, router, aux_loss.importance / load, ...)
    data:   which stand-in tasks (`moe_scale.data.multimodel.standins`), their sampling weights

Every micro-batch comes from one task, drawn by weight. The draw depends only on (seed, batch
number), so every rank picks the same task: under expert parallelism the ranks must run the
same MoE layers (a classification batch only runs the encoder's), while each rank draws its own
examples of that task. The other tasks' modality nets get no gradient in a step, hence
`find_unused_parameters`. The final report is `evaluate` per task (accuracy, token accuracy,
BLEU, log-perplexity) next to the majority baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, fields
from typing import Any, TYPE_CHECKING

import numpy as np
from torch import nn

from moe_scale.data.multimodel.metrics import majority_baseline
from moe_scale.data.multimodel.standins import STANDINS, standin_sources
from moe_scale.data.multimodel.tasks import TARGET_SPACES, Batch, Task, build_tasks, collate
from moe_scale.models.multimodel.config import MultiModelConfig
from moe_scale.models.multimodel.evaluate import evaluate
from moe_scale.models.multimodel.model import MultiModel
from moe_scale.validation import ConfigError, check

if TYPE_CHECKING:
    from moe_scale.train.config import Config
from moe_scale.train.tasks import TaskDef, TaskLoss

# Set from the data (vocabulary, task tokens, class heads) or from the `moe` section.
_FROM_ELSEWHERE = ("vocab_size", "num_target_spaces", "class_heads", "num_experts", "moe_k", "moe_hidden",
                   "moe_router", "moe_importance", "moe_load", "moe_options")


def _model_section() -> type:
    debug = MultiModelConfig.debug()
    hints = typing.get_type_hints(MultiModelConfig)
    specs: list[tuple] = [("name", str, dataclasses.field(default="multimodel"))]
    for f in fields(MultiModelConfig):
        if f.name not in _FROM_ELSEWHERE:
            specs.append((f.name, hints[f.name], dataclasses.field(default=getattr(debug, f.name))))
    section = dataclasses.make_dataclass("MultiModelSection", specs)
    section.__doc__ = ("The MultiModel's sizes: `MultiModelConfig` options (defaults: its debug model) except "
                       "the vocabulary and heads (from the data) and the MoE options (the moe section).")
    section.__module__ = __name__
    return section


MultiModelSection = _model_section()


@dataclass
class MultiModelData:
    """The stand-in tasks of `moe_scale.data.multimodel.standins`.

    tasks          names to train jointly (empty: all of them)
    weights        sampling weight per task, in the order of `tasks` (empty: uniform)
    batch_size     examples per rank per micro-step, all of one task
    split_seed     fixes the generated data and its train / evaluation split
    eval_examples  held-out examples per task in the final report
    decode         greedy-decode in the final report (exact-match accuracy, BLEU); one process or
                   ep_size 1 only, since ranks would stop decoding at different steps
    """

    tasks: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    batch_size: int = 32
    split_seed: int = 0
    eval_examples: int = 150
    decode: bool = True

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in STANDINS]
        check(not unknown, f"data.tasks: unknown task(s) {unknown}; choose from {list(STANDINS)}")
        check(len(set(self.tasks)) == len(self.tasks), f"data.tasks lists a task twice: {list(self.tasks)}")
        n = len(self.tasks) or len(STANDINS)
        check(not self.weights or len(self.weights) == n,
              f"data.weights needs one weight per task ({n}), got {len(self.weights)}")
        check(all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0),
              f"data.weights must be >= 0 with a positive sum, got {list(self.weights)}")
        check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_examples >= 1, f"data.eval_examples must be >= 1, got {self.eval_examples}")


def model_config(cfg: Config, tasks: list[Task]) -> MultiModelConfig:
    """The `MultiModelConfig` of the model section, the data's vocabulary and heads, and the moe section."""
    m = cfg.model
    moe = cfg.moe_config()
    taken = {"d_model", "num_experts", "d_hidden", "k", "router", "aux_loss"}
    options = {f.name: getattr(moe, f.name) for f in fields(moe) if f.name not in taken}
    sizes = {f.name: getattr(m, f.name) for f in fields(m) if f.name != "name"}
    return MultiModelConfig(
        **sizes,
        vocab_size=len(tasks[0].vocab),
        num_target_spaces=len(TARGET_SPACES),
        class_heads={t.spec.head: t.spec.num_classes for t in tasks if t.spec.is_classification},
        num_experts=moe.num_experts, moe_k=moe.k, moe_hidden=moe.d_hidden, moe_router=moe.router,
        moe_importance=moe.aux_loss.importance, moe_load=moe.aux_loss.load, moe_options=options,
    )


@functools.lru_cache(maxsize=2)
def all_standin_tasks(split_seed: int) -> list[Task]:
    """Every stand-in task, encoded with one vocabulary built over all of them (so a subset trains
    the same embedding tables); cached, as generating them takes seconds."""
    return build_tasks(standin_sources(seed=split_seed))


class MultiModelTask:
    find_unused_parameters = True

    def __init__(self, cfg: Config, rt):
        d = cfg.data
        names = list(d.tasks) or list(STANDINS)
        every = all_standin_tasks(d.split_seed)
        self.tasks = [t for t in every if t.name in names]
        w = np.asarray(d.weights or [1.0] * len(self.tasks), dtype=float)
        self.probs = w / w.sum()
        self.batch_size, self.seed, self.rank = d.batch_size, cfg.train.seed, rt.rank
        self.eval_examples, self.decode = d.eval_examples, d.decode
        self.batches_drawn = 0
        self.model = MultiModel(model_config(cfg, every))

    def batch_at(self, n: int) -> Batch:
        """Batch number n of this rank: its task is the same on every rank, its examples are not."""
        i = int(np.random.default_rng([self.seed, n]).choice(len(self.tasks), p=self.probs))
        task = self.tasks[i]
        pick = np.random.default_rng([self.seed, n, self.rank + 1]).choice(
            len(task.train), size=self.batch_size, replace=len(task.train) < self.batch_size)
        return collate(task.spec, [task.train[j] for j in pick])

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.batches_drawn)
        self.batches_drawn += 1
        return batch

    def loss(self, model: nn.Module, batch: Batch, device) -> TaskLoss:
        batch = batch.to(device)
        language = batch.target_modality == "language"
        out = model(batch.inputs, input_modality=batch.input_modality, target_space_B=batch.target_space,
                    targets_BT=batch.targets if language else None, target_modality=batch.target_modality,
                    input_mask=batch.input_mask)
        task_loss = getattr(model, "module", model).task_loss(out, batch.targets, batch.target_modality)
        tokens = int((batch.targets != 0).sum()) if language else batch.targets.numel()
        return TaskLoss(task_loss, task_loss + out.aux_loss, out.moe_stats, tokens,
                        {f"loss/{batch.task}": float(task_loss.detach())})

    def val_batches(self, n: int):
        """n batches of held-out examples, the tasks in turn; the same on every rank."""
        for b in range(n):
            task = self.tasks[b % len(self.tasks)]
            start = (b // len(self.tasks)) * self.batch_size
            examples = [task.eval[(start + i) % len(task.eval)] for i in range(self.batch_size)]
            yield collate(task.spec, examples)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        return {"val_loss": val_loss}

    def final_report(self, model: nn.Module, device, collective: bool) -> dict[str, Any]:
        report = {}
        for task in self.tasks:
            metrics = evaluate(model, task, max_examples=self.eval_examples, decode=self.decode and not collective,
                               device=device)
            chance = majority_baseline(task, self.eval_examples)
            report[task.name] = {"metrics": metrics, "chance": {k: v for k, v in chance.items() if k in metrics}}
        return {"tasks": report, "eval_examples": self.eval_examples}

    def format_report(self, report: dict[str, Any]) -> str:
        lines = [f"per-task metrics on up to {report['eval_examples']} held-out examples per task",
                 f"{'task':16s} {'metric':15s} {'model':>7s} {'chance':>7s}"]
        for name, r in report["tasks"].items():
            for i, (k, v) in enumerate(r["metrics"].items()):
                chance = f"{r['chance'][k]:7.3f}" if k in r["chance"] else ""
                lines.append(f"{name if i == 0 else '':16s} {k:15s} {v:7.3f} {chance}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_drawn = int(state["batches_drawn"])


def check_config(cfg: Config) -> None:
    m = cfg.model
    sizes = {f.name: getattr(m, f.name) for f in fields(m) if f.name != "name"}
    try:
        MultiModelConfig.debug(**sizes)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    check(m.name == "multimodel", f"model.name must be multimodel here, got {m.name!r}")
    check(cfg.moe.aux_loss.switch == 0 and cfg.moe.aux_loss.z == 0,
          "the MultiModel balances its experts with the importance and load losses (the paper's); "
          "set moe.aux_loss.switch=0 and moe.aux_loss.z=0")
    check(cfg.moe.router != "min_loss", "moe.router=min_loss needs per-expert losses; the MultiModel has none")
    if m.use_moe:
        cfg.check_moe()
    else:
        check(cfg.parallel.ep_size == 1, "parallel.ep_size > 1 needs MoE layers: set model.use_moe=true")


TASK = TaskDef(MultiModelSection, MultiModelData, MultiModelTask, check_config)
