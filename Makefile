# Run as root: sudo make reproduce | sudo make test
VENV := .venv
TESTBED := $(VENV)/bin/testbed
PYTEST := $(VENV)/bin/python -m pytest

# What runs inside the full-kernel VM (Debian's stock kernel under qemu TCG, ~10x slower
# than native): the tests marked `fullkernel`, those whose path depends on the kernel
# (capabilities, 802.1Q VLANs, GRE/IPIP tunnels, native schedulers, netem vs the delay
# line, and the smoke runs of the experiments that use them). Kernel-agnostic tests
# (lifecycle, routing, FRR, the systems under test) run on the host only. Readiness
# timeouts are scaled for the slow VM.
FULLKERNEL_TESTS := -m fullkernel --durations=10 tests/kernel tests/e2e

.PHONY: setup reproduce reproduce-full test test-host test-fullkernel test-unit doctor cleanup lint

setup:
	@bash scripts/setup.sh

reproduce: setup
	$(TESTBED) reproduce --all --quick

reproduce-full: setup
	$(TESTBED) reproduce --all --full

test: test-host

test-host: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
	$(PYTEST) -q -ra tests

test-fullkernel: setup
	python3 scripts/fullkernel.py --timeout 2700 -- env TESTBED_TIMEOUT_SCALE=10 TESTBED_NATIVE_ONLY=1 \
		$(VENV)/bin/python -m pytest -q -ra -p no:cacheprovider $(FULLKERNEL_TESTS)

test-unit: setup
	$(PYTEST) -q tests/unit

doctor: setup
	$(TESTBED) doctor

cleanup: setup
	$(TESTBED) cleanup

lint: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
