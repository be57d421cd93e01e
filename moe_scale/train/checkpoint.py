"""Checkpoints with `torch.distributed.checkpoint` (DCP): atomic, verified, resharding experts.

Layout of RUN_DIR/checkpoints:

    step_00000100/            a complete checkpoint (published by one directory rename)
        .metadata, __R_I.distcp   DCP: model and optimizer state keyed by parameter name
        rank_R.json           per-rank trainer state: step, data position, counters, RNG states
        MANIFEST.json         size and sha256 of every file above
    .tmp-step_00000200/       a save in progress (or one killed mid-way): never read, removed

Expert weights are stacked tensors with a global expert axis `[E, ...]`. Under expert
parallelism each rank holds a block of that axis; `save`/`load` then present expert
parameters and their optimizer state as DTensors sharded on the EP mesh dimension, so DCP
stores them by global expert index and a checkpoint taken at one EP size loads at another.

Under DeepSpeed ZeRO-1/2 the optimizer state lives in flat fp32 partitions, one per rank:
they are saved by DCP under a per-rank key (`zero.rank_R`), so such a checkpoint resumes
with the same world size and ZeRO stage; the model weights are stored by name as above.

Saving: DCP writes (and fsyncs) its files into the temporary directory, each rank writes its
JSON state, the files are hashed into the manifest, and rank 0 renames the directory into
place and fsyncs the parent: a checkpoint is visible only when complete. The last
`keep_last` are kept. A save that fails (a full disk, a quota, a read-only mount; DCP reports
it wrapped in its CheckpointException) is a `CheckpointError` naming the directory; the
previous checkpoint stays in place.

A checkpoint may hold the model weights only (`moe-scale convert` writes one at step 0): it
loads into a run whose optimizer then starts fresh.

Loading never runs code from the checkpoint: the files are checked against the manifest
first (truncation or modification is a `CheckpointError` naming the file), DCP's pickled
`.metadata` is read with an unpickler that only admits DCP's own metadata classes, tensor
payloads are read by DCP with `weights_only=True`, the non-tensor entries (the optimizer's
`param_groups`: lr, betas, parameter names) by a load planner that uses `weights_only=True`
too instead of DCP's unrestricted unpickling (they stay in DCP's format, so DCP's own tools
still read the checkpoint), and trainer state is JSON. The manifest guards against damage, not
against an attacker, who can recompute it; the restricted readers are what keep code out.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says which file and what to do."""


@dataclass
class ExpertSharding:
    """How expert parameters are laid out under expert parallelism.

    device_mesh   2-D mesh ("edp", "ep"); expert tensors are sharded on "ep" and replicated on "edp"
    param_names   fully qualified names of the expert parameters (local blocks `[E_local, ...]`)
    ep_major_mesh under FSDP, the mesh ("ep", "edp") over the same ranks (expert blocks are also
                  sharded over EDP there)
    """

    device_mesh: Any
    param_names: set[str]
    ep_major_mesh: Any = None  # the same ranks as ("ep", "edp"); needed under FSDP only


# ---- locating --------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---- integrity -------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _files_of_rank(directory: Path, rank: int) -> list[Path]:
    """Files this rank wrote (DCP names its data files __RANK_N.distcp)."""
    return [p for p in directory.iterdir()
            if p.name.startswith(f"__{rank}_") or p.name == f"rank_{rank}.json"]


def _cause(err: BaseException) -> str:
    """One line for a failed save; DCP wraps each rank's exception in a CheckpointException."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (inner, _) = next(iter(sorted(err.failures.items())))
        where = f" on rank {rank}" if len(err.failures) < 2 else f" on ranks {sorted(err.failures)}"
        return _cause(inner) + where
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fix(path: Path) -> str:
    return f"delete {path} to resume from the previous checkpoint"


def verify_checkpoint(path: str | Path, files: list[str] | None = None) -> dict[str, Any]:
    """Check files against the manifest; raise CheckpointError naming the first bad one."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); "
                              f"it was not written by moe_scale or its save did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest_path} is damaged ({err}); delete {path} and resume from an earlier checkpoint") from None
    fix = _fix(path)
    for name in files if files is not None else sorted(entries):
        info = entries[name]
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; {fix}")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, the manifest says "
                                  f"{info['size']} (truncated?); {fix}")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its sha256 in the "
                                  f"manifest (modified?); {fix}")
    return manifest


