#!/usr/bin/env bash
# The GPU checks of kdplug's compiled core, in one go, on a machine with an NVIDIA GPU, a CUDA
# build of torch and nvcc (no internet needed: nothing is downloaded). Fits in ~10 minutes on an
# H200 (16 cores). From the repository root:
#
#     bash benchmarks/gpu/run_gpu_checks.sh            # everything
#     QUICK=1 bash benchmarks/gpu/run_gpu_checks.sh    # a smaller benchmark
#
# Steps (each under its own timeout; a failed step is reported and the next one still runs):
#   1. versions: torch / CUDA / GPU / nvcc
#   2. build the extension with its CUDA kernels (TORCH_CUDA_ARCH_LIST defaults to the GPU's own
#      arch, e.g. 9.0 on H100 / H200)
#   3. the host emulation test of the kernels' rows (csrc/tests/test_cuda_rows.cpp)
#   4. tests/test_cuda.py (CUDA vs CPU compiled vs PyTorch path; opcheck; determinism; compile)
#   5. the GPU benchmark (benchmarks/gpu/bench_gpu.py): a Markdown table and its JSON
# Outputs go to $OUT (the device runner's folder) or benchmarks/gpu/out/: run.log, build.log,
# test_cuda.log, results_<gpu>.md / .json. The exit status is that of the first failed step.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT"
status=0
start=$SECONDS
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - start))s] $*" | tee -a "$OUT/run.log"; }
step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...
  local name=$1 limit=$2 logfile=$3
  shift 3
  log "== $name (timeout ${limit}s)"
  timeout "$limit" "$@" > >(tee "$OUT/$logfile") 2>&1
  local rc=$?
  log "== $name: exit $rc"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
  return $rc
}

# --- 1. versions -------------------------------------------------------------------------------
log "repository $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | wc -l) local changes)"
python - <<'EOF' 2>&1 | tee -a "$OUT/run.log"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true) | tee -a "$OUT/run.log"
(command -v nvcc && nvcc --version | tail -2) 2>&1 | tee -a "$OUT/run.log"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)"; then
  log "no CUDA device or torch without CUDA: nothing to check here"
  exit 1
fi

# --- 2. build ----------------------------------------------------------------------------------
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
log "building with TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
if ! step build 360 build.log pip install --no-build-isolation --no-deps --no-index -e .; then
  log "pip failed; trying python setup.py build_ext --inplace"
  step build_ext 360 build_ext.log python setup.py build_ext --inplace
fi
python - <<'EOF' 2>&1 | tee -a "$OUT/run.log"
import kdplug._extension as e
print("kdplug build_info:", e.build_info())
print("why_not:", e.why_not())
EOF

# --- 3. host emulation of the kernels' rows ------------------------------------------------------
if command -v g++ >/dev/null 2>&1; then
  step emulation 120 emulation.log bash -c \
    "g++ -std=c++17 -O2 -fno-fast-math -Icsrc csrc/tests/test_cuda_rows.cpp -o /tmp/kdplug_test_cuda_rows && /tmp/kdplug_test_cuda_rows"
fi

# --- 4. CUDA tests -----------------------------------------------------------------------------
step test_cuda 300 test_cuda.log python -m pytest -q -p no:cacheprovider -x --durations=10 tests/test_cuda.py

# --- 5. benchmark ------------------------------------------------------------------------------
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())" 2>/dev/null || echo gpu)
args=(--out "$OUT/results_${gpu}.md" --budget-s "${BENCH_BUDGET_S:-180}")
if [ "${QUICK:-0}" = "1" ]; then args+=(--quick); fi
step bench 300 bench.log python benchmarks/gpu/bench_gpu.py "${args[@]}"
if [ -f "$OUT/results_${gpu}.md" ]; then
  cp "$OUT/results_${gpu}.md" "benchmarks/gpu/results_${gpu}.md" 2>/dev/null || true
  cat "$OUT/results_${gpu}.md"
fi

log "done, status $status"
exit $status
