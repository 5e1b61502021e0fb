#!/usr/bin/env bash
# The one script that validates pinpoint on a CUDA machine (no network needed), in <= 6 min
# of wall time on a cold H200 (cold Triton cache, build included): every step has its own
# cap, and the caps add up to at most 330 s.
#
#   bash bench/gpu_check.sh            # run everything
#   bash bench/gpu_check.sh --dry-run  # print the plan (steps, caps, commands) and exit 0
#   bash bench/gpu_check.sh --only build,e2e-7b   # rerun some steps (after a fix)
#
# Needs: python3 (or $PYTHON) with torch, triton, pybind11, ninja, pytest, hypothesis,
# transformers (pytest-xdist for the parallel Triton step: without it that step runs
# serially); nvcc from $CUDA_HOME, /usr/local/cuda, or PATH; compute-sanitizer beside nvcc
# or on PATH. PINPOINT_PIP_INSTALL=1 builds with `pip install --no-build-isolation
# --no-deps -e .` instead of `setup.py build_ext --inplace`; PINPOINT_CUDA_ARCHS (default:
# this GPU's compute capability) and MAX_JOBS (default: nproc) pass through to setup.py.
# Measured here (2-core CPU, loaded): nvcc spends ~15 s CPU on attention_bf16.cu for sm_90.
# Outputs under bench/out/: gpu_check.log (everything), gpu_check.{md,json} (one summary
# table of the steps, with the benchmark and end-to-end results folded in),
# kernels_gpu.{json,md}, e2e_7b.json.
# Exit status: nonzero if any step failed or hit its cap, or any cross-check mismatched.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${PINPOINT_GPU_CHECK_OUT:-bench/out}

# name | cap (s) | command (a function below) | what it does
STEPS=(
  "environment|10|step_environment|versions, GPU, nvcc, compute-sanitizer"
  "build|75|step_build|build _C and _cuda for this GPU's arch (PINPOINT_BUILD_CUDA=1: a CUDA failure is fatal)"
  "cuda-tests|45|step_cuda_tests|tests/gpu cuda backend + self-checks, CUDA_LAUNCH_BLOCKING=1"
  "memcheck|35|step_memcheck|compute-sanitizer memcheck: attention (3 cases) and head_slice_grad/apply"
  "racecheck|20|step_racecheck|compute-sanitizer racecheck: one multi-tile attention case"
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
from importlib import metadata
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformers", "pytest", "pytest-xdist", "hypothesis", "pybind11", "ninja"):
    try:  # metadata only: importing transformers alone can take seconds
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
}

step_build() {
  [[ -n "${NVCC:-}" ]] || { echo "nvcc not found in \$CUDA_HOME, /usr/local/cuda or PATH"; return 1; }
  export PINPOINT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # Only this GPU's architecture (sm_90 alone halves nvcc's time; the release build does 80;90).
  if [[ -z "${PINPOINT_CUDA_ARCHS:-}" ]]; then
    PINPOINT_CUDA_ARCHS=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())") || return 1
    export PINPOINT_CUDA_ARCHS
  fi
  echo "PINPOINT_CUDA_ARCHS=$PINPOINT_CUDA_ARCHS MAX_JOBS=$MAX_JOBS"
  if [[ "${PINPOINT_PIP_INSTALL:-0}" == "1" ]]; then
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  else
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c "import pinpoint_kernels._cuda as m; print('pinpoint_kernels._cuda:', m.__file__)"
}

step_cuda_tests() {
  CUDA_LAUNCH_BLOCKING=1 PINPOINT_GPU_EXAMPLES=${PINPOINT_GPU_EXAMPLES:-10} \
    "$PY" -m pytest tests/gpu/test_cuda_kernels.py -q -p no:cacheprovider \
    --hypothesis-seed=0 -k "not triton" --confcutdir=tests/gpu -o addopts="-ra --import-mode=importlib"
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
  # Self-checks off here: with the backend forced they would add a cold Triton compilation per
  # (dtype, head_dim) in every worker; test_backend_passes_its_self_check covers the check.
  PINPOINT_SELF_CHECK=0 PINPOINT_GPU_EXAMPLES=${PINPOINT_GPU_EXAMPLES:-6} "$PY" -m pytest tests/gpu/test_cuda_kernels.py -q \
    -p no:cacheprovider --hypothesis-seed=0 -k triton "${par[@]}" --confcutdir=tests/gpu -o addopts="-ra --import-mode=importlib"
}

step_benchmarks() {
  "$PY" bench/kernels_gpu.py --iters 10 --warmup 3 --out "$OUT"
}

step_e2e() {
  "$PY" bench/e2e_7b.py --layers "${PINPOINT_E2E_LAYERS:-4}" --out "$OUT/e2e_7b.json"
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

ONLY=""
case "${1:-}" in
  --dry-run) plan; exit 0 ;;
  --only)
    ONLY=",${2:-},"
    for s in "${STEPS[@]}"; do ONLY=${ONLY/,${s%%|*},/,}; done
    if [[ -z "${2:-}" || "$ONLY" != "," ]]; then
      echo "--only takes step names from: $(printf '%s ' "${STEPS[@]%%|*}")" >&2; exit 2
    fi
    ONLY=",$2," ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --only STEP[,STEP...]]" >&2; exit 2 ;;
esac
export OUT

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
  [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] && continue
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
