#!/usr/bin/env bash
# Operator's view of one training instance: service state, GPUs, current step, the last committed
# checkpoint and any spot notice. Read-only; safe to run at any time (sudo not needed).
# No -e: one failing probe must not hide the sections after it.
set -uo pipefail

APP_DIR="${MAMBA_APP_DIR:-/opt/mamba-training}"
if [ -r "${APP_DIR}/env" ]; then
  # shellcheck source=/dev/null
  . "${APP_DIR}/env"
fi
VENV="${MAMBA_VENV:-${APP_DIR}/venv}"
LOG_DIR="${MAMBA_LOG_DIR:-/var/log/mamba-training}"
STORE="${MAMBA_RUN_STORE:-unknown}"
IMDS="${MAMBA_IMDS_URL:-http://169.254.169.254}"

section() { printf '\n== %s ==\n' "$1"; }

section "Service mamba-training"
if command -v systemctl >/dev/null 2>&1; then
  systemctl show mamba-training --no-pager \
    --property=ActiveState,SubState,ExecMainStatus,NRestarts,ActiveEnterTimestamp
else
  echo "systemctl not available"
fi

section "GPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu --format=csv
else
  echo "nvidia-smi not found"
fi

section "Current step"
# The trainer logs one line per logged step when its output is not a terminal (as here, under
# systemd): "21:16:33 INFO    step 130/1000  loss 2.1003  1,234 tok/s  ETA 5m12s".
last=$(cat "${LOG_DIR}"/*.log 2>/dev/null | grep -E '(^| )step [0-9]+/[0-9]+ ' | tail -n 1)
if [ -n "${last}" ]; then
  printf '%s\n' "${last}" | grep -oE 'step [0-9]+/' | head -n 1 | grep -oE '[0-9]+'
  echo "last progress: ${last}"
else
  echo "unknown (no step logged in ${LOG_DIR} yet)"
fi

section "Last committed checkpoint (${STORE})"
if [ -x "${VENV}/bin/mamba-training" ]; then
  "${VENV}/bin/mamba-training" checkpoints list "${STORE}" --json 2>&1 | tail -n 20
else
  echo "mamba-training is not installed in ${VENV} (is the setup still running? see /var/log/mamba-training-setup.log)"
fi

section "Spot notice"
token=$(curl -sf -m 2 -X PUT "${IMDS}/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')
if [ -z "${token}" ]; then
  echo "instance metadata service not reachable"
else
  meta() { curl -sf -m 2 -H "X-aws-ec2-metadata-token: ${token}" "${IMDS}/latest/meta-data/$1"; }
  echo "interruption: $(meta spot/instance-action || echo none)"
  echo "rebalance recommendation: $(meta events/recommendations/rebalance || echo none)"
  echo "lifecycle state: $(meta autoscaling/target-lifecycle-state || echo unknown)"
fi
