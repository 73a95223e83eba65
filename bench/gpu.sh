#!/usr/bin/env bash
# The GPU check, on one CUDA machine that can fetch nothing: install the package's dependencies
# from wheels brought along (`make wheels` fills .whl/; torch, triton and transformers are
# expected on the machine), run the GPU-only tests (tests_gpu/), then bench/gpu.py, which
# writes bench/results/gpu.json and prints a table. Finishes in under 8 minutes on an H200.
#   bench/gpu.sh                 WHEELS=/path/to/wheels PYTHON=python3.12 bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
started=$SECONDS

"$PYTHON" -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"'
if [ -d "$WHEELS" ]; then
  mapfile -t requirements < <("$PYTHON" bench/gpu.py --requirements)
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${requirements[@]}"
fi
echo "gpu.sh: dependencies ready after $((SECONDS - started)) s"

# tests_gpu/ is outside testpaths (CPU CI never collects it); 150 s of the budget at most.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 120 tests_gpu
echo "gpu.sh: GPU tests passed after $((SECONDS - started)) s"

# What is left of 400 s goes to the measurements: gpu.py starts nothing new past its budget (the
# step under way finishes) and rewrites the JSON after each one, so the hard limit loses little.
budget=$((400 - (SECONDS - started)))
if [ "$budget" -lt 120 ]; then budget=120; fi
timeout $((470 - (SECONDS - started))) "$PYTHON" bench/gpu.py --budget-s "$budget"
echo "gpu.sh: done in $((SECONDS - started)) s"
