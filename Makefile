# The verbs a newcomer needs. `make demo` and `make test` work on a fresh Debian with Python 3.11.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# Per-test timeout in seconds; the whole suite must stay well under 15 minutes on 2 cores.
TEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

.PHONY: help bootstrap bootstrap-dev demo up test lint typecheck pytest bench clean soak audit faults

help:
	@echo "make demo       set up, then run the whole gateway with demo traffic and an incident"
	@echo "make test       set up (with dev tools), then ruff, mypy and the test suite"
	@echo "make lint       ruff check"
	@echo "make typecheck  mypy (strict) on the packages listed in pyproject.toml"
	@echo "make bench      the benchmark harness (bench/run.sh)"
	@echo "make soak       the proxy at 70% of capacity for SOAK_MINUTES (10); fails on >10% growth"
	@echo "make faults     the fault suite with the issue's full durations (Redis down 30 s, ...)"
	@echo "make audit      pip-audit over the installed dependencies (needs PyPI's advisory DB)"
	@echo "make clean      remove caches and the demo's state (var/demo); keeps .venv and var/"

bootstrap:
	@scripts/bootstrap.sh

bootstrap-dev:
	@scripts/bootstrap.sh dev

demo: bootstrap
	$(BIN)/apigw demo

up: bootstrap
	$(BIN)/apigw up

test: bootstrap-dev
	$(MAKE) --no-print-directory lint typecheck pytest

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q --timeout=$(TEST_TIMEOUT) $(PYTEST_ARGS)

bench: bootstrap-dev
	@if [ -x bench/run.sh ]; then bench/run.sh; \
	else echo "bench: not yet - bench/run.sh arrives with the benchmark harness (issue 8)"; fi

SOAK_MINUTES ?= 10
soak: bootstrap-dev
	$(BIN)/python scripts/soak.py --minutes $(SOAK_MINUTES)

faults: bootstrap-dev
	APIGW_FAULT_FULL=1 $(BIN)/pytest -q -s -m fault --timeout=900 tests/test_fault_pipeline.py \
		tests/test_fault_workers.py

# pip-audit reads advisories from PyPI's JSON API per installed version
# (https://pypi.org/pypi/NAME/VERSION/json). A PyPI mirror without that API makes pip-audit call
# every package "not found": probe it first (with pip's own version) and name the cause.
AUDIT_PROBE := import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15).close()
audit: bootstrap-dev
	@$(BIN)/python -m pip_audit --version >/dev/null 2>&1 || $(BIN)/pip install -q pip-audit
	@url="https://pypi.org/pypi/pip/$$($(BIN)/python -c 'import pip; print(pip.__version__)')/json"; \
	if ! why="$$($(BIN)/python -c '$(AUDIT_PROBE)' "$$url" 2>&1)"; then \
		echo "make audit: PyPI's advisory service is unreachable from here, so nothing can be audited."; \
		echo "  pip-audit needs $$url (PyPI's JSON API, per package version);"; \
		echo "  it answered: $$(printf '%s\n' "$$why" | tail -n 1)"; \
		echo "  A PyPI mirror without the JSON API (or no route to pypi.org) causes this."; \
		echo "  Run 'make audit' where pypi.org is reachable; see docs/security.md."; \
		exit 3; \
	fi
	$(BIN)/python -m pip_audit --progress-spinner off --skip-editable --strict

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info var/demo tests/artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
