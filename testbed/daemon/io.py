"""Stream-socket helpers shared by the daemons' wire protocols."""

from __future__ import annotations

import socket


class PeerClosed(ConnectionError):
    """The peer closed the stream before a whole message arrived."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from a stream socket; PeerClosed if it ends first (the message
    says how much of the n came)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)
