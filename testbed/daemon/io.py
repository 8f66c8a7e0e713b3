"""Stream-socket helpers shared by the daemons' wire protocols: recv_exact for blocking
readers, Stream for a connection served by a Loop."""

from __future__ import annotations

import selectors
import socket
from typing import Callable, Optional


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


class Stream:
    """A non-blocking stream socket served by a Loop: what arrives goes to on_data(bytes),
    send() queues and writes what the socket takes (the rest on the next write event), and
    the end of the connection (EOF, an error, or close()) calls on_close() once.
    on_drain(), if given, is called when a write event has emptied the queue (for a sender
    that refills it). `out` is what is still queued."""

    def __init__(self, loop, sock, on_data: Callable, on_close: Callable,
                 on_drain: Optional[Callable] = None):
        self.loop, self.sock, self.on_data, self.on_close = loop, sock, on_data, on_close
        self.on_drain = on_drain
        self.out = bytearray()
        self.open = True
        sock.setblocking(False)
        loop.add(sock, self._ready)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
            if self.open and not self.out and self.on_drain is not None:
                self.on_drain()
        if mask & selectors.EVENT_READ and self.open:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.on_data(data)

    def send(self, data: bytes) -> None:
        if self.open:
            self.out += data
            self.flush()

    def flush(self) -> None:
        while self.out and self.open:
            try:
                k = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self.out[:k]
        if self.open:
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
            self.loop.modify(self.sock, self._ready, ev)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.loop.remove(self.sock)
            self.sock.close()
            self.on_close()
