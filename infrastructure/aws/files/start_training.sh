#!/usr/bin/env bash
# ExecStart of mamba-training.service: this instance is one node of the configured run. It meets
# the other nodes at the coordinator and trains one process per GPU; the run resumes from its
# latest committed checkpoint whenever the set of nodes changes.
# Exit codes (systemd acts on them): 0 done, 1 error (restarted), 2 bad config and 75 preempted
# or stopped (never restarted). `mamba-training launch` reports them itself, a stop included.
set -euo pipefail

APP_DIR="${MAMBA_APP_DIR:-/opt/mamba-training}"
VENV="${MAMBA_VENV:-${APP_DIR}/venv}"
CONFIG="${MAMBA_CONFIG:-${APP_DIR}/config.yaml}"
NNODES="${MAMBA_NNODES:-1:1}"
: "${MAMBA_COORDINATOR:?MAMBA_COORDINATOR (HOST:PORT of the coordinator) is not set}"

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

gpus=$(gpu_count)
nproc=$((gpus > 1 ? gpus : 1))
echo "start_training: $(date -u +%FT%TZ) ${CONFIG} on ${gpus} GPU(s), nodes ${NNODES}, coordinator ${MAMBA_COORDINATOR}"
exec "${VENV}/bin/mamba-training" launch --coordinator "${MAMBA_COORDINATOR}" --nnodes "${NNODES}" \
  --nproc-per-node "${nproc}" -- --config "${CONFIG}" --resume auto