# ---- safe DCP metadata -----------------------------------------------------------------------

_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_METADATA, "Metadata"), (_METADATA, "StorageMeta"), (_METADATA, "MetadataIndex"),
    (_METADATA, "TensorProperties"), (_METADATA, "TensorStorageMetadata"), (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"), (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP metadata is made of (and torch dtypes): nothing else can run."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which DCP metadata never "
                              f"holds; refusing to load it (tampered file?)")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with the metadata read by `_MetadataUnpickler` instead of pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"cannot read {path}: {err}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- non-tensor entries --------------------------------------------------------------------


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by `torch.load(weights_only=True)`.

    DCP's own `load_bytes` unpickles them with `weights_only=False`, which runs any code a
    planted pickle names; weights_only admits plain values and tensors only, as DCP's reader
    already does for the tensor payloads. A refused entry is kept in `refused` for the caller's
    message: DCP reports planner errors wrapped in its own exception.
    """

    refused: str = ""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True, map_location="cpu")
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.refused = (f"checkpoint entry {fqn} holds more than plain values; refusing to unpickle it "
                            f"(tampered file?): {reason}")
            raise CheckpointError(self.refused) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, minus its unpickling
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# ---- state dicts -----------------------------------------------------------------------------


def _with_global_experts(model_sd: dict, optim_sd: dict, sharding: ExpertSharding | None) -> None:
    """Wrap local expert blocks (and their optimizer state) as DTensors on the global expert axis.

    Under FSDP an expert tensor is already a DTensor: this rank's EDP chunk of its EP block. On
    the ("ep", "edp") view of the mesh, sharding dim 0 over both puts that chunk at its global
    place (EP block outer, EDP chunk inner). `_local` undoes either wrap after loading.
    """
    if sharding is None:
        return
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t):
        if isinstance(t, DTensor):
            ep = sharding.device_mesh["ep"].size()
            shape = (t.shape[0] * ep, *t.shape[1:])
            wrapped = DTensor.from_local(t.to_local(), sharding.ep_major_mesh, [Shard(0), Shard(0)], run_check=False,
                                         shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
            wrapped._fsdp_origin = t
        else:
            wrapped = DTensor.from_local(t, sharding.device_mesh, [Replicate(), Shard(0)], run_check=False)
        wrapped._global_experts_wrap = True
        return wrapped

    for name in sharding.param_names:
        model_sd[name] = wrap(model_sd[name])
        if name in optim_sd["state"]:  # a new dict: the old one may be the optimizer's own state
            optim_sd["state"][name] = {k: wrap(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                                       for k, v in optim_sd["state"][name].items()}


def _local(tree: Any) -> Any:
    """The tensors to load into the model: expert wraps undone; FSDP's own DTensors kept."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        if not getattr(tree, "_global_experts_wrap", False):
            return tree
        origin = getattr(tree, "_fsdp_origin", None)
        if origin is None:
            return tree.to_local()
        return DTensor.from_local(tree.to_local(), origin.device_mesh, origin.placements, run_check=False,
                                  shape=origin.shape, stride=origin.stride())
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_local(v) for v in tree]
    return tree


def is_zero_optimizer(optimizer: Any) -> bool:
    """A DeepSpeed ZeRO-1/2 optimizer (flat fp32 partitions per rank)."""
    return hasattr(optimizer, "single_partition_of_fp32_groups")


