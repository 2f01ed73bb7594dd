# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Torch's default two OpenMP threads stall under load on small machines: tests run on one.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# .[test] includes the optional extras (safetensors, tensorboard, mlflow-skinny, ray): their tests run, not skip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job on `digits`: batches of 16 train the 1,007-image set to convergence (93%), and a
# GradPC target with τ ≈ 0.78 shows GC (Gauss-Newton, hard labels) below, at and above the threshold.
demo: $(VENV)/.installed
	$(VENV)/bin/poisonreach run --train-batch-size 16 --eps-w 0.7 --eps-d 0.1 0.5 tau 2 --out runs/demo

# Two workers (pytest-xdist), each single-threaded: the suite's wall time on a 2-core machine halves.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(VENV)/.installed
	$(PY) bench/bench_gc.py

clean:
	rm -rf $(VENV) runs .pytest_cache
