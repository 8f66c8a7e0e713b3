"""Wackamole's messages, declared once: daemon <-> daemon over UDP on the servers' LAN.
Pure: no sockets, no clocks (the caller passes the time).

Every message is one UDP datagram

    header (28 bytes) | body (by type) | tag (16 bytes)

    header := magic u16 (0x574B, "WK") | version u8 | type u8 | sender u16 | dest u16 |
              inc u64 | seq u32 | ts_us u64
    tag    := HMAC-SHA256(key, header + body)[:16]

- `sender` is the daemon's id (1..65535; its place in the membership order).
- `dest` is the member the message is for, or 0 for every member (sent to the segment's
  broadcast address). A receiver drops a message for another member ('misdirected'), so
  a unicast message captured on its way to one member cannot be replayed to another.
- `inc` is the sender's incarnation: its start time in microseconds. `seq` counts the
  sender's messages from 1 within the incarnation, separately per `dest` (one counter for
  broadcasts, one per member for unicasts). A receiver keeps, per sender and channel
  (broadcast, or to itself), the highest incarnation seen and the highest seq
  (`ReplayGuard`): a message of an older incarnation, or a seq not above the highest seen,
  is a replay. Strictly increasing rather than a window: within one channel the LAN keeps
  a sender's datagrams in order (a unicast waiting for ARP resolution can be overtaken by
  a broadcast: hence the separate channels), so nothing legitimate is lost.
- `ts_us` is the sender's wall clock when it sent the message. A receiver drops messages
  sent before it started itself (so nothing captured earlier can be replayed to a daemon
  that has just restarted and has no replay state yet) or more than `max_age_s` old or
  ahead of its own clock (all daemons of a testbed share one host clock).

Bodies (u16 ids, u32 IPv4 addresses, all big-endian):

    VID       vid u32 | coord u16 | cinc u64                         a view's identity: its
              number, the member that proposed it and that member's incarnation
    VIEW      VID | n u8 | n x member u16                            a view: 15 + 2n bytes
    HEARTBEAT VIEW | vflags u8 (1: installed, 2: mature)             "I am alive, in VIEW"
    PROPOSE   VIEW                                                   coord proposes VIEW
    ACK       VID                                                    a member accepts it
    INSTALL   VIEW                                                   every member acked
    LEAVE     VIEW                                                   sender leaves (its view)
    STATE     VID | sflags u8 (1: mature) | prev u8 | n u16 | n x vip u32
              the VIPs the sender held when view VID began, and the size of the
              view those holdings were valid in (conflicts go to the larger component)
    BALANCE   VID | bseq u32 | n u16 | n x (vip u32 | owner u16)
              the representative's new allocation in view VID
    RELEASED  VID | bseq u32 | n u16 | n x vip u32                   (after a BALANCE)
    ARP_SHARE n u16 | n x (ip u32 | mac 6 bytes)                     neighbours it has seen
    DRAIN     VID                                  sender is leaving: move its VIPs away
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from testbed.sealed import (TAG_LEN, ReplayWindow, WireError, check_size, int_to_ip,
                            ip_to_int, tag, verify)

MAGIC = 0x574B
VERSION = 1
(HEARTBEAT, PROPOSE, ACK, INSTALL, LEAVE, STATE, BALANCE, RELEASED, ARP_SHARE,
 DRAIN) = range(1, 11)
TYPE_NAMES = {HEARTBEAT: "heartbeat", PROPOSE: "propose", ACK: "ack", INSTALL: "install",
              LEAVE: "leave", STATE: "state", BALANCE: "balance", RELEASED: "released",
              ARP_SHARE: "arp_share", DRAIN: "drain"}
MEMBERSHIP_TYPES = (HEARTBEAT, PROPOSE, ACK, INSTALL, LEAVE)

HEADER = struct.Struct("!HBBHHQIQ")
VID = struct.Struct("!IHQ")
VIEW_HEAD = struct.Struct("!IHQB")
ACK_BODY = VID
STATE_HEAD = struct.Struct("!IHQBBH")
TABLE_HEAD = struct.Struct("!IHQIH")  # BALANCE and RELEASED
COUNT = struct.Struct("!H")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
OWNED = struct.Struct("!IH")
NEIGH = struct.Struct("!I6s")

HEADER_LEN = HEADER.size  # 28
MIN_MESSAGE = HEADER_LEN + TAG_LEN
MAX_MESSAGE = 1472  # the UDP payload of one 1500-byte IPv4 packet
MAX_MEMBERS = 255
MAX_ID = 65535

VF_INSTALLED, VF_MATURE = 1, 2
SF_MATURE = 1

# why a datagram was dropped: each is a counter in the daemon's status
DROP_REASONS = ("truncated", "oversized", "bad_magic", "bad_version", "bad_hmac",
                "unknown_type", "unknown_sender", "misdirected", "stale", "replay",
                "malformed")


# messages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """A membership view: its number, the member that proposed it (and that member's
    incarnation, so that a restarted member's views never reuse an identity), the members
    in order."""

    vid: int
    coord: int
    members: tuple
    inc: int = 0

    @property
    def key(self) -> tuple:
        """Views are ordered by number, then by the lower coordinator (concurrent proposals),
        then by the coordinator's later incarnation."""
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        if len(self.members) > MAX_MEMBERS:
            raise ValueError(f"a view holds at most {MAX_MEMBERS} members")
        return VIEW_HEAD.pack(self.vid, self.coord, self.inc, len(self.members)) + b"".join(
            U16.pack(m) for m in self.members)

    @classmethod
    def unpack_from(cls, buf, off: int = 0) -> tuple:
        vid, coord, inc, n = VIEW_HEAD.unpack_from(buf, off)
        off += VIEW_HEAD.size
        if len(buf) < off + 2 * n:
            raise WireError("malformed", "view members cut short")
        members = struct.unpack_from(f"!{n}H", buf, off)
        off += 2 * n
        if list(members) != sorted(set(members)) or 0 in members:
            raise WireError("malformed", "view members must be distinct ids in order")
        return cls(vid, coord, tuple(members), inc), off


NO_KEY = (-1, 0, 0)  # below every view's key


@dataclass(frozen=True)
class Heartbeat:
    view: View
    installed: bool = True
    mature: bool = False
    type = HEARTBEAT

    def pack(self) -> bytes:
        return self.view.pack() + bytes([(VF_INSTALLED if self.installed else 0)
                                         | (VF_MATURE if self.mature else 0)])


@dataclass(frozen=True)
class Propose:
    view: View
    type = PROPOSE

    def pack(self) -> bytes:
        return self.view.pack()


@dataclass(frozen=True)
class Ack:
    vid: int
    coord: int
    inc: int = 0
    type = ACK

    @property
    def key(self) -> tuple:
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        return ACK_BODY.pack(self.vid, self.coord, self.inc)


@dataclass(frozen=True)
class Install:
    view: View
    type = INSTALL

    def pack(self) -> bytes:
        return self.view.pack()


@dataclass(frozen=True)
class Leave:
    view: View
    type = LEAVE

    def pack(self) -> bytes:
        return self.view.pack()


@dataclass(frozen=True)
class State:
    vid: int
    coord: int
    held: tuple  # VIPs as dotted strings, sorted by address
    mature: bool = False
    prev_size: int = 0
    inc: int = 0
    type = STATE

    @property
    def key(self) -> tuple:
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        return STATE_HEAD.pack(self.vid, self.coord, self.inc, SF_MATURE if self.mature else 0,
                               min(self.prev_size, 255), len(self.held)) + b"".join(
            U32.pack(ip_to_int(v)) for v in self.held)


@dataclass(frozen=True)
class Balance:
    vid: int
    coord: int
    bseq: int
    table: tuple  # ((vip, owner), ...) in VIP order
    inc: int = 0
    type = BALANCE

    @property
    def key(self) -> tuple:
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        return TABLE_HEAD.pack(self.vid, self.coord, self.inc, self.bseq,
                               len(self.table)) + b"".join(
            OWNED.pack(ip_to_int(v), o) for v, o in self.table)


@dataclass(frozen=True)
class Released:
    vid: int
    coord: int
    bseq: int
    vips: tuple
    inc: int = 0
    type = RELEASED

    @property
    def key(self) -> tuple:
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        return TABLE_HEAD.pack(self.vid, self.coord, self.inc, self.bseq,
                               len(self.vips)) + b"".join(
            U32.pack(ip_to_int(v)) for v in self.vips)


@dataclass(frozen=True)
class ArpShare:
    entries: tuple  # ((ip, "aa:bb:cc:dd:ee:ff"), ...)
    type = ARP_SHARE

    def pack(self) -> bytes:
        return COUNT.pack(len(self.entries)) + b"".join(
            NEIGH.pack(ip_to_int(ip), bytes.fromhex(mac.replace(":", "")))
            for ip, mac in self.entries)


MAX_ARP_ENTRIES = (MAX_MESSAGE - MIN_MESSAGE - COUNT.size) // NEIGH.size


@dataclass(frozen=True)
class Drain:
    """A member about to leave asks the representative of view VID to move its VIPs to
    the others first, so that each changes hands with one message (RELEASED)."""

    vid: int
    coord: int
    inc: int = 0
    type = DRAIN

    @property
    def key(self) -> tuple:
        return (self.vid, -self.coord, self.inc)

    def pack(self) -> bytes:
        return VID.pack(self.vid, self.coord, self.inc)


def _ips(buf, off: int, n: int) -> tuple:
    if len(buf) != off + 4 * n:
        raise WireError("malformed", "address list length")
    return tuple(int_to_ip(x) for x in struct.unpack_from(f"!{n}I", buf, off))


def decode_body(mtype: int, body: bytes):
    """The message object of a body; raises WireError('malformed') if it does not parse."""
    try:
        if mtype in (HEARTBEAT, PROPOSE, INSTALL, LEAVE):
            view, off = View.unpack_from(body)
            if mtype == HEARTBEAT:
                if len(body) != off + 1:
                    raise WireError("malformed", "heartbeat length")
                f = body[off]
                return Heartbeat(view, bool(f & VF_INSTALLED), bool(f & VF_MATURE))
            if len(body) != off:
                raise WireError("malformed", "view length")
            return {PROPOSE: Propose, INSTALL: Install, LEAVE: Leave}[mtype](view)
        if mtype in (ACK, DRAIN):
            if len(body) != VID.size:
                raise WireError("malformed", "view id length")
            return (Ack if mtype == ACK else Drain)(*VID.unpack(body))
        if mtype == STATE:
            vid, coord, inc, f, prev, n = STATE_HEAD.unpack_from(body)
            return State(vid, coord, _ips(body, STATE_HEAD.size, n), bool(f & SF_MATURE), prev,
                         inc)
        if mtype in (BALANCE, RELEASED):
            vid, coord, inc, bseq, n = TABLE_HEAD.unpack_from(body)
            off = TABLE_HEAD.size
            if mtype == RELEASED:
                return Released(vid, coord, bseq, _ips(body, off, n), inc)
            if len(body) != off + OWNED.size * n:
                raise WireError("malformed", "balance length")
            table = tuple((int_to_ip(ip), o) for ip, o in
                          (OWNED.unpack_from(body, off + OWNED.size * i) for i in range(n)))
            return Balance(vid, coord, bseq, table, inc)
        if mtype == ARP_SHARE:
            (n,) = COUNT.unpack_from(body)
            if len(body) != COUNT.size + NEIGH.size * n:
                raise WireError("malformed", "arp share length")
            out = []
            for i in range(n):
                ip, mac = NEIGH.unpack_from(body, COUNT.size + NEIGH.size * i)
                out.append((int_to_ip(ip), mac.hex(":")))
            return ArpShare(tuple(out))
    except struct.error as e:
        raise WireError("malformed", str(e)) from None
    raise WireError("unknown_type", str(mtype))


# envelope -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    type: int
    sender: int
    inc: int
    seq: int
    ts_us: int
    dest: int = 0  # the member it is for; 0: every member
    version: int = VERSION
    magic: int = MAGIC

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.version, self.type, self.sender, self.dest,
                           self.inc, self.seq, self.ts_us)


