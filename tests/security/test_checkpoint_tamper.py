"""A damaged or modified checkpoint is refused with a message naming the file and the fix."""

from __future__ import annotations

import pytest

from moe_scale.train.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
from tests.train.test_checkpoint import DEBUG, _trainer, saved  # noqa: F401 - the fixture of a saved one-step run
from tests.trainer_utils import cli, tiny


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
