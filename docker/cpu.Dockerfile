# CPU image: the single-process debug run, multi-rank CPU runs (torchrun, deepspeed, accelerate +
# mpirun) and the test suite. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t moe_scale:cpu .
#   docker run --rm moe_scale:cpu                                  # moe-scale train configs/lm_debug.yaml
#   docker run --rm moe_scale:cpu python -m pytest -q
FROM python:3.11-slim

# gcc: DeepSpeed JIT-builds a small CPU comm op, moe_scale its fused CPU kernels; openmpi-bin: accelerate's MULTI_CPU launch.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ openmpi-bin \
    && rm -rf /var/lib/apt/lists/*
ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

WORKDIR /workspace/moe_scale
COPY . .
# The CPU wheel of torch comes from PyTorch's CPU index (PyPI's Linux wheel is the CUDA build);
# the install line itself is the README's.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install torch==2.13.0 && pip install -e ".[all]"

# The stdlib corpus is on the image; the hub is never needed for the debug config or the tests.
ENV HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
ENTRYPOINT []
CMD ["moe-scale", "train", "configs/lm_debug.yaml"]
