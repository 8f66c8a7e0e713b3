"""A socket's kernel queues, read with ioctls: what a sender has not yet seen acknowledged.

Used by daemons that pace themselves on the kernel's queue (the mirror's sender) and by
TCP_REPAIR's dump (the migration), so it lives below both. Standard library only."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B


def ioctl_int(sock: socket.socket, req: int) -> int:
    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]


def send_queue_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue: not yet sent, or sent and not yet acknowledged."""
    return ioctl_int(sock, SIOCOUTQ)


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes of the send queue not yet sent at all."""
    return ioctl_int(sock, SIOCOUTQNSD)


def receive_queue_bytes(sock: socket.socket) -> int:
    """Bytes received and not yet read."""
    return ioctl_int(sock, SIOCINQ)
