#!/usr/bin/env bash
# CUDA build check (DESIGN.md §2), run by `make test` wherever nvcc exists: a full build of the extension
# with its CUDA kernels against the CUDA build of torch 2.14.1, for sm_80 and sm_90, in a throwaway copy of
# the tree (the CPU build in the repo is untouched); then an import that asserts every public op has a CUDA
# kernel registered. Nothing runs on a GPU. Without nvcc it says so and exits 0.
#
#   bash scripts/cuda_build_check.sh
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0, else /usr/local/cuda), CUDA_VENV (default
# .venv-cuda in the repo: created with torch==2.14.1 numpy ninja setuptools wheel on first use),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default: the CPU count), PYTHON (python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# Not the nvcc on PATH: here that is a wrapper in /usr/local/bin, from which torch would guess /usr/local.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$d/bin/nvcc" ]; then CUDA_HOME=$d; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build_check: SKIPPED: no nvcc (set CUDA_HOME to a CUDA toolkit to run the CUDA build check)"
  exit 0
fi
export CUDA_HOME

VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
PY=$VENV/bin/python
if ! "$PY" -c 'import sys, torch; sys.exit(not (torch.__version__.startswith("2.14.1") and torch.version.cuda))' \
    2>/dev/null; then
  echo "cuda_build_check: setting up $VENV (torch 2.14.1, CUDA build)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install -q torch==2.14.1 numpy ninja setuptools wheel > "$VENV/pip.log" 2>&1 || {
    tail -30 "$VENV/pip.log"
    echo "cuda_build_check: FAILED: could not install torch 2.14.1 into $VENV (log above)"
    exit 1
  }
  "$PY" -c 'import torch; assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"'
fi

TREE=$(mktemp -d "${TMPDIR:-/tmp}/fusedopt-cuda-check.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude='./.venv*' --exclude='*.so' --exclude=./results \
  -cf - . | tar -C "$TREE" -xf -

# FUSEDOPT_GRIDEMU=0, as benchmarks/gpu_check.sh builds: the optimizers' grid-emulation ops are CPU code that
# the CPU build compiles and tests already.
export FUSEDOPT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FUSEDOPT_GRIDEMU=0
echo "cuda_build_check: building with $("$CUDA_HOME/bin/nvcc" --version | tail -1) for $TORCH_CUDA_ARCH_LIST" \
  "(MAX_JOBS=$MAX_JOBS) in $TREE"
start=$SECONDS
# Under set -e and pipefail a grep that finds nothing would end the script before it says why, so the
# log's last lines are shown when it names no error.
(cd "$TREE" && "$PY" setup.py -q build_ext --inplace > build.log 2>&1) || {
  if grep -q -E "error" "$TREE/build.log"; then
    grep -E -B2 -A8 "error" "$TREE/build.log" | head -80 || true
  else
    tail -40 "$TREE/build.log"
  fi
  echo "cuda_build_check: FAILED: the CUDA build failed (log above)"
  exit 1
}
echo "cuda_build_check: built in $((SECONDS - start)) s"

# No kernel may spill registers to local memory (Note [Register budget] in csrc/include/fusedopt/mta.h):
# setup.py passes ptxas --warn-on-spills, which names each kernel that spills in the log.
spills=$(grep -o "spilled to local memory in function '[^']*', [0-9]* bytes spill stores" "$TREE/build.log" \
  | sed -E "s/.*function '([^']*)', ([0-9]*) bytes.*/\2 \1/" | sort -u | sort -rn || true)
if [ -n "$spills" ]; then
  echo "$spills" | head -30 | while read -r bytes name; do
    echo "  $bytes bytes: $(echo "$name" | c++filt | cut -c1-220)"
  done
  echo "cuda_build_check: FAILED: $(echo "$spills" | wc -l) kernel builds spill registers (above, the largest first)"
  exit 1
fi
echo "cuda_build_check: no kernel spills registers (ptxas --warn-on-spills)"

# Every public fusedopt op (not starting with "_": tests-only ops such as _gridemu_* and _philox) must have a
# CUDA kernel, except the host-only ones named here with their reason.
cd "$TREE" && "$PY" - <<'EOF'
import sys

import torch

import fusedopt._ext

HOST_ONLY = {"dropout_seed": "draws (seed, offset) from torch's default CPU generator, on a CPU tensor"}
assert fusedopt._ext.HAS_CUDA_KERNELS, "the build info says no CUDA kernels were built"
assert not fusedopt._ext.BUILD["gridemu"], "FUSEDOPT_GRIDEMU=0 still built the grid-emulation ops"
ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fusedopt::"))
public = [op for op in ops if not op.startswith("_") and op not in HOST_ONLY]
missing = [op for op in public if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedopt::{op}", "CUDA")]
print(f"cuda_build_check: {len(public)} ops with CUDA kernels required: {', '.join(public)}")
if missing:
    sys.exit(f"cuda_build_check: FAILED: no CUDA kernel registered for {', '.join(missing)}")
print("cuda_build_check: OK")
EOF
