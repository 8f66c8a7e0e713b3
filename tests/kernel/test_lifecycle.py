"""Network lifecycle on real namespaces: build, tear down, signals, SIGKILL + cleanup,
concurrent runs, bad input, process supervision. Needs root; each test takes seconds."""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from testbed import ledger
from testbed.errors import SpecError
from testbed.errors import TestbedError as TBError  # not "Test*": pytest would collect it
from testbed.network import Network
from testbed.process import TIMEOUT_SCALE
from testbed.topology import Topology

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pair() -> Topology:
    t = Topology("pair")
    t.add_host("h1")
    t.add_host("h2")
    t.add_link("h1", "h2")
    return t


def ledger_file(rid: str) -> str:
    return ledger.ledger_path(rid)


def ping(node, ip: str) -> bool:
    return node.run(["ping", "-c", "1", "-W", "1", ip], check=False).returncode == 0


def running(pid: int, needle: str) -> bool:
    """pid is alive (not a zombie) and its command line contains needle."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and needle in cmd


# (1) a normal run ---------------------------------------------------------------------------

def test_normal_run(root_state, run_id, run_namespaces):
    rid = run_id()
    with Network(pair(), run_id=rid) as net:
        assert net.prefix == f"tb-{rid}-"
        assert run_namespaces(rid) == [f"tb-{rid}-h1", f"tb-{rid}-h2"]
        with open(ledger_file(rid)) as f:
            led = json.load(f)
        assert led["pid"] == os.getpid()
        assert sorted(led["namespaces"]) == [f"tb-{rid}-h1", f"tb-{rid}-h2"]
        assert ping(net["h1"], net["h2"].ip)
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger_file(rid))
    root_state.assert_unchanged()


def test_default_run_id_prefix(root_state, run_namespaces):
    net = Network(pair())
    root_state.own(net.run_id)
    assert net.prefix.startswith("tb-") and net.prefix == f"tb-{net.run_id}-"
    with net:
        assert run_namespaces(net.run_id) == [f"{net.prefix}h1", f"{net.prefix}h2"]
    assert run_namespaces(net.run_id) == []
    root_state.assert_unchanged()


def test_stop_is_idempotent_and_start_once(root_state, run_id, run_namespaces):
    rid = run_id()
    net = Network(pair(), run_id=rid).start()
    try:
        with pytest.raises(TBError, match="already started"):
            net.start()
    finally:
        net.stop()
    net.stop()
    assert run_namespaces(rid) == []
    root_state.assert_unchanged()


# (2) an exception inside the with block ---------------------------------------------------------

def test_exception_tears_down_and_propagates(root_state, run_id, run_namespaces):
    rid = run_id()
    pid = None
    with pytest.raises(RuntimeError, match="boom inside the block"), \
            Network(pair(), run_id=rid) as net:
        pid = net["h1"].start(["sleep", "1000"]).pid
        assert running(pid, "sleep 1000")
        assert len(run_namespaces(rid)) == 2
        raise RuntimeError("boom inside the block")
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger_file(rid))
    assert not running(pid, "sleep 1000")
    root_state.assert_unchanged()


# (3)/(4) a child process that builds a network and gets a signal ---------------------------------

CHILD = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {repo!r})
    from testbed.network import Network
    from testbed.topology import Topology

    class Marker:  # something a system attached: it must be stopped, its process running
        def __init__(self, path, proc):
            self.path, self.proc = path, proc

        def stop(self):
            with open(self.path, "w") as f:
                f.write("stopped, sleep alive" if self.proc.alive else "stopped, sleep dead")

    t = Topology("sig")
    t.add_host("h1")
    t.add_host("h2")
    t.add_link("h1", "h2")
    with Network(t, run_id=sys.argv[1]) as net:
        p = net["h1"].start(["sleep", "1000"])
        net.own(Marker(sys.argv[2], p))
        print("ready", p.pid, flush=True)
        while True:
            signal.pause()
""")


class Child:
    """A Python process running CHILD; ready() waits for its 'ready <sleep pid>' line."""

    def __init__(self, tmp_path, rid: str, child_pids: set):
        script = tmp_path / "child.py"
        script.write_text(CHILD.format(repo=REPO))
        self.rid = rid
        self.marker = tmp_path / "owned.stopped"  # written by the owned thing's stop()
        self.proc = subprocess.Popen([sys.executable, str(script), rid, str(self.marker)],
                                     cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child_pids.add(self.proc.pid)

    def ready(self, timeout: float = 30) -> int:
        timeout *= TIMEOUT_SCALE  # a Python start-up plus a build: slow under qemu's TCG
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline().decode()
                if line.startswith("ready"):
                    return int(line.split()[1])
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"child never got ready (rc {self.proc.returncode}): "
                    f"{self.proc.stderr.read().decode()[-2000:]}")

    def finish(self, timeout: float = 20) -> tuple:
        timeout *= TIMEOUT_SCALE
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"child did not exit within {timeout} s of the signal")
        return rc, self.proc.stderr.read().decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_tears_down(sig, tmp_path, root_state, run_id, run_namespaces, child_pids):
    rid = run_id()
    child = Child(tmp_path, rid, child_pids)
    sleep_pid = child.ready()
    assert run_namespaces(rid) == [f"tb-{rid}-h1", f"tb-{rid}-h2"]
    assert running(sleep_pid, "sleep 1000")
    assert os.path.exists(ledger_file(rid))

    child.proc.send_signal(sig)
    rc, err = child.finish()
    # it exited because of the signal (KeyboardInterrupt re-raises SIGINT at exit; SIGTERM
    # becomes SystemExit(128 + 15)), not through some other path such as our KILL after a hang
    assert rc == {signal.SIGINT: -signal.SIGINT, signal.SIGTERM: 143, signal.SIGHUP: 129}[sig], err
    # what the network owned was stopped, and before the nodes' processes
    assert child.marker.read_text() == "stopped, sleep alive"
    assert run_namespaces(rid) == []
    assert not running(sleep_pid, "sleep 1000")
    assert not os.path.exists(ledger_file(rid))
    root_state.assert_unchanged()


