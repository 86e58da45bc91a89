#!/usr/bin/env bash
# The one call on a lent H200 (DESIGN.md §7), from the repository root on the device machine:
#
#   bash benchmarks/gpu_check.sh
#
# 1. builds fusedopt with its CUDA kernels for sm_90 (log: $OUT/build.log),
# 2. runs the CUDA tests, the reference tests and the dropout CUDA tests ($OUT/tests.log),
# 3. runs the GPU benchmark ($OUT/bench.log, $OUT/gpu_bench.json),
# and writes $OUT/summary.txt; the benchmark's markdown table is printed last. Every stage runs even when
# an earlier one failed, each under its own time limit, all within 8 minutes. No network, no installs: the
# machine's python3, torch, pytest, nvcc. $OUT defaults to results/gpu.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/results/gpu}
mkdir -p "$OUT"
DEADLINE=$((SECONDS + 465))
STATUS=()

# stage NAME LIMIT LOG CMD...: runs CMD under `timeout`, appending its output to LOG (and to stdout).
stage() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    STATUS+=("$name: not run (out of time)")
    return
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after $limit s" | tee -a "$log"
  STATUS+=("$name: rc=$rc in $((SECONDS - t0)) s")
}

if [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
{
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  echo "nvcc: $(command -v nvcc || echo 'not on PATH'); CUDA_HOME=$CUDA_HOME"
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, torch.cuda.get_device_name())'
  nproc
} > "$OUT/build.log" 2>&1
cat "$OUT/build.log"

stage build 300 "$OUT/build.log" \
  env FUSEDOPT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace
python3 -c 'import fusedopt._ext as e; assert e.HAS_CUDA_KERNELS; print("fusedopt", e.BUILD)' 2>&1 \
  | tee -a "$OUT/build.log"

: > "$OUT/tests.log"
# pytest-xdist, where installed, spreads the tests over 8 processes (the CPU ops they compare with are
# the slow half); they share the one GPU.
PAR=()
python3 -c 'import xdist' 2>/dev/null && PAR=(-n 8)
stage tests 120 "$OUT/tests.log" \
  python3 -m pytest -q -p no:cacheprovider -rfE "${PAR[@]}" tests/test_cuda.py tests/test_reference.py
if [ -f tests/test_dropout.py ]; then
  stage dropout-tests 60 "$OUT/tests.log" \
    python3 -m pytest -q -p no:cacheprovider -rfE "${PAR[@]}" -m cuda tests/test_dropout.py
fi

: > "$OUT/bench.log"
stage bench 200 "$OUT/bench.log" python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json"

{
  printf '%s\n' "${STATUS[@]}"
  grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s" "$OUT/tests.log"
  echo "total $SECONDS s"
} > "$OUT/summary.txt"
echo
echo "== summary"
cat "$OUT/summary.txt"
echo
# The benchmark's table, last.
sed -n '/^copy bandwidth/,$p' "$OUT/bench.log"
