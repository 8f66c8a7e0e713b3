"""Shared fixtures for the three test tiers.

- Tests under tests/kernel and tests/e2e are marked `kernel` / `e2e` and skipped, with a
  reason, when not run as root (they create real network namespaces).
- `root_state` snapshots what a run could leak into the root namespace and asserts later
  that nothing changed.
- `run_id` hands out run ids that carry a per-session marker, so a test can tell its own
  namespaces and ledgers from those of other people using the same machine at the same time.

Other people run their own testbeds on these machines concurrently: their `tb-*` namespaces
and ledgers come and go during our tests. The namespace/ledger comparison therefore only
looks at objects this session owns (its run ids, or ledgers written by this process or by a
child it spawned); everything else in the snapshot (links, addresses, routes, iptables and
nftables rules) is compared exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import secrets
import subprocess
import time
from typing import Callable

import pytest

from testbed.process import TIMEOUT_SCALE

LEDGER_DIR = "/run/testbed"
IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root: creates real network namespaces (run the kernel/e2e tiers with sudo)"

#: Decorate a test with this to skip it when not root (the kernel/e2e directories get it
#: automatically through their markers).
requires_root = pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)

#: Every run id this session hands out starts with this: "z" + 4 hex digits.
SESSION = "z" + secrets.token_hex(2)
_counter = itertools.count()

#: PIDs of helper processes tests spawned (their ledgers and probe namespaces are ours).
CHILD_PIDS: set = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}tests{os.sep}kernel{os.sep}" in path:
            item.add_marker(pytest.mark.kernel)
        if f"{os.sep}tests{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
        if not IS_ROOT and (item.get_closest_marker("kernel") or item.get_closest_marker("e2e")):
            item.add_marker(pytest.mark.skip(reason=ROOT_REASON))


# polling ------------------------------------------------------------------------------------

def poll(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
         what: str = "condition"):
    """Return cond()'s first truthy value; fail the test if none comes within timeout
    (scaled by TESTBED_TIMEOUT_SCALE, as readiness timeouts are, for slow VMs)."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def wait_until():
    """wait_until(cond, timeout=10, what="...") polls cond until truthy or fails the test."""
    return poll


# run ids -------------------------------------------------------------------------------------

def new_run_id() -> str:
    return f"{SESSION}{next(_counter):x}"


@pytest.fixture
def run_id() -> Callable[[], str]:
    """A factory of run ids owned by this test session (call it once per network)."""
    return new_run_id


def netns_list() -> list:
    """Names from `ip netns list` (the command, not the directory: what a user would see)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def namespaces_of(rid: str) -> list:
    prefix = f"tb-{rid}-"
    return [n for n in netns_list() if n.startswith(prefix)]


@pytest.fixture
def run_namespaces() -> Callable[[str], list]:
    """run_namespaces(run_id) -> the names in `ip netns list` with that run's prefix."""
    return namespaces_of


def ledgers() -> dict:
    """/run/testbed/<run>.json files -> their content (None if unreadable)."""
    out: dict = {}
    if not os.path.isdir(LEDGER_DIR):
        return out
    for f in sorted(os.listdir(LEDGER_DIR)):
        try:
            with open(os.path.join(LEDGER_DIR, f)) as fh:
                out[f] = json.load(fh)
        except (OSError, ValueError):
            out[f] = None
    return out


# root namespace snapshot ----------------------------------------------------------------------

_COUNTERS_IPT = re.compile(r"\[\d+:\d+\]")
_COUNTERS_NFT = re.compile(r"counter packets \d+ bytes \d+")
_LFT = re.compile(r"(valid_lft|preferred_lft) \S+")


def _cmd(argv: list) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return f"<{argv[0]} not installed>"
    return p.stdout + (f"<exit {p.returncode}: {p.stderr.strip()}>" if p.returncode else "")