def _zero_state(optimizer: Any) -> dict[str, Any]:
    """This rank's fp32 master partitions and the AdamW state over them (created empty if need be)."""
    base = optimizer.optimizer.state_dict()["state"]
    state = {}
    for i, part in enumerate(optimizer.single_partition_of_fp32_groups):
        s = base.get(i) or {"step": torch.zeros(()), "exp_avg": torch.zeros_like(part),
                            "exp_avg_sq": torch.zeros_like(part)}
        state[str(i)] = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in s.items()}
    return {"fp32": {str(i): p for i, p in enumerate(optimizer.single_partition_of_fp32_groups)}, "state": state}


def _set_zero_state(optimizer: Any, loaded: dict[str, Any]) -> None:
    with torch.no_grad():
        for i, part in enumerate(optimizer.single_partition_of_fp32_groups):
            part.copy_(loaded["fp32"][str(i)])
    groups = optimizer.optimizer.state_dict()["param_groups"]
    state = {int(i): dict(s) for i, s in loaded["state"].items()}
    optimizer.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _state_dicts(model: nn.Module, optimizer: Any, sharding: ExpertSharding | None, rank: int):
    """DCP state: {"model": ..., "optim": ...} (FQN keys) or {"model": ..., "zero": {"rank_R": ...}}."""
    options = StateDictOptions(ignore_frozen_params=False)
    if optimizer is None or is_zero_optimizer(optimizer):
        model_sd = get_model_state_dict(model, options=options)
        _with_global_experts(model_sd, {"state": {}}, sharding)  # else DCP keeps one rank's expert block
        if optimizer is None:
            return {"model": model_sd}
        return {"model": model_sd, "zero": {f"rank_{rank}": _zero_state(optimizer)}}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    _with_global_experts(model_sd, optim_sd, sharding)
    return {"model": model_sd, "optim": optim_sd}


def _drop_unsaved_optimizer_state(optim_sd: dict[str, Any], metadata: Metadata) -> bool:
    """Leave out the optimizer state of parameters that had none when saved.

    A parameter that never received a gradient (the MultiModel's modality net of a task not yet
    drawn) has no AdamW state; the state dict built to load into holds one for every parameter.
    Without its entry the parameter stays stateless after loading, as it was when saved.
    """
    saved = {k.rsplit(".", 1)[0] for k in metadata.state_dict_metadata if k.startswith("optim.state.")}
    missing = [fqn for fqn in optim_sd.get("state", {}) if f"optim.state.{fqn}" not in saved]
    for fqn in missing:
        del optim_sd["state"][fqn]
    return bool(missing)


