#!/usr/bin/env bash
# The CUDA backend on a GPU machine (torch with CUDA installed; no registry needed), one script,
# under 8 minutes (its two checks time out at 6 and 1.5 minutes): installs the wheels from dist/
# without dependencies, then checks every CUDA op against torch CUDA (forward and gradient) and
# times normax vs torch with achieved bandwidth against a device-to-device copy of the same run.
#
# Prepare on a machine with a registry:
#   maturin build --release --out dist && pip download --no-deps -d dist array-api-compat
# then carry dist/ and benches/ to the GPU machine and run: bash benches/gpu_check.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m pip install --no-deps --no-index --force-reinstall --quiet "$repo"/dist/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cd "$(mktemp -d)"  # import the installed wheel, not the source tree
status=0
timeout 360 python3 "$repo/benches/gpu_check.py" || status=$?
if [ -f "$repo/benches/gpu_check_extra.py" ]; then
    timeout 90 python3 "$repo/benches/gpu_check_extra.py" || status=$?
fi
exit "$status"
