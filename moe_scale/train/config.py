"""Training configuration: one dataclass per component, loaded from YAML with dotted overrides.

    cfg = load_config("configs/lm_debug.yaml", ["moe.num_experts=64", "optim.lr=1e-3"])

Sections: model, moe, data, optim, train, parallel, checkpoint, logging. `model.name` picks the
client (`moe_scale.train.tasks`: lm, multimodel, selector), and with it the dataclasses of the
`model:` and `data:` sections (the LM's: `moe_scale.models.lm.config`). Every section
checks its own fields in `__post_init__`; `Config.__post_init__` checks combinations across
sections (the client's own through its `TaskDef.check`).
Unknown keys, wrongly typed values and impossible combinations raise `ConfigError` naming the
key and the fix, before any model is built or any data read.

Values are parsed, never evaluated: the file with a `yaml.SafeLoader` that also refuses a key
given twice, an override's value as a YAML scalar or list, then converted to the field's
declared type. Numbers must be finite (`.inf` and `.nan` are refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from moe_scale.distributed.config import ParallelConfig
from moe_scale.moe.config import MoEConfig
from moe_scale.train.tasks import get_task
from moe_scale.validation import ConfigError, check, check_choice


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
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {list(self.betas)}")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        check(self.expert_lr_scale > 0, f"optim.expert_lr_scale must be > 0, got {self.expert_lr_scale}")


PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINTING = ("none", "attention", "moe", "full")


@dataclass
class TrainConfig:
    """The loop.

    precision        auto: bf16 autocast on CUDA with bf16 support, fp32 otherwise
    deterministic    deterministic kernels and seeds: the same run gives the same bits on CPU
    max_skipped_steps  stop when this many consecutive steps had a NaN/inf loss or gradient
    num_threads      CPU threads per process (0: torch's default). Small models on a shared CPU
                     run many times faster on 1 thread than on several that wait for each other
    activation_checkpointing  what each block recomputes in backward instead of keeping:
                     none, attention (the attention sublayer), moe (the MoE FFN sublayers)
                     or full (whole blocks); an override of true / false means full / none
    compile          compile each block with `torch.compile` (the lm client)
    """

    max_steps: int = 200
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    activation_checkpointing: str = "none"
    compile: bool = False
    device: str = "auto"
    num_threads: int = 0
    run_dir: str = "runs/default"
    max_skipped_steps: int = 10

    def __post_init__(self):
        check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.eval_every >= 0, f"train.eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        check(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        check_choice("train.precision", self.precision, PRECISIONS)
        self.activation_checkpointing = {"true": "full", "false": "none"}.get(
            self.activation_checkpointing.lower(), self.activation_checkpointing)
        check_choice("train.activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        check_choice("train.device", self.device, DEVICES)
        check(bool(self.run_dir), "train.run_dir must be a directory path")
        check(self.num_threads >= 0, f"train.num_threads must be >= 0 (0 = torch's default), got {self.num_threads}")
        check(self.max_skipped_steps >= 1, f"train.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")


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
        check(self.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {self.every}")
        check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        check(bool(self.resume), "checkpoint.resume must be auto, never or a checkpoint path")


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
        check(self.every >= 1, f"logging.every must be >= 1, got {self.every}")
        check(self.load_every >= 1, f"logging.load_every must be >= 1, got {self.load_every}")


@dataclass
class Config:
    model: Any = field(default_factory=lambda: _default_section("model"))  # the client's: see `tasks.TaskDef`
    moe: MoESection = field(default_factory=MoESection)  # type: ignore[valid-type]
    data: Any = field(default_factory=lambda: _default_section("data"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        check(self.optim.warmup_steps < self.train.max_steps or self.train.max_steps == 1,
              f"optim.warmup_steps={self.optim.warmup_steps} must be below train.max_steps={self.train.max_steps}")
        get_task(self.model.name).check_config(self)

    def check_moe(self) -> None:
        """The `moe` section builds a valid layer of width model.d_model, and ep_size divides its experts."""
        self.moe_config()
        check(self.moe.num_experts % self.parallel.ep_size == 0,
              f"parallel.ep_size={self.parallel.ep_size} must divide moe.num_experts={self.moe.num_experts}")

    def moe_config(self) -> MoEConfig:
        """The `MoEConfig` of the model's MoE layers, checked as the layer would check it."""
        options = {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        try:  # MoEConfig checks every option the layer would, and allocates nothing
            return MoEConfig(d_model=self.model.d_model, **options)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"moe: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))



def _default_section(section: str) -> Any:
    """The default client's (lm) `model:` or `data:` section."""
    task = get_task("lm")
    return task.model_section() if section == "model" else task.data_section()


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
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def _read_yaml(path: Path) -> dict:
    example = "e.g. configs/lm_debug.yaml"
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give a YAML file ({example})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path ({example})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # YAML's messages name the file instead of "<unicode string>"
        raw = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}; fix it there") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; give its sections (model:, moe:, ...) or start from "
                          f"a shipped config ({example})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, moe:, ...), got {type(raw).__name__}")
    return raw


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in from an anchor may be overridden on purpose
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                                            f"keep one of them")
                    seen[key] = line
                except TypeError:
                    pass  # an unhashable key: SafeLoader's own message follows
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[str, Any]:
    """`"moe.num_experts=64"` -> ("moe.num_experts", 64). The value is a YAML scalar or list."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. moe.num_experts=64)")
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"override {item!r}: {err}") from None
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML 1.1 reads "3e-4" as a string
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}; give a finite value")
        return number
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
