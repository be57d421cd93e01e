"""The training loop: `Trainer(cfg).fit()`, one optimizer step per `train_step()`.

    cfg = load_config("configs/lm_debug.yaml", ["train.max_steps=50"])
    Trainer(cfg).fit()

`model.name` picks the client (`moe_scale.train.tasks`): its `Task` object supplies the data,
the model, the loss of a batch and the evaluation; this file only drives them.

Set-up order: refuse what cannot run (`preflight`: device, ranks for ep_size, memory), join the
launcher's process group (none in the debug mode) and check every rank has the same config,
seed, build the task (its data, and its model with the expert weights on the meta device),
make this rank's experts (all of them, or its EP block when `parallel.ep_size > 1`) on its
device, build AdamW
with dense/expert groups, wrap in the backend (torch DDP + EDP, or DeepSpeed), resume from
the newest checkpoint, then loop: train_step -> log -> eval -> checkpoint; at the end the
task's final report (per-task metrics, diversity, ...) is printed and written to
RUN_DIR/final_metrics.json.

A step whose loss or global gradient norm is inf/nan on any rank is skipped on every rank
(no update, counted in `skipped_steps`); `train.max_skipped_steps` in a row stop the run.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_scale.distributed.collectives import all_reduce, any_rank
from moe_scale.distributed.determinism import rank_seed, seed_everything
from moe_scale.distributed.mesh import MoEMesh, build_mesh
from moe_scale.distributed.parallelize import (
    expert_param_names,
    ExpertInit,
    apply_fsdp,
    experts_on_meta,
    materialize_experts,
    parallelize,
)
from moe_scale.moe import MoELayer
from moe_scale.train.backends import DeepSpeedBackend, FSDPBackend, TorchBackend, deepspeed_config
from moe_scale.train.balancing import ExpertBiasBalancer
from moe_scale.train.checkpoint import Checkpointer, ExpertSharding, latest_checkpoint, list_checkpoints
from moe_scale.train.config import Config, save_config
from moe_scale.validation import ConfigError
from moe_scale.train.metrics import MetricsLogger, MoEAccumulator, moe_summary
from moe_scale.train.optim import build_optimizer, lr_at, param_groups
from moe_scale.train.preflight import check_same_config, dataset_errors, preflight
from moe_scale.train.runs import RunReader
from moe_scale.train.runtime import Runtime, init_runtime
from moe_scale.train.tasks import get_task


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


REPORT_FILE = "final_metrics.json"


def expert_parallel(model: nn.Module, cfg: Config, rt: Runtime,
                    init: ExpertInit | None = None) -> tuple[nn.Module, MoEMesh, ExpertSharding | None]:
    """Integration point with expert parallelism.

    The model's experts come on the meta device (`experts_on_meta`); this rank's are made on
    its device and initialised per global expert, so every EP size starts from the same model.
    ep_size = 1: every rank holds all experts; the EDP group is the whole world. ep_size > 1:
    `moe_scale.distributed.mesh.build_mesh` makes the EP x EDP groups and
    `moe_scale.distributed.parallelize.parallelize(model, mesh)` keeps this rank's block of
    every expert stack and swaps in the all-to-all comm. The trainer then syncs expert grads
    over `mesh.edp_group` and checkpoints experts sharded on the mesh's "ep" dimension.
    """
    ep = cfg.parallel.ep_size
    if ep == 1:
        materialize_experts(model, init, device=rt.device, init_seed=cfg.train.seed)
        return model, MoEMesh.data_parallel(), None
    if rt.world_size % ep:
        raise ConfigError(f"parallel.ep_size={ep} must divide the world size {rt.world_size}")
    mesh = build_mesh(cfg.parallel, device_type=rt.device.type)
    model = parallelize(model, mesh, device=rt.device, init_seed=cfg.train.seed, init=init)
    return model, mesh, ExpertSharding(mesh.device_mesh, expert_param_names(model))


def shard_fsdp(model: nn.Module, mesh: MoEMesh, rt: Runtime, bf16: bool) -> nn.Module:
    """`parallel.backend: fsdp`: dense parameters sharded over the world, experts over their EDP group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = init_device_mesh(rt.device.type, (rt.world_size,), mesh_dim_names=("dp",))
    experts = mesh.device_mesh["edp"] if mesh.device_mesh is not None else world
    return apply_fsdp(model, world, experts, bf16=bf16)


