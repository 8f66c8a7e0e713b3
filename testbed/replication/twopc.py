"""Upper-bound two-phase commit (paper 004, section 7): the baseline that forces twice and
sends unicasts per action, without the locks a real 2PC needs (so a real one does worse).

The replica a client talks to is the **coordinator** of that client's actions:

1. it sends PREPARE(action) to every other replica by UDP unicast;
2. each participant forces the action to its disk (`disk.append(force=True)`) and answers
   YES (a participant that already prepared the action answers YES again without forcing:
   PREPARE is retransmitted on timeout, every `retransmit_s`);
3. once every participant said YES, the coordinator forces its decision record (with the
   action) and sends COMMIT to every participant, applies the action (the next ordinal of
   its own order) and answers the client. Each participant forces its outcome record on
   COMMIT (or ABORT) and then applies the action.

Per action that is two forced writes on the client's critical path (the participants' in
parallel, then the coordinator's) and 2n-1 forced writes in all: every replica forces twice
per action (its PREPARE or decision record, and its outcome record), which is what the
paper counts ("2PC requires two forced disk writes ... per action") and what its 63
updates/s against COReL's 110 imply (an earlier version forced only PREPARE and the
decision, one write per replica per action, and reached COReL's rate: 105-110 updates/s at
14 replicas). 3(n-1) unicasts: n-1 PREPARE, n-1 YES, n-1 COMMIT (the paper counts 2n;
`status()["sent"]` counts the real ones, retransmissions included). COMMIT is not
acknowledged (upper bound): a participant that misses it keeps the action prepared
(`in_doubt` in the status). A participant silent for `give_up_s` aborts the action: ABORT
to every participant, and the client gets an error (never a silent loss).
Without locks the replicas' orders may differ under concurrent coordinators: each
replica's `ordinal` and `hash` are its own order of commits (the baseline measures the cost
of the commit protocol, as the paper's did).

Datagrams: `header | body | tag` (testbed.sealed), header :=
    magic u16 (0x3243, "2C") | version u8 | type u8 | sender u16 | dest u16 | inc u64 |
    seq u64 | ts_us u64
`inc` is the sender's start time (µs); `seq` counts its datagrams (per incarnation). A
receiver drops a datagram not for it ('misdirected'), sent before it started or more than
`max_age_s` away from its clock ('stale'), or already seen (a `ReplayWindow` per sender
and incarnation; an older incarnation is a 'replay'). Bodies:
    PREPARE  txn u64 | client_id u64 | client_seq u64 | semantics u8 | payload
    YES, COMMIT, ABORT  txn u64 | cinc u64
where txn counts the coordinator's actions and cinc is the coordinator's incarnation.
"""

from __future__ import annotations

import collections
import socket
import struct
import time
from typing import Callable

from testbed.replication import protocol
from testbed.sealed import TAG_LEN, ReplayWindow, WireError, check_size, tag, verify

MAGIC = 0x3243
VERSION = 1
PREPARE, YES, COMMIT, ABORT = 1, 2, 3, 4
TYPE_NAMES = {PREPARE: "prepare", YES: "yes", COMMIT: "commit", ABORT: "abort"}
HEADER = struct.Struct("!HBBHHQQQ")
PREP_HEAD = struct.Struct("!QQQB")
TXN = struct.Struct("!QQ")  # txn, the coordinator's incarnation
MIN_DATAGRAM = HEADER.size + TXN.size + TAG_LEN
MAX_DATAGRAM = 65507
DROP_REASONS = ("truncated", "oversized", "bad_magic", "bad_version", "bad_hmac",
                "unknown_type", "unknown_sender", "misdirected", "stale", "replay",
                "malformed")
_SEM = {v: k for k, v in protocol.SEMANTICS.items()}
# log records: kind u8 | sender u16 | inc u64 | txn u64 | client_id u64 | client_seq u64
REC = struct.Struct("!BHQQQQ")
REC_PREPARED, REC_DECIDED, REC_COMMITTED, REC_ABORTED = 1, 2, 3, 4


def encode(key: bytes, mtype: int, sender: int, dest: int, inc: int, seq: int, ts_us: int,
           body: bytes) -> bytes:
    data = HEADER.pack(MAGIC, VERSION, mtype, sender, dest, inc, seq, ts_us) + body
    return data + tag(key, data)


def decode(key: bytes, data: bytes) -> tuple:
    """(type, sender, dest, inc, seq, ts_us, body) of an authenticated datagram; WireError
    naming the drop reason otherwise."""
    check_size(len(data), MIN_DATAGRAM, MAX_DATAGRAM)
    magic, version, mtype, sender, dest, inc, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad_magic", hex(magic))
    if version != VERSION:
        raise WireError("bad_version", str(version))
    verify(key, data, len(data))
    if mtype not in TYPE_NAMES:
        raise WireError("unknown_type", str(mtype))
    body = data[HEADER.size:len(data) - TAG_LEN]
    if mtype == PREPARE and len(body) < PREP_HEAD.size:
        raise WireError("malformed", "prepare shorter than its header")
    if mtype != PREPARE and len(body) != TXN.size:
        raise WireError("malformed", f"{TYPE_NAMES[mtype]} body of {len(body)} bytes")
    return mtype, sender, dest, inc, seq, ts, body


