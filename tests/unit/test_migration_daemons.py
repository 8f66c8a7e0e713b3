"""The migration daemons on the shared runtime (no namespaces): one-line usage errors and
exit 2, TERM ends them with exit 0 and their files removed, the streamer's send-queue drain,
the controller's layout from the topology module, and paper 003's VM image over localhost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from testbed.errors import SpecError
from testbed.migration import control, streamer
from testbed.migration.controller import Layout
from testbed.poll import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*argv):
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("module,name,argv", [
    ("agent", "migration.agent", []),
    ("player", "migration.player", ["--dst", "10.0.0.1", "--port", "0", "--out", "x"]),
    ("player", "migration.player", ["--dst", "10.0.0.1", "--port", "1", "--out", "x",
                                    "--buffer-s", "0"]),
    ("streamer", "migration.streamer", ["restore", "--listen", "nowhere", "--mport", "1",
                                        "--ctl", "c", "--out", "o"]),
    ("streamer", "migration.streamer", ["serve", "--port", "1", "--seconds", "0", "--ctl",
                                        "c", "--out", "o"]),
    ("replication", "migration.replication", ["replica", "--port", "70000"]),
    ("replication", "migration.replication", ["primary", "--dst", "10.0.0.1", "--out", "o",
                                              "--max-bytes", "0"]),
    ("wan", "migration.wan", ["vm-sink", "--vs-ip", "10.0.0.1", "--out", "o"]),
    ("wan", "migration.wan", []),
])
def test_usage_errors_are_one_line_exit_2(module, name, argv, capsys, tmp_path,
                                          monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(f"testbed.migration.{module}")
    assert mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: ") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []  # nothing created before the arguments were checked


def test_replica_ends_on_term_with_exit_0():
    port = _free_port()
    p = _start("testbed.migration.replication", "replica", "--port", str(port))
    try:
        wait_until(lambda: "listening" in (p.stdout.readline() or "x"), 20, "the replica")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert p.stderr.read() == ""
    finally:
        p.kill()
        p.wait()


def test_agent_answers_and_term_removes_its_socket(tmp_path):
    ctl = str(tmp_path / "agent.sock")
    p = _start("testbed.migration.agent", "--ctl", ctl)
    try:
        wait_until(lambda: os.path.exists(ctl), 20, "the agent's socket")
        assert "127.0.0.1/8" in control.request(ctl, op="addrs")["addrs"]
        with pytest.raises(control.ControlError, match="unknown command"):
            control.request(ctl, op="bogus")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert not os.path.exists(ctl)
    finally:
        p.kill()
        p.wait()


def test_control_server_idle_and_close(tmp_path):
    path = str(tmp_path / "c.sock")
    server = control.serve(path, lambda msg: {"echo": msg["x"]})
    assert control.request(path, op="x", x=3)["echo"] == 3
    assert server.idle(timeout=1)
    server.close()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        control.request(path, op="x", x=1)


def test_drain_waits_for_the_peer_to_ack():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
        with a, b:
            a.sendall(b"x" * 1000)
            assert streamer.drain(a, 5.0)  # acked (not yet read)
            a.setblocking(False)
            try:
                while True:  # fill the window: the peer reads nothing
                    a.send(b"y" * 65536)
            except BlockingIOError:
                pass
            t = time.monotonic()
            assert not streamer.drain(a, 0.1)
            assert 0.09 < time.monotonic() - t < 2


def test_layout_from_the_topology_module():
    from topologies import gmpls_dr

    lay = Layout.of(gmpls_dr)
    assert lay.service_ip == gmpls_dr.SERVICE_IP and lay.bod == gmpls_dr.BOD
    assert (lay.vlan_migration, lay.park_main, lay.park_backup) == (10, 11, 12)
    with pytest.raises(SpecError, match="lacks SERVICE_IP"):
        Layout.of(object())


def test_the_library_imports_no_topologies():
    code = ("import sys, testbed.migration.controller, testbed.migration.wan; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('topologies', 'experiments')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_wan_vm_image_moves_intact_over_localhost(tmp_path):
    """vm-source -> vm-sink on 127.0.0.1: the pre-copy rounds, SIGUSR1/SIGUSR2, the stop-
    and-copy, every page's CRC, the resumed echo service, and TERM ending the sink."""
    echo, mport = _free_port(socket.SOCK_DGRAM), _free_port()
    common = ["--port", str(echo), "--mport", str(mport)]
    src_out, sink_out = str(tmp_path / "src.json"), str(tmp_path / "sink.json")
    # one namespace: the VS address differs between the sites (127.0.0.2 at A)
    sink = _start("testbed.migration.wan", "vm-sink", "--vs-ip", "127.0.0.1", *common,
                  "--pages", "256", "--out", sink_out)
    src = None
    try:
        assert "sink listening" in sink.stdout.readline()
        src = _start("testbed.migration.wan", "vm-source", "--vs-ip", "127.0.0.2", *common,
                     "--dst", "127.0.0.1",
                     "--state-mb", "1", "--wws-mb", "0.25", "--dirty-mbps", "2",
                     "--out", src_out)
        assert src.stdout.readline().startswith("serving")
        src.send_signal(signal.SIGUSR1)
        assert "converged" in src.stdout.readline()
        src.send_signal(signal.SIGUSR2)
        assert src.stdout.readline().strip() == "migrated"
        assert src.wait(20) == 0
        assert sink.stdout.readline().startswith("resumed")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"\0" * 12, ("127.0.0.1", echo))
            assert u.recv(100).endswith(b"vs_b")
        assert sink.stdout.readline().strip() == "sink done"
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(10) == 0
    finally:
        for p in (src, sink):
            if p is not None:
                p.kill()
                p.wait()
    with open(src_out) as f:
        s = json.load(f)
    with open(sink_out) as f:
        k = json.load(f)
    assert s["resumed_ok"] and k["bad_pages"] == 0 and k["pages_seen"] == 256
    assert s["sha256"] == k["sha256"]
    assert s["rounds"][0]["pages"] == 256 and s["sent_bytes"] >= 256 * 4096