def test_sigkill_then_cleanup(tmp_path, root_state, run_id, run_namespaces, child_pids,
                              wait_until):
    rid = run_id()
    child = Child(tmp_path, rid, child_pids)
    sleep_pid = child.ready()
    child.proc.kill()
    child.proc.wait(10)

    # SIGKILL gives no chance to clean up: everything is still there
    assert run_namespaces(rid) == [f"tb-{rid}-h1", f"tb-{rid}-h2"]
    assert running(sleep_pid, "sleep 1000")
    assert os.path.exists(ledger_file(rid))

    cli = [sys.executable, "-m", "testbed.cli", "cleanup"]
    listing = subprocess.run(cli + ["--list"], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=False)
    assert listing.returncode == 0, listing.stderr
    mine = [ln for ln in listing.stdout.splitlines() if ln.startswith(rid + " ")]
    assert len(mine) == 1 and "dead" in mine[0], listing.stdout

    # --run: a plain `cleanup` would also remove other people's dead runs on this machine
    done = subprocess.run(cli + ["--run", rid], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger_file(rid))
    wait_until(lambda: not running(sleep_pid, "sleep 1000"), timeout=5,
               what="the orphaned sleep to die")
    root_state.assert_unchanged()
    # the report counts each namespace once (the ledger's list and the prefix scan overlap)
    assert f"run {rid}: removed 2 namespaces" in done.stdout


# (5) two networks at once -------------------------------------------------------------------

def test_two_networks_at_once(root_state, run_namespaces, wait_until):
    topo = pair()
    a = Network(topo)
    b = Network(topo)
    root_state.own(a.run_id)
    root_state.own(b.run_id)
    assert a.prefix != b.prefix
    try:
        a.start()
        b.start()
        # same topology, so the same addresses, in separate namespaces
        assert a["h2"].ip == b["h2"].ip
        assert ping(a["h1"], a["h2"].ip)
        assert ping(b["h1"], b["h2"].ip)
        assert set(run_namespaces(a.run_id)).isdisjoint(run_namespaces(b.run_id))
        a.stop()
        assert run_namespaces(a.run_id) == []
        assert run_namespaces(b.run_id) == [f"{b.prefix}h1", f"{b.prefix}h2"]
        assert ping(b["h1"], b["h2"].ip)
        assert os.path.exists(ledger_file(b.run_id))
    finally:
        a.stop()
        b.stop()
    assert run_namespaces(b.run_id) == []
    root_state.assert_unchanged()


# (6) bad input raises before anything is created ----------------------------------------------

def _dup_address():
    return pair_with(ip_a="10.9.0.1/24", ip_b="10.9.0.1/24")


def pair_with(**link) -> Topology:
    t = Topology("bad")
    t.add_host("h1")
    t.add_host("h2")
    t.add_link("h1", "h2", **link)
    return t


def _mixed_subnets():
    return pair_with(ip_a="10.9.0.1/24", ip_b="10.8.0.1/24")


def _no_prefix():
    return pair_with(ip_a="10.9.0.1")


def _route_on_switch():
    t = Topology("bad")
    t.add_host("h1")
    t.add_switch("s1")
    t.add_link("h1", "s1")
    t.add_route("s1", "default", "10.0.0.1")
    return t


def _unreachable_next_hop():
    t = pair_with()
    t.add_route("h1", "10.77.0.0/24", "192.168.99.1")  # no interface of h1 reaches it
    return t


def _empty():
    return Topology("empty")


@pytest.mark.parametrize("build, pattern", [
    (_dup_address, r"duplicate address"),
    (_mixed_subnets, r"several subnets"),
    (_no_prefix, r"needs a prefix length"),
    (_route_on_switch, r"route on switch s1"),
    (_unreachable_next_hop, r"192\.168\.99\.1"),
    (_empty, r"has no nodes"),
], ids=["dup-address", "mixed-subnets", "no-prefix", "route-on-switch",
        "unreachable-next-hop", "empty"])
