"""The group communication's datagrams, declared once. Pure: no sockets, no clocks.

Every datagram is one UDP datagram on the daemons' LAN port:

    header (28 bytes) | body (by type) | tag (16 bytes)

    header := magic u16 (0x4743, "GC") | version u8 | type u8 | sender u16 | dest u16 |
              inc u64 | seq u32 | ts_us u64
    tag    := HMAC-SHA256(key, header + body)[:16]          (testbed.sealed)

- `sender` is the daemon's id (1..65535), `dest` the member a unicast is for or 0 for a
  broadcast; a receiver drops a datagram addressed to another member ('misdirected').
- `inc` is the sender's incarnation (its start time in µs); `seq` counts every datagram the
  sender sends in that incarnation, from 1, over all destinations. A receiver keeps one
  `ReplayWindow` per (sender, incarnation): a window (not a strictly increasing number), as
  broadcasts and unicasts of one sender may overtake each other by a little. A datagram of
  an incarnation older than the newest one seen from that sender is 'stale'.
- `ts_us` is the sender's wall clock at sending: a receiver drops datagrams sent before it
  started itself (nothing captured earlier can be replayed to a daemon that has just
  restarted with no replay state) or more than `MAX_AGE_S` away from its own clock.

Bodies (big-endian; CONF := conf_seq u32 | coord u16 | cinc u64, a configuration id):

    HEARTBEAT CONF | flags u8 (1 installed, 2 sequencer) | high u32 | safe u32
    DATA      CONF | n u16 | n x (counter u32 | service u8 | len u16 | payload)
              a member's messages to the sequencer (unicast), `counter` per configuration
    ORDERED   CONF | safe u32 | high u32 | n u16 |
              n x (seq u32 | sender u16 | counter u32 | service u8 | len u16 | payload)
              the sequencer's ordered messages (broadcast; retransmissions by unicast)
    ACK       CONF | aru u32                 the highest seq up to which the sender has all
    NACK      CONF | n u16 | n x (first u32 | last u32)       seq ranges the sender lacks
    JOIN      CONF (old regular) | top u32 | n u8 | n x member u16 | HOLD
              HOLD := aru u32 | k u8 | k x (first u32 | last u32)  (what it holds of CONF)
    COMMIT    CONF (new) | n u8 | n x (member u16 | CONF (its old) | HOLD)
    RECOVERED CONF (new)
    INSTALL   CONF (new)

`top` in JOIN is the highest configuration seq the sender has seen (the new one is above
every member's). Messages are plain tuples on the hot path (DATA, ORDERED, ACK, NACK).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from testbed.sealed import TAG_LEN, ReplayWindow, WireError, check_size, tag, verify

MAGIC = 0x4743
VERSION = 1
(HEARTBEAT, DATA, ORDERED, ACK, NACK, JOIN, COMMIT, RECOVERED, INSTALL) = range(1, 10)
TYPE_NAMES = {HEARTBEAT: "heartbeat", DATA: "data", ORDERED: "ordered", ACK: "ack",
              NACK: "nack", JOIN: "join", COMMIT: "commit", RECOVERED: "recovered",
              INSTALL: "install"}
MEMBERSHIP_TYPES = (HEARTBEAT, JOIN, COMMIT, RECOVERED, INSTALL)
BROADCAST = 0

AGREED, SAFE = 1, 2
SERVICES = (AGREED, SAFE)

HEADER = struct.Struct("!HBBHHQIQ")
CONF = struct.Struct("!IHQ")
HB = struct.Struct("!IHQBII")
CONF_N = struct.Struct("!IHQH")
DATA_ITEM = struct.Struct("!IBH")
ORD_HEAD = struct.Struct("!IHQIIH")
ORD_ITEM = struct.Struct("!IHIBH")
ACK_BODY = struct.Struct("!IHQI")
RANGE = struct.Struct("!II")
HOLD_HEAD = struct.Struct("!IB")
JOIN_HEAD = struct.Struct("!IHQIB")
U16 = struct.Struct("!H")
U8 = struct.Struct("!B")

HEADER_LEN = HEADER.size  # 28
MIN_MESSAGE = HEADER_LEN + TAG_LEN
MAX_MESSAGE = 1472  # the UDP payload of one 1500-byte IPv4 packet
MAX_PAYLOAD = 1200
MAX_RANGES = 40
MAX_ID = 65535
MAX_AGE_S = 10.0
HF_INSTALLED, HF_SEQUENCER = 1, 2

# room for messages in one DATA / ORDERED datagram
DATA_ROOM = MAX_MESSAGE - HEADER_LEN - TAG_LEN - CONF_N.size
ORDERED_ROOM = MAX_MESSAGE - HEADER_LEN - TAG_LEN - ORD_HEAD.size

DROP_REASONS = ("truncated", "oversized", "bad_magic", "bad_version", "bad_hmac",
                "unknown_type", "unknown_sender", "misdirected", "stale", "replay",
                "malformed")


@dataclass(frozen=True, order=True)
class ConfId:
    """A configuration's identity, totally ordered: its number, then the representative
    that formed it, then that representative's incarnation."""

    seq: int
    coord: int
    inc: int


