#!/usr/bin/env bash
# Multi-node DDP training with torchrun's c10d rendezvous. Run on EVERY node:
#   NNODES=2 MASTER_ADDR=node1 RDZV_ID=run42 launch/multinode.sh [hydra overrides...]
# Env: NNODES (required; "MIN:MAX" for elastic), MASTER_ADDR (required: rendezvous
# host, any of the nodes), MASTER_PORT (29500), RDZV_ID (default $SLURM_JOB_ID,
# else required; must be identical on all nodes and unique per run),
# NPROC_PER_NODE (default: GPUs on this node, else 1), MAX_RESTARTS (0).
# Node ranks are assigned by the rendezvous, so no NODE_RANK is needed.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpu_count() {
  local n=0
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"; n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  echo $((n > 0 ? n : 1))
}

: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (rendezvous host)}"
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-}}
: "${RDZV_ID:?set RDZV_ID (same on all nodes, unique per run)}"

cmd=(torchrun "--nnodes=$NNODES" "--nproc_per_node=${NPROC_PER_NODE:-$(gpu_count)}"
  --rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:${MASTER_PORT:-29500}"
  "--rdzv-id=$RDZV_ID" "--max-restarts=${MAX_RESTARTS:-0}" train.py "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  out=$(printf '%q ' "${cmd[@]}"); echo "${out% }"; exit 0
fi
exec "${cmd[@]}"
