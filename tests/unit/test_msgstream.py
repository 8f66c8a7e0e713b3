"""msgstream's receiver and sender as processes on loopback (no root): every message
arrives in order, a stream cut inside a message ends at the last whole one, bad arguments
are one line and status 2."""

import json
import socket
import subprocess
import sys

from testbed.measure.msgstream import HEAD
from testbed.poll import wait_until

ME = [sys.executable, "-m", "testbed.measure.msgstream"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver(tmp_path, port):
    ready = tmp_path / "ready"
    p = subprocess.Popen(ME + ["recv", "--port", str(port), "--out", str(tmp_path / "m.csv"),
                               "--ready-file", str(ready)], stdout=subprocess.PIPE, text=True)
    wait_until(ready.exists, 20, "msgstream ready file",
               abort=lambda: p.poll() is not None and "the receiver exited")
    assert json.loads(ready.read_text())["pid"] == p.pid
    return p, ready


def test_stream_arrives_whole_and_in_order(tmp_path):
    port = _free_port()
    rx, ready = _receiver(tmp_path, port)
    tx = subprocess.run(ME + ["send", "--dst", "127.0.0.1", "--port", str(port),
                              "--rate-kbit", "800", "--seconds", "0.2", "--size", "100"],
                        capture_output=True, text=True, timeout=30)
    out, _ = rx.communicate(timeout=30)
    sent, got = json.loads(tx.stdout.splitlines()[-1]), json.loads(out.splitlines()[-1])
    assert tx.returncode == 0 and rx.returncode == 0
    assert sent["sent"] == got["received"] == 200 and got["in_order"]
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 201
    assert not ready.exists()  # removed at exit


def test_a_stream_cut_inside_a_message_ends_at_the_last_whole_one(tmp_path):
    port = _free_port()
    rx, _ready = _receiver(tmp_path, port)
    with socket.create_connection(("127.0.0.1", port)) as c:
        msg = HEAD.pack(0, 64, 0) + b"\0" * (64 - HEAD.size)
        c.sendall(msg + msg[:40])  # one whole message, then part of the next
    out, _ = rx.communicate(timeout=30)
    assert rx.returncode == 0
    assert json.loads(out.splitlines()[-1])["received"] == 1


def test_bad_arguments_are_one_line_status_2():
    p = subprocess.run(ME + ["send", "--dst", "127.0.0.1", "--port", "0", "--rate-kbit", "1",
                             "--seconds", "1"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.startswith("msgstream: ") and p.stderr.count("\n") == 1