@dataclass(frozen=True)
class Configuration:
    """An installed configuration: regular, or the transitional one that precedes it."""

    conf_id: ConfId
    members: tuple
    transitional: bool


@dataclass(frozen=True)
class Delivery:
    """A message delivered in configuration `conf_id` (in its transitional configuration
    if `in_transitional`)."""

    sender: int
    service: int
    payload: bytes
    conf_id: ConfId
    in_transitional: bool = False


@dataclass(frozen=True)
class Hold:
    """What a member holds of its old configuration's messages: all up to `aru`, and the
    seq ranges `extra` above it."""

    aru: int
    extra: tuple = ()

    def covers(self, s: int) -> bool:
        return s <= self.aru or any(a <= s <= b for a, b in self.extra)

    def pack(self) -> bytes:
        extra = self.extra[:MAX_RANGES]
        return HOLD_HEAD.pack(self.aru, len(extra)) + b"".join(RANGE.pack(a, b)
                                                                for a, b in extra)

    @classmethod
    def unpack_from(cls, buf, off: int) -> tuple:
        aru, k = HOLD_HEAD.unpack_from(buf, off)
        off += HOLD_HEAD.size
        extra = tuple(RANGE.unpack_from(buf, off + RANGE.size * i) for i in range(k))
        return cls(aru, extra), off + RANGE.size * k


@dataclass(frozen=True)
class Join:
    old: ConfId
    top: int
    members: tuple
    hold: Hold

    def pack(self) -> bytes:
        o = self.old
        return (JOIN_HEAD.pack(o.seq, o.coord, o.inc, self.top, len(self.members))
                + b"".join(U16.pack(m) for m in self.members) + self.hold.pack())


@dataclass(frozen=True)
class Commit:
    conf: ConfId
    entries: tuple  # (member, old ConfId, Hold), by member

    @property
    def members(self) -> tuple:
        return tuple(e[0] for e in self.entries)

    def pack(self) -> bytes:
        c = self.conf
        out = [CONF.pack(c.seq, c.coord, c.inc), U8.pack(len(self.entries))]
        for m, old, hold in self.entries:
            out.append(U16.pack(m) + CONF.pack(old.seq, old.coord, old.inc) + hold.pack())
        return b"".join(out)


# bodies ---------------------------------------------------------------------------------------

def heartbeat_body(conf: ConfId, flags: int, high: int, safe: int) -> bytes:
    return HB.pack(conf.seq, conf.coord, conf.inc, flags, high, safe)


def data_body(conf: ConfId, items) -> bytes:
    """items: (counter, service, payload)."""
    out = [CONF_N.pack(conf.seq, conf.coord, conf.inc, len(items))]
    for c, service, payload in items:
        out.append(DATA_ITEM.pack(c, service, len(payload)))
        out.append(payload)
    return b"".join(out)


def ordered_body(conf: ConfId, safe: int, high: int, items) -> bytes:
    """items: (seq, sender, counter, service, payload)."""
    out = [ORD_HEAD.pack(conf.seq, conf.coord, conf.inc, safe, high, len(items))]
    for s, sender, c, service, payload in items:
        out.append(ORD_ITEM.pack(s, sender, c, service, len(payload)))
        out.append(payload)
    return b"".join(out)


def ack_body(conf: ConfId, aru: int) -> bytes:
    return ACK_BODY.pack(conf.seq, conf.coord, conf.inc, aru)


def nack_body(conf: ConfId, ranges) -> bytes:
    ranges = list(ranges)[:MAX_RANGES]
    return CONF_N.pack(conf.seq, conf.coord, conf.inc, len(ranges)) + b"".join(
        RANGE.pack(a, b) for a, b in ranges)


def conf_body(conf: ConfId) -> bytes:
    return CONF.pack(conf.seq, conf.coord, conf.inc)


def data_item_size(payload: bytes) -> int:
    return DATA_ITEM.size + len(payload)


def ordered_item_size(payload: bytes) -> int:
    return ORD_ITEM.size + len(payload)


