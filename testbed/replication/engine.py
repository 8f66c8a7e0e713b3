"""Paper 004's replication engine (Amir and Tutu, "From Total Order to Database
Replication"), pure logic: it is driven by the group communication's events exactly as gc
delivers them and never touches a socket or a clock.

    eng = Engine(me, servers, disk, send)       # send(payload, service): a gc multicast
                            # (or node=GroupNode: send = node.multicast); servers: the
                            # initial servers (the first primary); disk: disk.Disk
    eng.on_event(ev)        # Configuration(conf_id, members, transitional) or
                            # Delivery(sender, service, payload, conf_id, in_transitional)
    eng.submit(req, reply)  # protocol.Request; reply(protocol.Reply) is called once
    eng.status(); eng.close()
    eng.request_join(r) / eng.request_leave(r)   # PERSISTENT_JOIN / LEAVE
    eng.snapshot_for(r) -> bytes | None          # the state transfer for joiner r
    Engine.from_snapshot(r, blob, disk, send)    # the joiner's engine (once; a restart
                                                 # is Engine(r, servers, disk, send))

Every multicast is SAFE and at most `max_payload` bytes (longer ones go in pieces).
Optional: weights {id: weight} for the voting, on_joined(r) (called when r's JOIN becomes
green here: its snapshot is ready), trace (a list: (ordinal, aid, applied) appended per
green action, for tests).

**Colours.** An action is red when ordered in a component whose primariness is unknown,
yellow when delivered in the transitional configuration of a primary, green once its
global order is known (it then has an ordinal and is applied to the database, `db.Db`),
white once every server is known to have it green (its body is then dropped).

**States** (Figure 4): RegPrim, TransPrim, ExchangeStates, ExchangeActions, Construct, No,
Un, NonPrim. A regular configuration starts an exchange (engine_exchange.py says what is
exchanged and decided); then Construct (the component holds a quorum and nobody in it is
undecided) or NonPrim. In Construct each member forces its vulnerable record and then
multicasts a CPC; all CPCs in the regular configuration -> install, RegPrim; the
transitional configuration first -> No; the missing CPCs in the transitional configuration
-> Un; an action in Un (case 1b) -> install, the action yellow, TransPrim; the regular
configuration in No -> nobody installed (case 3), the vulnerability is cleared; in Un ->
the member stays vulnerable (undecided) until an exchange resolves it. RegPrim + a
transitional configuration -> TransPrim (actions delivered there are yellow). Install: the
yellow actions, then the red ones sorted by (creator, index) (a deterministic order that
keeps each creator's FIFO order), become green.

**Quorum.** Dynamic linear voting: a weighted majority (weights default 1) of the members
of the last primary component that are still servers; exactly half of the weight wins iff
it holds the lowest id of those members. The first primary is all the initial servers.

**Disk.** The creator forces an action (`a` record) before multicasting it; everything
else on the normal path is unforced (`g` green / `r` red records, with the body), so the
forced writes per action are 1/n on average over n servers. The vulnerable record (before
a CPC), the record before a state message (so the green line it announces is on disk:
others whiten by it) and an install are forced too (a few per configuration change). A
restarted engine replays `disk.records()`: green order and database, red and yellow
actions, last primary, vulnerability; its own forced actions that it had not seen
delivered are held as red (the next exchange spreads them). The log is a prefix of what
was appended (disk.Disk has one writer thread): a SIGKILL may lose the unforced tail, never
a record before a completed forced one. A server that restarts after a crash inside a
primary is **amnesic** until an exchange with someone who holds that primary's whole order
(engine_exchange.py): it may have missed green actions (Safe delivery promises them to
every member unless it crashes), so it must not help form the next primary on its own
knowledge. Bodies of white actions are dropped at the end of an exchange (green lines are
learned from state messages); in a long stable primary they stay in memory until the next
configuration change.

Choices the paper leaves open:

- A server generates new actions (multicasts them) only in RegPrim and NonPrim; requests
  that arrive in other states, or whose forced write ends there, wait and go out on the
  next entry to RegPrim / NonPrim. On sending its state message a server holds (as red)
  every action it generated whose forced write is done, so an action lost across a
  configuration change (or a crash) still reaches everyone through the exchange.
- Actions from a creator are held in index order; one that arrives before its
  predecessor waits (pending) until the gap is filled, so each creator's actions are
  contiguous (the red cut) and green in FIFO order.
- Exchange retransmissions go through the group communication in the new configuration
  (SAFE), one action per message; then each member multicasts DONE; the exchange ends on
  every member's DONE. Messages longer than `max_payload` are fragmented.
- Commutative and timestamp updates are answered as soon as the action is delivered
  (red, yellow or green) in any component, without waiting for the global order: `add`
  and `ts_set` commute, so the state they build (the green database plus the red actions,
  which is what a dirty query reads) is the same at every member once an exchange has
  given the members the same actions, primary or not, and is final once they are green.
  Strict updates are answered when green, with their ordinal.
- Queries: weak = the green database at once; dirty = a scratch copy of the green
  database with the yellow and red actions applied in their local order; consistent =
  answered in RegPrim once every action this server generated before the query is green
  (no action is generated for it).
- PERSISTENT_JOIN(r) is `request_join(r)` at any member (the representative); the first
  green JOIN for r counts (later ones and those for known servers are no-ops). At that
  ordinal every server keeps the snapshot `snapshot_for(r)` (deterministic bytes, equal at
  all servers, so a transfer cut off can resume at the same offset from another member).
  The joiner starts with `Engine.from_snapshot(...)`, knowing no primary: it counts in a
  quorum once a primary containing it is installed. PERSISTENT_LEAVE(r) is
  `request_leave(r)`; once green r is no longer a server (nor a voter). Ids are not reused.
"""

