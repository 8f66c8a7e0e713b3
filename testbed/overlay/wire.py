"""The overlay's messages, declared once: daemon <-> daemon over UDP, client <-> daemon over a
UNIX socket. Pure: no sockets, no clocks.

Every daemon message is one UDP datagram

    common header (18 bytes) | body (by type) | tag (16 bytes)

    common  := version u8 | type u8 | inc u8 | peer_inc u8 | sender u16 | nonce u64 | ts u32
    tag     := HMAC-SHA256(key, header + body)[:16]

- `sender` is the overlay node id of the daemon that sent this hop (not the originator).
- `nonce` counts up by one per message to that neighbour, starting at the sender's start time
  in microseconds, so it grows across restarts too; the receiver keeps a replay window per
  neighbour (`ReplayWindow`) and drops anything seen or older than the window.
- `ts` is the sender's clock in microseconds (mod 2**32), echoed in acks to measure RTTs.
- `inc` / `peer_inc`: the sender's incarnation of this link and the receiver's as the sender
  knows it (both bump when a side declares the link dead, or on a restart), so that link
  protocol state of an older incarnation is never applied to a newer one.

Types and bodies (sizes without header and tag):

    HELLO       seq u16 | lsdb digest u32                                   6 -> 40 bytes in all
    HELLO_ACK   seq u16 | echo u32 | rx_loss u16 (1e-4 units)               8
    LINK_STATE  count u8 | count x LSA
        LSA     origin u16 | seq u64 | age_s u16 | nlinks u16 | nlinks x (nbr u16 |
                delay_us u32 | loss u16)                                    14 + 8 per link
    DATA        ROUTED | SESSION | payload                                  32 + payload
    LINK_ACK    proto u8 | cum u32 | echo u32 | nbytes u16 | SACK bitmap    11 + nbytes
    E2E_ACK     ROUTED | session u32 | cum u32 | echo u32 | flags u8 | nbytes u16 | bitmap

    ROUTED      src u16 | dst u16 | sport u16 | dport u16 | ttl u8 | proto u8 | stamp u8 |
                kind u8 | link_seq u32 | budget_ms u16                       18
    SESSION     session u32 | seq u32 | wnd u16 | ts u32                      14

A SACK bitmap acknowledges, beyond `cum` (every sequence number below it is acknowledged),
bit i (little-endian: byte i // 8, bit i % 8) for sequence number cum + 1 + i.
`proto` is the link protocol the message travels with (BEST_EFFORT, RELIABLE, REALTIME),
`stamp` the largest buffer occupancy (0-255) a hop saw, `budget_ms` the time a REALTIME
message has left to arrive (hops subtract what they held it and the link's one-way delay).

Client frames (UNIX SOCK_SEQPACKET, one frame per message; see client.py):

    client -> daemon   SEND  1 u8 | flags u8 | dst u16 | dport u16 | payload
                       CTRL  2 u8 | JSON request
    daemon -> client   DATA  1 u8 | 0 u8 | src u16 | sport u16 | payload
                       REPLY 2 u8 | JSON reply
                       ERROR 3 u8 | UTF-8 message
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

# re-exported: the daemon and tests use wire.ReplayWindow, wire.tag
from testbed.sealed import (TAG_LEN, ReplayWindow, WireError, check_size, seal,  # noqa: F401
                            tag, verify)

VERSION = 1
HELLO, HELLO_ACK, LINK_STATE, DATA, LINK_ACK, E2E_ACK = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {HELLO: "hello", HELLO_ACK: "hello_ack", LINK_STATE: "link_state", DATA: "data",
              LINK_ACK: "link_ack", E2E_ACK: "e2e_ack"}

BEST_EFFORT, RELIABLE, REALTIME = 0, 1, 2
PROTO_NAMES = {BEST_EFFORT: "best_effort", RELIABLE: "reliable", REALTIME: "realtime"}
PROTOS = {v: k for k, v in PROTO_NAMES.items()}

KIND_DATAGRAM, KIND_SESSION = 0, 1  # ROUTED.kind: what a DATA belongs to
ACK_CONGESTED, ACK_NOPORT = 1, 2  # E2E_ACK flags

COMMON = struct.Struct("!BBBBHQI")
HELLO_BODY = struct.Struct("!HI")
HELLO_ACK_BODY = struct.Struct("!HIH")
LS_COUNT = struct.Struct("!B")
LSA_HEAD = struct.Struct("!HQHH")
LSA_LINK = struct.Struct("!HIH")
ROUTED = struct.Struct("!HHHHBBBBIH")
SESSION = struct.Struct("!IIHI")
LINK_ACK_BODY = struct.Struct("!BIIH")
E2E_ACK_BODY = struct.Struct("!IIIBH")

HEADER_LEN = COMMON.size  # 18
MIN_MESSAGE = HEADER_LEN + TAG_LEN
MAX_MESSAGE = 1472  # the UDP payload of one 1500-byte IPv4 packet
DATA_OVERHEAD = HEADER_LEN + ROUTED.size + SESSION.size + TAG_LEN  # 66
MAX_PAYLOAD = MAX_MESSAGE - DATA_OVERHEAD  # 1406
MAX_SACK_BYTES = 256  # a bitmap covers at most 2048 packets beyond the cumulative ack
MAX_LSA_LINKS = (MAX_MESSAGE - HEADER_LEN - TAG_LEN - LS_COUNT.size - LSA_HEAD.size) // 8
MASK32 = 0xFFFFFFFF

# offsets into a routed body (ROUTED starts at 0), for in-place rewriting when forwarding
OFF_TTL, OFF_PROTO, OFF_STAMP, OFF_LINK_SEQ, OFF_BUDGET = 8, 9, 10, 12, 16
LINK_SEQ = struct.Struct("!I")
BUDGET = struct.Struct("!H")

# why a message was dropped: every reason is a counter in the daemon's stats
DROP_REASONS = ("oversized", "truncated", "bad_version", "bad_hmac", "unknown_type",
                "unknown_sender", "replay", "malformed", "stale_link")

# client frames
CL_SEND, CL_CTRL = 1, 2
SV_DATA, SV_REPLY, SV_ERROR = 1, 2, 3
CL_SEND_HEAD = struct.Struct("!BBHH")
SV_DATA_HEAD = struct.Struct("!BBHH")
SEND_WANT_REPLY = 1
MAX_FRAME = 65536


# authentication (WireError, tag, seal and ReplayWindow: testbed.sealed) ---------------------

def check(buf, n: int, key: bytes) -> tuple:
    """Validate datagram buf[:n]: size, version, tag, type. Returns the unpacked common
    header (version, type, inc, peer_inc, sender, nonce, ts); raises WireError."""
    check_size(n, MIN_MESSAGE, MAX_MESSAGE)
    hdr = COMMON.unpack_from(buf, 0)
    if hdr[0] != VERSION:
        raise WireError("bad_version", str(hdr[0]))
    verify(key, buf, n)
    if hdr[1] not in TYPE_NAMES:
        raise WireError("unknown_type", str(hdr[1]))
    return hdr


# messages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    type: int
    sender: int
    nonce: int
    ts: int = 0
    inc: int = 0
    peer_inc: int = 0
    version: int = VERSION

    def pack(self) -> bytes:
        return COMMON.pack(self.version, self.type, self.inc, self.peer_inc, self.sender,
                           self.nonce, self.ts & MASK32)


@dataclass(frozen=True)
class Hello:
    TYPE = HELLO
    seq: int
    digest: int

    def pack(self) -> bytes:
        return HELLO_BODY.pack(self.seq, self.digest)

    @classmethod
    def unpack(cls, mv) -> "Hello":
        _exact(mv, HELLO_BODY.size)
        return cls(*HELLO_BODY.unpack_from(mv))


@dataclass(frozen=True)
class HelloAck:
    TYPE = HELLO_ACK
    seq: int
    echo: int
    rx_loss: int  # the acker's loss estimate of sender -> acker, in 1e-4

    def pack(self) -> bytes:
        return HELLO_ACK_BODY.pack(self.seq, self.echo & MASK32, self.rx_loss)

    @classmethod
    def unpack(cls, mv) -> "HelloAck":
        _exact(mv, HELLO_ACK_BODY.size)
        return cls(*HELLO_ACK_BODY.unpack_from(mv))


@dataclass(frozen=True)
class LsaLink:
    nbr: int
    delay_us: int
    loss: int  # 1e-4 units


@dataclass(frozen=True)
class Lsa:
    """One node's links, as it advertises them."""

    origin: int
    seq: int
    age_s: int
    links: tuple = ()

    @property
    def size(self) -> int:
        return LSA_HEAD.size + LSA_LINK.size * len(self.links)

    def pack(self) -> bytes:
        if len(self.links) > MAX_LSA_LINKS:
            raise ValueError(f"an LSA carries at most {MAX_LSA_LINKS} links")
        out = [LSA_HEAD.pack(self.origin, self.seq, min(self.age_s, 0xFFFF), len(self.links))]
        out += [LSA_LINK.pack(ln.nbr, min(ln.delay_us, MASK32), min(ln.loss, 10000))
                for ln in self.links]
        return b"".join(out)


