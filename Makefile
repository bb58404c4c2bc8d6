# Every target creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrate launch --space search_spaces/mate_digits.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_loss.py
	$(BIN)/python bench/bench_step.py
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_search.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_correlation.py
	$(BIN)/python bench/bench_teachers.py
	$(BIN)/python bench/bench_methods.py
	$(BIN)/python bench/bench_serve.py
