"""COReL (Keidar, 1994), the baseline with an end-to-end acknowledgement per action, on the
group communication of testbed.replication.gc (docs/replication.md).

Normal operation, in a primary configuration:

1. the replica a client talks to (the originator) multicasts the action (Agreed order);
2. every member, on delivery, forces the action to its disk and then multicasts an
   acknowledgement (Agreed; the acknowledgements that become ready on one loop turn share
   one message, as they do when several forced writes complete together);
3. an action **commits** once every member of the configuration it was delivered in has
   acknowledged it, in the agreed order (an action commits only after every action
   delivered before it): it takes the next ordinal, and its originator answers the client.

So one forced write per action at every replica and n + 1 multicasts per action (the
paper's "n multicast messages", plus the action itself), against the engine's one.

Choices (the paper leaves them to Keidar's thesis):

- **Primary** = a configuration holding a majority of all the servers (`servers`, every
  replica that may ever take part), a static majority rather than COReL's dynamic voting.
  Outside a primary an update or a consistent query is refused at once (an error reply);
  weak and dirty queries are answered from the local order.
- **Configuration changes.** An action commits only on acknowledgements delivered in the
  regular configuration it was delivered in. When a configuration ends (the transitional
  configuration is delivered) every action still waiting for acknowledgements becomes
  **in doubt**: it is never applied here afterwards, it is logged as such, and its
  originator answers the client with an error that says the outcome is in doubt. Actions
  delivered in a transitional or a non-primary configuration are in doubt at once. So an
  action is never applied twice and never lost silently. What is not done: Keidar's state
  exchange in the next primary, which would re-order the in-doubt actions that some member
  committed (acknowledgements it received just before the change that another member
  missed): replicas whose acknowledgements were cut at different points can differ on such
  an action; `status()["in_doubt"]` counts them, and the applied hashes show it.
- An originator that gets no delivery of its action within `give_up_s` answers the client
  with an error (the outcome is then unknown, and says so).

Messages (payload of a group multicast):
    ACTION  b"A" | orig u16 | oseq u64 | client_id u64 | client_seq u64 | semantics u8 |
            payload
    ACK     b"K" | n u16 | n x (orig u16 | oseq u64)
`oseq` counts the originator's actions from its start time in µs (unique across restarts).
Log records: kind u8 | orig u16 | oseq u64 | client_id u64 | client_seq u64 (+ payload):
1 forced action, 2 committed, 3 in doubt. At start the committed records rebuild the order.
"""

from __future__ import annotations

import collections
import struct
import time
from typing import Callable

from testbed.replication import protocol

ACTION_HEAD = struct.Struct("!cHQQQB")
ACK_HEAD = struct.Struct("!cH")
ACK_ITEM = struct.Struct("!HQ")
REC = struct.Struct("!BHQQQ")
REC_FORCED, REC_COMMITTED, REC_IN_DOUBT = 1, 2, 3
MAX_ACKS = 100  # per ACK message: 2 + 10 * 100 bytes, under the GC's 1200-byte payload
_SEM = {v: k for k, v in protocol.SEMANTICS.items()}


def encode_action(orig: int, oseq: int, req: protocol.Request) -> bytes:
    return ACTION_HEAD.pack(b"A", orig, oseq, req.client_id, req.client_seq,
                            protocol.SEMANTICS[req.semantics]) + req.payload


def encode_ack(keys) -> bytes:
    keys = list(keys)
    return ACK_HEAD.pack(b"K", len(keys)) + b"".join(ACK_ITEM.pack(*k) for k in keys)


def decode_message(data: bytes):
    """("action", (orig, oseq), Request) or ("ack", [(orig, oseq), ...]); ValueError if
    malformed."""
    if data[:1] == b"A" and len(data) >= ACTION_HEAD.size:
        _, orig, oseq, cid, cseq, sem = ACTION_HEAD.unpack_from(data)
        if sem not in _SEM:
            raise ValueError(f"unknown semantics {sem}")
        return "action", (orig, oseq), protocol.Request(
            cid, cseq, protocol.UPDATE, _SEM[sem], bytes(data[ACTION_HEAD.size:]))
    if data[:1] == b"K" and len(data) >= ACK_HEAD.size:
        _, n = ACK_HEAD.unpack_from(data)
        if len(data) != ACK_HEAD.size + n * ACK_ITEM.size:
            raise ValueError("ack length")
        return "ack", [ACK_ITEM.unpack_from(data, ACK_HEAD.size + i * ACK_ITEM.size)
                       for i in range(n)]
    raise ValueError("unknown message")


