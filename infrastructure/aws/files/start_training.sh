#!/usr/bin/env bash
# ExecStart of mamba-training.service: resume the configured run from its latest committed
# checkpoint and train. One process per GPU through torchrun when the instance has several.
# Exit codes (systemd acts on them): 0 done, 1 error (restarted), 2 bad config and 75 preempted
# (never restarted).
set -euo pipefail

APP_DIR="${MAMBA_APP_DIR:-/opt/mamba-training}"
VENV="${MAMBA_VENV:-${APP_DIR}/venv}"
CONFIG="${MAMBA_CONFIG:-${APP_DIR}/config.yaml}"
IMDS="${MAMBA_IMDS_URL:-http://169.254.169.254}"
EXIT_PREEMPTED=75

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# A spot interruption notice or a scale-in already decided: the instance is going away.
instance_is_leaving() {
  local token
  token=$(curl -sf -m 2 -X PUT "${IMDS}/latest/api/token" \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') || return 1
  curl -sf -m 2 -H "X-aws-ec2-metadata-token: ${token}" \
    "${IMDS}/latest/meta-data/spot/instance-action" >/dev/null && return 0
  [ "$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: ${token}" \
    "${IMDS}/latest/meta-data/autoscaling/target-lifecycle-state" || true)" = "Terminated" ]
}

gpus=$(gpu_count)
echo "start_training: $(date -u +%FT%TZ) resuming ${CONFIG} on ${gpus} GPU(s)"

if [ "${gpus}" -le 1 ]; then
  # One process: its exit code (75 when preempted) reaches systemd unchanged.
  exec "${VENV}/bin/mamba-training" train --config "${CONFIG}" --resume auto
fi

# torchrun reports any worker failure, a preempted exit included, as exit 1; tell systemd the
# truth when the stop came from systemd (SIGTERM) or from AWS taking the instance back.
stopping=0
trap 'stopping=1' TERM INT
status=0
"${VENV}/bin/torchrun" --standalone --nproc-per-node="${gpus}" \
  -m mamba_training train --config "${CONFIG}" --resume auto || status=$?
if [ "${status}" -ne 0 ] && { [ "${stopping}" -eq 1 ] || instance_is_leaving; }; then
  echo "start_training: stopped for preemption (torchrun exit ${status})"
  exit "${EXIT_PREEMPTED}"
fi
exit "${status}"
