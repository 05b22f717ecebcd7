# manatee-grpc: every dependency comes from pyproject.toml into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:50051

.PHONY: install run test unit lint proto proto-check bench demo soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Start the service on the embedded mms simulator.
run: install
	$(PY) -m manatee_grpc serve --listen $(LISTEN)

## Lint, type-check, check generated code, then the whole test suite.
test: install lint
	$(PY) -m pytest -q

unit: install
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	cd protos && ../$(BIN)/buf lint && ../$(BIN)/buf format --diff --exit-code

## Regenerate the Python messages, gRPC stubs and .pyi stubs from protos/.
proto: install
	$(PY) tools/gen_proto.py

## The load benchmark, then the policy demo.
bench: install demo
	$(PY) -m bench

## The balancing policy against a fixed split and no balancing: a table, and docs/policy.png.
demo: install
	$(PY) -m bench.policy

soak: install
	$(PY) -m pytest -q -m soak tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
