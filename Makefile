# revisit: `make run` starts the service, `make test` runs the default test suite.
# Both set up everything they need first (PostGIS via apt, .venv, the package;
# for `make test` also Chromium) and install nothing on a second run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.revisit-installed
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers (each with its own PostgreSQL cluster).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: run test test-all lint bench setup postgis browser clean

run: setup
	$(BIN)/revisit run

# The tests also drive the web map in a headless Chromium; the ten slowest are listed.
test: setup browser
	$(BIN)/pytest $(XDIST) --durations=10 $(PYTEST_ARGS)

test-all: setup browser
	$(BIN)/pytest $(XDIST) -m "" --durations=10 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check revisit tests bench
	$(BIN)/ruff format --check revisit tests bench
	$(BIN)/mypy

setup: postgis $(STAMP)

postgis:
	@bash scripts/ensure-postgis.sh

browser:
	@bash scripts/ensure-chromium.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
