"""testbed.daemon.datagrams: reading a socket dry (the failover daemons' loop callbacks)."""

import socket

import pytest

from testbed.daemon.datagrams import until_dry


def test_until_dry_yields_every_queued_datagram_then_stops():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        for m in (b"one", b"two", b"three"):
            a.send(m)
        assert list(until_dry(lambda: b.recv(64))) == [b"one", b"two", b"three"]
        assert list(until_dry(lambda: b.recv(64))) == []  # nothing queued: no wait


def test_until_dry_raises_other_errors_unless_quiet():
    def broken():
        raise OSError(100, "Network is down")

    with pytest.raises(OSError):
        list(until_dry(broken))
    assert list(until_dry(broken, quiet=True)) == []