class _Entry:
    __slots__ = ("key", "req", "members", "acks", "conf")

    def __init__(self, key, req, members, conf):
        self.key, self.req, self.members, self.conf = key, req, frozenset(members), conf
        self.acks: set = set()


class COReL:
    """One COReL replica. `node` is the GroupNode (multicast(payload, service)); its
    events go to on_event(). `loop` (optional) batches acknowledgements per loop turn and
    runs the give-up timer."""

    def __init__(self, me: int, servers, node, disk, loop=None, service=None,
                 give_up_s: float = 10.0):
        self.me = me
        self.servers = tuple(sorted(servers))
        if me not in self.servers:
            raise ValueError(f"replica {me} is not among the servers {self.servers}")
        self.node, self.disk, self.loop = node, disk, loop
        if service is None:
            from testbed.replication.gc import AGREED
            service = AGREED
        self.service = service
        self.give_up_s = give_up_s
        self.oseq = int(time.time() * 1e6)
        self.order = protocol.OrderHash()
        self.conf_id = None
        self.members: tuple = ()
        self.regular = False      # a regular configuration is installed
        self.primary = False
        self.pending: collections.OrderedDict = collections.OrderedDict()  # key -> _Entry
        self.waiting: dict = {}   # oseq -> (req, reply, submitted at)
        self.ack_batch: list = []
        self.ack_flush_armed = False
        self.counts = {"committed": 0, "in_doubt": 0, "refused": 0, "gave_up": 0,
                       "actions_sent": 0, "acks_sent": 0, "ack_messages": 0,
                       "actions_delivered": 0, "acks_delivered": 0, "malformed": 0,
                       "configurations": 0}
        self.closed = False
        self._recover()
        if loop is not None:
            loop.after(1.0, self._tick)

    def _recover(self) -> None:
        for rec in self.disk.records():
            if len(rec) >= REC.size and rec[0] == REC_COMMITTED:
                _, _, _, cid, cseq = REC.unpack_from(rec)
                self.order.apply((cid, cseq))

    # clients -------------------------------------------------------------------------------
    def submit(self, req: protocol.Request, reply: Callable) -> None:
        if self.closed:
            reply(protocol.error_reply(req.client_seq, "replica is shutting down"))
            return
        if req.kind == protocol.QUERY:
            if req.semantics == protocol.CONSISTENT and not self.primary:
                self.counts["refused"] += 1
                reply(protocol.error_reply(req.client_seq, self._not_primary()))
            else:
                reply(protocol.Reply(req.client_seq, protocol.OK, self.order.ordinal))
            return
        if not self.primary:
            self.counts["refused"] += 1
            reply(protocol.error_reply(req.client_seq, self._not_primary()))
            return
        self.oseq += 1
        self.waiting[self.oseq] = (req, reply, time.monotonic())
        self.counts["actions_sent"] += 1
        self.node.multicast(encode_action(self.me, self.oseq, req), self.service)

    def _not_primary(self) -> str:
        return (f"corel: not in a primary component (members {list(self.members)} of "
                f"{len(self.servers)} servers; a primary needs {len(self.servers) // 2 + 1})")

    def _answer(self, key: tuple, reply_fn: Callable) -> None:
        if key[0] != self.me:
            return
        w = self.waiting.pop(key[1], None)
        if w is not None:
            w[1](reply_fn(w[0]))

    # group communication events ------------------------------------------------------------
    def on_event(self, ev) -> None:
        if self.closed:
            return
        if hasattr(ev, "payload"):
            self._on_delivery(ev)
        else:
            self._on_configuration(ev)

    def _on_configuration(self, ev) -> None:
        self.counts["configurations"] += 1
        self._doubt_all("the configuration changed before every member acknowledged it")
        if ev.transitional:
            self.regular = False
            self.primary = False
            self.members = tuple(ev.members)
            return
        self.regular = True
        self.conf_id = ev.conf_id
        self.members = tuple(sorted(ev.members))
        self.primary = 2 * len(set(self.members) & set(self.servers)) > len(self.servers)

    def _on_delivery(self, ev) -> None:
        try:
            msg = decode_message(ev.payload)
        except ValueError:
            self.counts["malformed"] += 1
            return
        usable = self.regular and self.primary and not ev.in_transitional
        if msg[0] == "action":
            self.counts["actions_delivered"] += 1
            _, key, req = msg
            if not usable:
                self._doubt(key, req, "it was ordered outside a primary configuration")
                return
            e = _Entry(key, req, self.members, self.conf_id)
            self.pending[key] = e
            rec = REC.pack(REC_FORCED, key[0], key[1], req.client_id, req.client_seq)
            self.disk.append(rec + req.payload, force=True, done=lambda: self._forced(e))
            return
        self.counts["acks_delivered"] += 1
        if not usable:
            return
        for key in msg[1]:
            e = self.pending.get(key)
            if e is not None and ev.sender in e.members:
                e.acks.add(ev.sender)
        self._commit_ready()

    def _forced(self, e: _Entry) -> None:
        if self.closed or self.pending.get(e.key) is not e or e.conf != self.conf_id:
            return  # in doubt meanwhile: no acknowledgement
        self.ack_batch.append(e.key)
        if self.loop is None or len(self.ack_batch) >= MAX_ACKS:
            self._flush_acks()
        elif not self.ack_flush_armed:
            self.ack_flush_armed = True
            self.loop.after(0, lambda now: self._flush_acks())

    def _flush_acks(self) -> None:
        self.ack_flush_armed = False
        keys, self.ack_batch = self.ack_batch, []
        keys = [k for k in keys if k in self.pending]
        if not keys or self.closed:
            return
        self.counts["acks_sent"] += len(keys)
        self.counts["ack_messages"] += 1
        self.node.multicast(encode_ack(keys), self.service)

    def _commit_ready(self) -> None:
        while self.pending:
            key, e = next(iter(self.pending.items()))
            if not e.members <= e.acks:
                return
            del self.pending[key]
            ordinal = self.order.apply(e.req.action_id)
            self.counts["committed"] += 1
            self.disk.append(REC.pack(REC_COMMITTED, key[0], key[1], *e.req.action_id),
                             force=False)
            self._answer(key, lambda req, n=ordinal: protocol.Reply(req.client_seq,
                                                                    protocol.OK, n))

    def _doubt(self, key: tuple, req: protocol.Request, why: str) -> None:
        self.counts["in_doubt"] += 1
        self.disk.append(REC.pack(REC_IN_DOUBT, key[0], key[1], *req.action_id), force=False)
        self._answer(key, lambda r: protocol.error_reply(
            r.client_seq, f"corel: action in doubt, not applied: {why}"))

    def _doubt_all(self, why: str) -> None:
        entries = list(self.pending.values())
        self.pending.clear()
        self.ack_batch = []
        for e in entries:
            self._doubt(e.key, e.req, why)

    def _tick(self, now: float) -> None:
        if self.closed:
            return
        for oseq, (req, reply, t0) in list(self.waiting.items()):
            if now - t0 > self.give_up_s and (self.me, oseq) not in self.pending:
                del self.waiting[oseq]
                self.counts["gave_up"] += 1
                reply(protocol.error_reply(
                    req.client_seq, f"corel: the action was not ordered within "
                    f"{self.give_up_s:g} s; its outcome is unknown"))
        self.loop.after(1.0, self._tick)

    # the server's interface ----------------------------------------------------------------
    def status(self) -> dict:
        return {"algo": "corel",
                "state": "closed" if self.closed else ("RegPrim" if self.primary else "NonPrim"),
                "primary": self.primary, "members": list(self.members),
                "conf": str(self.conf_id), "applied": self.order.ordinal,
                "hash": self.order.hexdigest(), "pending": len(self.pending),
                "waiting": len(self.waiting), **self.counts}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for req, reply, _t0 in list(self.waiting.values()):
            reply(protocol.error_reply(req.client_seq, "replica is shutting down"))
        self.waiting.clear()