def decode_body(mtype: int, b):
    """The body as a tuple (hot path) or message object; WireError('malformed')."""
    try:
        if mtype == ORDERED:
            cs, cc, ci, safe, high, n = ORD_HEAD.unpack_from(b)
            off = ORD_HEAD.size
            items = []
            for _ in range(n):
                s, sender, c, service, ln = ORD_ITEM.unpack_from(b, off)
                off += ORD_ITEM.size
                payload = bytes(b[off:off + ln])
                if len(payload) != ln:
                    raise WireError("malformed", "ordered item cut short")
                off += ln
                items.append((s, sender, c, service, payload))
            _end(b, off)
            return ConfId(cs, cc, ci), safe, high, items
        if mtype == DATA:
            cs, cc, ci, n = CONF_N.unpack_from(b)
            off = CONF_N.size
            items = []
            for _ in range(n):
                c, service, ln = DATA_ITEM.unpack_from(b, off)
                off += DATA_ITEM.size
                payload = bytes(b[off:off + ln])
                if len(payload) != ln or service not in SERVICES:
                    raise WireError("malformed", "data item")
                off += ln
                items.append((c, service, payload))
            _end(b, off)
            return ConfId(cs, cc, ci), items
        if mtype == ACK:
            _end(b, ACK_BODY.size)
            cs, cc, ci, aru = ACK_BODY.unpack(b)
            return ConfId(cs, cc, ci), aru
        if mtype == HEARTBEAT:
            _end(b, HB.size)
            cs, cc, ci, flags, high, safe = HB.unpack(b)
            return ConfId(cs, cc, ci), flags, high, safe
        if mtype == NACK:
            cs, cc, ci, n = CONF_N.unpack_from(b)
            _end(b, CONF_N.size + RANGE.size * n)
            ranges = [RANGE.unpack_from(b, CONF_N.size + RANGE.size * i) for i in range(n)]
            return ConfId(cs, cc, ci), ranges
        if mtype in (RECOVERED, INSTALL):
            _end(b, CONF.size)
            return ConfId(*CONF.unpack(b))
        if mtype == JOIN:
            cs, cc, ci, top, n = JOIN_HEAD.unpack_from(b)
            off = JOIN_HEAD.size
            members = struct.unpack_from(f"!{n}H", b, off)
            hold, off = Hold.unpack_from(b, off + 2 * n)
            _end(b, off)
            if list(members) != sorted(set(members)) or 0 in members:
                raise WireError("malformed", "join members must be distinct ids in order")
            return Join(ConfId(cs, cc, ci), top, tuple(members), hold)
        if mtype == COMMIT:
            conf = ConfId(*CONF.unpack_from(b))
            (n,) = U8.unpack_from(b, CONF.size)
            off = CONF.size + 1
            entries = []
            for _ in range(n):
                (m,) = U16.unpack_from(b, off)
                old = ConfId(*CONF.unpack_from(b, off + 2))
                hold, off = Hold.unpack_from(b, off + 2 + CONF.size)
                entries.append((m, old, hold))
            _end(b, off)
            if [e[0] for e in entries] != sorted({e[0] for e in entries}):
                raise WireError("malformed", "commit members must be distinct ids in order")
            return Commit(conf, tuple(entries))
    except struct.error as e:
        raise WireError("malformed", str(e)) from None
    raise WireError("unknown_type", str(mtype))


def _end(b, off: int) -> None:
    if len(b) != off:
        raise WireError("malformed", f"body of {len(b)} bytes, expected {off}")


# datagrams ------------------------------------------------------------------------------------

def encode(key: bytes, mtype: int, sender: int, dest: int, inc: int, seq: int, ts_us: int,
           body: bytes) -> bytes:
    data = HEADER.pack(MAGIC, VERSION, mtype, sender, dest, inc, seq, ts_us) + body
    if len(data) + TAG_LEN > MAX_MESSAGE:
        raise ValueError(f"datagram of {len(data) + TAG_LEN} bytes exceeds {MAX_MESSAGE}")
    return data + tag(key, data)


def decode(key: bytes, data) -> tuple:
    """((type, sender, dest, inc, seq, ts_us), body) of an authenticated datagram; raises
    WireError. Replay and freshness are the receiver's business (ReplayGuard)."""
    n = len(data)
    check_size(n, MIN_MESSAGE, MAX_MESSAGE)
    magic, version, mtype, sender, dest, inc, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad_magic", hex(magic))
    if version != VERSION:
        raise WireError("bad_version", str(version))
    verify(key, data, n)
    if mtype not in TYPE_NAMES:
        raise WireError("unknown_type", str(mtype))
    return (mtype, sender, dest, inc, seq, ts), decode_body(
        mtype, memoryview(data)[HEADER_LEN:n - TAG_LEN])


class ReplayGuard:
    """Replay and freshness check of authenticated headers at member `me`: check() returns
    None if fresh, else the drop reason ('misdirected', 'stale' or 'replay')."""

    def __init__(self, started_us: int, me: int, max_age_s: float = MAX_AGE_S,
                 window: int = 1024):
        self.started_us = started_us
        self.me = me
        self.max_age_us = int(max_age_s * 1e6)
        self.window = window
        self.senders: dict = {}  # sender -> (inc, ReplayWindow)

    def check(self, sender: int, dest: int, inc: int, seq: int, ts_us: int,
              now_us: int) -> Optional[str]:
        if dest not in (BROADCAST, self.me):
            return "misdirected"
        if ts_us < self.started_us or abs(now_us - ts_us) > self.max_age_us:
            return "stale"
        if seq <= 0:
            return "replay"
        known = self.senders.get(sender)
        if known is None or inc > known[0]:
            known = (inc, ReplayWindow(self.window))
            self.senders[sender] = known
        elif inc < known[0]:
            return "stale"
        return None if known[1].accept(seq) else "replay"
