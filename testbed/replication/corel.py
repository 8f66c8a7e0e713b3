"""COReL (Keidar, 1994), the baseline with an end-to-end acknowledgement per action, on the
group communication of testbed.replication.gc (docs/replication.md).

Normal operation, in a primary configuration (state RegPrim):

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
  replica that may ever take part): a static majority rather than COReL's dynamic voting.
  Outside RegPrim an update or a consistent query is refused at once (an error reply);
  weak and dirty queries are answered from the local order.
- **Acknowledgements count only in the regular configuration** the action was delivered
  in. When a configuration ends (its transitional configuration is delivered), every
  action still waiting for acknowledgements becomes **in doubt**, with its place in the
  agreed order (configuration id, delivery index); so does an action delivered in a
  transitional or non-primary configuration. Its originator answers the client with an
  error: the outcome is unknown (it may still be applied, see below; never silently).
- **Exchange** (state Exchange) when a primary configuration is installed, before anything
  new is accepted: every member multicasts STATE (the number of actions it applied and
  its in-doubt actions); once all are delivered, the member that applied the most (lowest
  id on a tie) multicasts the committed action ids the others lack (TRANSFER), and every
  member applies them; then every member applies the union of the reported in-doubt
  actions that are not applied yet, sorted by their place in the agreed order. An action
  that any member committed was acknowledged by every member of its configuration, so
  every one of them holds it (forced, then in doubt); a primary is a majority, so it
  contains one of them, and the action is applied again in the same place. This is
  Keidar's resolution in its simplest form: the state exchange carries action ids only
  (the baselines keep the order, not a database), and in-doubt actions are kept in memory
  (a replica that restarts forgets its in-doubt actions; its committed ones are in its log).
- An originator that gets no delivery of its action within `give_up_s` answers the client
  with an error (the outcome is then unknown, and says so).

Messages (payload of a group multicast, at most 1200 bytes):
    ACTION    b"A" | orig u16 | oseq u64 | client_id u64 | client_seq u64 | semantics u8 |
              payload
    ACK       b"K" | n u16 | n x (orig u16 | oseq u64)
    STATE     b"S" | CONF | last u8 | applied u64 | n u16 | n x DOUBT
    TRANSFER  b"T" | CONF | last u8 | first ordinal u64 | n u16 | n x (cid u64 | cseq u64)
    CONF  := seq u64 | coord u16 | inc u64          (the configuration it belongs to)
    DOUBT := orig u16 | oseq u64 | cid u64 | cseq u64 | CONF | index u32
`oseq` counts the originator's actions from its start time in µs (unique across restarts).
Log records: kind u8 | orig u16 | oseq u64 | client_id u64 | client_seq u64 (+ payload):
1 forced action, 2 committed (in the order of the ordinals), 3 in doubt. At start the
committed records rebuild the order.
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
CONF = struct.Struct("!QHQ")
STATE_HEAD = struct.Struct("!c" + CONF.format[1:] + "BQH")
DOUBT = struct.Struct("!HQQQ" + CONF.format[1:] + "I")
XFER_HEAD = struct.Struct("!c" + CONF.format[1:] + "BQH")
XFER_ITEM = struct.Struct("!QQ")
REC = struct.Struct("!BHQQQ")
REC_FORCED, REC_COMMITTED, REC_IN_DOUBT = 1, 2, 3
MAX_PAYLOAD = 1200
MAX_ACKS = (MAX_PAYLOAD - ACK_HEAD.size) // ACK_ITEM.size
MAX_DOUBTS = (MAX_PAYLOAD - STATE_HEAD.size) // DOUBT.size
MAX_XFER = (MAX_PAYLOAD - XFER_HEAD.size) // XFER_ITEM.size
_SEM = {v: k for k, v in protocol.SEMANTICS.items()}
NONPRIM, EXCHANGE, REGPRIM = "NonPrim", "Exchange", "RegPrim"


def conf_tuple(conf) -> tuple:
    """(seq, coord, inc) of a gc.ConfId (or of a tuple, for tests)."""
    if conf is None:
        return (0, 0, 0)
    if isinstance(conf, tuple):
        return tuple(conf)
    return (conf.seq, conf.coord, conf.inc)


def encode_action(orig: int, oseq: int, req: protocol.Request) -> bytes:
    return ACTION_HEAD.pack(b"A", orig, oseq, req.client_id, req.client_seq,
                            protocol.SEMANTICS[req.semantics]) + req.payload


def encode_ack(keys) -> bytes:
    keys = list(keys)
    return ACK_HEAD.pack(b"K", len(keys)) + b"".join(ACK_ITEM.pack(*k) for k in keys)


def encode_states(conf: tuple, applied: int, doubts: list) -> list:
    """STATE messages: doubts = [((orig, oseq), (cid, cseq), (conf tuple), index)]."""
    chunks = [doubts[i:i + MAX_DOUBTS] for i in range(0, len(doubts), MAX_DOUBTS)] or [[]]
    out = []
    for n, chunk in enumerate(chunks):
        last = 1 if n == len(chunks) - 1 else 0
        out.append(STATE_HEAD.pack(b"S", *conf, last, applied, len(chunk)) + b"".join(
            DOUBT.pack(k[0], k[1], a[0], a[1], *c, i) for k, a, c, i in chunk))
    return out


def encode_transfers(conf: tuple, first: int, ids: list) -> list:
    chunks = [ids[i:i + MAX_XFER] for i in range(0, len(ids), MAX_XFER)] or [[]]
    out = []
    for n, chunk in enumerate(chunks):
        last = 1 if n == len(chunks) - 1 else 0
        out.append(XFER_HEAD.pack(b"T", *conf, last, first + n * MAX_XFER, len(chunk))
                   + b"".join(XFER_ITEM.pack(*a) for a in chunk))
    return out


def decode_message(data: bytes):
    """("action", key, Request) | ("ack", [key]) | ("state", conf, last, applied, doubts) |
    ("transfer", conf, last, first, [action_id]); ValueError if malformed."""
    t = data[:1]
    if t == b"A" and len(data) >= ACTION_HEAD.size:
        _, orig, oseq, cid, cseq, sem = ACTION_HEAD.unpack_from(data)
        if sem not in _SEM or _SEM[sem] not in protocol.UPDATE_SEMANTICS:
            raise ValueError(f"bad semantics {sem}")
        return "action", (orig, oseq), protocol.Request(
            cid, cseq, protocol.UPDATE, _SEM[sem], bytes(data[ACTION_HEAD.size:]))
    if t == b"K" and len(data) >= ACK_HEAD.size:
        _, n = ACK_HEAD.unpack_from(data)
        if len(data) != ACK_HEAD.size + n * ACK_ITEM.size:
            raise ValueError("ack length")
        return "ack", [ACK_ITEM.unpack_from(data, ACK_HEAD.size + i * ACK_ITEM.size)
                       for i in range(n)]
    if t == b"S" and len(data) >= STATE_HEAD.size:
        _, s, c, i, last, applied, n = STATE_HEAD.unpack_from(data)
        if len(data) != STATE_HEAD.size + n * DOUBT.size:
            raise ValueError("state length")
        doubts = []
        for j in range(n):
            o, q, cid, cseq, cs, cc, ci, idx = DOUBT.unpack_from(
                data, STATE_HEAD.size + j * DOUBT.size)
            doubts.append(((o, q), (cid, cseq), (cs, cc, ci), idx))
        return "state", (s, c, i), bool(last), applied, doubts
    if t == b"T" and len(data) >= XFER_HEAD.size:
        _, s, c, i, last, first, n = XFER_HEAD.unpack_from(data)
        if len(data) != XFER_HEAD.size + n * XFER_ITEM.size:
            raise ValueError("transfer length")
        return "transfer", (s, c, i), bool(last), first, [
            XFER_ITEM.unpack_from(data, XFER_HEAD.size + j * XFER_ITEM.size) for j in range(n)]
    raise ValueError("unknown message")


class _Entry:
    __slots__ = ("key", "req", "members", "acks", "conf", "index")

    def __init__(self, key, req, members, conf, index):
        self.key, self.req, self.members = key, req, frozenset(members)
        self.conf, self.index = conf, index
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
        self.history: list = []      # committed action ids, by ordinal - 1
        self.committed_ids: set = set()
        self.conf = (0, 0, 0)
        self.members: tuple = ()
        self.state = NONPRIM
        self.regular = False
        self.index = 0               # actions delivered in this regular configuration
        self.pending: collections.OrderedDict = collections.OrderedDict()  # key -> _Entry
        self.doubt: dict = {}        # key -> (action_id, conf, index)
        self.waiting: dict = {}      # oseq -> (req, reply, submitted at)
        self.exchange = None         # {"states": {m: [applied, doubts, last]}, ...}
        self.ack_batch: list = []
        self.ack_flush_armed = False
        self.counts = {"committed": 0, "in_doubt": 0, "resolved": 0, "transferred": 0,
                       "refused": 0, "gave_up": 0, "actions_sent": 0, "acks_sent": 0,
                       "ack_messages": 0, "actions_delivered": 0, "acks_delivered": 0,
                       "exchange_messages": 0, "malformed": 0, "configurations": 0}
        self.closed = False
        for rec in self.disk.records():
            if len(rec) >= REC.size and rec[0] == REC_COMMITTED:
                self._apply(REC.unpack_from(rec)[3:5], log=False)
        if loop is not None:
            loop.after(1.0, self._tick)

    @property
    def primary(self) -> bool:
        return self.state == REGPRIM

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
        if ACTION_HEAD.size + len(req.payload) > MAX_PAYLOAD:
            reply(protocol.error_reply(req.client_seq, f"corel: an action's payload is at "
                                       f"most {MAX_PAYLOAD - ACTION_HEAD.size} bytes, got "
                                       f"{len(req.payload)}"))
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
        if self.state == EXCHANGE:
            return "corel: exchanging states after a configuration change; try again"
        return (f"corel: not in a primary component (members {list(self.members)} of "
                f"{len(self.servers)} servers; a primary needs {len(self.servers) // 2 + 1})")

    def _answer(self, key: tuple, reply_fn: Callable) -> None:
        if key[0] != self.me:
            return
        w = self.waiting.pop(key[1], None)
        if w is not None:
            w[1](reply_fn(w[0]))

    def _apply(self, action_id: tuple, log: bool = True) -> int:
        """Apply an action at the next ordinal (once: a second time is skipped, 0)."""
        action_id = tuple(action_id)
        if action_id in self.committed_ids:
            return 0
        self.committed_ids.add(action_id)
        self.history.append(action_id)
        if log:
            self.disk.append(REC.pack(REC_COMMITTED, 0, 0, *action_id), force=False)
        return self.order.apply(action_id)

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
        self._doubt_pending("the configuration changed before every member acknowledged it")
        self.exchange = None
        self.members = tuple(sorted(ev.members))
        if ev.transitional:
            self.regular = False
            self.state = NONPRIM
            return
        self.regular = True
        self.conf = conf_tuple(ev.conf_id)
        self.index = 0
        if 2 * len(set(self.members) & set(self.servers)) <= len(self.servers):
            self.state = NONPRIM
            return
        self.state = EXCHANGE
        self.exchange = {"states": {}, "done": set(), "leader": None, "target": None}
        doubts = sorted(((k, a, c, i) for k, (a, c, i) in self.doubt.items()),
                        key=lambda d: (d[2], d[3]))
        for m in encode_states(self.conf, self.order.ordinal, doubts):
            self.counts["exchange_messages"] += 1
            self.node.multicast(m, self.service)

    def _on_delivery(self, ev) -> None:
        try:
            msg = decode_message(ev.payload)
        except ValueError:
            self.counts["malformed"] += 1
            return
        kind = msg[0]
        if kind in ("state", "transfer"):
            if (self.state == EXCHANGE and not ev.in_transitional and msg[1] == self.conf
                    and ev.sender in self.members):
                (self._on_state if kind == "state" else self._on_transfer)(ev.sender, *msg[2:])
            return
        usable = self.regular and self.state == REGPRIM and not ev.in_transitional
        if kind == "action":
            self.counts["actions_delivered"] += 1
            _, key, req = msg
            self.index += 1
            if not usable:
                self._doubt(key, req.action_id, self.conf, self.index,
                            "it was ordered outside a primary configuration")
                return
            e = _Entry(key, req, self.members, self.conf, self.index)
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
        if self.closed or self.pending.get(e.key) is not e:
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
            ordinal = self._apply(e.req.action_id)
            self.counts["committed"] += 1
            if ordinal:
                self._answer(key, lambda req, n=ordinal: protocol.Reply(
                    req.client_seq, protocol.OK, n))
            else:
                self._answer(key, lambda req: protocol.error_reply(
                    req.client_seq, "corel: duplicate action (applied before)"))

    def _doubt(self, key: tuple, action_id: tuple, conf: tuple, index: int, why: str) -> None:
        self.counts["in_doubt"] += 1
        self.doubt[key] = (tuple(action_id), conf, index)
        self.disk.append(REC.pack(REC_IN_DOUBT, key[0], key[1], *action_id), force=False)
        self._answer(key, lambda r: protocol.error_reply(
            r.client_seq, f"corel: action in doubt, outcome unknown: {why}"))

    def _doubt_pending(self, why: str) -> None:
        entries = list(self.pending.values())
        self.pending.clear()
        self.ack_batch = []
        for e in entries:
            self._doubt(e.key, e.req.action_id, e.conf, e.index, why)

    # the exchange after a primary configuration is installed -------------------------------
    def _on_state(self, sender: int, last: bool, applied: int, doubts: list) -> None:
        ex = self.exchange
        st = ex["states"].setdefault(sender, [applied, [], False])
        st[1].extend(doubts)
        st[2] = last
        if not all(m in ex["states"] and ex["states"][m][2] for m in self.members):
            return
        applied_by = {m: ex["states"][m][0] for m in self.members}
        top = max(applied_by.values())
        low = min(applied_by.values())
        ex["leader"] = min(m for m, a in applied_by.items() if a == top)
        ex["target"] = top
        if low == top:
            self._finish_exchange()
            return
        if self.me == ex["leader"]:
            for m in encode_transfers(self.conf, low + 1, self.history[low:top]):
                self.counts["exchange_messages"] += 1
                self.node.multicast(m, self.service)

    def _on_transfer(self, sender: int, last: bool, first: int, ids: list) -> None:
        ex = self.exchange
        if ex["leader"] != sender:
            return
        for i, aid in enumerate(ids):
            if first + i == self.order.ordinal + 1:
                self._apply(aid)
                self.counts["transferred"] += 1
        if last:
            self._finish_exchange()

    def _finish_exchange(self) -> None:
        ex = self.exchange
        union: dict = {}
        for m in sorted(ex["states"]):
            for key, aid, conf, index in ex["states"][m][1]:
                union.setdefault(key, (conf, index, aid))
        for key, (_conf, _index, aid) in sorted(union.items(), key=lambda kv: kv[1][:2]):
            if self._apply(aid):
                self.counts["resolved"] += 1
            self.doubt.pop(key, None)
        self.exchange = None
        self.state = REGPRIM

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
        return {"algo": "corel", "state": "closed" if self.closed else self.state,
                "primary": self.primary, "members": list(self.members),
                "conf": list(self.conf), "applied": self.order.ordinal,
                "hash": self.order.hexdigest(), "pending": len(self.pending),
                "doubt_now": len(self.doubt), "waiting": len(self.waiting), **self.counts}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for req, reply, _t0 in list(self.waiting.values()):
            reply(protocol.error_reply(req.client_seq, "replica is shutting down"))
        self.waiting.clear()