@dataclass(frozen=True)
class LinkState:
    TYPE = LINK_STATE
    lsas: tuple

    def pack(self) -> bytes:
        return LS_COUNT.pack(len(self.lsas)) + b"".join(a.pack() for a in self.lsas)

    @classmethod
    def unpack(cls, mv) -> "LinkState":
        (count,) = LS_COUNT.unpack_from(mv)
        off, lsas = LS_COUNT.size, []
        for _ in range(count):
            origin, seq, age, nlinks = LSA_HEAD.unpack_from(mv, off)
            off += LSA_HEAD.size
            links = tuple(LsaLink(*LSA_LINK.unpack_from(mv, off + i * LSA_LINK.size))
                          for i in range(nlinks))
            off += nlinks * LSA_LINK.size
            lsas.append(Lsa(origin, seq, age, links))
        if off != len(mv):
            raise WireError("malformed", f"link state: {len(mv) - off} trailing bytes")
        return cls(tuple(lsas))


def pack_link_states(lsas, limit: int = MAX_MESSAGE - HEADER_LEN - TAG_LEN) -> list:
    """Pack LSAs into as few LINK_STATE bodies as fit in one datagram each."""
    bodies, cur, size = [], [], LS_COUNT.size
    for lsa in lsas:
        if cur and (size + lsa.size > limit or len(cur) == 255):
            bodies.append(LinkState(tuple(cur)).pack())
            cur, size = [], LS_COUNT.size
        cur.append(lsa)
        size += lsa.size
    if cur:
        bodies.append(LinkState(tuple(cur)).pack())
    return bodies


