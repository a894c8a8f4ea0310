#!/usr/bin/env bash
# Single-node DDP training.
#   launch/torchrun.sh [NPROC] [hydra overrides...]
# NPROC: first argument if it is a number, else $NPROC, else the number of GPUs
# (CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`), else 1.
# MAX_RESTARTS (default 0): restart all workers after a failure; they resume from last.pt.
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

if [[ ${1:-} =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
NPROC=${NPROC:-$(gpu_count)}

cmd=(torchrun --standalone "--nproc_per_node=$NPROC" "--max-restarts=${MAX_RESTARTS:-0}" train.py "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  out=$(printf '%q ' "${cmd[@]}"); echo "${out% }"; exit 0
fi
exec "${cmd[@]}"
