"""Wackamole's VIP manager (paper 004, section 3): every virtual IP covered exactly once in
each connected component, on top of testbed.failover.membership.

The allocation functions are pure and deterministic: every member runs them on the same
inputs (the STATE messages of the view, the view's member order) and gets the same table,
so no member needs to be told what to do after a view change.

States (paper, Figure 2):
- GATHER, entered on every view change: send STATE (the VIPs held when the view began,
  maturity, and the size of the component those holdings were valid in); on each STATE
  received, drop at once any VIP another member wins (ResolveConflicts); when every
  member's STATE is in, compute the table (`allocate`): conflicts resolved, uncovered VIPs
  handed out; acquire and release accordingly, announce with gratuitous ARP; RUN.
  A cascading view change restarts GATHER with fresh STATEs.
  Every refresh_s the holders announce their VIPs again: a partition that heals without
  bringing a member back (the other side's servers failed meanwhile) causes no view
  change, and the router may still point at a server of the side that held the VIPs while
  it was cut off.
- RUN: serve. The representative (first in the membership order) checks the balance every
  balance_s and, if one member holds two more than another, sends BALANCE with a new
  table. Every member releases what it loses and says so (RELEASED, also when it lost
  nothing: the representative repeats BALANCE to those it has not heard from); a member
  gaining a VIP acquires it only once its previous holder has released it, so that no two
  members of a view ever hold a VIP at once. A hand-over that does not complete within
  discovery_s turns into a view change (STATE exchange) instead.
- A voluntary leave first drains: the leaving member asks the representative (DRAIN),
  which sends a BALANCE moving its VIPs to the others, so each VIP changes hands with a
  single RELEASED message while the rest of the cluster keeps running; then it leaves the
  group holding nothing. If the drain cannot run (no RUN state, no representative answer
  within the drain time) it releases everything and leaves, and the view change covers
  its VIPs.
- A new daemon is immature and holds nothing. It becomes mature in the first GATHER in
  which some member is mature, or on its own after mature_s if none ever is (a whole
  cluster booting), and then asks for a view change so that the VIPs get allocated.

Conflicts (two members of a view claim a VIP: a partition healed) go to the member whose
holdings were valid in the larger component, then to the later member in the view's order
(the paper's rule: the earlier one releases). Preferring the larger component means a
server that was cut off and took every VIP for itself never takes them from the rest of the
cluster when it comes back.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from testbed.failover.wire import Balance, Drain, Released, State, View


# pure allocation --------------------------------------------------------------------------

def winner(claimants: Iterable[int], states: dict, members: tuple) -> int:
    """The member that keeps a VIP several members claim."""
    order = {m: i for i, m in enumerate(members)}
    return max(claimants, key=lambda m: (states[m].prev_size, order[m]))


def allocate(vips: list, states: dict, members: tuple, eligible: Iterable[int]) -> tuple:
    """(table, contested): table maps every VIP to its owner (None if no member is eligible
    to take an uncovered one); contested is the set of VIPs several members claimed.

    states: member -> State (every member of the view). Uncovered VIPs go, in the order of
    `vips`, to the eligible member holding the fewest so far (ties: membership order)."""
    order = {m: i for i, m in enumerate(members)}
    held = {m: set(states[m].held) for m in members}
    table: dict = {}
    contested = set()
    for v in vips:
        claimants = [m for m in members if v in held[m]]
        if len(claimants) > 1:
            contested.add(v)
        table[v] = winner(claimants, states, members) if claimants else None
    eligible = [m for m in members if m in set(eligible)]
    if eligible:
        load = {m: 0 for m in eligible}
        for o in table.values():
            if o in load:
                load[o] += 1
        for v in vips:
            if table[v] is None:
                m = min(eligible, key=lambda m: (load[m], order[m]))
                table[v] = m
                load[m] += 1
    return table, contested


def loads(table: dict, members: tuple) -> dict:
    out = {m: 0 for m in members}
    for o in table.values():
        if o in out:
            out[o] += 1
    return out


def balance(vips: list, table: dict, members: tuple) -> dict:
    """A table where no member holds two more VIPs than another, moving as few as possible:
    repeatedly the last VIP (in `vips` order) of the most loaded member (ties: the later in
    membership order) goes to the least loaded (ties: the earlier)."""
    order = {m: i for i, m in enumerate(members)}
    new = dict(table)
    held = {m: [v for v in vips if new.get(v) == m] for m in members}
    while True:
        donor = max(members, key=lambda m: (len(held[m]), order[m]))
        taker = min(members, key=lambda m: (len(held[m]), order[m]))
        if len(held[donor]) - len(held[taker]) <= 1:
            return new
        v = held[donor].pop()
        held[taker].append(v)
        held[taker].sort(key=vips.index)
        new[v] = taker


def drain(vips: list, table: dict, members: tuple, leaving: Iterable[int]) -> dict:
    """A table where the leaving members hold nothing: their VIPs go to the least loaded
    of the others (ties: membership order), then the others are balanced."""
    leaving = set(leaving)
    rest = tuple(m for m in members if m not in leaving)
    if not rest:
        return dict(table)
    order = {m: i for i, m in enumerate(rest)}
    new = {v: (o if o in order else None) for v, o in table.items()}
    load = loads(new, rest)
    for v in vips:
        if v in new and new[v] is None:
            m = min(rest, key=lambda m: (load[m], order[m]))
            new[v] = m
            load[m] += 1
    return balance(vips, new, rest)


# the manager --------------------------------------------------------------------------------

class Actuator:
    """What the manager does to the world; the daemon's version uses pyroute2 and a packet
    socket, the unit tests record the calls."""

    def acquire(self, vip: str) -> None: ...
    def release(self, vip: str) -> None: ...
    def announce(self, vip: str) -> None: ...  # one round of gratuitous ARPs


class VipManager:
    """One member's VIP state machine. send(dests, msg) as in Membership; regather(now)
    asks the membership for a view change."""

    def __init__(self, me: int, vips: list, actuator: Actuator, send: Callable,
                 regather: Callable, now: float, mature_s: float, balance_s: float,
                 handover_s: float, garp_offsets=(0.0, 0.1, 0.3), refresh_s: float = 0.0,
                 log: Callable = print):
        self.me = me
        self.vips = list(vips)
        self.act = actuator
        self.send = send
        self.regather = regather
        self.log = log
        self.balance_s = balance_s
        self.handover_s = handover_s
        self.garp_offsets = tuple(garp_offsets)
        self.refresh_s = refresh_s  # re-announce what we hold this often (0: never)
        self.next_refresh = now + refresh_s if refresh_s else None
        self.retx_s = 0.05
        self.held: set = set()
        self.mature = False
        self.mature_at = now + mature_s
        self.state = "idle"  # idle (no view yet), gather, run
        self.view: Optional[View] = None
        self.run_size = 0  # size of the view our holdings are valid in
        self.my_state: Optional[State] = None
        self.states: dict = {}
        self.future: dict = {}  # view key -> {sender: State} received before that view
        self.table: dict = {}
        self.bseq = 0
        self.gains: dict = {}  # vip -> (from member, deadline)
        self.released: dict = {}  # (view key, bseq) -> {vip: member}
        self.last_released: Optional[Released] = None  # my answer to the current BALANCE
        self.bal_out: Optional[dict] = None  # the representative's BALANCE under way
        self.draining: set = set()  # (representative) members to move every VIP away from
        self.next_retx = 0.0
        self.next_balance: Optional[float] = None
        self.state_replied: dict = {}  # member -> when I last answered its STATE
        self.garps: list = []  # [(when, vip)]
        self.counters = {"acquired": 0, "released": 0, "conflicts_dropped": 0,
                         "balances_sent": 0, "balances_applied": 0, "handover_timeouts": 0,
                         "gathers": 0, "gathers_interrupted": 0}

    # helpers ---------------------------------------------------------------------------------
    def _acquire(self, vip: str, now: float) -> None:
        if vip in self.held:
            return
        self.act.acquire(vip)
        self.held.add(vip)
        self.counters["acquired"] += 1
        self.log(f"acquire {vip}")
        self._schedule_garp(vip, now)

    def _release(self, vip: str) -> None:
        if vip not in self.held:
            return
        self.act.release(vip)
        self.held.discard(vip)
        self.counters["released"] += 1
        self.garps = [(t, v) for t, v in self.garps if v != vip]
        self.log(f"release {vip}")

    def _schedule_garp(self, vip: str, now: float) -> None:
        self.garps = [(t, v) for t, v in self.garps if v != vip]
        self.garps += [(now + dt, vip) for dt in self.garp_offsets]
        self.garps.sort()
        self._run_garps(now)

    def _run_garps(self, now: float) -> None:
        while self.garps and self.garps[0][0] <= now:
            _, vip = self.garps.pop(0)
            if vip in self.held:
                self.act.announce(vip)

    def release_all(self) -> None:
        for v in sorted(self.held):
            self._release(v)

    # events ----------------------------------------------------------------------------------
    def on_view(self, view: View, now: float) -> None:
        if self.state == "gather":
            self.counters["gathers_interrupted"] += 1
        self.counters["gathers"] += 1
        self.view = view
        self.state = "gather"
        self.gains.clear()
        self.bseq = 0  # BALANCE numbers count within a view
        self.last_released = None
        self.bal_out = None
        self.draining = set()
        self.my_state = State(view.vid, view.coord, tuple(sorted(self.held, key=self.vips.index)),
                              self.mature, self.run_size if self.mature else 0, view.inc)
        self.states = {self.me: self.my_state}
        for sender, st in self.future.pop(view.key, {}).items():
            if sender in view.members:
                self.states[sender] = st
        self.future = {k: v for k, v in sorted(self.future.items()) if k > view.key}
        while len(self.future) > 8:
            self.future.pop(next(iter(self.future)))
        others = tuple(m for m in view.members if m != self.me)
        if others:
            self.send(others, self.my_state)
        self.next_retx = now + self.retx_s
        for sender, st in list(self.states.items()):
            if sender != self.me:
                self._resolve_early(sender, st)
        self._maybe_complete(now)

    def on_state(self, sender: int, st: State, now: float) -> None:
        if self.view is None or st.key != self.view.key:
            if self.view is None or st.key > self.view.key:
                self.future.setdefault(st.key, {})[sender] = st
            return
        if sender not in self.view.members:
            return
        if self.state == "run":
            # it is still gathering (STATEs are only repeated then): it may lack mine
            if now - self.state_replied.get(sender, -1.0) >= self.retx_s:
                self.state_replied[sender] = now
                self.send((sender,), self.my_state)
            return
        self.states[sender] = st
        self._resolve_early(sender, st)
        self._maybe_complete(now)

    def _resolve_early(self, sender: int, st: State) -> None:
        """ResolveConflicts: drop at once a VIP that sender beats me to (I cannot win it
        whatever the other STATEs say)."""
        members = self.view.members
        for v in set(st.held) & self.held:
            if winner([self.me, sender], self.states, members) == sender:
                self.counters["conflicts_dropped"] += 1
                self._release(v)

    def _maybe_complete(self, now: float) -> None:
        if self.state != "gather" or set(self.states) < set(self.view.members):
            return
        members = self.view.members
        any_mature = any(self.states[m].mature for m in members)
        if any_mature and not self.mature:
            self.mature = True
            self.log("mature (a mature member is in the view)")
        eligible = members if any_mature else ()
        table, contested = allocate(self.vips, self.states, members, eligible)
        mine = {v for v, o in table.items() if o == self.me}
        for v in sorted(self.held - mine, key=self.vips.index):
            self._release(v)
        for v in sorted(mine - self.held, key=self.vips.index):
            self._acquire(v, now)
        for v in sorted(mine & contested, key=self.vips.index):
            self._schedule_garp(v, now)  # the others' holder may have been announced last
        self.table = table
        self.state = "run"
        self.run_size = len(members) if self.mature else 0
        self.next_balance = now + self.balance_s
        self.log(f"run in view {self.view.vid}: hold {sorted(self.held, key=self.vips.index)}")

    def on_balance(self, sender: int, msg: Balance, now: float) -> None:
        if self.state != "run" or msg.key != self.view.key or sender != self.view.members[0]:
            return
        if msg.bseq == self.bseq and self.last_released is not None:
            self.send(None, self.last_released)  # the representative missed our answer
            return
        if msg.bseq <= self.bseq:
            return
        self.bseq = msg.bseq
        self._apply_balance(dict(msg.table), now)

    def _apply_balance(self, new: dict, now: float) -> None:
        self.counters["balances_applied"] += 1
        lost = sorted((v for v in self.held if new.get(v) != self.me), key=self.vips.index)
        for v in lost:
            self._release(v)
        self.last_released = Released(self.view.vid, self.view.coord, self.bseq, tuple(lost),
                                      self.view.inc)
        self.send(None, self.last_released)
        done = self.released.get((self.view.key, self.bseq), {})
        for v in self.vips:
            if new.get(v) == self.me and v not in self.held:
                old = self.table.get(v)
                if old is None or old == self.me or done.get(v) == old:
                    self._acquire(v, now)
                else:
                    self.gains[v] = (old, now + self.handover_s)
        self.table = new

    def request_drain(self, now: float) -> bool:
        """Before a voluntary leave: have our VIPs moved to the others. False if that
        cannot be done (not in RUN, or alone)."""
        if self.state != "run" or len(self.view.members) < 2 or not self.held:
            return False
        rep = self.view.members[0]
        if rep == self.me:
            self._drain(self.me, now)
        else:
            self.send((rep,), Drain(self.view.vid, self.view.coord, self.view.inc))
        return True

    def on_drain(self, sender: int, msg: Drain, now: float) -> None:
        if (self.state == "run" and msg.key == self.view.key and sender in self.view.members
                and self.view.members[0] == self.me):
            self._drain(sender, now)

    def _drain(self, member: int, now: float) -> None:
        self.draining.add(member)
        self.log(f"drain {member}")
        if self.bal_out is None:
            self._rebalance(now)  # else: once the BALANCE under way is answered

    def _rebalance(self, now: float) -> None:
        """(Representative) send a BALANCE if the table is unbalanced or a draining
        member still holds VIPs."""
        members = self.view.members
        new = (drain(self.vips, self.table, members, self.draining) if self.draining
               else balance(self.vips, self.table, members))
        if new == self.table:
            return
        self.bseq += 1
        self.counters["balances_sent"] += 1
        self.log(f"balance {self.bseq}: {loads(self.table, members)} -> {loads(new, members)}")
        others = tuple(m for m in members if m != self.me)
        table = tuple(sorted(new.items(), key=lambda kv: self.vips.index(kv[0])))
        msg = Balance(self.view.vid, self.view.coord, self.bseq, table, self.view.inc)
        self.send(others, msg)
        self.bal_out = {"msg": msg, "waiting": set(others), "next_tx": now + self.retx_s,
                        "deadline": now + self.handover_s}
        self._apply_balance(new, now)

    def drained(self) -> bool:
        return not self.held and not self.gains

    def on_released(self, sender: int, msg: Released, now: float) -> None:
        if self.view is None or msg.key != self.view.key:
            return
        out = self.bal_out
        if out is not None and msg.bseq == self.bseq:
            out["waiting"].discard(sender)
        notes = self.released.setdefault((msg.key, msg.bseq), {})
        for v in msg.vips:
            notes[v] = sender
            if self.state == "run" and self.gains.get(v, (None,))[0] == sender:
                del self.gains[v]
                self._acquire(v, now)
        while len(self.released) > 16:
            self.released.pop(next(iter(self.released)))

    def tick(self, now: float) -> float:
        self._run_garps(now)
        nxt = [now + 1.0]
        if self.next_refresh is not None:
            if now >= self.next_refresh:
                self.next_refresh = now + self.refresh_s
                if self.state == "run":
                    for v in sorted(self.held, key=self.vips.index):
                        self.act.announce(v)
            nxt.append(self.next_refresh)
        if self.state == "gather":
            if now >= self.next_retx:
                others = tuple(m for m in self.view.members if m != self.me)
                if others:
                    self.send(others, self.my_state)
                self.next_retx = now + self.retx_s
            nxt.append(self.next_retx)
        if not self.mature and now >= self.mature_at:
            self.mature = True
            self.log("mature (timeout)")
            if self.state == "run":  # a view of immature members: allocate now
                self.regather(now)
        if self.state == "run":
            for v, (frm, deadline) in list(self.gains.items()):
                if now >= deadline:
                    self.log(f"hand-over of {v} from {frm} timed out: view change")
                    self.counters["handover_timeouts"] += 1
                    self.gains.clear()
                    self.regather(now)
                    break
            nxt += [deadline for _, deadline in self.gains.values()]
            out = self.bal_out
            if out is not None:
                if not out["waiting"]:
                    self.bal_out = None
                elif now >= out["deadline"]:
                    self.log(f"balance {self.bseq}: no answer from {sorted(out['waiting'])}: "
                             f"view change")
                    self.counters["handover_timeouts"] += 1
                    self.bal_out = None
                    self.regather(now)
                elif now >= out["next_tx"]:
                    out["next_tx"] = now + self.retx_s
                    self.send(tuple(sorted(out["waiting"])), out["msg"])
                if self.bal_out is not None:
                    nxt += [out["next_tx"], out["deadline"]]
            rep = self.mature and self.view.members[0] == self.me
            if rep and self.bal_out is None and self.draining:
                self._rebalance(now)  # a drain that waited for an earlier BALANCE
            if (rep and self.next_balance is not None and now >= self.next_balance
                    and self.bal_out is None):
                self.next_balance = now + self.balance_s
                self._rebalance(now)
            if (self.mature and self.view.members[0] == self.me and self.next_balance
                    is not None and self.bal_out is None):
                nxt.append(self.next_balance)
        if self.garps:
            nxt.append(self.garps[0][0])
        if not self.mature:
            nxt.append(self.mature_at)
        return min(t for t in nxt if t > now)  # the next time anything is due

    def status(self) -> dict:
        return {"vip_state": self.state, "mature": self.mature,
                "held": sorted(self.held, key=self.vips.index),
                "table": {v: o for v, o in self.table.items()},
                "pending_gains": sorted(self.gains), "counters": dict(self.counters)}
