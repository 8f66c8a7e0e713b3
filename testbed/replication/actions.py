"""The engine's actions, its group messages and its log records, declared once. Pure.

An **action** is identified by `(creator, index)`: the server that generated it and that
server's count of the actions it generated (1, 2, ...; it survives restarts through the
creator's forced log record). Its body:

    ACTION  kind u8 | creator u16 | index u64 | client_id u64 | client_seq u64 |
            semantics u8 | payload

kind: UPDATE (a client's update; semantics as in protocol.SEMANTICS), JOIN / LEAVE
(PERSISTENT_JOIN / PERSISTENT_LEAVE of section 5.1; payload = the server id, u16).
Internal actions carry client_id 0 and client_seq = creator << 40 | index, so that the
database's exactly-once table and order hash treat every action alike.

**Group messages** (the payload of one multicast, at most `max_payload` bytes; a longer
message is cut into FRAG pieces that the receiver joins again, FIFO per sender):

    A | action                                 an action, multicast by its creator (SAFE)
    T | ordinal u64 | action                   an action retransmitted in the exchange;
                                               ordinal 0 = red, else its green ordinal
    S | json                                   the exchange's state message
    D | json                                   "my retransmissions are done"
    C | json                                   CPC (create primary component)
    F | msg u32 | part u16 | parts u16 | bytes  a piece of a longer message

**Log records** (disk.append; rebuilt by Engine at start):

    a | action                 an action this server generated (forced before multicast)
    r | action                 an action received (red; unforced)
    g | ordinal u64 | action   an action green at ordinal (unforced)
    m | json                   meta: last primary, vulnerable, yellow, attempt (see engine)
    j | json                   a join snapshot (the state at a joiner's join point)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

UPDATE, JOIN, LEAVE = 1, 2, 3
KIND_NAMES = {UPDATE: "update", JOIN: "join", LEAVE: "leave"}
HEAD = struct.Struct("!BHQQQB")
ORD = struct.Struct("!Q")
FRAG = struct.Struct("!IHH")
SERVER = struct.Struct("!H")

MSG_ACTION, MSG_RETRANS, MSG_STATE, MSG_DONE, MSG_CPC, MSG_FRAG = (b"A", b"T", b"S", b"D", b"C",
                                                                   b"F")
REC_CREATED, REC_RED, REC_GREEN, REC_META, REC_JOIN = b"a", b"r", b"g", b"m", b"j"


class ActionError(ValueError):
    """A malformed action, message or record (one line)."""


@dataclass(frozen=True)
class Action:
    kind: int
    creator: int
    index: int
    client_id: int
    client_seq: int
    semantics: int
    payload: bytes

    @property
    def aid(self) -> tuple:
        return (self.creator, self.index)

    @property
    def client_key(self) -> tuple:
        return (self.client_id, self.client_seq)

    @property
    def target(self) -> int:
        """The server a JOIN / LEAVE names."""
        return SERVER.unpack_from(self.payload)[0]


def internal(kind: int, creator: int, index: int, target: int) -> Action:
    return Action(kind, creator, index, 0, creator << 40 | index, 0, SERVER.pack(target))


def encode_action(a: Action) -> bytes:
    return HEAD.pack(a.kind, a.creator, a.index, a.client_id, a.client_seq,
                     a.semantics) + a.payload


def decode_action(data: bytes) -> Action:
    if len(data) < HEAD.size:
        raise ActionError(f"action of {len(data)} bytes is shorter than its header")
    kind, creator, index, cid, cseq, sem = HEAD.unpack_from(data)
    if kind not in KIND_NAMES:
        raise ActionError(f"unknown action kind {kind}")
    return Action(kind, creator, index, cid, cseq, sem, bytes(data[HEAD.size:]))


def encode_ordinal_action(tag: bytes, ordinal: int, a: Action) -> bytes:
    return tag + ORD.pack(ordinal) + encode_action(a)


def decode_ordinal_action(body: bytes) -> tuple:
    if len(body) < ORD.size:
        raise ActionError("ordinal cut short")
    return ORD.unpack_from(body)[0], decode_action(body[ORD.size:])


def encode_json(tag: bytes, obj) -> bytes:
    return tag + json.dumps(obj, separators=(",", ":")).encode()


def decode_json(body: bytes):
    try:
        return json.loads(body)
    except ValueError as e:
        raise ActionError(f"bad json body: {e}") from None


def fragment(msg: bytes, msg_id: int, max_payload: int) -> list:
    """msg itself if it fits, else FRAG pieces of at most max_payload bytes each."""
    if len(msg) <= max_payload:
        return [msg]
    room = max_payload - 1 - FRAG.size
    parts = [msg[i:i + room] for i in range(0, len(msg), room)]
    if len(parts) > 0xFFFF:
        raise ActionError(f"message of {len(msg)} bytes needs too many fragments")
    return [MSG_FRAG + FRAG.pack(msg_id & 0xFFFFFFFF, i, len(parts)) + p
            for i, p in enumerate(parts)]


class Reassembler:
    """Joins FRAG pieces per sender (pieces of one message arrive in order: FIFO)."""

    def __init__(self):
        self.partial = {}

    def reset(self):
        self.partial.clear()

    def feed(self, sender: int, payload: bytes):
        """The whole message, or None while pieces are missing."""
        if payload[:1] != b"F":
            return payload
        if len(payload) < 1 + FRAG.size:
            raise ActionError("fragment header cut short")
        msg_id, part, parts = FRAG.unpack_from(payload, 1)
        key = (sender, msg_id)
        chunks = self.partial.setdefault(key, [])
        if part != len(chunks):          # a piece lost across a configuration change
            self.partial.pop(key, None)
            return None
        chunks.append(payload[1 + FRAG.size:])
        if len(chunks) < parts:
            return None
        del self.partial[key]
        return b"".join(chunks)