def test_bad_topology_creates_nothing(build, pattern, root_state, run_id, run_namespaces):
    rid = run_id()
    net = None
    try:
        with pytest.raises(SpecError, match=pattern):
            net = Network(build(), run_id=rid)
            net.start()
    finally:
        if net is not None:  # the error came after __init__: leave nothing behind
            net.stop()
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger_file(rid))
    root_state.assert_unchanged(timeout=0)


def test_bogus_backend(root_state, run_id):
    rid = run_id()
    with pytest.raises(SpecError, match=r"backend must be one of auto, netem, delayline, "
                                        r"got 'bogus'"):
        Network(pair(), backend="bogus", run_id=rid)
    assert not os.path.exists(ledger_file(rid))
    root_state.assert_unchanged(timeout=0)


# (7) process supervision ------------------------------------------------------------------------

def group_members(pgid: int) -> list:
    """Live processes of process group pgid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and running(int(entry), ""):
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_term_ignoring_process_is_killed(root_state, run_id, run_namespaces):
    rid = run_id()
    with Network(pair(), run_id=rid) as net:
        p = net["h1"].start(["sh", "-c", "trap '' TERM; echo armed; sleep 1000"])
        p.wait_ready(lambda: "armed" in p.log(), timeout=5)
        pgid = os.getpgid(p.pid)
        assert pgid == p.pid  # its own process group, so the whole group gets the signals
        assert len(group_members(pgid)) == 2  # sh and its sleep
        t0 = time.monotonic()
    took = time.monotonic() - t0
    assert p.returncode == -signal.SIGKILL  # TERM was ignored, KILL did it
    assert took < 10
    assert group_members(pgid) == []  # the sleep inherited the ignored TERM; it died too
    assert run_namespaces(rid) == []
    root_state.assert_unchanged()


def test_readiness_timeout_raises_and_network_tears_down(root_state, run_id, run_namespaces):
    rid = run_id()
    with pytest.raises(TBError, match=r"h1:never not ready after [0-9.]+ s") as info, \
            Network(pair(), run_id=rid) as net:
        t0 = time.monotonic()
        try:
            net["h1"].start(["sleep", "1000"], name="never", ready=lambda: False,
                            ready_timeout=1.0)
        finally:
            took = time.monotonic() - t0
            procs = list(net["h1"].procs)
    # ready_timeout is scaled by TESTBED_TIMEOUT_SCALE (10 in the qemu tier)
    assert 1.0 * TIMEOUT_SCALE <= took < 3.0 * TIMEOUT_SCALE
    assert "log " in str(info.value)  # it says where the log is
    assert len(procs) == 1 and not running(procs[0].pid, "sleep 1000")
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger_file(rid))
    root_state.assert_unchanged()


def test_process_exiting_early_fails_readiness_with_log_tail(root_state, run_id, run_namespaces):
    rid = run_id()
    with Network(pair(), run_id=rid) as net:
        t0 = time.monotonic()
        with pytest.raises(TBError) as info:
            net["h1"].start(["sh", "-c", "echo first line; echo the-last-words >&2; exit 3"],
                            name="quitter", ready=lambda: False, ready_timeout=10)
        took = time.monotonic() - t0
        msg = str(info.value)
        assert "h1:quitter exited with 3 before it was ready" in msg
        assert "the-last-words" in msg  # the log tail (stderr goes to the same log)
        assert took < 5 * TIMEOUT_SCALE  # fails as soon as the process dies, not at the timeout
        # the rest of the network still works
        assert ping(net["h1"], net["h2"].ip)
    assert run_namespaces(rid) == []
    root_state.assert_unchanged()


def test_command_not_found(root_state, run_id):
    with Network(pair(), run_id=run_id()) as net, \
            pytest.raises(TBError, match=r"command not found: no-such-binary-xyz"):
        net["h1"].start(["no-such-binary-xyz"])
    root_state.assert_unchanged()


def test_started_process_runs_inside_its_namespace(root_state, run_id):
    with Network(pair(), run_id=run_id()) as net:
        p = net["h2"].start(["sleep", "1000"])
        ns_inode = os.stat(f"/run/netns/{net['h2'].ns}").st_ino
        assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == ns_inode
        assert os.stat(f"/proc/{p.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert os.path.dirname(p.log_path) == net.log_dir
    root_state.assert_unchanged()


# (8) unknown names ------------------------------------------------------------------------------

def test_unknown_node_and_link(root_state, run_id):
    with Network(pair(), run_id=run_id()) as net:
        with pytest.raises(SpecError, match=r"unknown node 'nope'"):
            net["nope"]
        with pytest.raises(SpecError, match=r"unknown node 'nope'"):
            net.link("h1", "nope")
        assert net.link("h2", "h1") is net.link("h1", "h2")
    root_state.assert_unchanged()


# (9) not root -----------------------------------------------------------------------------------

def test_not_root_says_so(monkeypatch, run_id):
    rid = run_id()
    net = Network(pair(), run_id=rid)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TBError, match=r"root.*sudo"):
        net._preflight()
    with pytest.raises(TBError, match=r"root.*sudo"):
        net.start()
    monkeypatch.undo()
    assert not os.path.exists(ledger_file(rid))
    assert not os.path.exists(f"/run/netns/tb-{rid}-h1")
