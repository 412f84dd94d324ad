# Two commands on a fresh machine: `make demo` (the main study, offline) and `make test`.
# Both create .venv when missing. torch==2.13.0 is installed first when no torch is importable
# (the CPU wheel on these machines' disk), so no install step ever pulls a multi-GB CUDA build.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparsefeat-installed

.PHONY: demo test test-fast quick bench clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/sparsefeat run --out results/demo --force

quick: $(STAMP)
	$(VENV)/bin/sparsefeat run --quick --out results/quick --force

test: $(STAMP)
	$(PY) -m pytest -q tests

# For working: everything but the tests marked slow (kill tests, whole studies); CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_harvest.py

clean:
	rm -rf results .pytest_cache build *.egg-info
