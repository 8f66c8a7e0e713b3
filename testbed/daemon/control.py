"""Control datagrams: one JSON request, one JSON reply, over a daemon's UNIX datagram socket.

The daemon binds `path` (bind_control) and answers each datagram to its sender's address;
a client (request) binds a temporary socket next to `path` so that the daemon can answer,
and removes it afterwards."""

from __future__ import annotations

import json
import os
import socket
import uuid

from testbed.daemon.files import remove_quietly

MAX_DATAGRAM = 65536


def bind_control(path: str) -> socket.socket:
    """A non-blocking UNIX datagram socket bound to path (a stale one is removed first);
    OSError saying which path if it cannot be bound."""
    remove_quietly(path)  # the socket of a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot create control socket {path}: {e}") from e
    sock.setblocking(False)
    return sock


def request(path: str, message: dict, timeout: float = 2.0, what: str = "daemon") -> dict:
    """Send `message` to the daemon at `path` and return its reply. TimeoutError ("no reply
    from WHAT PATH within T s") without one, OSError if the daemon's socket is missing."""
    client = os.path.join(os.path.dirname(os.path.abspath(path)),
                          f".ctl-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(client)
        sock.settimeout(timeout)
        sock.sendto(json.dumps(message).encode(), path)
        try:
            data = sock.recv(MAX_DATAGRAM)
        except socket.timeout:
            raise TimeoutError(f"no reply from {what} {path} within {timeout} s") from None
        return json.loads(data)
    finally:
        sock.close()
        remove_quietly(client)
