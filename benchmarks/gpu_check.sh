#!/usr/bin/env bash
# The one call on a lent GPU (DESIGN.md §7: an H200; the device tool now lends H100s too), from the repository
# root on the device machine:
#
#   bash benchmarks/gpu_check.sh
#
# 1. builds fusedopt with its CUDA kernels for sm_90 (log: $OUT/build.log),
# 2. runs the CUDA tests, the reference tests and the dropout CUDA tests ($OUT/tests.log),
# 3. runs the benchmark, `python3 -m fusedopt.bench --device cuda` on the three GPU layouts, dropout included
#    ($OUT/bench.log; $OUT/bench/results.json, results.md, results.png where matplotlib is installed),
# 4. runs the tests that make the CUDA ops raise, last and on their own ($OUT/tests.log): on 2026-11-28 a
#    TORCH_CHECK raised by a CUDA op segfaulted the process there, which would take down the parity tests,
# and writes $OUT/summary.txt; the benchmark's markdown tables are printed last. Every stage runs even when
# an earlier one failed, each under its own time limit, all within GPU_CHECK_SECONDS (default 540: call it
# with a 600 s limit). The only timed build (2026-11-28) took 187 s; the kernels have twice the dtype
# variants since, so the build may take up to ~6 minutes. To keep it short it builds only this CPU's widest
# ISA and no optimizer grid-emulation ops (FUSEDOPT_GRIDEMU=0, tests only); the benchmark gets what is left,
# at most 200 s. At 1e9 parameters every implementation keeps its own parameters and state (Adam: 12 GB each),
# so on an 80 GB H100 a torch variant may run out of memory: its row then says so and the others go on.
# Logs and the results are written as they go (the benchmark's after every row, and it starts
# no row past 80% of its time), so a run cut short still leaves what it finished. No network, no installs:
# the machine's python3, torch, pytest, nvcc.
# $OUT defaults to results/gpu. GPU_CHECK_SKIP="tests bench" (any of build tests dropout-tests bench
# error-tests) skips stages, e.g. to fit a short device budget.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/results/gpu}
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
STATUS=()

# stage NAME LIMIT LOG CMD...: runs CMD under `timeout`, appending its output to LOG (and to stdout).
stage() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  local left=$((DEADLINE - SECONDS))
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    STATUS+=("$name: skipped (GPU_CHECK_SKIP)")
    return
  fi
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

# The CPU kernels for this CPU's widest ISA only (the CPU ops are what the CUDA ones are compared with).
ISA=DEFAULT
grep -qw avx2 /proc/cpuinfo && ISA=DEFAULT,AVX2
grep -qw avx512bw /proc/cpuinfo && ISA=DEFAULT,AVX512
stage build 400 "$OUT/build.log" \
  env FUSEDOPT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 FUSEDOPT_CPU_ISAS=$ISA FUSEDOPT_GRIDEMU=0 MAX_JOBS=16 \
  python3 setup.py build_ext --inplace
python3 -c 'import fusedopt._ext as e; assert e.HAS_CUDA_KERNELS; print("fusedopt", e.BUILD)' 2>&1 \
  | tee -a "$OUT/build.log"

# Error paths, each in its own process (2026-11-28: a TORCH_CHECK raised by the CUDA ops segfaulted here,
# not on the CPU machines): which ones survive, and the toolchain and runtime libraries involved.
probe() {
  echo "== error-path probes"
  echo "CXX=${CXX:-unset} CC=${CC:-unset}; $(${CXX:-c++} --version | head -1); system g++: $(/usr/bin/g++ --version 2>/dev/null | head -1)"
  ldd fusedopt/_C*.so | grep -E "stdc\+\+|gcc_s|gomp|c10" | sed 's/^/  /'
  for what in cpu-check cuda-check cuda-check-no-trace; do
    env_extra=()
    [ "$what" = cuda-check-no-trace ] && env_extra=(TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1)
    timeout 30 env "${env_extra[@]}" python3 - "$what" <<'PY' 2>&1 | tail -3
import sys, torch, fusedopt._ext
dev = "cpu" if sys.argv[1] == "cpu-check" else "cuda"
p, st = torch.zeros(4, device=dev), torch.zeros((), device=dev)
try:
    torch.ops.fusedopt.sgd_([p], [torch.zeros(5, device=dev)], [], [st], [0], lr=0.1)
    print(sys.argv[1], "NOT RAISED")
except RuntimeError as e:
    print(sys.argv[1], "raised:", str(e).splitlines()[0])
PY
    echo "  $what: rc=$?"
  done
}
probe 2>&1 | tee -a "$OUT/build.log"

: > "$OUT/tests.log"
# pytest-xdist, where installed, spreads the tests over 8 processes (the CPU ops they compare with are
# the slow half); they share the one GPU.
PAR=()
python3 -c 'import xdist' 2>/dev/null && PAR=(-n 8)
# 2 OpenMP threads a worker: 8 workers × 16 threads each oversubscribed the 16 cores (2026-11-28: the tests
# stage timed out at 120 s).
PYTEST=(env OMP_NUM_THREADS=2 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rfE --maxfail=30)
RAISING="test_mixed_devices_raise or test_bad_input_raises_before_launch or test_cuda_bad_input_is_a_clear_error"
stage tests 100 "$OUT/tests.log" "${PYTEST[@]}" "${PAR[@]}" -k "not ($RAISING)" \
  tests/test_cuda.py tests/test_reference.py
stage dropout-tests 45 "$OUT/tests.log" "${PYTEST[@]}" "${PAR[@]}" -m cuda -k "not ($RAISING)" tests/test_dropout.py

: > "$OUT/bench.log"
left=$((DEADLINE - SECONDS))
[ "$left" -gt 200 ] && left=200
stage bench 200 "$OUT/bench.log" python3 -m fusedopt.bench --device cuda \
  --optimizers adam,adamw,sgd,adagrad,rmsprop,adam-masked --layouts single-1e9,gpt-1b,many-small-10k \
  --out "$OUT/bench" --budget "$left" --quiet

stage error-tests 30 "$OUT/tests.log" "${PYTEST[@]}" -k "$RAISING" tests/test_cuda.py tests/test_dropout.py

{
  printf '%s\n' "${STATUS[@]}"
  grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s" "$OUT/tests.log"
  echo "total $SECONDS s"
} > "$OUT/summary.txt"
echo
echo "== summary"
cat "$OUT/summary.txt"
echo
# The benchmark's tables, last.
cat "$OUT/bench/results.md" 2>/dev/null || echo "no $OUT/bench/results.md"
