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
    cmd = re.search(r'^CMD \[(.*)\]$', text, re.M).group(1)
    config = re.search(r'"(configs/\w+\.yaml)"', cmd).group(1)
    assert (REPO / config).is_file()
    assert (REPO / "docker" / f"{name}.dockerignore").is_file()


def test_cpu_image_takes_the_cpu_wheel():
    text = (REPO / "docker" / "cpu.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r'^CMD \["moe-scale", "train", "configs/\w+\.yaml"\]', text, re.M)


def test_cuda_image_pins_the_cuda_build_of_its_base_image_and_starts_through_torchrun():
    text = (REPO / "docker" / "cuda.Dockerfile").read_text()
    cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, re.M)
    assert cuda, "the CUDA image starts from an nvidia/cuda base"
    major, minor = cuda.groups()
    assert f"PIP_INDEX_URL=https://download.pytorch.org/whl/cu{major}{minor}" in text
    assert f"torch.version.cuda == '{major}.{minor}'" in text  # the build fails on another wheel
    cmd = re.search(r'^CMD \["(launcher/torchrun\.sh)", "configs/\w+\.yaml"\]', text, re.M)
    assert cmd and "torch.distributed.run" in (REPO / cmd.group(1)).read_text()
