#!/usr/bin/env bash
# Launch `moe-scale train` with the deepspeed launcher (use a config with parallel.backend=deepspeed).
#
#   launcher/deepspeed.sh CONFIG [section.key=value ...]
#
# Environment:
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" lines, see launcher/hostfile) for multi-node jobs;
#                without it the job runs on this node only
#   NUM_GPUS     processes on this node when there is no hostfile (default: all GPUs; on a machine
#                without GPUs DeepSpeed starts this many CPU processes)
#   MASTER_PORT  rendezvous port on the first host (default 29500)
#   PYTHON       interpreter (default python3)
set -euo pipefail
CONFIG=${1:?usage: launcher/deepspeed.sh CONFIG [section.key=value ...]}
shift
PYTHON=${PYTHON:-python3}
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
elif [[ -n "${NUM_GPUS:-}" ]]; then
    args+=(--num_gpus "$NUM_GPUS")
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module moe_scale.cli train "$CONFIG" "$@"
