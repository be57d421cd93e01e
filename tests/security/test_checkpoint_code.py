"""A checkpoint never runs code on load: a pickle planted in any entry or file is refused.

The attacker here can write the checkpoint directory, so they also rewrite `.metadata` and
recompute the manifest's hashes; the readers, not the manifest, must refuse the payload.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from moe_scale.train import checkpoint as ckpt_mod
from moe_scale.train.checkpoint import MANIFEST, Checkpointer, CheckpointError, SafeFileSystemReader
from tests.trainer_utils import CONFIGS, cli, tiny


class _Evil:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root: Path) -> Path:
    model, optimizer = _model_and_optimizer()
    return Checkpointer(root).save(1, model, optimizer, {"step": 1})


def _rehash(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = {"size": (ckpt / name).stat().st_size, "sha256": ckpt_mod._sha256(ckpt / name)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _replace_entry(ckpt: Path, fqn: str, payload: bytes) -> None:
    """Swap the stored bytes of entry `fqn` for `payload`, fixing offsets, metadata and manifest."""
    metadata = SafeFileSystemReader(ckpt).read_metadata()
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    data = (ckpt / info.relative_path).read_bytes()
    (ckpt / info.relative_path).write_bytes(data[: info.offset] + payload + data[info.offset + info.length :])
    shift = len(payload) - info.length
    for other in metadata.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += shift
    info.length = len(payload)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(ckpt, info.relative_path)
    _rehash(ckpt, ".metadata")


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _entries(tmp_path_factory) -> tuple[list[str], str]:
    ckpt = _save(tmp_path_factory.mktemp("probe"))
    metadata = SafeFileSystemReader(ckpt).read_metadata()
    non_tensor = sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    tensor = next(k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata))
    return non_tensor, tensor


NON_TENSOR = [f"optim.param_groups.0.{k}" for k in
              ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
               "differentiable", "fused", "decoupled_weight_decay", "params")]


def test_every_non_tensor_entry_is_covered(tmp_path_factory):
    """The parametrised cases below plant a pickle in each non-tensor entry a save writes."""
    non_tensor, _ = _entries(tmp_path_factory)
    assert non_tensor == sorted(NON_TENSOR)


@pytest.mark.parametrize("fqn", NON_TENSOR)
@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_pickle_in_a_non_tensor_entry_is_refused(tmp_path, fqn, form):
    ckpt = _save(tmp_path / "ckpts")
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    _replace_entry(ckpt, fqn, _torch_saved(evil) if form == "torch.save" else pickle.dumps(evil, protocol=2))
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=rf"entry {fqn} holds more than plain values; refusing"):
        Checkpointer(tmp_path / "ckpts").load(ckpt, model, optimizer)
    assert not marker.exists()


def test_pickle_in_a_tensor_entry_is_refused(tmp_path, tmp_path_factory):
    _, tensor = _entries(tmp_path_factory)
    ckpt = _save(tmp_path / "ckpts")
    marker = tmp_path / "pwned"
    _replace_entry(ckpt, tensor, _torch_saved(_Evil(marker)))
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        Checkpointer(tmp_path / "ckpts").load(ckpt, model, optimizer)
    assert not marker.exists()


def test_pickle_as_metadata_is_refused(tmp_path):
    ckpt = _save(tmp_path / "ckpts")
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _rehash(ckpt, ".metadata")
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match="refers to posix.system"):
        Checkpointer(tmp_path / "ckpts").load(ckpt, model, optimizer)
    assert not marker.exists()


@pytest.mark.parametrize("name, message", [("rank_0.json", "rank_0.json is not JSON trainer state"),
                                           (MANIFEST, "MANIFEST.json is damaged")])
def test_pickle_in_a_json_file_is_refused(tmp_path, name, message):
    ckpt = _save(tmp_path / "ckpts")
    marker = tmp_path / "pwned"
    (ckpt / name).write_bytes(pickle.dumps(_Evil(marker)))
    if name != MANIFEST:
        _rehash(ckpt, name)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=message):
        Checkpointer(tmp_path / "ckpts").load(ckpt, model, optimizer)
    assert not marker.exists()


def test_untampered_checkpoint_still_loads(tmp_path):
    """The restricted readers accept what a save writes (lr, betas tuple, parameter names, ...)."""
    ckpt = _save(tmp_path / "ckpts")
    saved_model, saved_optimizer = _model_and_optimizer()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.0)
    Checkpointer(tmp_path / "ckpts").load(ckpt, model, optimizer)
    for a, b in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and tuple(optimizer.param_groups[0]["betas"]) == (0.9, 0.999)


def test_resume_from_a_planted_pickle_stops_the_cli_with_a_message(tmp_path):
    run = tmp_path / "run"
    args = ("train", str(CONFIGS / "lm_debug.yaml"), *tiny(run, "optim.warmup_steps=0", "train.max_steps=1"))
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    ckpt = next((run / "checkpoints").iterdir())
    marker = tmp_path / "pwned"
    _replace_entry(ckpt, "optim.param_groups.0.lr", _torch_saved(_Evil(marker)))
    again = cli(*args[:-1], "train.max_steps=2")
    assert again.returncode == 2
    assert "optim.param_groups.0.lr holds more than plain values" in again.stderr
    assert "Traceback" not in again.stderr
    assert not marker.exists()
