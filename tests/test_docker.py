"""Docker images install the package the way the README says (`docker build` itself needs a daemon)."""

from __future__ import annotations

import re

import pytest

from tests.trainer_utils import REPO

README_INSTALL = 'pip install torch==2.13.0 && pip install -e ".[all]"'


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "cuda.Dockerfile"])
def test_images_install_as_the_readme_says(name):
    text = (REPO / "docker" / name).read_text()
    assert README_INSTALL in text
    assert re.search(r"^FROM \S+", text, re.M)
    assert re.search(r'^CMD \["moe-scale", "train", "configs/\w+\.yaml"\]', text, re.M)
    config = re.search(r'"(configs/\w+\.yaml)"', text).group(1)
    assert (REPO / config).is_file()
    assert (REPO / "docker" / f"{name}.dockerignore").is_file()


def test_cpu_image_takes_the_cpu_wheel():
    assert "download.pytorch.org/whl/cpu" in (REPO / "docker" / "cpu.Dockerfile").read_text()
