#!/usr/bin/env bash
# The one script that validates pinpoint on a CUDA machine (no network needed), in <= 6 min
# of wall time on a cold H200 (cold Triton cache, build included): every step has its own
# cap, and the caps add up to at most 330 s.
#
#   bash bench/gpu_check.sh            # run everything
#   bash bench/gpu_check.sh --dry-run  # print the plan (steps, caps, commands) and exit 0
#
# Needs: python3 (or $PYTHON) with torch, triton, pybind11, ninja, pytest, hypothesis,
# transformers (pytest-xdist for the parallel Triton step: without it that step runs
# serially); nvcc from $CUDA_HOME, /usr/local/cuda, or PATH; compute-sanitizer beside nvcc
# or on PATH. PINPOINT_PIP_INSTALL=1 builds with `pip install --no-build-isolation
# --no-deps -e .` instead of `setup.py build_ext --inplace`.
# Outputs under bench/out/: gpu_check.log (everything), gpu_check.{md,json} (one summary
# table of the steps, with the benchmark and end-to-end results folded in),
# kernels_gpu.{json,md}, e2e_7b.json.
# Exit status: nonzero if any step failed or hit its cap, or any cross-check mismatched.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=bench/out

# name | cap (s) | command (a function below) | what it does
STEPS=(
  "environment|5|step_environment|versions, GPU, nvcc, compute-sanitizer"
  "build|75|step_build|build _C and _cuda (PINPOINT_BUILD_CUDA=1: a CUDA build failure is fatal)"
  "cuda-tests|45|step_cuda_tests|tests/gpu cuda backend + self-checks, CUDA_LAUNCH_BLOCKING=1"
  "memcheck|35|step_memcheck|compute-sanitizer memcheck: attention (3 cases) and head_slice_grad/apply"
  "racecheck|25|step_racecheck|compute-sanitizer racecheck: one multi-tile attention case"
  "triton-tests|70|step_triton_tests|tests/gpu triton backend, pytest -n 8 (xdist), fewer hypothesis examples"
  "benchmarks|35|step_benchmarks|bench/kernels_gpu.py: timings + asserted cross-checks"
  "e2e-7b|40|step_e2e|bench/e2e_7b.py: Llama-2-7B shapes, bf16, 4 layers"
)

find_tool() {  # $1: tool name -> path from CUDA_HOME, /usr/local/cuda, then PATH
  local home
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [[ -n "$home" && -x "$home/bin/$1" ]]; then echo "$home/bin/$1"; return 0; fi
  done
  command -v "$1" 2>/dev/null
}

step_environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not available"
  echo "nvcc: ${NVCC:-not found}"; [[ -n "${NVCC:-}" ]] && "$NVCC" --version | tail -2
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformers", "xdist", "hypothesis"):
    try:
        print(name, __import__(name).__version__ if name != "xdist" else "present")
    except ImportError:
        print(name, "MISSING")
EOF
}

step_build() {
  [[ -n "${NVCC:-}" ]] || { echo "nvcc not found in \$CUDA_HOME, /usr/local/cuda or PATH"; return 1; }
  export PINPOINT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [[ "${PINPOINT_PIP_INSTALL:-0}" == "1" ]]; then
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  else
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import pinpoint_kernels._cuda as m; print('pinpoint_kernels._cuda:', m.__file__)"
}

step_cuda_tests() {
  CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest tests/gpu/test_cuda_kernels.py -q -p no:cacheprovider \
    --hypothesis-seed=0 -k "not triton" -o addopts="-ra --import-mode=importlib"
}

step_memcheck() {
  [[ -n "${SANITIZER:-}" ]] || { echo "compute-sanitizer not found"; return 1; }
  "$SANITIZER" --tool memcheck --error-exitcode 99 --leak-check no \
    "$PY" tests/gpu/sanitize_cases.py attention grad apply
}

step_racecheck() {
  [[ -n "${SANITIZER:-}" ]] || { echo "compute-sanitizer not found"; return 1; }
  PINPOINT_SELF_CHECK=0 "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 99 \
    "$PY" tests/gpu/sanitize_cases.py multi_tile
}

step_triton_tests() {
  local par=()
  if "$PY" -c "import xdist" 2>/dev/null; then par=(-n 8); else echo "pytest-xdist missing: running serially"; fi
  PINPOINT_GPU_EXAMPLES=${PINPOINT_GPU_EXAMPLES:-6} "$PY" -m pytest tests/gpu/test_cuda_kernels.py -q \
    -p no:cacheprovider --hypothesis-seed=0 -k triton "${par[@]}" -o addopts="-ra --import-mode=importlib"
}

step_benchmarks() {
  "$PY" bench/kernels_gpu.py --iters 10 --warmup 3
}

step_e2e() {
  "$PY" bench/e2e_7b.py --layers "${PINPOINT_E2E_LAYERS:-4}"
}

plan() {
  local total=0 name cap fn what
  echo "gpu_check plan (python: $PY; nvcc: ${NVCC:-not found}; compute-sanitizer: ${SANITIZER:-not found})"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap fn what <<<"$s"
    printf 'step %-13s cap %3ss  %s\n' "$name" "$cap" "$what"
    total=$((total + cap))
  done
  echo "total cap ${total}s"
}

export PY
NVCC=$(find_tool nvcc || true)
SANITIZER=$(find_tool compute-sanitizer || true)
if [[ -n "$NVCC" && -z "${CUDA_HOME:-}" ]]; then  # setup.py looks in CUDA_HOME, then PATH
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
fi
export CUDA_HOME=${CUDA_HOME:-} NVCC SANITIZER

if [[ "${1:-}" == "--dry-run" ]]; then
  plan
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PINPOINT_REQUIRE_CUDA_EXT=1 PYTHONUNBUFFERED=1
plan
: >"$OUT/gpu_check_steps.tsv"
status=0
START=$(date +%s)
for s in "${STEPS[@]}"; do
  IFS='|' read -r name cap fn what <<<"$s"
  echo; echo "=== $name (cap ${cap}s, at $(( $(date +%s) - START ))s): $what"
  t0=$(date +%s)
  # SIGINT first, so pytest still prints its summary when a step runs over its cap.
  timeout -s INT -k 10 "$cap" bash -c "$(declare -f "$fn"); $fn"
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  [[ $rc -eq 124 ]] && echo "!!! $name hit its ${cap}s cap"
  [[ $rc -ne 0 ]] && status=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$cap" "$secs" "$rc" >>"$OUT/gpu_check_steps.tsv"
done
"$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import gpu_check_summary; sys.exit(gpu_check_summary(sys.argv[1], int(sys.argv[2])))" "$OUT" "$status" || status=1
echo "=== done in $(( $(date +%s) - START ))s, status $status"
exit $status
