"""transformers and safetensors are the optional `hf` extra: the core never imports them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainer_utils import REPO, cli_env

CHECK = """
import sys
import moe_scale, moe_scale.cli, moe_scale.train.trainer, moe_scale.models.lm.task, moe_scale.convert
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "safetensors"))
print(loaded)
"""


def test_core_and_trainer_import_without_transformers():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_hf_extra_pins_transformers_and_safetensors():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["hf"] == ["transformers==5.18.0", "safetensors==0.8.0"]
    assert "hf" in extras["all"][0]
