# Run as root: sudo make reproduce | sudo make test
VENV := .venv
TESTBED := $(VENV)/bin/testbed
PYTEST := $(VENV)/bin/python -m pytest

.PHONY: setup reproduce reproduce-full test test-unit doctor cleanup lint

setup:
	@bash scripts/setup.sh

reproduce: setup
	$(TESTBED) reproduce --all --quick

reproduce-full: setup
	$(TESTBED) reproduce --all --full

test: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
	$(PYTEST) -q -ra tests

test-unit: setup
	$(PYTEST) -q tests/unit

doctor: setup
	$(TESTBED) doctor

cleanup: setup
	$(TESTBED) cleanup

lint: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