@dataclass(frozen=True)
class Routed:
    """The routed part of DATA and E2E_ACK: end-to-end addresses and per-hop fields."""

    src: int
    dst: int
    sport: int
    dport: int
    ttl: int = 64
    proto: int = BEST_EFFORT
    stamp: int = 0
    kind: int = KIND_DATAGRAM
    link_seq: int = 0
    budget_ms: int = 0

    def pack(self) -> bytes:
        return ROUTED.pack(self.src, self.dst, self.sport, self.dport, self.ttl, self.proto,
                           self.stamp, self.kind, self.link_seq, self.budget_ms)


@dataclass(frozen=True)
class Data:
    TYPE = DATA
    routed: Routed
    session: int = 0
    seq: int = 0
    wnd: int = 0
    ts: int = 0
    payload: bytes = b""

    def pack(self) -> bytes:
        return (self.routed.pack() + SESSION.pack(self.session, self.seq, self.wnd,
                                                  self.ts & MASK32) + bytes(self.payload))

    @classmethod
    def unpack(cls, mv) -> "Data":
        _at_least(mv, ROUTED.size + SESSION.size)
        r = Routed(*ROUTED.unpack_from(mv))
        _check_routed(r)
        s = SESSION.unpack_from(mv, ROUTED.size)
        return cls(r, *s, payload=bytes(mv[ROUTED.size + SESSION.size:]))


@dataclass(frozen=True)
class LinkAck:
    TYPE = LINK_ACK
    proto: int
    cum: int
    echo: int
    bitmap: bytes = b""

    def pack(self) -> bytes:
        return LINK_ACK_BODY.pack(self.proto, self.cum, self.echo & MASK32,
                                  len(self.bitmap)) + bytes(self.bitmap)

    @classmethod
    def unpack(cls, mv) -> "LinkAck":
        _at_least(mv, LINK_ACK_BODY.size)
        proto, cum, echo, nbytes = LINK_ACK_BODY.unpack_from(mv)
        if proto not in (RELIABLE, REALTIME):
            raise WireError("malformed", f"link ack for protocol {proto}")
        _bitmap_len(mv, LINK_ACK_BODY.size, nbytes)
        return cls(proto, cum, echo, bytes(mv[LINK_ACK_BODY.size:]))


