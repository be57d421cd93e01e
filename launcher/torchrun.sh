#!/usr/bin/env bash
# Launch `moe-scale train` with torchrun, on one node or several.
#
#   launcher/torchrun.sh CONFIG [section.key=value ...]
#
# Environment:
#   NPROC_PER_NODE  processes per node (default: the GPUs of this node, or 2 on a CPU machine)
#   NNODES          nodes in the job (default 1)
#   RDZV_ENDPOINT   host:port of the rendezvous; default localhost:0 (a free port) on one node.
#                   Multi-node: the same host:port on every node, e.g. node001:29500.
#   RDZV_ID         job id shared by the nodes (default moe_scale)
#   PYTHON          interpreter (default python3)
#
# Multi-node example (run on every node):
#   NNODES=2 RDZV_ENDPOINT=node001:29500 RDZV_ID=run42 launcher/torchrun.sh configs/lm_gpu_multinode.yaml
set -euo pipefail
CONFIG=${1:?usage: launcher/torchrun.sh CONFIG [section.key=value ...]}
shift
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ "$NNODES" == 1 ]]; then
    RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}
elif [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "launcher/torchrun.sh: a multi-node job needs RDZV_ENDPOINT=host:port of the first node" >&2
    exit 2
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-moe_scale}" \
    --max-restarts=0 \
    -m moe_scale.cli train "$CONFIG" "$@"
