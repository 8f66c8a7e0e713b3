"""PERSISTENT_JOIN's state transfer (testbed.replication.transfer) in one process: members'
TransferService and a Joiner on one Loop over loopback TCP, with stand-in engines; and the
server's configuration keys for joins (one-line errors)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from testbed.daemon import Loop, UsageError
from testbed.replication import transfer as T
from testbed.replication.server import load_config

KEY = b"k" * 32


class FakeEngine:
    """What TransferService uses of an Engine."""

    def __init__(self, blob=None, servers=(1, 2, 3), left=()):
        self.blob, self.servers, self.left = blob, set(servers), set(left)
        self.join_requests = []

    def snapshot_for(self, j):
        return self.blob

    def request_join(self, j):
        self.join_requests.append(j)
        return True


def free_port(ip="127.0.0.1") -> int:
    s = socket.socket()
    s.bind((ip, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(loop, pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        loop.run_once(0.02)


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def member(loop, ip, port, eng, **kw):
    return T.TransferService(loop, KEY, ip, port, lambda: eng, log=lambda m: None, **kw)


def joiner(loop, via, port, got, **kw):
    kw.setdefault("timeout", 1.0)
    return T.Joiner(loop, KEY, 4, via, port, got.append, retry=0.05, log=lambda m: None, **kw)


def test_frames_are_checked():
    nonce = b"n" * 16
    r = T.Reader(KEY, nonce)
    f0 = T.encode(KEY, nonce, T.WAIT, 0)
    f1 = T.encode(KEY, nonce, T.CHUNK, 1, b"\0" * 8 + b"abc")
    assert r.feed(f0 + f1[:5]) == [(T.WAIT, b"")]          # a frame cut in two
    assert r.feed(f1[5:]) == [(T.CHUNK, b"\0" * 8 + b"abc")]
    with pytest.raises(T.TransferError, match="out of order"):
        T.Reader(KEY, nonce).feed(f1)                     # seq 1 first
    with pytest.raises(T.TransferError, match="bad tag"):
        T.Reader(KEY, b"m" * 16).feed(f0)                 # another connection's frame
    bad = bytearray(f0)
    bad[-1] ^= 1
    with pytest.raises(T.TransferError, match="bad tag"):
        T.Reader(KEY, nonce).feed(bytes(bad))
    with pytest.raises(T.TransferError, match="HELLO"):
        T.Reader(KEY).feed(f0)                            # a member wants HELLO first
    h = T.hello(KEY, nonce, 4, 10, b"")
    m = T.Reader(KEY)
    assert m.feed(h)[0][0] == T.HELLO and m.nonce == nonce
    with pytest.raises(T.TransferError, match="length"):
        T.Reader(KEY).feed(b"\xff\xff\xff\xff")


def test_member_requests_the_join_and_sends_once_green(loop):
    port = free_port()
    eng = FakeEngine()
    svc = member(loop, "127.0.0.1", port, eng, chunk=1000)
    got = []
    j = joiner(loop, ["127.0.0.1"], port, got)
    run(loop, lambda: j.phase == "waiting")
    assert eng.join_requests == [4]                       # the representative issued it
    (conn,) = svc.conns                                   # a vanished joiner ends in 10 s
    assert conn.stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10000
    blob = bytes(range(256)) * 40
    eng.blob = blob
    eng.servers.add(4)
    svc.on_joined(4)
    run(loop, lambda: got)
    assert got == [blob] and j.status()["phase"] == "done"
    assert j.sources == [{"peer": "127.0.0.1", "from": 0, "to": len(blob)}]
    assert svc.counts["served"] == 1 and svc.counts["bytes"] == len(blob)
    assert eng.join_requests == [4]                       # once, however many ticks
    svc.close()


def test_transfer_resumes_at_the_offset_from_another_member(loop):
    port = free_port()
    blob = b"".join(b"%06d" % i for i in range(2000))     # 12000 bytes
    e1, e2 = FakeEngine(blob), FakeEngine(blob)
    m1 = member(loop, "127.0.0.1", port, e1, chunk=500, pace=0.01)
    m2 = member(loop, "127.0.0.2", port, e2, chunk=500, pace=0.01)
    got = []
    j = joiner(loop, ["127.0.0.1", "127.0.0.2"], port, got)
    run(loop, lambda: len(j.data) >= 3000)
    m1.close()                                            # the first peer dies mid-way
    cut = len(j.data)
    assert 0 < cut < len(blob)
    run(loop, lambda: got)
    assert got == [blob]
    assert [s["peer"] for s in j.sources] == ["127.0.0.1", "127.0.0.2"]
    assert j.sources[1]["from"] == cut and j.sources[1]["to"] == len(blob)
    assert m2.counts["resumed"] == 1 and m2.counts["bytes"] == len(blob) - cut
    assert not e2.join_requests                           # 2 had ordered the JOIN
    m2.close()


def test_a_different_snapshot_starts_again_at_zero(loop):
    port = free_port()
    b1, b2 = b"a" * 4000, b"b" * 3000
    m1 = member(loop, "127.0.0.1", port, FakeEngine(b1), chunk=500, pace=0.01)
    m2 = member(loop, "127.0.0.2", port, FakeEngine(b2), chunk=500)
    got = []
    j = joiner(loop, ["127.0.0.1", "127.0.0.2"], port, got)
    run(loop, lambda: len(j.data) >= 1000)
    m1.close()
    run(loop, lambda: got)
    assert got == [b2] and j.sources[-1]["from"] == 0
    m2.close()


def test_silent_member_times_out_and_refusals_move_on(loop):
    port = free_port()
    mute = socket.socket()                                # accepts, never answers
    mute.bind(("127.0.0.1", port))
    mute.listen(4)
    left = member(loop, "127.0.0.2", port, FakeEngine(left={4}))
    blob = b"x" * 100
    ok = member(loop, "127.0.0.3", port, FakeEngine(blob))
    got = []
    t0 = time.monotonic()
    j = joiner(loop, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], port, got, timeout=0.4)
    run(loop, lambda: got)
    assert got == [blob] and time.monotonic() - t0 >= 0.4
    assert j.errors == 2 and left.counts["refused"] == 1
    assert j.sources == [{"peer": "127.0.0.3", "from": 0, "to": 100}]
    mute.close()
    left.close()
    ok.close()


def test_a_joiner_with_another_key_is_dropped(loop):
    port = free_port()
    svc = member(loop, "127.0.0.1", port, FakeEngine(b"secret"))
    got = []
    j = T.Joiner(loop, b"z" * 32, 4, ["127.0.0.1"], port, got.append, timeout=1.0,
                 retry=0.05, log=lambda m: None)
    run(loop, lambda: svc.counts["bad_frames"] >= 2)
    assert not got and svc.counts["bytes"] == 0 and j.phase != "done"
    j.close()
    svc.close()


def base_config(tmp_path, **extra) -> str:
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    cfg = {"id": 4, "algo": "engine", "peers": {"1": "10.0.0.1", "4": "10.0.0.4"},
           "gc_port": 8300, "client_port": 8310, "key_file": str(key),
           "data_dir": str(tmp_path / "d"), "disk": {"forced": False},
           "status_file": str(tmp_path / "s.json"), "broadcast_ip": "10.0.0.255",
           "servers": [1], "join_via": ["10.0.0.1"], **extra}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_server_join_keys(tmp_path):
    cfg = load_config(base_config(tmp_path))
    assert cfg["transfer_port"] == 8311 and cfg["transfer_chunk"] == 65536
    assert cfg["join_via"] == ["10.0.0.1"] and cfg["servers"] == [1]
    for extra, msg in [({"servers": [1, 4]}, "one of the initial servers"),
                       ({"servers": [9]}, "servers must be"),
                       ({"join_via": ["nope"]}, "IPv4"),
                       ({"join_via": []}, "join_via must"),
                       ({"transfer_port": 8310}, "must differ"),
                       ({"transfer_chunk": 0}, "transfer_chunk"),
                       ({"transfer_pace_ms": -1}, "transfer_pace_ms"),
                       ({"algo": "corel"}, "engine only"),
                       ({"gc_timeouts": {"hearbeat": 0.1}}, "unknown timeouts"),
                       ({"gc_timeouts": {"heartbeat": "0.1"}}, "heartbeat must be"),
                       ({"gc_timeouts": {"window": 1.5}}, "window must be")]:
        with pytest.raises(UsageError, match=msg) as e:
            load_config(base_config(tmp_path, **extra))
        assert "\n" not in str(e.value)


def test_unpaced_transfer_of_megabytes(loop):
    port = free_port()
    blob = bytes(range(256)) * (12 * 1024)                # 3 MiB
    svc = member(loop, "127.0.0.1", port, FakeEngine(blob), chunk=65536)
    got = []
    t0 = time.monotonic()
    joiner(loop, ["127.0.0.1"], port, got)
    run(loop, lambda: got, timeout=10)
    assert got == [blob] and svc.counts["served"] == 1
    assert time.monotonic() - t0 < 5                    # not paced by the 0.2 s tick
    svc.close()


def test_a_server_that_is_not_an_initial_server_and_not_joining_is_one_line(tmp_path):
    import subprocess
    import sys

    path = base_config(tmp_path)
    cfg = json.loads(open(path).read())
    del cfg["join_via"]                      # not a joiner, and not among servers [1]
    cfg.update(data_dir=str(tmp_path / "d2"), peers={"1": "127.0.0.1", "4": "127.0.0.4"},
               broadcast_ip="127.255.255.255", gc_port=free_port(),
               client_port=free_port("127.0.0.4"))
    with open(path, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([sys.executable, "-m", "testbed.replication.server", path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "is not one of the servers" in r.stderr, r.stderr



def test_a_connect_that_gets_no_answer_moves_to_the_next_member(loop):
    # a listener whose accept queue is full drops further SYNs, as a partition would
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fill.append(c)
    got: list = []
    j = joiner(loop, ["127.0.0.1", "127.0.0.1"], port, got, timeout=0.3)
    try:
        run(loop, lambda: j.attempts >= 3, timeout=5)   # gave up and tried again, twice
        assert "no answer in 0.3 s" in j.last_error and not got
    finally:
        j.close()
        assert j.connecting is None
        for c in fill:
            c.close()
        lst.close()
