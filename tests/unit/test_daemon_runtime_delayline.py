"""What the delay line and overlay moves added to the daemon runtime: the signal wake-up fd
for a hand-written select loop, control datagrams, sub-commands of ArgParser. No root."""

import os
import select
import signal
import threading

import pytest

from testbed import daemon
from testbed.daemon.control import bind_control, request
from testbed.daemon.loop import Wakeup


def test_wakeup_makes_a_signal_wake_select_and_restores_the_old_fd():
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    old = signal.signal(signal.SIGUSR1, lambda s, f: None)
    try:
        with Wakeup() as wake:
            assert select.select([wake], [], [], 0)[0] == []
            os.kill(os.getpid(), signal.SIGUSR1)
            assert select.select([wake], [], [], 2)[0] == [wake]
            wake.drain()
            assert select.select([wake], [], [], 0)[0] == []
        assert signal.set_wakeup_fd(before) == before  # restored on close
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_control_request_round_trip_and_cleanup(tmp_path):
    path = str(tmp_path / "d.sock")
    (tmp_path / "d.sock").write_text("stale")  # a dead daemon's leftover
    server = bind_control(path)
    server.setblocking(True)

    def serve():
        data, addr = server.recvfrom(65536)
        server.sendto(data, addr)

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert request(path, {"stats": True}) == {"stats": True}
    finally:
        t.join(5)
        server.close()
    assert os.listdir(tmp_path) == ["d.sock"]  # the client's socket is gone


def test_control_request_timeout_names_what(tmp_path):
    path = str(tmp_path / "mute.sock")
    server = bind_control(path)
    try:
        with pytest.raises(TimeoutError, match="no reply from thing .*mute.sock within 0.1 s"):
            request(path, {}, timeout=0.1, what="thing")
    finally:
        server.close()
    assert os.listdir(tmp_path) == ["mute.sock"]


def test_bind_control_says_which_path():
    with pytest.raises(OSError, match="cannot create control socket /nonexistent/x.sock"):
        bind_control("/nonexistent/x.sock")


def test_subcommand_errors_are_one_line_with_the_name(capsys):
    p = daemon.ArgParser("thing")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--port", type=daemon.port, required=True)
    assert p.parse_args(["send", "--port", "9"]).port == 9
    for argv in (["send", "--port", "0"], ["send"], ["fly"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("thing: ") and err.count("\n") == 1, err


def test_loop_stop_on_signals_still_closes_cleanly():
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    loop = daemon.Loop()
    loop.stop_on_signals([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        loop.run_once(2)
        assert loop.stopping and loop.signum == signal.SIGUSR1
    finally:
        loop.close()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert signal.set_wakeup_fd(before) == before
