# The two commands of the README:
#   make bench   the main job: fusedopt against torch, interleaved (~1 minute on 2 cores)
#   make test    the test suite, the sanitizer check (ASan+UBSan build, op tests) and, where nvcc
#                exists, the CUDA build check
# Both set up .venv (torch 2.13.0 CPU wheel + tools) and build the extension
# incrementally on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := torch==2.13.0 numpy ninja setuptools wheel pytest hypothesis matplotlib scikit-learn
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: bench test build cuda-check clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	touch $@

# An in-place build (ninja keeps it incremental) plus a .pth file: a develop
# install that does not rebuild everything in a temporary folder each time.
build: $(VENV)/.deps
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PY) setup.py -q build_ext --inplace
	echo "$(CURDIR)" > "$(SITE)/fusedopt-dev.pth"

bench: build
	$(PY) -m fusedopt.bench $(ARGS)

test: build
	$(PY) -m pytest -q tests
	bash scripts/sanitize_check.sh $(PY)
	bash scripts/cuda_build_check.sh

clean:
	rm -rf build fusedopt/_C*.so fusedopt/_build_info.py
