#!/usr/bin/env bash
# The CUDA backend on a GPU machine (torch with CUDA installed; no registry needed), bounded at
# about 8 minutes: installs the wheels from dist/ without dependencies, runs the gpu tests (every
# CUDA op against torch CUDA and the CPU path, forward and gradient), then the GPU benchmark.
#
# Prepare on a machine with a registry:
#   maturin build --release --out dist && pip download -d dist array-api-compat pytest
# then carry the repository with dist/ to the GPU machine and run: bash benches/gpu/run.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python3 -m pip install --no-deps --no-index --force-reinstall --quiet "$repo"/dist/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cd "$(mktemp -d)"  # import the installed wheel, not the source tree
status=0
timeout 360 python3 -m pytest "$repo/tests/cuda" -m gpu -q -p no:cacheprovider --rootdir "$repo" || status=$?
timeout 120 python3 "$repo/benches/gpu/bench_gpu.py" || status=$?
exit "$status"
