# Run as root: sudo make reproduce | sudo make test
VENV := .venv
TESTBED := $(VENV)/bin/testbed
PYTEST := $(VENV)/bin/python -m pytest

# What runs inside the full-kernel VM (Debian's stock kernel under qemu TCG, ~10x slower
# than native): the tests marked `fullkernel`, those whose path depends on the kernel
# (the capability probe, 802.1Q VLANs with TESTBED_NATIVE_ONLY=1, GRE/IPIP tunnels, native
# schedulers, netem vs the delay line, and the smoke runs of emulator_tunnels and
# qos_custom_queuing). Kernel-agnostic tests (lifecycle, routing, FRR, the systems under
# test) run on the host only. Only these files are collected: importing every test module
# costs a minute under TCG. Readiness timeouts are scaled for the slow VM.
FULLKERNEL_FILES := tests/kernel/test_capabilities.py tests/kernel/test_vlans.py \
	tests/kernel/test_tunnels.py tests/kernel/test_queueing.py \
	tests/e2e/test_link_emulation.py tests/e2e/test_experiments_smoke.py
FULLKERNEL_TESTS := -m fullkernel --durations=10 $(FULLKERNEL_FILES)

.PHONY: setup lock check-install reproduce reproduce-full test test-host test-fullkernel \
	test-unit doctor cleanup lint

# apt packages (their services left disabled and stopped) and .venv from requirements.lock
setup:
	@bash scripts/setup.sh

# refresh requirements.lock (keeps the pins that still fit; UPGRADE=1: every pin to its newest)
lock:
	@UPGRADE=$(UPGRADE) bash scripts/lock.sh

# pip install of the checkout (not editable) into a fresh venv outside it, then import every
# module of testbed from outside it
check-install:
	@bash scripts/check-install.sh

reproduce: setup
	$(TESTBED) reproduce --all --quick

reproduce-full: setup
	$(TESTBED) reproduce --all --full

# both kernels (this machine's, then Debian's stock kernel in qemu) and the install check,
# each tier timed: at the end, each tier's time and the total, a WARNING past the budget of
# 25 minutes, a failure past 60 (CI's hard limit is 90). Every tier runs; a failing one
# fails make test. scripts/testtime.sh keeps the times in .cache/testtime/.
TIER := bash scripts/testtime.sh run
test: setup
	@bash scripts/testtime.sh start
	@$(TIER) host $(MAKE) --no-print-directory test-host || true
	@$(TIER) fullkernel $(MAKE) --no-print-directory test-fullkernel || true
	@$(TIER) install $(MAKE) --no-print-directory check-install || true
	@bash scripts/testtime.sh summary

test-host: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
	$(PYTEST) -q -ra --durations=20 tests

test-fullkernel: setup
	python3 scripts/fullkernel.py --timeout 1500 -- env TESTBED_TIMEOUT_SCALE=10 TESTBED_NATIVE_ONLY=1 \
		$(VENV)/bin/python -m pytest -q -ra -p no:cacheprovider $(FULLKERNEL_TESTS)

test-unit: setup
	$(PYTEST) -q tests/unit

doctor: setup
	$(TESTBED) doctor

cleanup: setup
	$(TESTBED) cleanup

lint: setup
	$(VENV)/bin/ruff check testbed tests experiments topologies
