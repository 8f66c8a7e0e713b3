"""GroupClient: the client library of the standalone group communication daemon.

    c = GroupClient("/run/gc1.sock")
    c.join("db")                   # the daemon set's group (see below)
    c.multicast(b"...", SAFE)      # AGREED or SAFE, <= MAX_PAYLOAD bytes
    ev = c.receive(timeout=1.0)    # Delivery | Configuration | None on timeout

One group per daemon set: the group's name is in the daemons' configuration, every client
of every daemon of the set is in that one group, and joining another name is an error
(GroupError, with the daemon's reason). A client receives what is delivered from its
join on: first the current regular Configuration, then every Delivery and Configuration
in the EVS order the daemon's GroupNode gives them.

Frames on the UNIX stream socket, both ways: `len u32 | type u8 | body` (len counts type
and body). Client -> daemon: JOIN (group, UTF-8), MCAST (service u8 | payload). Daemon ->
client: JOINED, ERROR (UTF-8 reason), CONF (conf seq u32 | coord u16 | inc u64 |
transitional u8 | n u8 | n x member u16), MSG (sender u16 | service u8 | conf seq u32 |
coord u16 | inc u64 | in_transitional u8 | payload).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Optional, Union

from testbed.replication.gc.wire import (MAX_PAYLOAD, SAFE, SERVICES, ConfId, Configuration,
                                         Delivery)

F_JOIN, F_MCAST, F_JOINED, F_ERROR, F_CONF, F_MSG = range(1, 7)
FRAME = struct.Struct("!IB")
CONF_HEAD = struct.Struct("!IHQBB")
MSG_HEAD = struct.Struct("!HBIHQB")
MAX_FRAME = 64 * 1024


class GroupError(Exception):
    """The daemon refused (another group's name, a bad message) or went away."""


def frame(ftype: int, body: bytes = b"") -> bytes:
    return FRAME.pack(len(body) + 1, ftype) + body


def conf_frame(ev: Configuration) -> bytes:
    c = ev.conf_id
    return frame(F_CONF, CONF_HEAD.pack(c.seq, c.coord, c.inc, int(ev.transitional),
                                        len(ev.members))
                 + struct.pack(f"!{len(ev.members)}H", *ev.members))


def msg_frame(ev: Delivery) -> bytes:
    c = ev.conf_id
    return frame(F_MSG, MSG_HEAD.pack(ev.sender, ev.service, c.seq, c.coord, c.inc,
                                      int(ev.in_transitional)) + ev.payload)


def parse_frames(buf: bytearray) -> list:
    """Complete frames (type, body) taken off the front of buf."""
    out = []
    while len(buf) >= FRAME.size:
        n, ftype = FRAME.unpack_from(buf)
        if n < 1 or n > MAX_FRAME:
            raise GroupError(f"bad frame length {n}")
        if len(buf) < 4 + n:
            break
        out.append((ftype, bytes(buf[5:4 + n])))
        del buf[:4 + n]
    return out


def decode_event(ftype: int, body: bytes) -> Union[Configuration, Delivery]:
    if ftype == F_CONF:
        seq, coord, inc, trans, n = CONF_HEAD.unpack_from(body)
        members = struct.unpack_from(f"!{n}H", body, CONF_HEAD.size)
        return Configuration(ConfId(seq, coord, inc), tuple(members), bool(trans))
    sender, service, seq, coord, inc, trans = MSG_HEAD.unpack_from(body)
    return Delivery(sender, service, body[MSG_HEAD.size:], ConfId(seq, coord, inc),
                    bool(trans))


class GroupClient:
    """See the module's docstring."""

    def __init__(self, socket_path: str, connect_timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as e:
            self.sock.close()
            raise GroupError(f"cannot connect to {socket_path}: {e}") from None
        self.sock.settimeout(None)
        self.buf = bytearray()
        self.events: list = []
        self.group: Optional[str] = None

    def join(self, group: str, timeout: float = 5.0) -> None:
        self.sock.sendall(frame(F_JOIN, group.encode()))
        deadline = time.monotonic() + timeout
        while True:
            for ftype, body in self._read(max(0.0, deadline - time.monotonic())):
                if ftype == F_JOINED:
                    self.group = group
                elif ftype == F_ERROR:
                    raise GroupError(body.decode(errors="replace"))
                else:
                    self.events.append(decode_event(ftype, body))
            if self.group == group:
                return
            if time.monotonic() >= deadline:
                raise GroupError(f"no answer to joining {group!r} within {timeout} s")

    def multicast(self, data: bytes, service: int = SAFE) -> None:
        if self.group is None:
            raise GroupError("join a group first")
        if service not in SERVICES:
            raise ValueError(f"service must be one of {SERVICES}")
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
        self.sock.sendall(frame(F_MCAST, bytes([service]) + bytes(data)))

    def receive(self, timeout: Optional[float] = None):
        """The next Delivery or Configuration, or None if none came within timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            for ftype, body in self._read(left):
                if ftype == F_ERROR:
                    raise GroupError(body.decode(errors="replace"))
                self.events.append(decode_event(ftype, body))
            if not self.events and deadline is not None and time.monotonic() >= deadline:
                return None
        return self.events.pop(0)

    def _read(self, timeout: Optional[float]) -> list:
        frames = parse_frames(self.buf)
        if frames:
            return frames
        r, _, _ = select.select([self.sock], [], [], timeout)
        if r:
            data = self.sock.recv(1 << 16)
            if not data:
                raise GroupError("the daemon closed the connection")
            self.buf += data
        return parse_frames(self.buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "GroupClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
