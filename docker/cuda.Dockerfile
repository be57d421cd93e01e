# CUDA image for GPU nodes (torchrun, deepspeed, SLURM). Build from the repository root:
#   docker build -f docker/cuda.Dockerfile -t moe_scale:cuda .
#   docker run --gpus all --ipc=host --rm moe_scale:cuda launcher/torchrun.sh configs/lm_gpu_1node.yaml
# The devel image carries nvcc, which DeepSpeed needs to JIT-build its ops.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git openmpi-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/moe_scale
COPY . .
ENV PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# PyPI's Linux wheel of torch is the CUDA build: the README's install line as it is.
RUN python3 -m venv /opt/venv \
    && pip install torch==2.13.0 && pip install -e ".[all]"

ENTRYPOINT []
CMD ["moe-scale", "train", "configs/lm_gpu_1node.yaml"]
