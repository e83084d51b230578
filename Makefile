# One-command entry points. Every target creates .venv (at the repository root) on
# first use and installs from this repository's own files only.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required); set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The main job: CVPO on SafetyCarGoal1-v0 with a small default budget.
# Extra overrides: make train ARGS="total_steps=200000 seed=1"
train: setup
	$(BIN)/python -m experiments.train env=CarGoal1 $(ARGS)

# The whole test suite, slow end-to-end tests included; two workers (most of the time
# is XLA compilation, which runs on one core per process).
test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

# Everything but the slow end-to-end tests.
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: setup
	$(BIN)/ruff check cvpo_jax experiments tests benchmarks
	$(BIN)/ruff format --check cvpo_jax experiments tests benchmarks

clean-venv:
	rm -rf $(VENV)