def ep_major_mesh(mesh):
    """The ("ep", "edp") view of an ("edp", "ep") mesh: same ranks, dims swapped (collective)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(mesh.device_type, mesh.mesh.T.contiguous(), mesh_dim_names=("ep", "edp"))


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    stepped: bool
    tokens: int
    seconds: float


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime | None = None):
        self.cfg = cfg
        p, t = cfg.parallel, cfg.train
        preflight(cfg, runtime)  # device, ranks for ep_size, memory: before any group, run dir or data
        self.rt = rt = runtime or init_runtime(t.device, p.dist_backend, p.timeout_s)
        check_same_config(cfg, rt)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        seed_everything(t.seed, t.deterministic)
        self.run_dir = Path(t.run_dir)
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        with dataset_errors(cfg), experts_on_meta() as init:  # expert weights: only this rank's, made below
            self.task = get_task(cfg.model.name).build(cfg, rt)
        model, self.mesh, sharding = expert_parallel(self.task.model, cfg, rt, init)
        model = model.to(rt.device)
        self._load_start_weights(model, sharding)
        model.activation_checkpointing = t.activation_checkpointing
        if t.compile:
            if not hasattr(model, "compile_blocks"):
                raise ConfigError(f"train.compile compiles the blocks of the lm client; model.name={cfg.model.name} "
                                  f"has none: set train.compile=false")
            model.compile_blocks()
        self.bf16 = t.precision == "bf16" or (
            t.precision == "auto" and rt.device.type == "cuda" and torch.cuda.is_bf16_supported())
        fsdp = p.backend == "fsdp" and rt.distributed
        if fsdp:
            model = shard_fsdp(model, self.mesh, rt, bf16=p.fsdp_precision == "bf16")
            if sharding is not None:
                sharding.ep_major_mesh = ep_major_mesh(self.mesh.device_mesh)
        o = cfg.optim
        groups = param_groups(model, o.lr, o.weight_decay, o.expert_lr_scale, o.expert_weight_decay)
        optimizer = build_optimizer(groups, o, rt.device)
        if p.backend == "deepspeed":
            ds = deepspeed_config(p.deepspeed_config, micro_batch=cfg.data.batch_size, grad_accum=t.grad_accum,
                                  grad_clip=o.grad_clip, bf16=self.bf16, world_size=rt.world_size)
            self.backend = DeepSpeedBackend(model, optimizer, ds, self.mesh.ep_size)
        elif fsdp:
            self.backend = FSDPBackend(model, optimizer, rt.device, o.grad_clip, self.mesh.ep_size)
        else:
            self.backend = TorchBackend(model, optimizer, self.mesh, rt.device, o.grad_clip,
                                        find_unused_parameters=self.task.find_unused_parameters)
        self.model: nn.Module = self.backend.module
        self.optimizer = self.backend.optimizer
        torch.manual_seed(rank_seed(t.seed, rt.rank))  # per-rank stream for dropout and router noise

        self.moe_acc = MoEAccumulator([m for m in self.model.modules() if isinstance(m, MoELayer)], rt.device)
        self.balancer = ExpertBiasBalancer(self.model, rt.device)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.tokens_seen = 0
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, rt.rank,
                                         rt.world_size, sharding)
        self._last_saved = -1
        self._resume()
        lg = cfg.logging
        wandb_options = ({"project": lg.wandb_project, "entity": lg.wandb_entity, "name": lg.wandb_name}
                         if lg.wandb else None)
        self.metrics = MetricsLogger(self.run_dir, enabled=rt.is_main, total_steps=t.max_steps,
                                     start_step=self.step, progress=lg.progress, wandb_options=wandb_options,
                                     config=cfg.to_dict())
        self._interval = {"loss": 0.0, "n": 0, "seconds": 0.0, "tokens": 0}
        self._extras: dict[str, list] = {}  # name -> [sum, count] over the logging interval

    # ---- checkpoints ----

    def _load_start_weights(self, model: nn.Module, sharding: ExpertSharding | None) -> None:
        """The task's starting weights (the lm's model.init_from / upcycle_from) when no checkpoint
        will be resumed: loaded before any wrapper copies the parameters."""
        load = getattr(self.task, "load_start_weights", None)
        ck = self.cfg.checkpoint
        resumes = ck.resume != "never" and (ck.resume != "auto" or latest_checkpoint(self.run_dir / "checkpoints"))
        if load is None or resumes:
            return
        runs = RunReader(rank=self.rt.rank, world_size=self.rt.world_size, sharding=sharding)
        loaded = load(model, runs, ep_rank=self.mesh.ep_rank, ep_size=self.mesh.ep_size)
        if loaded and self.rt.is_main:
            print(f"starting from {loaded}", flush=True)

    def _resume(self) -> None:
        ck = self.cfg.checkpoint
        self.checkpointer.remove_incomplete()
        existing = list_checkpoints(self.checkpointer.root)
        if ck.resume == "never":
            if existing:
                raise ConfigError(f"{self.run_dir} already holds checkpoints and checkpoint.resume=never; "
                                  f"choose a new train.run_dir or set checkpoint.resume=auto")
            return
        path = latest_checkpoint(self.checkpointer.root) if ck.resume == "auto" else Path(ck.resume)
        if path is None:
            return
        state = self.checkpointer.load(path, self.model, self.optimizer)
        if state.get("weights_only"):  # written by `moe-scale convert`: step 0, the data from its start
            if self.rt.is_main:
                print(f"starting from the weights of {path}", flush=True)
            return
        self.step = int(state["step"])
        self.task.load_state_dict(state["data"])
        self.skipped_steps = int(state["skipped_steps"])
        self.tokens_seen = int(state["tokens_seen"])
        self._last_saved = self.step
        exact = "" if state["exact"] else " (different world size: RNG streams restart)"
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}{exact}", flush=True)

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.task.state_dict(), "skipped_steps": self.skipped_steps,
                "tokens_seen": self.tokens_seen}

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.trainer_state())
        self._last_saved = self.step
        return path

    # ---- steps ----

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)

    def train_step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches of this rank.

        The non-finite rule lives here: a step whose loss or gradient norm is inf/nan on any
        rank is skipped on every rank (the backend's `step(skip=True)` makes no update; under
        DeepSpeed its `backward` has already turned such a loss into zeros).
        """
        t0 = time.perf_counter()
        self.model.train()
        accum = self.cfg.train.grad_accum
        logs = any(self._writes_at(self.step + 1))
        loss_sum = torch.zeros((), device=self.rt.device)
        tokens = 0
        self.balancer.begin_step()
        for micro in range(accum):
            batch = self.task.next_batch()
            last = micro == accum - 1
            with self.backend.accumulate(last):
                with self._autocast():
                    out = self.task.loss(self.backend.model, batch, self.rt.device)
                self.backend.backward(out.total / accum, last=last)
            if logs:
                self.moe_acc.add(out.moe_stats)
            self.balancer.add(out.moe_stats)
            loss_sum += out.loss.detach()
            tokens += out.tokens
            for k, v in out.extras.items():
                total_count = self._extras.setdefault(k, [0.0, 0])
                total_count[0] += v
                total_count[1] += 1
        grad_norm = self.backend.finish_grads()
        loss_mean = loss_sum / accum
        bad = not bool(torch.isfinite(loss_mean))
        if grad_norm is not None:
            bad = bad or not bool(torch.isfinite(grad_norm))
        bad = any_rank(bad, self.rt.device)
        lr = lr_at(self.step, lr=self.cfg.optim.lr, min_lr=self.cfg.optim.min_lr,
                   warmup_steps=self.cfg.optim.warmup_steps, max_steps=self.cfg.train.max_steps)
        stepped, norm = self.backend.step(lr, skip=bad)
        self.balancer.step(applied=stepped)
        self.step += 1
        tokens *= self.rt.world_size
        self.tokens_seen += tokens
        if stepped:
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.cfg.train.max_skipped_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (step {self.step}); "
                    f"lower optim.lr or check the data")
        return StepResult(self.step, float(loss_mean), norm, lr, stepped, tokens, time.perf_counter() - t0)

    def _writes_at(self, step: int) -> tuple[bool, bool]:
        """(metrics, expert load): what step `step` (1-based) writes."""
        t, lg = self.cfg.train, self.cfg.logging
        last = step == t.max_steps
        return step % lg.every == 0 or last, step % lg.load_every == 0 or last

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over `train.eval_batches` batches of every rank, and what the task
        derives from it (bits per byte for the LM)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with self.moe_acc.traffic_excluded():
            for batch in self.task.val_batches(self.cfg.train.eval_batches):
                with self._autocast():
                    loss = self.task.loss(self.model, batch, self.rt.device).loss
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        if self.rt.distributed:
            total = all_reduce(total, self.rt.device)
        return self.task.val_metrics(float(total[0] / total[1]))

    @torch.no_grad()
    def final_report(self) -> dict[str, Any] | None:
        """The task's end-of-run metrics; printed and written to RUN_DIR/final_metrics.json on rank 0.

        Under expert parallelism every rank takes part (the MoE layers exchange tokens);
        otherwise rank 0 alone computes it.
        """
        collective = self.mesh.ep_size > 1
        if not (collective or self.rt.is_main):
            return None
        with self._autocast(), self.moe_acc.traffic_excluded():
            report = self.task.final_report(self.model, self.rt.device, collective)
        if report is None or not self.rt.is_main:
            return report
        (self.run_dir / REPORT_FILE).write_text(json.dumps({"step": self.step, **report}, indent=1))
        self.metrics.log(self.step, _flatten(report, "final"))
        self.metrics.write(self.task.format_report(report))
        return report

    # ---- loop ----

    def _log(self, result: StepResult) -> None:
        iv = self._interval
        iv["loss"] += result.loss
        iv["n"] += 1
        iv["seconds"] += result.seconds
        iv["tokens"] += result.tokens
        self.metrics.progress(result.step, result.loss, result.tokens / max(result.seconds, 1e-9))
        log_now, load_now = self._writes_at(result.step)
        if not (log_now or load_now):
            return
        acc = self.moe_acc
        interval = torch.tensor([iv["loss"], float(iv["n"])], dtype=torch.float64, device=acc.device)
        packed = torch.cat([interval, acc.packed()])
        if self.rt.distributed:
            packed = all_reduce(packed, self.rt.device)
        loss_sum, n = float(packed[0]), float(packed[1])
        tokens_LE, routed_LE, dropped_L, assign_L, a2a, aux = acc.unpack(packed[2:], self.rt.world_size)
        L = acc.L
        if log_now:
            values = {"loss": float(loss_sum / n), "lr": result.lr, "grad_norm": result.grad_norm,
                      "tokens_per_s": iv["tokens"] / max(iv["seconds"], 1e-9),
                      "skipped_steps": float(self.skipped_steps), "tokens_seen": float(self.tokens_seen)}
            values.update(aux)
            values.update({k: v / n for k, (v, n) in self._extras.items()})
            self._extras = {}
            if L:
                values.update(moe_summary(tokens_LE, routed_LE, dropped_L, assign_L))
                values["moe/a2a_bytes_per_step"] = a2a / max(iv["n"], 1) / self.rt.world_size
            self.metrics.log(result.step, values)
            self._interval = {"loss": 0.0, "n": 0, "seconds": 0.0, "tokens": 0}
        if load_now and L:
            self.metrics.log_expert_load(result.step, tokens_LE)
        if log_now:
            acc.reset()

    def fit(self) -> dict[str, float]:
        """Train to `train.max_steps`; returns the last logged training and validation losses."""
        t, ck = self.cfg.train, self.cfg.checkpoint
        last: dict[str, float] = {}
        try:
            while self.step < t.max_steps:
                result = self.train_step()
                self._log(result)
                last["loss"] = result.loss
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                    ev = self.evaluate()
                    self.metrics.log(self.step, ev)
                    last.update(ev)
                if ck.every and self.step % ck.every == 0:
                    self.save_checkpoint()
            if ck.save_final and self._last_saved != self.step:
                self.save_checkpoint()
            self.final_report()
        finally:
            self.metrics.close()
        return last


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numbers of a nested report as `prefix/a/b` scalars (lists and strings left out)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
