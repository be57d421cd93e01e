"""Training configuration: one dataclass per component, loaded from YAML with dotted overrides.

    cfg = load_config("configs/lm_debug.yaml", ["moe.num_experts=64", "optim.lr=1e-3"])

Sections: model, moe, data, optim, train, parallel, checkpoint, logging. `model.name` picks the
client (`moe_scale.train.tasks`: lm, multimodel, selector), and with it the dataclasses of the
`model:` and `data:` sections; `ModelConfig` and `DataConfig` here are the LM's. Every section
checks its own fields in `__post_init__`; `Config.__post_init__` checks combinations across
sections (the client's own through its `TaskDef.check`).
Unknown keys, wrongly typed values and impossible combinations raise `ConfigError` naming the
key and the fix, before any model is built or any data read.

Values are parsed, never evaluated: the file with `yaml.safe_load`, an override's value as a
YAML scalar or list, then converted to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_scale.moe.config import MoEConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key} must be one of {list(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    """The `lm` client: byte-level decoder-only transformer (models/lm).

    moe_every   1: every FFN is an MoE layer; 2: every other one (layers 1, 3, ...); 0: dense
    d_ff        hidden size of the dense FFNs (default 4 * d_model); experts use moe.d_hidden
    """

    name: str = "lm"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    d_ff: int | None = None
    moe_every: int = 1
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        _choice("model.name", self.name, ("lm",))
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.d_model % self.n_heads == 0,
               f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
               f"choose n_heads dividing d_model")
        _check(self.d_ff is None or self.d_ff >= 1, f"model.d_ff must be >= 1 or null, got {self.d_ff}")
        _check(self.moe_every >= 0, f"model.moe_every must be >= 0 (0 = dense model), got {self.moe_every}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))


def _moe_section() -> type:
    """The `moe` section: every `MoEConfig` option except d_model (taken from the model).

    Derived from `MoEConfig` so a new engine option is configurable without touching this
    file; `Config.__post_init__` validates it by building the layer on the meta device.
    """
    specs = []
    hints = typing.get_type_hints(MoEConfig)
    for f in fields(MoEConfig):
        if f.name == "d_model":
            continue
        default = field(default=8) if f.name == "num_experts" else field(
            default=f.default, default_factory=f.default_factory)
        specs.append((f.name, hints[f.name], default))
    section = dataclasses.make_dataclass("MoESection", specs)
    section.__doc__ = "Options of every MoE layer of the model: `MoEConfig` minus d_model."
    section.__module__ = __name__
    return section


MoESection = _moe_section()


@dataclass
class DataConfig:
    """Text data through HF `datasets`, byte tokens, fixed-length blocks.

    dataset        "python-stdlib": the running Python's standard-library sources (offline);
                   anything else is passed to `datasets.load_dataset` (hub name or local path)
    val_fraction   share of documents in the validation split (chosen by a hash of the text)
    batch_size     blocks per rank per micro-step
    """

    dataset: str = "python-stdlib"
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    val_fraction: float = 0.05
    seq_len: int = 128
    batch_size: int = 16
    cache_dir: str | None = None

    def __post_init__(self):
        _check(self.seq_len >= 1, f"data.seq_len must be >= 1, got {self.seq_len}")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.max_documents is None or self.max_documents >= 2,
               f"data.max_documents must be >= 2 (train and validation) or null, got {self.max_documents}")


@dataclass
class OptimConfig:
    """AdamW with dense and expert parameter groups, linear warmup then cosine decay to min_lr.

    Norms, biases and embeddings get no weight decay. Expert parameters use
    lr * expert_lr_scale and expert_weight_decay (default: weight_decay).
    """

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    expert_lr_scale: float = 1.0
    expert_weight_decay: float | None = None

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {list(self.betas)}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        _check(self.expert_lr_scale > 0, f"optim.expert_lr_scale must be > 0, got {self.expert_lr_scale}")


PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """The loop.

    precision        auto: bf16 autocast on CUDA with bf16 support, fp32 otherwise
    deterministic    deterministic kernels and seeds: the same run gives the same bits on CPU
    max_skipped_steps  stop when this many consecutive steps had a NaN/inf loss or gradient
    num_threads      CPU threads per process (0: torch's default). Small models on a shared CPU
                     run many times faster on 1 thread than on several that wait for each other
    """

    max_steps: int = 200
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    activation_checkpointing: bool = False
    device: str = "auto"
    num_threads: int = 0
    run_dir: str = "runs/default"
    max_skipped_steps: int = 10

    def __post_init__(self):
        _check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        _check(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.device", self.device, DEVICES)
        _check(bool(self.run_dir), "train.run_dir must be a directory path")
        _check(self.num_threads >= 0, f"train.num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")
        _check(self.max_skipped_steps >= 1, f"train.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")


BACKENDS = ("torch", "fsdp", "deepspeed")
DIST_BACKENDS = ("auto", "gloo", "nccl")
FSDP_PRECISIONS = ("fp32", "bf16")
A2A_MODES = ("flat", "hierarchical")


@dataclass
class ParallelConfig:
    """How ranks split the work. World size comes from the launcher (RANK / WORLD_SIZE).

    backend      torch: DDP for dense params + expert-data-parallel all-reduce for experts;
                 fsdp: FSDP2 `fully_shard`, dense params over the world, experts over their
                 expert-data-parallel group (parameters, gradients and AdamW state sharded);
                 deepspeed: `deepspeed.initialize` with MoE parameter groups
    ep_size      expert-parallel group size; must divide moe.num_experts and the world size
    a2a          flat or hierarchical all-to-all (within nodes, then across; same result)
    dist_backend auto: nccl on CUDA, gloo on CPU
    fsdp_precision  fsdp only: fp32, or bf16 (bf16 parameters in forward/backward, gradients
                    reduced and kept in float32, float32 master weights)
    """

    backend: str = "torch"
    ep_size: int = 1
    a2a: str = "flat"
    dist_backend: str = "auto"
    deepspeed_config: str | None = None
    timeout_s: int = 600
    fsdp_precision: str = "fp32"

    def __post_init__(self):
        _choice("parallel.backend", self.backend, BACKENDS)
        _choice("parallel.dist_backend", self.dist_backend, DIST_BACKENDS)
        _choice("parallel.fsdp_precision", self.fsdp_precision, FSDP_PRECISIONS)
        _check(self.fsdp_precision == "fp32" or self.backend == "fsdp",
               f"parallel.fsdp_precision={self.fsdp_precision} applies to parallel.backend=fsdp only; "
               f"use train.precision=bf16 for autocast under parallel.backend={self.backend}")
        _choice("parallel.a2a", self.a2a, A2A_MODES)
        _check(self.ep_size >= 1, f"parallel.ep_size must be >= 1, got {self.ep_size}")
        _check(self.timeout_s >= 1, f"parallel.timeout_s must be >= 1, got {self.timeout_s}")
        if self.backend == "deepspeed":
            _check(self.deepspeed_config is not None,
                   "parallel.backend=deepspeed needs parallel.deepspeed_config (e.g. configs/deepspeed/zero2.json)")


@dataclass
class CheckpointConfig:
    """DCP checkpoints under RUN_DIR/checkpoints.

    every     save every this many steps (0: only at the end)
    resume    auto: from the newest complete checkpoint of the run dir, if any; never; or a path
    """

    every: int = 100
    keep_last: int = 3
    resume: str = "auto"
    save_final: bool = True

    def __post_init__(self):
        _check(self.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {self.every}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _check(bool(self.resume), "checkpoint.resume must be auto, never or a checkpoint path")


@dataclass
class LoggingConfig:
    """Metrics: JSONL in the run dir always; tqdm bar and wandb on rank 0 when enabled.

    every        log scalars every this many steps
    load_every   record per-layer expert load (JSONL, wandb heatmaps) every this many steps
    wandb        log to wandb too (the mode follows WANDB_MODE, e.g. offline)
    """

    every: int = 10
    load_every: int = 50
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "moe_scale"
    wandb_entity: str | None = None
    wandb_name: str | None = None

    def __post_init__(self):
        _check(self.every >= 1, f"logging.every must be >= 1, got {self.every}")
        _check(self.load_every >= 1, f"logging.load_every must be >= 1, got {self.load_every}")


@dataclass
class Config:
    model: Any = field(default_factory=ModelConfig)  # the client's section: see `tasks.TaskDef`
    moe: MoESection = field(default_factory=MoESection)  # type: ignore[valid-type]
    data: Any = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        from moe_scale.train.tasks import get_task

        _check(self.optim.warmup_steps < self.train.max_steps or self.train.max_steps == 1,
               f"optim.warmup_steps={self.optim.warmup_steps} must be below train.max_steps={self.train.max_steps}")
        get_task(self.model.name).check(self)

    def check_moe(self) -> None:
        """The `moe` section builds a valid layer of width model.d_model, and ep_size divides its experts."""
        self.moe_config()
        _check(self.moe.num_experts % self.parallel.ep_size == 0,
               f"parallel.ep_size={self.parallel.ep_size} must divide moe.num_experts={self.moe.num_experts}")

    def moe_config(self) -> MoEConfig:
        """The `MoEConfig` of the model's MoE layers, checked as the layer would check it."""
        from moe_scale.moe.layer import MoELayer

        options = {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        try:
            with torch.device("meta"):  # validates every option without allocating the experts
                layer = MoELayer(self.model.d_model, **options)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"moe: {err}") from None
        return layer.cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply `key.sub=value` overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, moe:, ...), got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """`"moe.num_experts=64"` -> ("moe.num_experts", 64). The value is a YAML scalar or list."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. moe.num_experts=64)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, _RawText(text, value)


class _RawText:
    """An override value: its YAML reading plus the raw text (kept for str fields: `name=007`)."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict) -> Config:
    from moe_scale.train.tasks import get_task

    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {raw!r}")
    model = raw.get("model", {})
    model = model.value if isinstance(model, _RawText) else model
    name = model.get("name", "lm") if isinstance(model, dict) else "lm"
    name = name.text.strip() if isinstance(name, _RawText) else name
    task = get_task(str(name))
    return _build(Config, raw, "", {"model": task.model_section, "data": task.data_section})


def _build(cls: type, raw: Any, prefix: str, section_types: dict[str, type] | None = None) -> Any:
    where = prefix.rstrip(".") or "the config"
    if isinstance(raw, _RawText):
        raw = raw.value
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = {**typing.get_type_hints(cls), **(section_types or {})}
    names = [f.name for f in fields(cls) if f.init]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(f"{prefix}{key}", [f"{prefix}{n}" for n in names]))
    values = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in names if name in raw}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key {key}; {hint}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    text = value.text if isinstance(value, _RawText) else None
    if isinstance(value, _RawText):
        value = value.value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value if text is None else _RawText(text, value), inner[0], key)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return _build(tp, value, f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if text is not None:
            return text.strip()
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (no secrets: the config holds none, and nothing is read from env)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
