"""The daemon runtime (testbed.daemon) and the poll helper (testbed.poll): no root."""

import os
import signal
import socket
import stat
import time

import pytest

from testbed import daemon, poll
from testbed.errors import TestbedError


def test_argparser_error_is_one_line_exit_2(capsys):
    p = daemon.ArgParser("thing")
    p.add_argument("--port", type=daemon.port, required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--port", "70000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("thing: ") and "65535" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind,text,want", [
    (daemon.addr, "10.0.0.1:80", ("10.0.0.1", 80)),
    (daemon.ipv4, "10.0.0.1", "10.0.0.1"),
    (daemon.int_in(1, 5), "5", 5),
    (daemon.float_in(0, 1), "0.5", 0.5),
])
def test_argument_types_accept(kind, text, want):
    assert kind(text) == want


@pytest.mark.parametrize("kind,text", [
    (daemon.addr, "10.0.0.1"), (daemon.addr, "x:80"), (daemon.ipv4, "10.0.0.256"),
    (daemon.int_in(1, 5), "6"), (daemon.float_in(0, 1), "nan"), (daemon.port, "0"),
])
def test_argument_types_refuse(kind, text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


def test_key_roundtrip_is_hex_and_private(tmp_path):
    key = daemon.new_key()
    path = daemon.write_key(str(tmp_path / "k"), key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read().strip() == key.hex()
    assert daemon.read_key(path) == key


@pytest.mark.parametrize("content,msg", [("zz", "hex"), ("00" * 8, "at least 16")])
def test_bad_key_files_are_usage_errors(tmp_path, content, msg):
    path = tmp_path / "k"
    path.write_text(content)
    with pytest.raises(daemon.UsageError, match=msg):
        daemon.read_key(str(path))
    with pytest.raises(daemon.UsageError, match="cannot read"):
        daemon.read_key(str(tmp_path / "missing"))


def test_recv_exact_reads_across_chunks_and_reports_truncation():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"abc")
        a.sendall(b"defg")
        assert daemon.recv_exact(b, 5) == b"abcde"
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(daemon.PeerClosed, match="after 2 of 4 bytes"):
            daemon.recv_exact(b, 4)


def test_stream_queues_what_the_socket_does_not_take_and_closes_once():
    loop = daemon.Loop()
    a, b = socket.socketpair()
    got, closed, drained = bytearray(), [], []
    s = daemon.Stream(loop, a, got.extend, lambda: closed.append(1),
                      on_drain=lambda: drained.append(1))
    b.setblocking(False)
    big = os.urandom(4 << 20)                    # far more than a socket buffer holds
    s.send(big)
    assert s.out                                 # the rest waits for write events
    echoed = bytearray()
    while len(echoed) < len(big):
        loop.run_once(0.05)
        try:
            echoed += b.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(echoed) == big and not s.out and drained
    b.sendall(b"hello")
    poll.wait_until(lambda: (loop.run_once(0.05), bytes(got) == b"hello")[1], 5, "data in")
    b.close()                                    # EOF: on_close once, the socket closed
    poll.wait_until(lambda: (loop.run_once(0.05), closed)[1], 5, "on_close")
    s.close()
    s.send(b"late")                              # nothing happens on a closed stream
    assert closed == [1] and not s.open and a.fileno() == -1
    loop.close()


def test_ready_file_is_written_then_removed(tmp_path):
    path = str(tmp_path / "d.ready")
    with daemon.ready_file(path, {"port": 7}):
        import json

        assert json.load(open(path)) == {"pid": os.getpid(), "port": 7}
    assert not os.path.exists(path)


def test_timers_fire_in_order_and_loop_serves_files():
    loop = daemon.Loop()
    fired = []
    a, b = socket.socketpair()
    try:
        loop.after(0.02, lambda now: fired.append("late"))
        loop.after(0.0, lambda now: fired.append("early"))
        loop.add(b, lambda mask: fired.append(b.recv(8)))
        a.send(b"x")
        loop.at(time.monotonic() + 0.05, lambda now: loop.stop())
        loop.run()
    finally:
        loop.close()
        a.close()
        b.close()
    assert fired[-1] == "late" and set(fired[:2]) == {"early", b"x"}


def test_a_stop_signal_wakes_the_loop_at_once():
    loop = daemon.Loop()
    loop.stop_on_signals()
    old = signal.getsignal(signal.SIGALRM)
    try:
        loop.after(30, lambda now: None)  # without the wake-up fd, select would sleep 30 s
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
        t0 = time.monotonic()
        loop.run()
        assert time.monotonic() - t0 < 5 and loop.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGALRM, old)
        loop.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_run_main_turns_usage_errors_into_one_line(capsys):
    def body(argv):
        raise daemon.UsageError(f"bad {argv[0]}")

    assert daemon.run_main("thing", body, ["x"]) == 2
    assert capsys.readouterr().err == "thing: bad x\n"
    assert daemon.run_main("thing", lambda argv: 0, []) == 0


def test_run_main_ends_cleanly_on_stop():
    def body(argv):
        raise daemon.Stop()

    assert daemon.run_main("thing", body, []) == 0


def test_daemon_package_imports_nothing_of_the_testbed_but_itself():
    import ast
    import pathlib

    for path in pathlib.Path(daemon.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("testbed") or name.startswith("testbed.daemon"), \
                    f"{path.name} imports {name}"


def test_wait_until_returns_the_value_and_times_out_naming_what():
    n = iter(range(100))
    assert poll.wait_until(lambda: next(n) >= 3 and "yes", 5, "three") == "yes"
    with pytest.raises(poll.WaitTimeout, match="never: not after"):
        poll.wait_until(lambda: False, 0.05, "never", scale=False)
    with pytest.raises(TestbedError, match="it died"):
        poll.wait_until(lambda: False, 5, "x", abort=lambda: "it died")
