"""`model.name: lm` for the trainer: byte blocks of text, next-byte cross-entropy."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from moe_scale.data.text import TextBlocks
from moe_scale.models.lm.model import MoELM, lm_loss
from moe_scale.models.lm.config import LMConfig, LMDataConfig
from moe_scale.train.config import Config, _check
from moe_scale.train.tasks import TaskDef, TaskLoss


def build_model(cfg: Config) -> MoELM:
    return MoELM.from_config(cfg.model, cfg.moe_config() if cfg.model.num_moe_layers else None)


class LMTask:
    find_unused_parameters = False

    def __init__(self, cfg: Config, rt):
        d = cfg.data
        load = lambda: TextBlocks.load(  # noqa: E731
            dataset=d.dataset, dataset_config=d.dataset_config, split=d.split, text_field=d.text_field,
            max_documents=d.max_documents, val_fraction=d.val_fraction, seq_len=d.seq_len,
            batch_size=d.batch_size, cache_dir=d.cache_dir, rank=rt.rank, world=rt.world_size, seed=cfg.train.seed,
        )
        if rt.is_main:
            self.data = load()
        rt.barrier()  # the other ranks then read the cache rank 0 built
        if not rt.is_main:
            self.data = load()
        self.model = build_model(cfg)

    def next_batch(self):
        return self.data.next_train_batch()

    def loss(self, model: nn.Module, batch, device) -> TaskLoss:
        x_BT, y_BT = (t.to(device, non_blocking=True) for t in batch)
        logits_BTV, stats = model(x_BT)
        loss = lm_loss(logits_BTV, y_BT)
        total = loss + sum((s.aux_loss for s in stats), loss.new_zeros(()))
        return TaskLoss(loss, total, stats, tokens=y_BT.numel())

    def val_batches(self, n: int):
        return self.data.val_batches(n)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}

    def final_report(self, model: nn.Module, device, collective: bool) -> dict[str, Any] | None:
        return None

    def format_report(self, report: dict[str, Any]) -> str:
        return ""

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)


def check(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    _check(d.seq_len <= m.max_seq_len,
           f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
           f"raise model.max_seq_len or lower data.seq_len")
    if m.moe_every:
        dense = f" minus model.n_dense_layers={m.n_dense_layers}" if m.n_dense_layers else ""
        _check(m.num_moe_layers > 0,
               f"model.moe_every={m.moe_every} > model.n_layers={m.n_layers}{dense} leaves no MoE layer; "
               f"use model.moe_every=0 for a dense model")
        _check(cfg.moe.router != "min_loss",
               "moe.router=min_loss needs per-expert losses, which the LM does not compute; "
               "choose another router (topk, switch, noisy_topk, expert_choice, hash, hierarchical)")
        cfg.check_moe()
    else:
        _check(cfg.parallel.ep_size == 1, "parallel.ep_size > 1 needs MoE layers: set model.moe_every >= 1")
        _check(m.num_shared_experts == 0, "model.num_shared_experts belongs to MoE layers: set model.moe_every >= 1 "
                                          "or model.num_shared_experts=0")


TASK = TaskDef(LMConfig, LMDataConfig, LMTask, check)
