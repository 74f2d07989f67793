# revisit: `make run` starts the service, `make test` runs the default test suite.
# Both set up everything they need first (PostGIS via apt, .venv, the package)
# and install nothing on a second run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.revisit-installed
PYTEST_ARGS ?=

.PHONY: run test test-all lint bench setup postgis clean

run: setup
	$(BIN)/revisit run

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/pytest -m "" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check revisit tests bench
	$(BIN)/ruff format --check revisit tests bench
	$(BIN)/mypy

setup: postgis $(STAMP)

postgis:
	@bash scripts/ensure-postgis.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
