"""The engine's bookkeeping (pure), under the state machine of engine.py: the colours of the
actions, the disk records and their replay at start, the database, the client requests
(updates, the three kinds of query), PERSISTENT_JOIN / LEAVE and the joiner's snapshot,
status(). engine.py's docstring gives the design and the choices.

Per server:

- `cut` {creator: n}: it holds creator's actions 1..n (green, yellow or red); `bodies` the
  action bodies it holds and has not whitened; `pending` actions above a gap;
- `green_of` {aid: ordinal} and `order` {ordinal: aid} of the non-white green actions;
  `green_cut` {creator: highest index green} (a joiner's cut at its join point);
- `red` (an insertion-ordered dict of aids) and `yellow` (a list, in delivery order);
- `prim` (index, attempt, members) of the last primary; `attempt`; `vulnerable`;
  `in_prim` (installed a primary and has not finished an exchange since: logged, so a
  restart knows) and `amnesic` (restarted after a crash inside a primary);
- `created` {aid: [action, sent]}: this server's actions that are forced on disk but not
  held yet (sent = multicast already).
"""

from __future__ import annotations

import json

from testbed.replication import actions as A
from testbed.replication import protocol as P
from testbed.replication.db import Db

SAFE = 2   # testbed.replication.gc.wire.SAFE
SEM = P.SEMANTICS


