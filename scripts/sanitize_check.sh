#!/usr/bin/env bash
# Sanitizer check (issue 7), run by `make test`: builds the CPU extension with ASan + UBSan (Note [Sanitizer
# build] in setup.py) in a copy of the tree (the build in the repo is untouched) and runs the op-level
# tests against it: tests/test_bad_input.py with its fuzz worker (a subprocess: the environment below reaches
# it), and the tests of tests/test_kernels.py, test_dropout.py, test_gridemu.py and test_shards.py that call
# every op. Any ASan report or UB aborts the process, so the tests fail. Python leaks by design: leak
# detection is off.
#
#   bash scripts/sanitize_check.sh [PYTHON]
#
# PYTHON (default .venv/bin/python in the repo, else python3) must have torch, pytest, hypothesis, ninja.
# Environment: FUSEDOPT_CPU_ISAS (default DEFAULT: the kernels of one ISA, to keep the build short; e.g.
# DEFAULT,AVX2,AVX512 for all), MAX_JOBS (default: the CPU count), CC (default gcc: its libasan is preloaded),
# SANITIZE_TREE (default build/sanitize in the repo: the copy, refreshed each run; its build is kept, so a
# second run rebuilds only what changed).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$ROOT/setup.py" ] || [ ! -d "$ROOT/csrc" ]; then
  echo "sanitize_check: FAILED: $ROOT is not the fusedopt repository (run scripts/sanitize_check.sh from it)"
  exit 1
fi

PY=${1:-${PYTHON:-}}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
# Absolute, but not through the symlink: a venv's python must stay the venv's.
case "$PY" in /*) ;; */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; *) PY=$(command -v "$PY") ;; esac

LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
LIBSTDCXX=$(${CC:-gcc} -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ] || [ "${LIBASAN#/}" = "$LIBASAN" ] || [ ! -e "$LIBSTDCXX" ]; then
  echo "sanitize_check: FAILED: gcc has no libasan.so / libstdc++.so (install gcc's, e.g. Debian's libgcc-12-dev)"
  exit 1
fi

# The sources of the repo, as they are now; the build outputs kept. A file whose content changed is copied
# (so it is newer than what was built from it), the others keep their time: ninja and setuptools rebuild
# only what changed. A file gone from the repo goes from the copy too.
TREE=${SANITIZE_TREE:-$ROOT/build/sanitize}
mkdir -p "$TREE"
TREE=$(cd "$TREE" && pwd)
if [ -n "$(ls -A "$TREE")" ] && [ ! -e "$TREE/.sanitize-tree" ]; then
  echo "sanitize_check: FAILED: $TREE is not empty and not a tree of this script; not touching it"
  exit 1
fi
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/fusedopt-sanitize-stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude='./.venv*' --exclude='*.so' --exclude=./results \
  --exclude=__pycache__ --exclude=./.hypothesis --exclude=./.pytest_cache --exclude=./fusedopt/_build_info.py \
  -cf - . | tar -C "$STAGE" -xf -
(cd "$STAGE" && find . -type f) | while IFS= read -r f; do
  cmp -s "$STAGE/$f" "$TREE/$f" || { mkdir -p "$(dirname "$TREE/$f")" && cp "$STAGE/$f" "$TREE/$f"; }
done
(cd "$TREE" && find . -type f ! -path './build/*' ! -path './sanitizer-logs/*' ! -path './.hypothesis/*' \
  ! -path './fusedopt/_C*.so' ! -path ./fusedopt/_build_info.py ! -name .sanitize-tree ! -name build.log) |
  while IFS= read -r f; do [ -e "$STAGE/$f" ] || rm -f "$TREE/$f"; done
touch "$TREE/.sanitize-tree"

export FUSEDOPT_SANITIZE=1 FUSEDOPT_CUDA=0 FUSEDOPT_CPU_ISAS=${FUSEDOPT_CPU_ISAS:-DEFAULT}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "sanitize_check: building with ASan+UBSan, ISAs $FUSEDOPT_CPU_ISAS (MAX_JOBS=$MAX_JOBS) in $TREE"
start=$SECONDS
(cd "$TREE" && "$PY" setup.py -q build_ext --inplace > build.log 2>&1) || {
  { grep -E -B2 -A8 "error" "$TREE/build.log" || tail -40 "$TREE/build.log"; } | head -80
  echo "sanitize_check: FAILED: the sanitizer build failed (log above)"
  exit 1
}
echo "sanitize_check: built in $((SECONDS - start)) s"
SO=$(ls "$TREE"/fusedopt/_C*.so)
if ! nm -D "$SO" | grep "__asan_report_store" > /dev/null; then  # not grep -q: nm would die of SIGPIPE
  echo "sanitize_check: FAILED: $SO is not instrumented by ASan"
  exit 1
fi

# libasan must be loaded before anything else (python is not instrumented), and libstdc++ with it: else ASan
# finds no __cxa_throw to intercept and aborts at the first C++ exception (a TORCH_CHECK). PYTHONPATH makes
# the tests and their subprocesses import this copy, not an installed or editable fusedopt. The reports go to
# files (pytest captures stderr, and a process that aborts never shows it): printed below on failure.
LOGS=$TREE/sanitizer-logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
export LD_PRELOAD=$LIBASAN:$LIBSTDCXX PYTHONPATH=$TREE${PYTHONPATH:+:$PYTHONPATH}
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$LOGS/asan
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:abort_on_error=1:log_path=$LOGS/ubsan
cd "$TREE"
"$PY" -c "
import fusedopt, fusedopt._ext
from fusedopt._build_info import BUILD
assert fusedopt.__file__.startswith('$TREE/'), fusedopt.__file__
assert BUILD['sanitize'] and BUILD['cpu_isas'] == '$FUSEDOPT_CPU_ISAS'.split(','), BUILD
"

# Every op (optimizer steps, stream_, dropout, keep bits, philox, the grid emulators) on every dtype, with
# masking, AMP tensors, non-finite values, multi-chunk and many-tensor lists, shards, and the fuzz.
start=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_bad_input.py \
  tests/test_kernels.py \
  tests/test_dropout.py \
  tests/test_gridemu.py \
  tests/test_shards.py || {
  for f in "$LOGS"/*; do [ -e "$f" ] && { echo "== $f"; head -60 "$f"; }; done
  echo "sanitize_check: FAILED (the sanitizer reports, if any, are above)"
  exit 1
}
if [ -n "$(ls -A "$LOGS")" ]; then  # a report from a process whose failure no test noticed
  for f in "$LOGS"/*; do echo "== $f"; head -60 "$f"; done
  echo "sanitize_check: FAILED: sanitizer reports (above) although the tests passed"
  exit 1
fi
echo "sanitize_check: tests passed in $((SECONDS - start)) s"
echo "sanitize_check: OK"