class Guard:
    """Replay and freshness checks for the replica `me` (see the module's doc)."""

    def __init__(self, me: int, started_us: int, max_age_s: float = 30.0, window: int = 4096):
        self.me, self.started_us = me, started_us
        self.max_age_us = int(max_age_s * 1e6)
        self.window = window
        self.senders: dict = {}  # sender -> (inc, ReplayWindow)

    def check(self, sender: int, dest: int, inc: int, seq: int, ts_us: int,
              now_us: int):
        if dest != self.me:
            return "misdirected"
        if ts_us < self.started_us or abs(now_us - ts_us) > self.max_age_us:
            return "stale"
        known = self.senders.get(sender)
        if known is None or inc > known[0]:
            win = ReplayWindow(self.window)
            win.accept(seq)
            self.senders[sender] = (inc, win)
            return None
        if inc < known[0] or not known[1].accept(seq):
            return "replay"
        return None


class TwoPC:
    """One replica of the upper-bound 2PC (coordinator of its own clients' actions,
    participant in everyone else's). The server's algorithm interface: submit, on_event,
    status, close."""

    def __init__(self, loop, me: int, peers: dict, port: int, key: bytes, disk,
                 bind_ip: str = None, retransmit_s: float = 0.2, give_up_s: float = 5.0,
                 max_age_s: float = 30.0):
        if me not in peers:
            raise ValueError(f"replica {me} is not among the peers {sorted(peers)}")
        self.loop, self.me, self.key, self.disk = loop, me, key, disk
        self.peers = {int(k): v for k, v in peers.items()}
        self.others = sorted(p for p in self.peers if p != me)
        self.port = port
        self.retransmit_s, self.give_up_s = retransmit_s, give_up_s
        self.inc = int(time.time() * 1e6)
        self.guard = Guard(me, self.inc, max_age_s)
        self.seq = 0
        self.txn = 0
        self.order = protocol.OrderHash()
        self.pending: dict = {}  # txn -> _Txn (coordinator)
        self.prepared: dict = {}  # (coord, inc, txn) -> action_id or None while forcing
        self.finished: collections.OrderedDict = collections.OrderedDict()
        self.sent = {name: 0 for name in TYPE_NAMES.values()}
        self.received = {name: 0 for name in TYPE_NAMES.values()}
        self.drops = {r: 0 for r in DROP_REASONS}
        self.committed = self.aborted = 0
        self.closed = False
        for rec in disk.records():  # recovery: the order of what committed here
            if len(rec) >= REC.size and rec[0] in (REC_DECIDED, REC_COMMITTED):
                self.order.apply(REC.unpack_from(rec)[4:6])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind_ip or self.peers[me], port))
        self.sock.setblocking(False)
        loop.add(self.sock, self._readable)
        loop.after(retransmit_s, self._tick)

    # sending -------------------------------------------------------------------------------
    def _send(self, mtype: int, dest: int, body: bytes) -> None:
        self.seq += 1
        data = encode(self.key, mtype, self.me, dest, self.inc, self.seq,
                      int(time.time() * 1e6), body)
        try:
            self.sock.sendto(data, (self.peers[dest], self.port))
            self.sent[TYPE_NAMES[mtype]] += 1
        except OSError:
            pass  # unreachable now: the retransmission or the give-up timer handles it

    # coordinator ---------------------------------------------------------------------------
    def submit(self, req: protocol.Request, reply: Callable) -> None:
        if self.closed:
            reply(protocol.error_reply(req.client_seq, "replica is shutting down"))
            return
        if req.kind == protocol.QUERY:  # no locks: answer from the local order
            reply(protocol.Reply(req.client_seq, protocol.OK, self.order.ordinal))
            return
        room = MAX_DATAGRAM - HEADER.size - PREP_HEAD.size - TAG_LEN
        if len(req.payload) > room:
            reply(protocol.error_reply(req.client_seq, f"2pc: an action's payload is at most "
                                       f"{room} bytes (one PREPARE datagram), got "
                                       f"{len(req.payload)}"))
            return
        self.txn += 1
        t = _Txn(self.txn, req, reply, set(self.others), time.monotonic())
        self.pending[t.txn] = t
        body = PREP_HEAD.pack(t.txn, req.client_id, req.client_seq,
                              protocol.SEMANTICS[req.semantics]) + req.payload
        t.body = body
        for p in self.others:
            self._send(PREPARE, p, body)
        if not t.waiting:
            self._decide(t)

    def _decide(self, t: "_Txn") -> None:
        t.deciding = True
        rec = REC.pack(REC_DECIDED, self.me, self.inc, t.txn, *t.req.action_id)
        self.disk.append(rec + t.req.payload, force=True, done=lambda: self._decided(t))

    def _decided(self, t: "_Txn") -> None:
        if self.pending.pop(t.txn, None) is None:
            return
        for p in self.others:
            self._send(COMMIT, p, TXN.pack(t.txn, self.inc))
        self.committed += 1
        ordinal = self.order.apply(t.req.action_id)
        t.reply(protocol.Reply(t.req.client_seq, protocol.OK, ordinal))

    def _abort(self, t: "_Txn", reason: str) -> None:
        self.pending.pop(t.txn, None)
        for p in self.others:
            self._send(ABORT, p, TXN.pack(t.txn, self.inc))
        self.aborted += 1
        self.disk.append(REC.pack(REC_ABORTED, self.me, self.inc, t.txn, *t.req.action_id),
                         force=False)
        t.reply(protocol.error_reply(t.req.client_seq, reason))

    def _tick(self, now: float) -> None:
        if self.closed:
            return
        for t in list(self.pending.values()):
            if t.deciding or not t.waiting:
                continue
            if now - t.started > self.give_up_s:
                self._abort(t, f"2pc: replica(s) {sorted(t.waiting)} did not answer PREPARE "
                               f"within {self.give_up_s:g} s; action aborted")
            elif now - t.last_sent >= self.retransmit_s:
                t.last_sent = now
                for p in sorted(t.waiting):
                    self._send(PREPARE, p, t.body)
        self.loop.after(self.retransmit_s / 2, self._tick)

    # receiving -----------------------------------------------------------------------------
    def _readable(self, mask: int) -> None:
        for _ in range(64):
            try:
                data, _addr = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.handle(data)

    def handle(self, data: bytes) -> None:
        try:
            mtype, sender, dest, inc, seq, ts, body = decode(self.key, data)
        except WireError as e:
            self.drops[e.reason] = self.drops.get(e.reason, 0) + 1
            return
        if sender not in self.peers or sender == self.me:
            self.drops["unknown_sender"] += 1
            return
        why = self.guard.check(sender, dest, inc, seq, ts, int(time.time() * 1e6))
        if why:
            self.drops[why] += 1
            return
        self.received[TYPE_NAMES[mtype]] += 1
        if mtype == PREPARE:
            self._on_prepare(sender, inc, body)
        elif mtype == YES:
            txn, cinc = TXN.unpack(body)
            t = self.pending.get(txn)
            if t is not None and cinc == self.inc:
                t.waiting.discard(sender)
                if not t.waiting and not t.deciding:
                    self._decide(t)
        else:
            txn, cinc = TXN.unpack(body)
            self._on_outcome(sender, cinc, txn, mtype == COMMIT)

    def _on_prepare(self, coord: int, inc: int, body: bytes) -> None:
        txn, cid, cseq, sem = PREP_HEAD.unpack_from(body)
        k = (coord, inc, txn)
        if k in self.finished:
            return
        if k in self.prepared:
            if self.prepared[k] is not None:  # forced already: say YES again
                self._send(YES, coord, TXN.pack(txn, inc))
            return
        self.prepared[k] = None
        rec = REC.pack(REC_PREPARED, coord, inc, txn, cid, cseq) + body[PREP_HEAD.size:]

        def forced():
            if k in self.prepared and not self.closed:
                self.prepared[k] = (cid, cseq)
                self._send(YES, coord, TXN.pack(txn, inc))

        self.disk.append(rec, force=True, done=forced)

    def _on_outcome(self, coord: int, inc: int, txn: int, commit: bool) -> None:
        k = (coord, inc, txn)
        aid = self.prepared.pop(k, None)
        if k in self.finished:
            return
        self.finished[k] = True
        while len(self.finished) > 100000:
            self.finished.popitem(last=False)
        if aid is None:
            return  # never prepared here (or still forcing: its YES goes nowhere)
        def forced():
            if commit and not self.closed:
                self.order.apply(aid)

        # the participant forces its outcome record too (2PC as in Gray and Reuter, and as
        # the paper counts it: two forced writes per action at every replica)
        self.disk.append(REC.pack(REC_COMMITTED if commit else REC_ABORTED, coord, inc, txn,
                                  *aid), force=True, done=forced)

    # the server's interface ----------------------------------------------------------------
    def on_event(self, event) -> None:
        """2PC does not use the group communication."""

    def status(self) -> dict:
        return {"algo": "2pc", "state": "closed" if self.closed else "RegPrim",
                "primary": True, "members": sorted(self.peers), "applied": self.order.ordinal,
                "hash": self.order.hexdigest(), "committed": self.committed,
                "aborted": self.aborted, "pending": len(self.pending),
                "in_doubt": sum(1 for v in self.prepared.values() if v is not None),
                "sent": dict(self.sent), "received": dict(self.received),
                "packets_sent": sum(self.sent.values()),
                "drops": {k: v for k, v in self.drops.items() if v}}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in list(self.pending.values()):
            self.pending.pop(t.txn, None)
            t.reply(protocol.error_reply(t.req.client_seq, "replica is shutting down"))
        self.loop.remove(self.sock)
        self.sock.close()


class _Txn:
    __slots__ = ("txn", "req", "reply", "waiting", "started", "last_sent", "deciding",
                 "body")

    def __init__(self, txn, req, reply, waiting, started):
        self.txn, self.req, self.reply, self.waiting = txn, req, reply, waiting
        self.started = self.last_sent = started
        self.deciding = False
        self.body = b""