@dataclass(frozen=True)
class E2eAck:
    TYPE = E2E_ACK
    routed: Routed
    session: int
    cum: int
    echo: int
    flags: int = 0
    bitmap: bytes = b""

    def pack(self) -> bytes:
        return (self.routed.pack() + E2E_ACK_BODY.pack(self.session, self.cum,
                                                       self.echo & MASK32, self.flags,
                                                       len(self.bitmap)) + bytes(self.bitmap))

    @classmethod
    def unpack(cls, mv) -> "E2eAck":
        _at_least(mv, ROUTED.size + E2E_ACK_BODY.size)
        r = Routed(*ROUTED.unpack_from(mv))
        _check_routed(r)
        session, cum, echo, flags, nbytes = E2E_ACK_BODY.unpack_from(mv, ROUTED.size)
        start = ROUTED.size + E2E_ACK_BODY.size
        _bitmap_len(mv, start, nbytes)
        return cls(r, session, cum, echo, flags, bytes(mv[start:]))


MESSAGES = {m.TYPE: m for m in (Hello, HelloAck, LinkState, Data, LinkAck, E2eAck)}


def _exact(mv, size: int) -> None:
    if len(mv) != size:
        raise WireError("malformed", f"body of {len(mv)} bytes, want {size}")


def _at_least(mv, size: int) -> None:
    if len(mv) < size:
        raise WireError("malformed", f"body of {len(mv)} bytes, want at least {size}")


def _bitmap_len(mv, start: int, nbytes: int) -> None:
    if nbytes > MAX_SACK_BYTES or len(mv) - start != nbytes:
        raise WireError("malformed", f"bitmap of {nbytes} bytes in {len(mv) - start}")


def _check_routed(r: Routed) -> None:
    if r.proto not in PROTO_NAMES or r.kind not in (KIND_DATAGRAM, KIND_SESSION):
        raise WireError("malformed", f"proto {r.proto} kind {r.kind}")


def encode(msg, header: Header, key: bytes) -> bytes:
    """A whole datagram: header, body, tag."""
    if header.type != msg.TYPE:
        raise ValueError(f"header type {header.type} for a {type(msg).__name__}")
    out = header.pack() + msg.pack()
    if len(out) + TAG_LEN > MAX_MESSAGE:
        raise ValueError(f"message of {len(out) + TAG_LEN} bytes exceeds {MAX_MESSAGE}")
    return seal(key, out)


def decode(data, key: bytes, n: Optional[int] = None) -> tuple:
    """(Header, message) of a datagram; WireError (with .reason) for anything to drop."""
    n = len(data) if n is None else n
    v, t, inc, pinc, sender, nonce, ts = check(data, n, key)
    body = memoryview(data)[HEADER_LEN:n - TAG_LEN]
    try:
        msg = MESSAGES[t].unpack(body)
    except struct.error as e:
        raise WireError("malformed", str(e)) from None
    return Header(t, sender, nonce, ts, inc, pinc, v), msg


# SACK bitmaps ------------------------------------------------------------------------------

def bits_to_bytes(bits: int, limit: int = MAX_SACK_BYTES) -> bytes:
    """An int bitmap (bit i: sequence cum + 1 + i) as wire bytes, cut to limit bytes."""
    if bits <= 0:
        return b""
    n = min((bits.bit_length() + 7) // 8, limit)
    return (bits & ((1 << (8 * n)) - 1)).to_bytes(n, "little")


def bytes_to_bits(data) -> int:
    return int.from_bytes(bytes(data), "little")


def acked_seqs(cum: int, bitmap) -> list:
    """Every sequence number a (cum, bitmap) pair acknowledges beyond cum."""
    bits, out, base = bytes_to_bits(bitmap), [], cum + 1
    while bits:
        low = bits & -bits
        out.append(base + low.bit_length() - 1)
        bits ^= low
    return out


# client frames -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSend:
    dst: int
    dport: int
    payload: bytes = b""
    want_reply: bool = False

    def pack(self) -> bytes:
        return CL_SEND_HEAD.pack(CL_SEND, SEND_WANT_REPLY if self.want_reply else 0,
                                 self.dst, self.dport) + self.payload


@dataclass(frozen=True)
class ServerData:
    src: int
    sport: int
    payload: bytes = field(default=b"")

    def pack(self) -> bytes:
        return SV_DATA_HEAD.pack(SV_DATA, 0, self.src, self.sport) + self.payload
