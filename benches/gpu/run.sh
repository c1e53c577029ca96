#!/usr/bin/env bash
# The CUDA backend on a GPU machine in one command, about 8 minutes at most, no registry needed:
# installs the wheels from dist/ without dependencies, runs the gpu tests (every CUDA op against
# torch CUDA and the CPU path, forward and gradient; the training-step checks of
# tests/cuda/test_gpu_training.py), then the benchmark against torch eager, torch.compile and
# Liger-Kernel (and torch's own F.linear_cross_entropy, chunked or not, for the linear
# cross-entropy), with issue 11's targets and issue 22's for the linear cross-entropy.
#
# Prepare where there is a registry (the GPU machine has torch with CUDA already):
#   maturin build --release --out dist                   # the normax wheel
#   pip download -d dist array-api-compat pytest         # the test dependencies
#   pip download --no-deps -d dist liger-kernel          # a peer (pure Python, 0.8.5 on 2026-11-27;
#                                                        # Python >= 3.10, triton from torch's wheels)
# then carry the repository with dist/ to the GPU machine and run:
#   bash benches/gpu/run.sh [bench_gpu.py arguments, e.g. --quick]
#
# Budget: the gpu tests at most 240 s; the benchmark at most 230 s (it starts no torch.compile after
# 140 s and ends well inside that; --quick: about a minute). Without Liger-Kernel its column says why.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
wheels=() peers=()
for wheel in "$repo"/dist/*.whl; do
  case "$(basename "$wheel")" in
    liger_kernel-*) peers+=("$wheel") ;;
    *) wheels+=("$wheel") ;;
  esac
done
python3 -m pip install --no-deps --no-index --force-reinstall --quiet "${wheels[@]}"
if ((${#peers[@]})); then
  python3 -m pip install --no-deps --no-index --quiet "${peers[@]}" ||
    echo "Liger-Kernel did not install: the benchmark runs without it"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cd "$(mktemp -d)"  # import the installed wheel, not the source tree
status=0
timeout 240 python3 -m pytest "$repo/tests/cuda" -m gpu -q -p no:cacheprovider --rootdir "$repo" || status=$?
timeout 230 python3 -u "$repo/benches/gpu/bench_gpu.py" --targets "$@" || status=$?
exit "$status"