class Core:
    def __init__(self, me, servers, disk, send, on_reply=None, *, weights=None,
                 on_joined=None, max_payload=1200, trace=None):
        servers = sorted({int(s) for s in servers})
        self.me, self.disk, self.send_fn = me, disk, send
        self.on_reply, self.on_joined, self.trace = on_reply, on_joined, trace
        self.weights = dict(weights or {})
        self.max_payload = max_payload
        self.servers, self.left, self.join_points = set(servers), set(), {}
        self.db = Db()
        self.cut, self.bodies, self.pending, self.pending_green = {}, {}, {}, {}
        self.green_of, self.order, self.green_cut = {}, {}, {}
        self.red, self.yellow = {}, []
        self.prim = (0, 0, tuple(servers))
        self.attempt, self.vulnerable = 0, None
        self.in_prim = self.amnesic = False
        self.body_base = 0
        self.green_lines = {}
        self.join_snapshots = {}
        self.created, self.my_index, self.my_green = {}, 0, 0
        self.waiting, self.consistent = {}, []
        self.state, self.conf_id, self.members, self.in_trans = "NonPrim", None, (), False
        self.states, self.dones, self.cpcs, self.plan = {}, set(), set(), None
        self.reasm = A.Reassembler()
        self.msg_id = 0
        self.closed = self.replaying = False
        self.counts = {k: 0 for k in ("sent", "sent_bytes", "delivered", "writes", "forced",
                                      "forced_actions", "retrans", "installs",
                                      "duplicate_deliveries", "transitions",
                                      "bad_messages")}

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, msg: bytes) -> None:
        self.msg_id += 1
        for piece in A.fragment(msg, self.msg_id, self.max_payload):
            self.counts["sent"] += 1
            self.counts["sent_bytes"] += len(piece)
            self.send_fn(piece, SAFE)

    def _append(self, record: bytes, force: bool, done=None) -> None:
        if self.replaying:
            return
        self.counts["writes"] += 1
        self.counts["forced"] += bool(force)
        self.disk.append(record, force=force, done=done)

    def _set_state(self, st: str) -> None:
        if st != self.state:
            self.counts["transitions"] += 1
        self.state = st
        if st == "RegPrim":
            self._check_consistent()

    def _write_meta(self, force: bool, done=None) -> None:
        meta = {"prim": [self.prim[0], self.prim[1], list(self.prim[2])],
                "att": self.attempt, "ip": self.in_prim, "amn": self.amnesic,
                "vul": None if self.vulnerable is None else
                [self.vulnerable[0], self.vulnerable[1], list(self.vulnerable[2])],
                "y": [list(aid) for aid in self.yellow]}
        self._append(A.encode_json(A.REC_META, meta), force, done)

    # -- colours --------------------------------------------------------------------------

    def _held(self, aid) -> bool:
        return aid[1] <= self.cut.get(aid[0], 0)

    def _is_green(self, aid) -> bool:
        """Green here (a creator's green actions are its indexes 1..n: global FIFO)."""
        return aid[1] <= self.green_cut.get(aid[0], 0)

    def _hold(self, a: A.Action, record: bool = True) -> None:
        self.cut[a.creator] = a.index
        self.bodies[a.aid] = a
        if a.creator in self.pending:
            self.pending[a.creator].pop(a.index, None)
        if a.creator == self.me:
            self.created.pop(a.aid, None)
        elif record:
            self._append(A.REC_RED + A.encode_action(a), False)
        w = self.waiting.get(a.aid)
        if w is not None and a.semantics != SEM[P.STRICT]:
            del self.waiting[a.aid]
            self._reply(w, P.Reply(a.client_seq, P.OK, 0))

    def _make_green(self, a: A.Action) -> None:
        aid = a.aid
        o = self.db.ordinal + 1
        self.red.pop(aid, None)
        if aid in self.yellow:
            self.yellow.remove(aid)
        self.green_of[aid] = o
        self.order[o] = aid
        if a.index > self.green_cut.get(a.creator, 0):
            self.green_cut[a.creator] = a.index
        self._append(A.encode_ordinal_action(A.REC_GREEN, o, a), False)
        applied, rep_ord = self.db.apply(o, a)
        if self.trace is not None:
            self.trace.append((o, aid, applied))
        if a.kind == A.JOIN:
            self._joined(a.target, o)
        elif a.kind == A.LEAVE:
            self.servers.discard(a.target)
            self.left.add(a.target)
            self.green_lines.pop(a.target, None)
        if a.creator == self.me:
            self.my_green = max(self.my_green, a.index)
        w = self.waiting.pop(aid, None)
        if w is not None:
            self._reply(w, P.Reply(a.client_seq, P.OK, rep_ord))
        if self.consistent:
            self._check_consistent()

    def _whiten(self) -> None:
        self.green_lines[self.me] = self.db.ordinal
        white = min(self.green_lines.get(s, self.join_points.get(s, 0)) for s in self.servers)
        white = min(white, self.db.ordinal)
        for o in range(self.body_base + 1, white + 1):
            aid = self.order.pop(o, None)
            if aid is not None:
                self.bodies.pop(aid, None)
                self.green_of.pop(aid, None)
        self.body_base = max(self.body_base, white)

    # -- own actions ----------------------------------------------------------------------

    def _create(self, kind, client_id, client_seq, semantics, payload, waiter=None):
        self.my_index += 1
        if kind == A.UPDATE:
            a = A.Action(kind, self.me, self.my_index, client_id, client_seq, semantics,
                         payload)
        else:
            a = A.internal(kind, self.me, self.my_index, int.from_bytes(payload, "big"))
        if waiter is not None:
            self.waiting[a.aid] = waiter
        self.counts["forced_actions"] += 1
        self._append(A.REC_CREATED + A.encode_action(a), True,
                     lambda: self._created_done(a))
        return a

    def _created_done(self, a: A.Action) -> None:
        if self.closed or self._held(a.aid):
            return
        self.created[a.aid] = [a, False]
        if self.state in ("RegPrim", "NonPrim"):
            self._flush_unsent()

    def _flush_unsent(self) -> None:
        for entry in self.created.values():
            if not entry[1]:
                entry[1] = True
                self._send(A.MSG_ACTION + A.encode_action(entry[0]))

    def _hold_own_created(self) -> None:
        for aid in sorted(self.created):
            a = self.created[aid][0]
            if a.index == self.cut.get(self.me, 0) + 1:
                self._hold(a, record=False)
                self.red[aid] = None
        waiting = self.pending.get(self.me)
        while waiting and (self.cut.get(self.me, 0) + 1) in waiting:
            a = waiting.pop(self.cut.get(self.me, 0) + 1)
            self._hold(a, record=False)
            self.red[a.aid] = None

    def _state_message(self) -> dict:
        v = self.vulnerable
        return {"g": self.db.ordinal, "gb": self.body_base,
                "cut": {str(c): n for c, n in self.cut.items()},
                "prim": [self.prim[0], self.prim[1], list(self.prim[2])],
                "att": self.attempt, "amn": self.amnesic,
                "vul": None if v is None else [v[0], v[1], list(v[2])],
                "y": [list(aid) for aid in self.yellow]}

    # -- clients --------------------------------------------------------------------------

    def _reply(self, waiter, rep) -> None:
        fn = waiter[0] or self.on_reply
        if fn is not None:
            fn(rep)

    def submit(self, req, reply=None) -> None:
        """Take a client's request (protocol.Request); reply(protocol.Reply) once."""
        w = (reply, req.client_seq)
        if self.closed or self.me in self.left:
            self._reply(w, P.error_reply(req.client_seq, "this replica left the system"))
            return
        if req.kind == P.UPDATE:
            self._create(A.UPDATE, req.client_id, req.client_seq, SEM[req.semantics],
                         bytes(req.payload), w)
        elif req.semantics == P.WEAK:
            self._reply(w, P.Reply(req.client_seq, P.OK, self.db.ordinal,
                                   result=self.db.read(bytes(req.payload))))
        elif req.semantics == P.DIRTY:
            scratch = self.db.copy()
            for aid in list(self.yellow) + list(self.red):
                scratch.apply_tentative(self.bodies[aid])
            self._reply(w, P.Reply(req.client_seq, P.OK, self.db.ordinal,
                                   result=scratch.read(bytes(req.payload))))
        else:
            self.consistent.append((self.my_index, bytes(req.payload), w))
            self._check_consistent()

    def _check_consistent(self) -> None:
        if self.state != "RegPrim" or not self.consistent:
            return
        keep = []
        for target, key, w in self.consistent:
            if self.my_green >= target:
                self._reply(w, P.Reply(w[1], P.OK, self.db.ordinal, result=self.db.read(key)))
            else:
                keep.append((target, key, w))
        self.consistent = keep

    # -- joins and leaves -----------------------------------------------------------------

    def request_join(self, joiner: int) -> bool:
        """Issue PERSISTENT_JOIN(joiner) as its representative; False if already known."""
        if joiner in self.servers or joiner in self.left:
            return False
        self._create(A.JOIN, 0, 0, 0, A.SERVER.pack(joiner))
        return True

    def request_leave(self, server: int) -> bool:
        """Issue PERSISTENT_LEAVE(server) (itself, or a dead replica); False if unknown."""
        if server not in self.servers:
            return False
        self._create(A.LEAVE, 0, 0, 0, A.SERVER.pack(server))
        return True

    def _joined(self, r: int, o: int) -> None:
        if r in self.servers or r in self.left:
            return
        self.servers.add(r)
        self.join_points[r] = o
        self.green_lines[r] = o
        self.join_snapshots[r] = json.dumps({
            "v": 1, "joiner": r, "ordinal": o, "db": self.db.snapshot().decode(),
            "servers": sorted(self.servers), "cut": {str(c): n for c, n in
                                                     self.green_cut.items()},
            "join_points": {str(s): p for s, p in self.join_points.items()},
            "left": sorted(self.left)}, sort_keys=True, separators=(",", ":")).encode()
        if self.on_joined is not None and not self.replaying:
            self.on_joined(r)

    def snapshot_for(self, joiner: int):
        """The state transfer for joiner (bytes, identical at every server that ordered
        its PERSISTENT_JOIN), or None if its JOIN is not green here (yet)."""
        return self.join_snapshots.get(joiner)

    def _load_snapshot(self, blob: bytes) -> None:
        d = json.loads(blob)
        self.db = Db.restore(d["db"].encode())
        self.servers = set(d["servers"])
        self.left = set(d["left"])
        self.join_points = {int(s): p for s, p in d["join_points"].items()}
        self.cut = {int(c): n for c, n in d["cut"].items()}
        self.green_cut = dict(self.cut)
        self.body_base = int(d["ordinal"])
        self.prim = (-1, 0, ())

    # -- recovery -------------------------------------------------------------------------

    def _replay(self, records) -> None:
        self.replaying = True
        meta = None
        try:
            for rec in records:
                tag, body = rec[:1], rec[1:]
                if tag == A.REC_JOIN:
                    if self.db.ordinal == 0 and not self.cut:
                        self._load_snapshot(body)
                elif tag == A.REC_CREATED:
                    a = A.decode_action(body)
                    self.my_index = max(self.my_index, a.index)
                    if not self._held(a.aid):
                        self.created[a.aid] = [a, True]
                elif tag == A.REC_RED:
                    self._on_action_red(A.decode_action(body))
                elif tag == A.REC_GREEN:
                    o, a = A.decode_ordinal_action(body)
                    if o == self.db.ordinal + 1:
                        if not self._held(a.aid):
                            self._hold(a, record=False)
                        self._make_green(a)
                elif tag == A.REC_META:
                    meta = json.loads(body)
            if meta is not None:
                self.prim = (meta["prim"][0], meta["prim"][1], tuple(meta["prim"][2]))
                self.attempt = meta["att"]
                v = meta["vul"]
                self.vulnerable = None if v is None else (v[0], v[1], tuple(v[2]))
                # crashed inside a primary: others may have green actions it never got
                self.amnesic = bool(meta["amn"] or meta["ip"])
                self.yellow = [tuple(x) for x in meta["y"]
                               if self._held(tuple(x)) and not self._is_green(tuple(x))]
                for aid in self.yellow:
                    self.red.pop(aid, None)
            self._hold_own_created()
        finally:
            self.replaying = False

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        st = self.disk.stats() if hasattr(self.disk, "stats") else {}
        return {
            "state": self.state, "primary": self.state == "RegPrim",
            "prim": {"index": self.prim[0], "attempt": self.prim[1],
                     "members": list(self.prim[2])},
            "members": list(self.members), "servers": sorted(self.servers),
            "green": self.db.ordinal, "red": len(self.red), "yellow": len(self.yellow),
            "white": self.body_base, "pending": sum(map(len, self.pending.values())),
            "applied": self.db.applied, "duplicates": self.db.duplicates,
            "vulnerable": self.vulnerable is not None, "attempt": self.attempt,
            "amnesic": self.amnesic,
            "hash": self.db.hexdigest(), "counts": dict(self.counts), "disk": st,
        }

    def close(self) -> None:
        """Stop; every client still waiting (an update not yet answered, a consistent query)
        gets 'replica is shutting down' (the update may still be ordered by the others)."""
        self.closed = True
        waiting = [w for w in self.waiting.values()] + [w for _, _, w in self.consistent]
        self.waiting, self.consistent = {}, []
        for w in waiting:
            self._reply(w, P.error_reply(w[1], "replica is shutting down (the outcome of an "
                                               "update is unknown)"))
