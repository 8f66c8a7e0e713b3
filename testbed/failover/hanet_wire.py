"""HANet's packet-transmission-agent (PTA) messages, declared once. Pure: no sockets, no
clocks (the caller passes the time).

A server whose public interface failed asks its sibling, over the private link it has just
made active, to take over its packet transmission (TAKEOVER); when its public link returns it
asks the sibling to give the job back (RELEASE). Each request is answered (ACK). UDP, as in
the paper: a TCP handshake cannot complete while the server's routes are being switched.

Every message is one UDP datagram

    header (28 bytes) | body (by type) | tag (16 bytes)

    header := magic u16 (0x484E, "HN") | version u8 | type u8 | sender u16 | flags u16 |
              inc u64 | seq u32 | ts_us u64
    tag    := HMAC-SHA256(key, header + body)[:16]

- `sender` is the daemon's id (1..65535).
- `inc` is the sender's incarnation (its start time in microseconds); `seq` counts its
  messages from 1 within an incarnation. A receiver keeps, per sender, the highest
  incarnation seen and a window over seq (`ReplayGuard`): an older incarnation, or a seq
  already seen or below the window, is a replay.
- `ts_us` is the sender's wall clock when it sent the message. A receiver drops messages
  sent before it started (nothing captured earlier can be replayed to a daemon that has just
  restarted and has no replay state yet) or more than `max_age_s` old or ahead of its own
  clock (the daemons of one testbed share the host's clock).
- `flags` is 0 (reserved).

Bodies (IPv4 addresses as u32, big-endian):

    TAKEOVER      req u32 | service_ip u32 | via_ip u32 | speed_kbit u32 | n u8 | link name
                  (n <= 15 ASCII bytes): "carry the packets of service_ip; reach me at via_ip,
                  my address on the link named `link`"                          17 + n bytes
    RELEASE       req u32 | service_ip u32: "my public link is back: stop"           8 bytes
    ACK           req u32 | status u8 | t_recv_us u64 | t_done_us u64: the answer to request
                  req, with the sibling's clock when it received the request and when it had
                  finished (for TAKEOVER: when its first gratuitous ARP had left)    21 bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.sealed import (TAG_LEN, ReplayWindow, WireError, check_size, int_to_ip,
                            ip_to_int, tag, verify)

MAGIC = 0x484E
VERSION = 1
TAKEOVER, RELEASE, ACK = 1, 2, 3
TYPE_NAMES = {TAKEOVER: "takeover", RELEASE: "release", ACK: "ack"}

# ACK status
OK, NO_PUBLIC, REFUSED = 0, 1, 2
STATUS_NAMES = {OK: "ok", NO_PUBLIC: "no_public", REFUSED: "refused"}

HEADER = struct.Struct("!HBBHHQIQ")
TAKEOVER_HEAD = struct.Struct("!IIIIB")
RELEASE_BODY = struct.Struct("!II")
ACK_BODY = struct.Struct("!IBQQ")

HEADER_LEN = HEADER.size  # 28
MIN_MESSAGE = HEADER_LEN + TAG_LEN
MAX_NAME = 15
MAX_MESSAGE = HEADER_LEN + TAKEOVER_HEAD.size + MAX_NAME + TAG_LEN  # 76
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# why a message was dropped: every reason is a counter in the daemon's status
DROP_REASONS = ("oversized", "truncated", "bad_magic", "bad_version", "bad_hmac",
                "unknown_type", "malformed", "unknown_sender", "replay", "stale")


@dataclass(frozen=True)
class Header:
    type: int
    sender: int
    inc: int
    seq: int
    ts_us: int
    flags: int = 0
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.type, self.sender, self.flags,
                           self.inc & MASK64, self.seq & MASK32, self.ts_us & MASK64)


@dataclass(frozen=True)
class Takeover:
    TYPE = TAKEOVER
    req: int
    service_ip: str
    via_ip: str
    speed_kbit: int
    link: str

    def pack(self) -> bytes:
        name = self.link.encode("ascii")
        if len(name) > MAX_NAME:
            raise ValueError(f"link name {self.link!r} is longer than {MAX_NAME} bytes")
        return TAKEOVER_HEAD.pack(self.req & MASK32, ip_to_int(self.service_ip),
                                  ip_to_int(self.via_ip), min(self.speed_kbit, MASK32),
                                  len(name)) + name

    @classmethod
    def unpack(cls, body: bytes) -> "Takeover":
        if len(body) < TAKEOVER_HEAD.size:
            raise WireError("malformed", "short takeover")
        req, sip, via, kbit, n = TAKEOVER_HEAD.unpack_from(body, 0)
        name = body[TAKEOVER_HEAD.size:]
        if n > MAX_NAME or len(name) != n:
            raise WireError("malformed", "takeover link name length")
        try:
            link = name.decode("ascii")
        except UnicodeDecodeError:
            raise WireError("malformed", "takeover link name not ASCII") from None
        return cls(req, int_to_ip(sip), int_to_ip(via), kbit, link)


@dataclass(frozen=True)
class Release:
    TYPE = RELEASE
    req: int
    service_ip: str

    def pack(self) -> bytes:
        return RELEASE_BODY.pack(self.req & MASK32, ip_to_int(self.service_ip))

    @classmethod
    def unpack(cls, body: bytes) -> "Release":
        if len(body) != RELEASE_BODY.size:
            raise WireError("malformed", "release size")
        req, sip = RELEASE_BODY.unpack(body)
        return cls(req, int_to_ip(sip))


@dataclass(frozen=True)
class Ack:
    TYPE = ACK
    req: int
    status: int
    t_recv_us: int
    t_done_us: int

    def pack(self) -> bytes:
        return ACK_BODY.pack(self.req & MASK32, self.status, self.t_recv_us & MASK64,
                             self.t_done_us & MASK64)

    @classmethod
    def unpack(cls, body: bytes) -> "Ack":
        if len(body) != ACK_BODY.size:
            raise WireError("malformed", "ack size")
        req, status, t_recv, t_done = ACK_BODY.unpack(body)
        if status not in STATUS_NAMES:
            raise WireError("malformed", f"ack status {status}")
        return cls(req, status, t_recv, t_done)


BODIES = {TAKEOVER: Takeover, RELEASE: Release, ACK: Ack}


def encode(key: bytes, header: Header, body) -> bytes:
    """One sealed datagram: header + body + tag."""
    if header.type != body.TYPE:
        raise ValueError(f"header type {header.type} does not match body {type(body).__name__}")
    msg = header.pack() + body.pack()
    return msg + tag(key, msg)


def decode(key: bytes, data: bytes) -> tuple:
    """Check and parse one datagram: (Header, body). Raises WireError (size, magic, version,
    tag, type, body) before anything in it is believed."""
    n = len(data)
    check_size(n, MIN_MESSAGE, MAX_MESSAGE)
    magic, version, typ, sender, flags, inc, seq, ts = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise WireError("bad_magic", hex(magic))
    if version != VERSION:
        raise WireError("bad_version", str(version))
    verify(key, data, n)
    if typ not in BODIES:
        raise WireError("unknown_type", str(typ))
    body = BODIES[typ].unpack(data[HEADER_LEN:n - TAG_LEN])
    return Header(typ, sender, inc, seq, ts, flags, version), body


class ReplayGuard:
    """Per sender: accept each (incarnation, seq) once. A newer incarnation resets the
    window; an older one is a replay. Within an incarnation, seqs above the highest seen or
    within `window` below it and not seen yet are accepted (IPsec's anti-replay bitmap).
    Messages stamped before this receiver started, or older than max_age_s, or more than
    max_age_s ahead of its clock, are stale."""

    def __init__(self, started_us: int, max_age_s: float = 5.0, window: int = 256):
        self.started_us = started_us
        self.max_age_us = int(max_age_s * 1e6)
        self.window = window
        self._state: dict = {}  # sender -> (inc, ReplayWindow)

    def check(self, header: Header, now_us: int) -> None:
        """Raise WireError('stale' or 'replay') unless the message is fresh; record it."""
        ts = header.ts_us
        if ts < self.started_us or ts < now_us - self.max_age_us or ts > now_us + self.max_age_us:
            raise WireError("stale", f"ts {ts} now {now_us}")
        st = self._state.get(header.sender)
        if st is None or header.inc > st[0]:
            st = self._state[header.sender] = (header.inc, ReplayWindow(self.window))
        elif header.inc < st[0]:
            raise WireError("replay", "older incarnation")
        if not st[1].accept(header.seq):
            raise WireError("replay", f"seq {header.seq}")

__all__ = ["Header", "Takeover", "Release", "Ack", "encode", "decode", "ReplayGuard",
           "WireError", "TAKEOVER", "RELEASE", "ACK", "OK", "NO_PUBLIC", "REFUSED",
           "DROP_REASONS", "STATUS_NAMES", "TYPE_NAMES"]