@dataclasses.dataclass(frozen=True)
class RootSnapshot:
    netns: frozenset
    ledgers: dict  # file name -> content
    links: tuple
    addrs: tuple
    routes: tuple
    iptables: tuple
    nft: tuple

    @classmethod
    def take(cls) -> RootSnapshot:
        ipt = tuple(line for line in _cmd(["iptables-save"]).splitlines()
                    if not line.startswith("#"))
        ipt = tuple(_COUNTERS_IPT.sub("[0:0]", line) for line in ipt)
        nft = tuple(_COUNTERS_NFT.sub("counter", line) for line in
                    _cmd(["nft", "list", "ruleset"]).splitlines())
        return cls(
            netns=frozenset(netns_list()),
            ledgers=ledgers(),
            links=tuple(_cmd(["ip", "-o", "link"]).splitlines()),
            addrs=tuple(_LFT.sub(r"\1", line) for line in _cmd(["ip", "-o", "addr"]).splitlines()),
            routes=tuple(_cmd(["ip", "route"]).splitlines()),
            iptables=ipt,
            nft=nft,
        )


class RootState:
    """A snapshot of the root namespace and a check that nothing of ours changed it."""

    def __init__(self):
        self.own_ids: set = set()
        self.before = RootSnapshot.take()

    def own(self, rid: str) -> None:
        """Declare a run id (e.g. a random default one) as this test's."""
        self.own_ids.add(rid)

    def _ours_ledger(self, name: str, content) -> bool:
        rid = name.split(".")[0]
        if rid.startswith(SESSION) or rid in self.own_ids:
            return True
        pid = (content or {}).get("pid")
        return pid == os.getpid() or pid in CHILD_PIDS

    def _ours_ns(self, name: str, owner_ids: set) -> bool:
        if name.startswith(f"tb-{SESSION}"):
            return True
        if any(name.startswith(f"tb-{rid}-") for rid in owner_ids):
            return True
        m = re.match(r"^tb-probe-(\d+)$", name)
        return bool(m) and (int(m.group(1)) == os.getpid() or int(m.group(1)) in CHILD_PIDS)

    def differences(self, after: RootSnapshot | None = None) -> list:
        after = after or RootSnapshot.take()
        b, a = self.before, after
        diffs = []
        led_names = set(b.ledgers) | set(a.ledgers)
        ours_led = {n for n in led_names
                    if self._ours_ledger(n, a.ledgers.get(n) or b.ledgers.get(n))}
        owner_ids = self.own_ids | {n.split(".")[0] for n in ours_led}
        for n in sorted(ours_led):
            if (n in b.ledgers) != (n in a.ledgers):
                diffs.append(f"ledger {n} {'appeared' if n in a.ledgers else 'vanished'}")
        for n in sorted(a.netns - b.netns):
            if self._ours_ns(n, owner_ids):
                diffs.append(f"namespace {n} appeared")
        for n in sorted(b.netns - a.netns):
            if self._ours_ns(n, owner_ids):
                diffs.append(f"namespace {n} vanished")
        for field in ("links", "addrs", "routes", "iptables", "nft"):
            x, y = getattr(b, field), getattr(a, field)
            if x != y:
                gone = [s for s in x if s not in y]
                new = [s for s in y if s not in x]
                diffs.append(f"{field}: removed {gone[:5]} added {new[:5]}")
        return diffs

    def assert_unchanged(self, timeout: float = 5.0) -> None:
        """Fail unless the root namespace is as it was (allowing timeout s to settle)."""
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while True:
            diffs = self.differences()
            if not diffs:
                return
            if time.monotonic() > deadline:
                pytest.fail("root namespace changed:\n  " + "\n  ".join(diffs))
            time.sleep(0.05)


@pytest.fixture
def root_state() -> RootState:
    """Snapshot of the root namespace; call .assert_unchanged() at the end of the test."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    return RootState()


@pytest.fixture
def child_pids() -> set:
    """Register PIDs of processes a test spawns so their ledgers count as this session's."""
    return CHILD_PIDS
