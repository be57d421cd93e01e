"""The model/task registry: what `model.name` selects, and the interface the trainer drives.

    model.name   adapter                              client
    lm           moe_scale/models/lm/task.py          byte-level MoE language model
    multimodel   moe_scale/models/multimodel/task.py  MultiModel, joint multi-task training
    selector     moe_scale/models/selector/task.py    Selector + focus-aware generator

A client registers a `TaskDef`: the dataclasses of its `model:` and `data:` config sections
(so unknown keys are rejected against the right fields), its cross-section checks, and a
factory of the `Task` object the trainer calls. Batches, losses and evaluation live next to the
client; the trainer knows only this interface and never a model's internals.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from moe_scale.moe import MoEStats
from moe_scale.validation import ConfigError

TASKS = {
    "lm": "moe_scale.models.lm.task",
    "multimodel": "moe_scale.models.multimodel.task",
    "selector": "moe_scale.models.selector.task",
}


@dataclass
class TaskLoss:
    """One micro-batch's losses.

    loss       the task's loss (what is logged as `loss`), a scalar tensor
    total      what is back-propagated: loss plus the MoE and any other auxiliary losses
    moe_stats  one `MoEStats` per MoE layer that ran, in model order
    tokens     tokens (or examples) of the batch on this rank, for throughput
    extras     further scalars to log, each averaged over the micro-batches that reported it
               in a logging interval (rank 0's values)
    """

    loss: Tensor
    total: Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)
    tokens: int = 0
    extras: dict[str, float] = field(default_factory=dict)


class Task(Protocol):
    """What the trainer needs of a client. `model` is built on the CPU, single-device, with
    every expert; the trainer moves it, applies expert parallelism and wraps it.

    find_unused_parameters   a step may leave parameters without gradient (DDP must know)

    Optional: `load_start_weights(model, runs, ep_rank=, ep_size=)`, called at step 0 of a run
    without a checkpoint once the experts are placed and before any wrapper copies the
    parameters; it loads the client's starting weights (the lm's model.init_from /
    upcycle_from) and says what it loaded, or returns None. `runs` (`train.runs.RunReader`)
    reads other runs' checkpoints for it.
    """

    model: nn.Module
    find_unused_parameters: bool

    def next_batch(self) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, device) -> TaskLoss: ...

    def val_batches(self, n: int) -> Iterator[Any]: ...

    def val_metrics(self, val_loss: float) -> dict[str, float]: ...

    def final_report(self, model: nn.Module, device, collective: bool) -> dict[str, Any] | None: ...

    def format_report(self, report: dict[str, Any]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class TaskDef:
    """A registered client.

    model_section, data_section   dataclasses of the `model:` and `data:` sections
    build(cfg, runtime)           -> Task (the runtime gives this process's share of the data)
    check_config(cfg)             cross-section checks; raises ConfigError
    build_model(cfg)              -> the model alone, without data (`moe-scale plan` builds it on
                                  the meta device); None where the model's shape comes from
                                  the data
    """

    model_section: type
    data_section: type
    build: Callable[..., Task]
    check_config: Callable[[Any], None]
    build_model: Callable[[Any], nn.Module] | None = None


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        raise ConfigError(f"model.name must be one of {list(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name]).TASK
