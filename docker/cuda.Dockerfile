# CUDA image for GPU nodes (torchrun, deepspeed, SLURM). Build from the repository root:
#   docker build -f docker/cuda.Dockerfile -t moe_scale:cuda .
#   docker run --gpus all --ipc=host --rm moe_scale:cuda                          # all GPUs of the node
#   docker run --gpus all --ipc=host --rm moe_scale:cuda launcher/torchrun.sh configs/lm_gpu_1node.yaml
# The devel image carries nvcc, which DeepSpeed needs to JIT-build its ops.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git openmpi-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/moe_scale
COPY . .
# The torch wheel is the CUDA 12.8 build, the toolkit of the base image: PyTorch's cu128 index
# comes first, so a newer default CUDA build on PyPI can never be picked instead. The install
# line itself is the README's.
ENV PIP_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install torch==2.13.0 && pip install -e ".[all]" \
    && python3 -c "import torch; assert torch.version.cuda == '12.8', torch.version.cuda"

ENTRYPOINT []
# torchrun on every GPU of the node, free rendezvous port; NPROC_PER_NODE / NNODES / RDZV_ENDPOINT
# as in launcher/torchrun.sh.
CMD ["launcher/torchrun.sh", "configs/lm_gpu_1node.yaml"]
