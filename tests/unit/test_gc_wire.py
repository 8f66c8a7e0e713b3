"""The group communication's datagrams (testbed.replication.gc.wire): golden encodings,
round trips, and the drops: forged, truncated, replayed, stale, misdirected."""

from __future__ import annotations

import pytest

from testbed.replication.gc import wire
from testbed.replication.gc.wire import (ORDERED, Commit, ConfId, Hold, Join, ReplayGuard,
                                         WireError)

KEY = b"k" * 32
C = ConfId(7, 2, 1000)


def test_golden_header_and_heartbeat():
    body = wire.heartbeat_body(C, wire.HF_INSTALLED, 10, 9)
    assert body.hex() == "00000007000200000000000003e8010000000a00000009"
    data = wire.encode(KEY, wire.HEARTBEAT, 2, 0, 1000, 1, 2000, body)
    assert data[:28].hex() == ("4743" "01" "01" "0002" "0000" "00000000000003e8"
                               "00000001" "00000000000007d0")
    assert len(data) == 28 + len(body) + 16
    hdr, got = wire.decode(KEY, data)
    assert hdr == (wire.HEARTBEAT, 2, 0, 1000, 1, 2000)
    assert got == (C, wire.HF_INSTALLED, 10, 9)


def test_round_trips():
    items = [(5, 1, 3, wire.SAFE, b"a" * 200), (6, 3, 1, wire.AGREED, b"")]
    body = wire.ordered_body(C, 4, 6, items)
    assert wire.decode_body(ORDERED, body) == (C, 4, 6, items)
    data = [(1, wire.SAFE, b"x"), (2, wire.AGREED, b"yy")]
    assert wire.decode_body(wire.DATA, wire.data_body(C, data)) == (C, data)
    assert wire.decode_body(wire.ACK, wire.ack_body(C, 9)) == (C, 9)
    assert wire.decode_body(wire.NACK, wire.nack_body(C, [(1, 2), (5, 5)])) == (
        C, [(1, 2), (5, 5)])
    j = Join(C, 9, (1, 2, 5), Hold(4, ((6, 8),)))
    assert wire.decode_body(wire.JOIN, j.pack()) == j
    cm = Commit(ConfId(10, 1, 5), ((1, C, Hold(4)), (2, ConfId(3, 2, 1), Hold(0, ((2, 2),)))))
    assert wire.decode_body(wire.COMMIT, cm.pack()) == cm
    assert wire.decode_body(wire.INSTALL, wire.conf_body(C)) == C
    assert Hold(4, ((6, 8),)).covers(7) and not Hold(4, ((6, 8),)).covers(5)


def test_conf_ids_are_totally_ordered():
    assert ConfId(2, 9, 0) > ConfId(1, 1, 99) and ConfId(2, 1, 5) > ConfId(2, 1, 4)


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_hmac"),
    (lambda d: d[:-2], "bad_hmac"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d + b"x" * 1500, "oversized"),
    (lambda d: b"XX" + d[2:], "bad_magic"),
])
def test_bad_datagrams_are_refused_with_a_reason(mutate, reason):
    data = wire.encode(KEY, wire.ACK, 1, 0, 5, 1, 6, wire.ack_body(C, 1))
    with pytest.raises(WireError) as e:
        wire.decode(KEY, mutate(data))
    assert e.value.reason == reason
    with pytest.raises(WireError, match="bad_hmac"):
        wire.decode(b"other" * 8, data)


def test_malformed_bodies():
    with pytest.raises(WireError, match="malformed"):
        wire.decode_body(wire.ACK, wire.ack_body(C, 1) + b"x")
    with pytest.raises(WireError, match="malformed"):
        wire.decode_body(ORDERED, wire.ordered_body(C, 0, 1, [(1, 1, 1, 1, b"abc")])[:-1])
    with pytest.raises(WireError, match="malformed"):
        wire.decode_body(wire.DATA, wire.data_body(C, [(1, 9, b"")]))  # no such service


def test_replay_guard():
    g = ReplayGuard(started_us=1000, me=3)
    now = 5000
    assert g.check(1, 0, 100, 1, 2000, now) is None
    assert g.check(1, 0, 100, 1, 2000, now) == "replay"
    assert g.check(1, 3, 100, 3, 2000, now) is None
    assert g.check(1, 0, 100, 2, 2000, now) is None          # a little out of order
    assert g.check(1, 2, 100, 4, 2000, now) == "misdirected"
    assert g.check(1, 0, 100, 5, 500, now) == "stale"         # sent before I started
    assert g.check(1, 0, 200, 1, 2000, now) is None           # a new incarnation
    assert g.check(1, 0, 100, 9, 2000, now) == "stale"        # the old one
    assert g.check(2, 0, 1, 1, now + int(60e6), now) == "stale"  # from the future


def test_a_daemon_client_that_does_not_read_is_dropped(monkeypatch):
    import socket

    from testbed.daemon import Loop
    from testbed.replication.gc import daemon as gcd

    class FakeDaemon:
        def __init__(self):
            self.loop, self.clients = Loop(), set()

    monkeypatch.setattr(gcd, "MAX_BACKLOG", 1 << 20)
    d = FakeDaemon()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c = gcd.Client(d, mine)
    d.clients.add(c)
    for _ in range(40):                         # 40 x 64 KiB, never read by the peer
        c.send(b"m" * 65536)
    assert not c.stream.open and c not in d.clients
    theirs.close()
    d.loop.close()