def encode(key: bytes, header: Header, msg) -> bytes:
    """One datagram: header + body + tag. header.type must be msg's type."""
    if header.type != msg.type:
        raise ValueError(f"header type {header.type} does not match {type(msg).__name__}")
    data = header.pack() + msg.pack()
    if len(data) + TAG_LEN > MAX_MESSAGE:
        raise ValueError(f"message of {len(data) + TAG_LEN} bytes exceeds {MAX_MESSAGE}")
    return data + tag(key, data)


def decode(key: bytes, data: bytes) -> tuple:
    """(Header, message) of an authenticated datagram; raises WireError. Replay and
    freshness are the receiver's business (ReplayGuard)."""
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
    hdr = Header(mtype, sender, inc, seq, ts, dest, version, magic)
    return hdr, decode_body(mtype, data[HEADER_LEN:n - TAG_LEN])


# replay protection ----------------------------------------------------------------------------


class ReplayGuard:
    """Replay and freshness check of authenticated headers, for the member `me`.

    check() returns None if the message is fresh, else the drop reason ('misdirected',
    'stale' or 'replay'). Kept per sender and channel (broadcast, or addressed to me); a
    newer incarnation of a sender (it restarted) replaces its window. window=1 (the
    default) accepts strictly increasing seqs only (see the module's doc)."""

    def __init__(self, started_us: int, me: int, max_age_s: float = 10.0, window: int = 1):
        self.started_us = started_us
        self.me = me
        self.max_age_us = int(max_age_s * 1e6)
        self.window = window
        self.senders: dict = {}  # (sender, channel) -> (inc, ReplayWindow)

    def check(self, hdr: Header, now_us: int) -> Optional[str]:
        if hdr.dest not in (0, self.me):
            return "misdirected"
        if hdr.ts_us < self.started_us or hdr.inc > hdr.ts_us:
            return "stale"
        if abs(now_us - hdr.ts_us) > self.max_age_us:
            return "stale"
        if hdr.seq <= 0:
            return "replay"
        chan = (hdr.sender, hdr.dest != 0)
        known = self.senders.get(chan)
        if known is None or hdr.inc > known[0]:
            win = ReplayWindow(self.window)
            win.accept(hdr.seq)
            self.senders[chan] = (hdr.inc, win)
            return None
        inc, win = known
        if hdr.inc < inc or not win.accept(hdr.seq):
            return "replay"
        return None
