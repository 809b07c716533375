# The two commands of the README. Each creates (or reuses) the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# One intra-op thread per process: simulated clusters run several ranks on few cores.
export OMP_NUM_THREADS ?= 1

.PHONY: run test lint clean bench-micro

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/smile train --nproc 4 --sim-nodes 2 --config configs/pretrain_tiny.yaml

# Two workers, a test file each at a time: most tests are one single-threaded process, so two
# share two cores; a file's tests stay together so its module fixtures are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --dist loadfile --durations=15

# Micro-benchmarks against the stored baseline (benchmarks/micro/baseline): fails on a median 25% slower.
bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro -q --benchmark-compare --benchmark-compare-fail=median:25%

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
