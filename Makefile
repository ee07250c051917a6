# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest install clean bench proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the project metadata changes. The dev extra includes the
# simulation extra (Flower's simulation engine, Ray) that bench/rounds.py and
# tests/integration/test_simulation.py need.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/fedvault demo

lint: $(STAMP)
	$(BIN)/ruff check fedvault server clients secure tests bench
	$(BIN)/ruff format --check fedvault server clients secure tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collects no test: that is a failure, never a pass.
pytest: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS); \
	status=$$?; [ $$status -ne 5 ] || echo "pytest collected no tests" >&2; exit $$status

test: lint typecheck pytest

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/rounds.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/dp_overhead.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/dp_utility.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/audit.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/data.py --part throughput
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/data.py --part utility

# Regenerate the gRPC stubs from proto/ (checked in; tests fail if they drift).
proto: $(STAMP)
	$(BIN)/python -m server.gateway.protogen

clean:
	rm -rf $(VENV) .fedvault .mypy_cache .pytest_cache .ruff_cache
