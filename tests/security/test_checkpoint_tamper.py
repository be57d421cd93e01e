"""A damaged or modified checkpoint is refused with a message naming the file and the fix."""

from __future__ import annotations

import pytest

from moe_scale.train.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
from moe_scale.train.config import load_config
from moe_scale.train.trainer import Trainer
from tests.trainer_utils import CONFIGS, cli, tiny

DEBUG = str(CONFIGS / "lm_debug.yaml")


def _trainer(tmp_path, *extra):
    return Trainer(load_config(DEBUG, tiny(tmp_path / "run", *extra)))


@pytest.fixture
def saved(tmp_path):
    t = _trainer(tmp_path)
    t.train_step()
    path = t.save_checkpoint()
    t.metrics.close()
    return path


def test_truncated_checkpoint_gives_a_clear_error(saved, tmp_path):
    data = saved / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp has \d+ bytes, the manifest says \d+ \(truncated\?\)"):
        _trainer(tmp_path)
    proc = cli("train", DEBUG, *tiny(tmp_path / "run"))
    assert proc.returncode == 2
    assert "truncated?" in proc.stderr and f"delete {saved}" in proc.stderr and "Traceback" not in proc.stderr


def test_modified_or_incomplete_checkpoint_gives_a_clear_error(saved, tmp_path):
    data = saved / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify_checkpoint(saved)
    (saved / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        verify_checkpoint(saved)