from __future__ import annotations

import hashlib
import json

from testbed.replication import actions as A
from testbed.replication.engine_core import SAFE, Core
from testbed.replication.engine_exchange import norm_state, plan, quorum

__all__ = ["Engine", "SAFE"]

REG_PRIM, TRANS_PRIM, EXCHANGE_STATES, EXCHANGE_ACTIONS = ("RegPrim", "TransPrim",
                                                          "ExchangeStates", "ExchangeActions")
CONSTRUCT, NO, UN, NON_PRIM = "Construct", "No", "Un", "NonPrim"


class Engine(Core):
    def __init__(self, me: int, servers, disk, send=None, on_reply=None, *, weights=None,
                 on_joined=None, max_payload: int = 1200, snapshot: bytes = None,
                 trace=None, node=None, loop=None, config=None):
        """send(payload, service) multicasts through the group communication; `node` (a
        gc.GroupNode) may stand for it (send = node.multicast). `loop` is not used (the
        engine is pure); `config` may carry {"weights": {id: weight}}."""
        if send is None:
            if node is None:
                raise ValueError("Engine needs send(payload, service) or a gc node")
            send = node.multicast
        if weights is None and config:
            weights = {int(k): v for k, v in (config.get("weights") or {}).items()}
        super().__init__(me, servers, disk, send, on_reply, weights=weights,
                         on_joined=on_joined, max_payload=max_payload, trace=trace)
        if snapshot is not None:
            self._load_snapshot(snapshot)
            self._append(A.REC_JOIN + snapshot, True)
        self._replay(disk.records())
        if me not in self.servers and me not in self.left:
            raise ValueError(f"server {me} is not one of the servers {sorted(servers)} and "
                             "its disk holds no join snapshot")

    @classmethod
    def from_snapshot(cls, me: int, snapshot: bytes, disk, send, **kw) -> "Engine":
        """The engine of a joining server, from the bytes of snapshot_for(me) at a member
        (a restarted joiner is built with Engine(me, ..., disk) alone: its disk has it)."""
        obj = json.loads(snapshot)
        if obj.get("joiner") != me:
            raise ValueError(f"snapshot is for server {obj.get('joiner')}, not {me}")
        return cls(me, obj["servers"], disk, send, snapshot=snapshot, **kw)

    @staticmethod
    def snapshot_digest(snapshot: bytes) -> str:
        return hashlib.sha256(snapshot).hexdigest()

    # -- GC events ----------------------------------------------------------------------

    def on_event(self, ev) -> None:
        if self.closed:
            return
        if hasattr(ev, "members"):
            if ev.transitional:
                self._on_transitional(ev)
            else:
                self._on_regular(ev)
            return
        try:
            self._on_delivery(ev)
        except (A.ActionError, ValueError, KeyError, TypeError, IndexError):
            self.counts["bad_messages"] += 1     # authenticated by gc: a bug, not an attack

    def _on_delivery(self, ev) -> None:
        payload = self.reasm.feed(ev.sender, ev.payload)
        if payload is None:
            return
        self.counts["delivered"] += 1
        tag, body = payload[:1], payload[1:]
        trans = ev.in_transitional
        if tag == A.MSG_ACTION:
            self._on_action(A.decode_action(body))
        elif tag == A.MSG_RETRANS:
            ordinal, action = A.decode_ordinal_action(body)
            self._on_retrans(ordinal, action)
        elif tag == A.MSG_STATE:
            if self.state == EXCHANGE_STATES and not trans and ev.conf_id == self.conf_id:
                self.states[ev.sender] = norm_state(A.decode_json(body))
                if set(self.states) >= set(self.members):
                    self._states_complete()
        elif tag == A.MSG_DONE:
            if self.state == EXCHANGE_ACTIONS and not trans and ev.conf_id == self.conf_id:
                self.dones.add(ev.sender)
                if self.dones >= set(self.members):
                    self._exchange_complete()
        elif tag == A.MSG_CPC:
            self._on_cpc(ev.sender, A.decode_json(body), trans)

    def _on_transitional(self, ev) -> None:
        self.in_trans = True
        if self.state == REG_PRIM:
            self._set_state(TRANS_PRIM)
        elif self.state == CONSTRUCT:
            self._set_state(NO)

    def _on_regular(self, ev) -> None:
        if self.me not in ev.members:
            return
        if self.state in (NO, CONSTRUCT):
            # case 3: the configuration changed before all CPCs: nobody installed
            self.vulnerable = None
            self._write_meta(force=False)
        self.conf_id, self.members = ev.conf_id, tuple(sorted(ev.members))
        self.in_trans = False
        self.reasm.reset()
        self.states, self.dones, self.cpcs, self.plan = {}, set(), set(), None
        self._set_state(EXCHANGE_STATES)
        self._hold_own_created()
        # forced, so that the green line announced is on disk (others whiten by it)
        conf = self.conf_id
        self._write_meta(force=True, done=lambda: self._send_state(conf))

    def _send_state(self, conf) -> None:
        if not self.closed and self.state == EXCHANGE_STATES and conf == self.conf_id:
            self._send(A.encode_json(A.MSG_STATE, self._state_message()))

    # -- actions ------------------------------------------------------------------------

    def _on_action(self, a: A.Action) -> None:
        if self._held(a.aid):
            self.counts["duplicate_deliveries"] += 1
            return
        if a.index > self.cut.get(a.creator, 0) + 1:
            self.pending.setdefault(a.creator, {})[a.index] = a
            return
        self._accept(a)
        self._drain(a.creator, accept=True)

    def _drain(self, creator: int, accept: bool = False) -> None:
        """Hold the pending actions of creator that are now contiguous: as if delivered
        now (accept: a gap is common to every member of a primary, so they all do the
        same), or as red (in an exchange)."""
        waiting = self.pending.get(creator)
        while waiting and (self.cut[creator] + 1) in waiting:
            b = waiting.pop(self.cut[creator] + 1)
            if accept:
                self._accept(b)
            else:
                self._hold(b)
                self.red[b.aid] = None

    def _accept(self, a: A.Action) -> None:
        st = self.state
        if st == UN:                       # case 1b: someone installed and is sending
            self._install()
            self._set_state(TRANS_PRIM)
            st = TRANS_PRIM
        if st == REG_PRIM:
            self._hold(a, record=False)
            self._make_green(a)
        elif st == TRANS_PRIM:
            self._hold(a)
            self.yellow.append(a.aid)
            self._write_meta(force=False)
        else:
            self._hold(a)
            self.red[a.aid] = None

    def _on_retrans(self, ordinal: int, a: A.Action) -> None:
        if ordinal == 0:
            self._on_action_red(a)
            return
        if ordinal <= self.db.ordinal:
            return
        self.pending_green[ordinal] = a
        while self.db.ordinal + 1 in self.pending_green:
            b = self.pending_green.pop(self.db.ordinal + 1)
            if not self._held(b.aid):
                self._hold(b, record=False)
            self._make_green(b)
            self._drain(b.creator)

    def _on_action_red(self, a: A.Action) -> None:
        if self._held(a.aid):
            return
        if a.index > self.cut.get(a.creator, 0) + 1:
            self.pending.setdefault(a.creator, {})[a.index] = a
            return
        self._hold(a)
        self.red[a.aid] = None
        self._drain(a.creator)

    # -- exchange -----------------------------------------------------------------------

    def _states_complete(self) -> None:
        self.plan = p = plan(self.me, self.states)
        self._set_state(EXCHANGE_ACTIONS)
        for o in p.green_to_send:
            a = self.bodies[self.order[o]]
            self._send(A.encode_ordinal_action(A.MSG_RETRANS, o, a))
            self.counts["retrans"] += 1
        for c, lo, hi in p.red_to_send:
            for i in range(lo + 1, hi + 1):
                aid = (c, i)
                a = self.bodies.get(aid)
                if a is None or (self._is_green(aid) and self.green_of.get(aid, 0) <= p.green_max):
                    continue
                self._send(A.encode_ordinal_action(A.MSG_RETRANS, 0, a))
                self.counts["retrans"] += 1
        self._send(A.encode_json(A.MSG_DONE, {}))

    def _exchange_complete(self) -> None:
        p = self.plan
        old_yellow = list(self.yellow)
        if p.prim[:2] > self.prim[:2]:
            self.prim = p.prim
        self.attempt = max(self.attempt, p.attempt - 1)
        if self.vulnerable is not None and self.me not in p.unresolved:
            self.vulnerable = None
        if self.amnesic and self.me not in p.amnesic:
            self.amnesic = False
        self.in_prim = False
        adopted = [aid for aid in p.yellow if not self._is_green(aid)]
        for aid in old_yellow:
            if not self._is_green(aid) and aid not in adopted:
                self.red[aid] = None
        for aid in adopted:
            self.red.pop(aid, None)
        self.yellow = adopted
        for m, st in self.states.items():
            if m in self.servers:
                self.green_lines[m] = max(self.green_lines.get(m, 0), st["g"])
        self._whiten()
        for j in list(self.join_snapshots):
            if j in self.members:
                del self.join_snapshots[j]
        can = (p.servable and not p.unresolved and not p.amnesic
               and self.db.ordinal == p.green_max
               and quorum(self.members, self.prim, self.servers, self.weights))
        if can:
            self.attempt = p.attempt
            self.vulnerable = (self.prim[0] + 1, p.attempt, tuple(self.members))
            self._set_state(CONSTRUCT)
            conf = self.conf_id
            self._write_meta(force=True, done=lambda: self._send_cpc(conf))
        else:
            self._write_meta(force=False)
            self._set_state(NON_PRIM)
            self._flush_unsent()

    def _send_cpc(self, conf) -> None:
        if self.closed or self.state != CONSTRUCT or conf != self.conf_id or self.in_trans:
            return
        self._send(A.encode_json(A.MSG_CPC, {"v": list(self.vulnerable[:2])}))

    def _on_cpc(self, sender: int, obj: dict, trans: bool) -> None:
        if self.state not in (CONSTRUCT, NO) or self.vulnerable is None:
            return
        if tuple(obj["v"]) != self.vulnerable[:2]:
            return
        self.cpcs.add(sender)
        if self.cpcs < set(self.members):
            return
        if self.state == CONSTRUCT and not trans:
            self._install()
            self._set_state(REG_PRIM)
            self._flush_unsent()
        else:
            self._set_state(UN)

    def _install(self) -> None:
        v = self.vulnerable
        self.prim = (v[0], v[1], v[2])
        for aid in list(self.yellow):
            self._make_green(self.bodies[aid])
        for aid in sorted(self.red):
            self._make_green(self.bodies[aid])
        self.yellow, self.vulnerable, self.attempt = [], None, 0
        self.in_prim = True
        self.counts["installs"] += 1
        self._write_meta(force=True)
        self._check_consistent()
