# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each creates the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: run test bench heads-benchmark clean

$(VENV)/.installed: pyproject.toml prob_jepa/__init__.py  # the editable install records which packages exist
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed  ## pre-train + evaluate on the embedded shapes data (ARGS="predictor=flow ...")
	$(PY) experiments/run.py $(ARGS)

# one pytest-xdist worker per core, each test file on one worker (its module fixtures built once); ARGS="-n 0" runs
# in this process (a debugger, pdb)
test: $(VENV)/.installed  ## the whole test suite, slow end-to-end tests included
	$(PY) -m pytest -n auto --dist loadfile $(ARGS)

bench: $(VENV)/.installed  ## training-step speed, memory, FLOPs, MFU (ARGS="model=hiera_b ...")
	$(PY) experiments/bench.py $(ARGS)

heads-benchmark: $(VENV)/.installed  ## every head on synthetic densities with known entropy
	$(PY) experiments/heads_benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
