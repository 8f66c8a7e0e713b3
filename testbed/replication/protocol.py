"""Client <-> replica server frames over TCP, declared once. Pure: no sockets.

Every frame is

    len u32 | type u8 | body            (big-endian; len counts type + body)

    REQUEST (1)  client_id u64 | client_seq u64 | kind u8 | semantics u8 | payload
    REPLY   (2)  client_seq u64 | status u8 | ordinal u64 | rlen u16 | reason (utf-8,
                 rlen bytes) | result

- kind: 1 update, 2 query.
- semantics: updates 1 strict, 2 commutative, 3 timestamp; queries 4 consistent, 5 weak,
  6 dirty (paper section 6).
- payload: an update's action (opaque to the transport: the algorithm and the database
  read it), or a query's key.
- status: 0 ok, 1 error. An error carries a one-line reason (no newline) and ordinal 0.
- ordinal: the action's place in the global persistent order (1, 2, ...) for an update;
  for a query, the ordinal of the last action applied to the state it read.

A client numbers its requests (client_seq, from 1) and picks a random client_id; (client_id,
client_seq) is the action's identity (the database applies it once). A connection may
have several requests outstanding; replies carry the client_seq they answer.

`Decoder` splits a byte stream into frames; decode errors are `ProtocolError` with a
one-line message (the server closes such a connection).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

LEN = struct.Struct("!I")
REQ_HEAD = struct.Struct("!QQBB")
REP_HEAD = struct.Struct("!QBQH")

REQUEST, REPLY = 1, 2
UPDATE, QUERY = "update", "query"
KINDS = {UPDATE: 1, QUERY: 2}
STRICT, COMMUTATIVE, TIMESTAMP = "strict", "commutative", "timestamp"
CONSISTENT, WEAK, DIRTY = "consistent", "weak", "dirty"
SEMANTICS = {STRICT: 1, COMMUTATIVE: 2, TIMESTAMP: 3, CONSISTENT: 4, WEAK: 5, DIRTY: 6}
UPDATE_SEMANTICS = (STRICT, COMMUTATIVE, TIMESTAMP)
QUERY_SEMANTICS = (CONSISTENT, WEAK, DIRTY)
OK, ERROR = "ok", "error"
STATUSES = {OK: 0, ERROR: 1}

_KIND_NAMES = {v: k for k, v in KINDS.items()}
_SEM_NAMES = {v: k for k, v in SEMANTICS.items()}
_STATUS_NAMES = {v: k for k, v in STATUSES.items()}

MAX_FRAME = 1 << 20  # type + body
MAX_PAYLOAD = 64 * 1024
MAX_REASON = 1000
U64 = (1 << 64) - 1


class ProtocolError(ValueError):
    """A malformed frame; the message is one line."""


@dataclass(frozen=True)
class Request:
    client_id: int
    client_seq: int
    kind: str          # UPDATE or QUERY
    semantics: str     # an update's or a query's semantics (see the module's doc)
    payload: bytes

    @property
    def action_id(self) -> tuple:
        return (self.client_id, self.client_seq)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ProtocolError(f"unknown request kind {self.kind!r}")
        allowed = UPDATE_SEMANTICS if self.kind == UPDATE else QUERY_SEMANTICS
        if self.semantics not in allowed:
            raise ProtocolError(f"semantics {self.semantics!r} is not one of "
                                f"{', '.join(allowed)} for a {self.kind}")
        for name in ("client_id", "client_seq"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= U64:
                raise ProtocolError(f"{name} must be an unsigned 64-bit integer, got {v!r}")
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")


@dataclass(frozen=True)
class Reply:
    client_seq: int
    status: str = OK   # OK or ERROR
    ordinal: int = 0
    reason: str = ""   # one line, for an error
    result: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ProtocolError(f"unknown reply status {self.status!r}")


def error_reply(client_seq: int, reason: str) -> Reply:
    """An error reply with reason made one line and short enough to encode."""
    line = " ".join(str(reason).split())[:MAX_REASON] or "error"
    return Reply(client_seq, ERROR, 0, line)


def encode_request(req: Request) -> bytes:
    body = REQ_HEAD.pack(req.client_id, req.client_seq, KINDS[req.kind],
                         SEMANTICS[req.semantics]) + bytes(req.payload)
    return LEN.pack(1 + len(body)) + bytes([REQUEST]) + body


def encode_reply(rep: Reply) -> bytes:
    reason = rep.reason.encode("utf-8")
    if len(reason) > MAX_REASON or b"\n" in reason:
        raise ProtocolError("a reply's reason must be one line of at most "
                            f"{MAX_REASON} bytes")
    body = REP_HEAD.pack(rep.client_seq, STATUSES[rep.status], rep.ordinal,
                         len(reason)) + reason + bytes(rep.result)
    if 1 + len(body) > MAX_FRAME:
        raise ProtocolError(f"reply of {len(body)} bytes exceeds {MAX_FRAME}")
    return LEN.pack(1 + len(body)) + bytes([REPLY]) + body


def decode_frame(ftype: int, body: bytes):
    """The Request or Reply of one frame's type and body; ProtocolError if malformed."""
    if ftype == REQUEST:
        if len(body) < REQ_HEAD.size:
            raise ProtocolError(f"request of {len(body)} bytes is shorter than its header")
        cid, seq, kind, sem = REQ_HEAD.unpack_from(body)
        if kind not in _KIND_NAMES:
            raise ProtocolError(f"unknown request kind {kind}")
        if sem not in _SEM_NAMES:
            raise ProtocolError(f"unknown semantics {sem}")
        return Request(cid, seq, _KIND_NAMES[kind], _SEM_NAMES[sem], bytes(body[REQ_HEAD.size:]))
    if ftype == REPLY:
        if len(body) < REP_HEAD.size:
            raise ProtocolError(f"reply of {len(body)} bytes is shorter than its header")
        seq, status, ordinal, rlen = REP_HEAD.unpack_from(body)
        if status not in _STATUS_NAMES:
            raise ProtocolError(f"unknown reply status {status}")
        off = REP_HEAD.size
        if len(body) < off + rlen:
            raise ProtocolError("reply reason cut short")
        try:
            reason = bytes(body[off:off + rlen]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("reply reason is not utf-8") from None
        return Reply(seq, _STATUS_NAMES[status], ordinal, reason, bytes(body[off + rlen:]))
    raise ProtocolError(f"unknown frame type {ftype}")


def decode(data: bytes):
    """The one message of a whole frame (len included); ProtocolError if malformed."""
    msgs, rest = Decoder().feed(data)
    if len(msgs) != 1 or rest:
        raise ProtocolError("want exactly one whole frame")
    return msgs[0]


class Decoder:
    """Feed it bytes as they arrive; feed() returns (messages, bytes still buffered).
    A malformed frame raises ProtocolError (the stream is then unusable)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> tuple:
        self.buf += data
        out = []
        buf = self.buf
        off = 0
        while len(buf) - off >= LEN.size:
            (n,) = LEN.unpack_from(buf, off)
            if n < 1 or n > MAX_FRAME:
                raise ProtocolError(f"frame length {n} out of range 1..{MAX_FRAME}")
            if len(buf) - off - LEN.size < n:
                break
            start = off + LEN.size
            out.append(decode_frame(buf[start], bytes(buf[start + 1:start + n])))
            off = start + n
        if off:
            del buf[:off]
        return out, len(buf)


class OrderHash:
    """The place of applied actions in the order, and a running SHA-256 over
    `(ordinal, client_id, client_seq)` of each (u64s): two replicas that applied the same
    actions in the same order have the same `hexdigest()`. What the baselines (COReL, 2PC)
    keep instead of a database: the paper's measurements answer the client as soon as
    the action is ordered."""

    def __init__(self):
        import hashlib
        self.ordinal = 0
        self.h = hashlib.sha256()

    def apply(self, action_id: tuple) -> int:
        self.ordinal += 1
        self.h.update(struct.pack("!QQQ", self.ordinal, *action_id))
        return self.ordinal

    def hexdigest(self) -> str:
        return self.h.hexdigest()
