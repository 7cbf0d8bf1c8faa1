# Everything a fresh machine needs: Python 3.11 and make. `make up` and `make test` create
# the virtual environment on first use and keep it in step with pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
RESULTS := benchmarks/results

.PHONY: up down status test unit integration bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# supervisor and circus are benchmark-only peers, never runtime dependencies.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

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

# Every table in benchmarks/README.md, in under 15 minutes on 2 cores. Not part of `make test`.
bench: $(BENCH_STAMP)
	mkdir -p $(RESULTS)
	$(BIN)/python benchmarks/agent_recovery.py --kills 4 --stops 5 --json $(RESULTS)/agent_recovery.json
	$(BIN)/python benchmarks/peers.py --kills 20 --seed 1 --json $(RESULTS)/peers.json
	$(BIN)/python benchmarks/tron_scale.py --json $(RESULTS)/tron_scale.json
	$(BIN)/python benchmarks/beat_ingest.py --seconds 6 --json $(RESULTS)/beat_ingest.json
	$(BIN)/python benchmarks/ladder_timing.py --reps 3 --json $(RESULTS)/ladder_timing.json

clean:
	rm -rf $(VENV) artifacts .pytest_cache
