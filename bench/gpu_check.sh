#!/usr/bin/env bash
# One-shot check of pinpoint's GPU kernels on a machine with a CUDA GPU and no network:
# build the extensions in place, run the GPU tests, run the microbenchmarks.
#
#   bash bench/gpu_check.sh            # from anywhere; ~2-4 minutes on an H100, capped at 6
#
# Assumes torch, triton, pybind11, ninja, pytest and hypothesis are installed, and nvcc is on
# PATH (or CUDA_HOME is set). PINPOINT_PIP_INSTALL=1 installs the project with
# `pip install --no-build-isolation --no-deps -e .` instead of building in place.
# Outputs: bench/out/gpu_check.log (everything), bench/out/kernels_gpu.{json,md}.
# Exit status: nonzero if the build, any test, or the benchmark failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
mkdir -p bench/out
exec > >(tee bench/out/gpu_check.log) 2>&1

START=$(date +%s)
status=0
step() { echo; echo "=== $* ($(( $(date +%s) - START ))s)"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not available"
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF

step "build (PINPOINT_BUILD_CUDA=1: a CUDA build failure is fatal)"
export PINPOINT_BUILD_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ "${PINPOINT_PIP_INSTALL:-0}" == "1" ]]; then
  timeout 240 pip install --no-build-isolation --no-deps -e . || status=1
else
  timeout 240 python setup.py build_ext --inplace || status=1
  export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import pinpoint_kernels._cuda as m; print('pinpoint_kernels._cuda:', m.__file__)" || status=1

step "tests/gpu"
export PINPOINT_REQUIRE_CUDA_EXT=1
timeout 200 python -m pytest tests/gpu -q -p no:cacheprovider --hypothesis-seed=0 || status=1

step "microbenchmarks"
timeout 110 python bench/kernels_gpu.py || status=1

step "done, status $status"
exit $status
