# Everything a fresh machine needs: Python 3.11 and make. `make up` and `make test` create
# the virtual environment on first use and keep it in step with pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up down status test unit integration bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/tron up

down: $(STAMP)
	$(BIN)/tron down

status: $(STAMP)
	$(BIN)/tron status

test: $(STAMP)
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

clean:
	rm -rf $(VENV) artifacts .pytest_cache
