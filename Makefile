# Quick start: `make run` (service + worker + demo on the embedded default), `make test` (`make test-fast`: the fast lane).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Embedded default: SQLite + a serverless Celery broker, API and one worker. make passes only SIGTERM
# on to its recipe; --exit-with-parent stops the service (and its worker) when make dies of SIGKILL too.
run: install
	$(BIN)/faultfleet run --demo --exit-with-parent

demo: install
	$(BIN)/faultfleet demo

test: install
	$(BIN)/python -m pytest

# The fast lane: no slow tests, no PostgreSQL / Redis / service processes; under a minute of CPU.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var build *.egg-info
