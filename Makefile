# lungvl: `make demo` runs the main job, `make test` the test suite. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/lungvl: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(BIN)/lungvl

demo: $(BIN)/lungvl
	OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 MPLCONFIGDIR=$(CURDIR)/demo_out/.mpl $(BIN)/lungvl demo --out demo_out

test: $(BIN)/lungvl
	$(BIN)/ruff check .
	$(BIN)/mypy --strict --no-warn-unused-ignores server privacy federation
	$(BIN)/mypy client simulations
	OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 MPLCONFIGDIR=$(CURDIR)/.pytest_cache/mpl $(BIN)/python -m pytest -q -m "not gpu"

lint: $(BIN)/lungvl
	$(BIN)/ruff check .
	$(BIN)/mypy --strict --no-warn-unused-ignores server privacy federation
	$(BIN)/mypy client simulations

clean:
	rm -rf demo_out .pytest_cache