def encode_rng() -> dict[str, str]:
    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def restore_rng(state: dict[str, str]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


# ---- save / load -----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process when no group exists; in debug mode that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under `root` (see module docstring)."""

    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 sharding: ExpertSharding | None = None):
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size, self.sharding = keep_last, rank, world_size, sharding

    def _collective(self) -> bool:
        return dist.is_initialized() and self.world_size > 1

    def _barrier(self) -> None:
        if self._collective():
            dist.barrier()

    def remove_incomplete(self) -> None:
        """Delete leftovers of saves that were killed mid-way (rank 0; call before training)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
        self._barrier()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             trainer_state: dict[str, Any]) -> Path:
        """Write step_{step} atomically. `trainer_state` is JSON-able and this rank's own."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        try:
            with _quiet_single_process():
                dcp.save(_state_dicts(model, optimizer, self.sharding, self.rank),
                         storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not self._collective())
            state = {**trainer_state, "rng": encode_rng(), "rank": self.rank, "world_size": self.world_size}
            _write_durable(tmp / f"rank_{self.rank}.json", json.dumps(state))
        except (OSError, CheckpointException) as err:  # a full disk, a quota, a read-only mount
            raise CheckpointError(f"saving checkpoint {final.name} failed: {_cause(err)}; free space or fix "
                                  f"permissions under {self.root} (or move train.run_dir) and rerun, which "
                                  f"resumes from the last complete checkpoint") from err
        self._barrier()  # every rank's files are on disk

        mine = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files_of_rank(tmp, self.rank)}
        gathered = [mine]
        if self._collective():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
        if self.rank == 0:
            entries = {k: v for part in gathered for k, v in part.items()}
            for p in tmp.iterdir():
                if p.name not in entries:
                    entries[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
            _write_durable(tmp / MANIFEST, json.dumps({"step": step, "world_size": self.world_size,
                                                       "files": entries}, indent=1, sort_keys=True))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             restore_rng_state: bool = True) -> dict[str, Any]:
        """Restore model and optimizer in place; return this rank's trainer state (RNG restored)."""
        path = Path(path)
        manifest = self._verify(path)
        metadata = SafeFileSystemReader(path).read_metadata()  # a refused .metadata is a CheckpointError itself
        if not any(k.startswith(("optim.", "zero.")) for k in metadata.state_dict_metadata):
            if is_zero_optimizer(optimizer):
                raise CheckpointError(f"{path} holds weights only, and DeepSpeed keeps its own fp32 copy of the "
                                      f"weights that loading them here would not reach; start a new run from it "
                                      f"with model.init_from={path.parent.parent}")
            optimizer = None  # weights only (`moe-scale convert`): the optimizer starts fresh
        zero = is_zero_optimizer(optimizer)
        if zero and manifest.get("world_size") != self.world_size:
            raise CheckpointError(f"{path} holds DeepSpeed ZeRO partitions of {manifest.get('world_size')} ranks; "
                                  f"resume it with that many ranks (this job has {self.world_size})")
        if optimizer is not None and not zero:
            # DCP only creates missing optimizer state (to load into) when no gradient is set.
            optimizer.zero_grad(set_to_none=True)
        state = _state_dicts(model, optimizer, self.sharding, self.rank)
        if optimizer is not None and not any(k.startswith("zero." if zero else "optim.")
                                             for k in metadata.state_dict_metadata):
            raise CheckpointError(f"{path} was saved with {'torch' if zero else 'DeepSpeed ZeRO'} optimizer state; "
                                  f"resume it with the same parallel.backend")
        stateless = optimizer is not None and not zero and _drop_unsaved_optimizer_state(state["optim"], metadata)
        planner = _SafeLoadPlanner()
        try:
            with _quiet_single_process():
                dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=planner,
                         no_dist=not self._collective())
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            if planner.refused:
                raise CheckpointError(f"{path}: {planner.refused}; {_fix(path)}") from None
            raise CheckpointError(f"cannot load checkpoint {path} into this model: {err}".strip()) from err
        model_sd = _local(state["model"])
        if zero:
            set_model_state_dict(model, model_sd)
            _set_zero_state(optimizer, state["zero"][f"rank_{self.rank}"])
        elif optimizer is not None:
            # strict=False only lets stateless parameters be; a missing model key fails in dcp.load above.
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=_local(state["optim"]),
                           options=StateDictOptions(strict=not stateless))
        else:
            set_model_state_dict(model, model_sd)
        exact = manifest.get("world_size") == self.world_size  # else the data order and RNG streams restart
        name = f"rank_{self.rank}.json" if exact else "rank_0.json"
        try:
            trainer_state = json.loads((path / name).read_bytes())
        except ValueError as err:  # UnicodeDecodeError included
            raise CheckpointError(f"checkpoint {path}: {name} is not JSON trainer state ({err}); {_fix(path)}") from None
        if not isinstance(trainer_state, dict):
            raise CheckpointError(f"checkpoint {path}: {name} is not JSON trainer state; {_fix(path)}")
        if restore_rng_state and exact:
            restore_rng(trainer_state["rng"])
        trainer_state["exact"] = exact
        return trainer_state

    def _verify(self, path: Path) -> dict[str, Any]:
        """Every rank checks a share of the files; a failure on any rank fails all of them alike."""
        error = ""
        manifest: dict[str, Any] = {}
        try:
            manifest = verify_checkpoint(path, files=[])
            names = sorted(manifest["files"])
            verify_checkpoint(path, files=names[self.rank :: self.world_size])
        except CheckpointError as err:
            error = str(err)
        if self._collective():
            errors = [None] * self.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), "")
        if error:
            raise CheckpointError(error)
        return manifest
