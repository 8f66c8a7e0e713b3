"""Group membership for the servers of one LAN: heartbeats, failure detection, and a view
change protocol so that every member installs the same views in the same order.

`Membership` is the protocol without I/O (the daemon in testbed.failover.daemon feeds it
datagrams and the time; the unit tests feed it a simulated network). Run alone as

    python -m testbed.failover --membership-only CONFIG.json

(the daemon without VIP management: it installs views and writes its status file). This
module imports nothing of the daemon: imports run daemon -> membership -> wire.

Protocol
- Every member sends a HEARTBEAT every `heartbeat_s`, carrying its installed view. A member
  not heard for `fault_s` is suspected: it left the reachable set R = {me} + {peers heard
  within fault_s, not departed}. A failure is therefore noticed between fault_s -
  heartbeat_s and fault_s after it happens (Spread's rule, paper 004 section 6).
- Whenever R differs from the installed view (a failure, a join, a merge of partitions, a
  member that restarted or reports another view), the lowest id in R proposes the view R
  (at once if a member was lost; after one heartbeat_s if R only grew, so that the others
  joining at the same time are heard and taken in by one view change rather than several)
  with an id above every id it has seen (PROPOSE). A member accepts a proposal that
  includes it and is newer than its view and than any proposal it accepted before (views
  are ordered by (id, lower proposer)) and ACKs it; it then accepts nothing older.
- The proposer installs the view when every member has acked, and sends INSTALL; a member
  installs only the proposal it acked last (or on seeing the proposer's heartbeat carrying
  it installed, if INSTALL was lost). Missing acks after `ack_timeout`: the proposer
  proposes again without the silent members. Two members that both install views therefore
  install them in the same order, and a view id names one member list.
- If the lowest id cannot hear us, nobody else would ever propose: a member whose mismatch
  lasts `discovery_s` proposes itself. A starting member waits up to `discovery_s` to be
  taken into an existing view before installing a view of its own. discovery_s is not spent
  on a failure: a failure costs the detection time and one round of PROPOSE/ACK/INSTALL.
- A member leaving voluntarily sends LEAVE: the others drop it from R at once (no timeout)
  and the lowest id proposes the smaller view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from testbed.errors import SpecError
from testbed.failover.wire import (NO_KEY, Ack, Heartbeat, Install, Leave, Propose, View)


@dataclass(frozen=True)
class Timeouts:
    """Fault-detection, heartbeat and discovery timeouts, in seconds (paper 004, Table 1)."""

    fault_s: float = 5.0
    heartbeat_s: float = 2.0
    discovery_s: float = 7.0

    def __post_init__(self):
        for what in ("fault_s", "heartbeat_s", "discovery_s"):
            v = getattr(self, what)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)
                    or not 0.02 <= v <= 600):
                raise SpecError(f"failover timeouts: {what} must be 0.02-600 s, got {v!r}")
        if self.heartbeat_s >= self.fault_s:
            raise SpecError(f"failover timeouts: heartbeat_s ({self.heartbeat_s:g}) must be "
                            f"below fault_s ({self.fault_s:g})")
        if self.discovery_s < self.heartbeat_s:
            raise SpecError(f"failover timeouts: discovery_s ({self.discovery_s:g}) must be "
                            f"at least heartbeat_s ({self.heartbeat_s:g})")

    def as_dict(self) -> dict:
        return {"fault_s": self.fault_s, "heartbeat_s": self.heartbeat_s,
                "discovery_s": self.discovery_s}


DEFAULT = Timeouts(5.0, 2.0, 7.0)  # Spread's defaults (paper 004, Table 1)
TUNED = Timeouts(1.0, 0.4, 1.4)  # the paper's tuned Spread


def comparable(advert_s: float) -> Timeouts:
    """Timeouts comparable to VRRP with advert_int advert_s: a heartbeat per advert, a
    failure declared after three missed ones (VRRP's master-down interval, less its skew)."""
    return Timeouts(round(3 * advert_s, 6), advert_s, round(4 * advert_s, 6))


@dataclass
class _Proposal:
    view: View
    acks: set
    deadline: float
    next_tx: float


class Membership:
    """One member's side of the protocol.

    send(dests, msg): dests None = every peer, else a tuple of ids.
    on_view(view): called when a view is installed.
    """

    def __init__(self, me: int, peers: Iterable[int], timeouts: Timeouts, now: float,
                 send: Callable, on_view: Callable, log: Callable = print,
                 mature: Callable[[], bool] = lambda: False, inc: int = 0):
        self.me = me
        self.inc = inc  # my incarnation: part of the identity of the views I propose
        self.peers = sorted(set(peers) - {me})
        self.t = timeouts
        self.send = send
        self.on_view = on_view
        self.log = log
        self.mature = mature
        self.retx_s = max(0.02, min(0.1, timeouts.heartbeat_s / 4))
        self.ack_timeout = max(timeouts.heartbeat_s, 0.25)
        self.grace_s = 2 * timeouts.heartbeat_s + 0.05
        self.started = now
        self.view = View(0, me, (me,), inc)
        self.installed = False
        self.last_heard: dict = {}
        self.inc_of: dict = {}
        self.departed: dict = {}  # id -> the incarnation that left
        self.restarted: set = set()
        self.reported: dict = {}  # id -> (view, installed)
        self.differs_since: dict = {}  # id -> since when its reported view differs from mine
        self.pending: Optional[_Proposal] = None  # my own proposal
        self.acked: Optional[View] = None  # the last proposal I accepted (not yet installed)
        self.acked_at = 0.0
        self.max_vid = 0
        self.mismatch_since: Optional[float] = None
        self.next_hb = now
        self.history: list = []  # installed views, oldest first (the last 100)
        self.views_installed = 0
        self.proposals = 0
        self.left = False

    # queries ---------------------------------------------------------------------------------
    def key(self) -> tuple:
        return self.view.key if self.installed else NO_KEY

    def alive(self, now: float) -> set:
        """R: me and the peers heard within fault_s that have not left."""
        lim = self.t.fault_s
        return {self.me} | {p for p, t in self.last_heard.items()
                            if p not in self.departed and now - t < lim}

    def status(self, now: float) -> dict:
        return {"state": self.phase(now), "installed": self.installed,
                "view": {"vid": self.view.vid, "coord": self.view.coord,
                         "inc": self.view.inc, "members": list(self.view.members)},
                "alive": sorted(self.alive(now)), "departed": sorted(self.departed),
                "views_installed": self.views_installed, "proposals": self.proposals,
                "history": [[v.vid, v.coord, list(v.members)] for v in self.history[-50:]]}

    def phase(self, now: float) -> str:
        if not self.installed:
            return "joining"
        if self.pending or self.acked or self.mismatch_since is not None:
            return "change"
        return "run"

    # input -----------------------------------------------------------------------------------
    def heard(self, sender: int, inc: int, now: float) -> bool:
        """Any authenticated message from sender; False if it comes from an incarnation
        that has left (to be ignored)."""
        if sender == self.me or sender not in self.peers:
            return False
        gone = self.departed.get(sender)
        if gone is not None:
            if inc <= gone:
                return False
            del self.departed[sender]
        old = self.inc_of.get(sender)
        if old is not None and inc != old:
            if inc < old:
                return False
            self.restarted.add(sender)  # it lost its state: a new view must take it in
            self.log(f"member {sender} restarted")
        self.inc_of[sender] = inc
        self.last_heard[sender] = now
        return True

    def receive(self, sender: int, inc: int, msg, now: float) -> None:
        """A membership message (HEARTBEAT, PROPOSE, ACK, INSTALL, LEAVE) from sender."""
        if self.left or not self.heard(sender, inc, now):
            return
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(sender, msg, now)
        elif isinstance(msg, Propose):
            self._on_propose(sender, msg.view, now)
        elif isinstance(msg, Ack):
            self._on_ack(sender, msg, now)
        elif isinstance(msg, Install):
            if self.acked is not None and msg.view == self.acked and sender == msg.view.coord:
                self._install(msg.view, now)
        elif isinstance(msg, Leave):
            self.departed[sender] = inc
            self.last_heard.pop(sender, None)
            self.log(f"member {sender} left")
        self.evaluate(now)

    def _on_heartbeat(self, sender: int, hb: Heartbeat, now: float) -> None:
        self.reported[sender] = (hb.view, hb.installed)
        self.max_vid = max(self.max_vid, hb.view.vid)
        if (hb.installed and self.acked is not None and hb.view == self.acked
                and sender == hb.view.coord):
            self._install(hb.view, now)  # its INSTALL was lost
        elif (self.installed and self.view.coord == self.me and sender in self.view.members
              and hb.view.key < self.view.key):
            # a member I took in has not installed my view: repeat the INSTALL
            self.send((sender,), Install(self.view))

    def _on_propose(self, sender: int, view: View, now: float) -> None:
        if sender != view.coord or self.me not in view.members:
            return
        self.max_vid = max(self.max_vid, view.vid)
        if self.acked is not None and view == self.acked:
            self.send((sender,), Ack(view.vid, view.coord, view.inc))  # our ack was lost
            return
        floor = max(self.key(), self.acked.key if self.acked else NO_KEY)
        if view.key <= floor:
            return
        if self.pending is not None and self.pending.view.key < view.key:
            self.pending = None  # a newer proposal wins over mine
        self.acked, self.acked_at = view, now
        self.send((sender,), Ack(view.vid, view.coord, view.inc))

    def _on_ack(self, sender: int, ack: Ack, now: float) -> None:
        p = self.pending
        if p is None or ack.key != p.view.key or sender not in p.view.members:
            return
        p.acks.add(sender)
        if p.acks >= set(p.view.members):
            others = tuple(m for m in p.view.members if m != self.me)
            self.send(others, Install(p.view))
            self._install(p.view, now)

    # output ----------------------------------------------------------------------------------
    def _propose(self, members: set, now: float) -> None:
        self.max_vid = max(self.max_vid, self.view.vid,
                           self.acked.vid if self.acked else 0) + 1
        view = View(self.max_vid, self.me, tuple(sorted(members)), self.inc)
        self.proposals += 1
        self.acked, self.acked_at = view, now
        if len(view.members) == 1:
            self.pending = None
            self._install(view, now)
            return
        self.pending = _Proposal(view, {self.me}, now + self.ack_timeout, now + self.retx_s)
        self.log(f"propose view {view.vid} {list(view.members)}")
        self.send(tuple(m for m in view.members if m != self.me), Propose(view))

    def _install(self, view: View, now: float) -> None:
        self.view, self.installed = view, True
        self.acked = None
        if self.pending is not None and self.pending.view == view:
            self.pending = None
        self.mismatch_since = None
        self.restarted -= set(view.members)
        self.differs_since.clear()
        self.history.append(view)
        del self.history[:-100]
        self.views_installed += 1
        self.log(f"install view {view.vid} (by {view.coord}) {list(view.members)}")
        self._heartbeat(now)
        self.on_view(view)

    def _heartbeat(self, now: float) -> None:
        self.send(None, Heartbeat(self.view, self.installed, bool(self.mature())))
        self.next_hb = now + self.t.heartbeat_s

    def leave(self, now: float) -> None:
        """Announce a voluntary leave; the member takes no further part."""
        self.send(None, Leave(self.view))
        self.left = True

    def regather(self, now: float) -> None:
        """Start a view change with the members reachable now (the VIP layer asks for one
        when its own state changed: maturity, a hand-over that did not complete)."""
        if not self.left:
            self._propose(self.alive(now), now)

    # time ------------------------------------------------------------------------------------
    def _mismatch(self, alive: set, now: float) -> bool:
        if not self.installed:
            return True
        members = set(self.view.members)
        if alive != members or self.restarted & members:
            return True
        for p in alive - {self.me}:
            rep = self.reported.get(p)
            same = rep is not None and rep[1] and rep[0] == self.view
            if same:
                self.differs_since.pop(p, None)
                continue
            since = self.differs_since.setdefault(p, now)
            if now - since > self.grace_s:
                return True
        return False

    def evaluate(self, now: float) -> None:
        if self.left:
            return
        alive = self.alive(now)
        if not self.installed and alive == {self.me} and now - self.started < self.t.discovery_s:
            return  # still looking for an existing group
        if not self._mismatch(alive, now):
            self.mismatch_since = None
            return
        if self.mismatch_since is None:
            self.mismatch_since = now
        if self.pending is not None and set(self.pending.view.members) == alive:
            return  # already proposing exactly this
        if (self.acked is not None and self.pending is None
                and now - self.acked_at < self.ack_timeout + self.retx_s):
            return  # someone else's proposal is under way
        members = set(self.view.members) if self.installed else {self.me}
        if (alive > members and alive != {self.me, *self.peers}
                and now - self.mismatch_since < self.t.heartbeat_s):
            return  # others are joining: give the rest a heartbeat's time to be heard too
        if min(alive) == self.me or now - self.mismatch_since >= self.t.discovery_s:
            self._propose(alive, now)

    def tick(self, now: float) -> float:
        """Advance timers; returns when tick() next needs to run."""
        if self.left:
            return now + 1.0
        if now >= self.next_hb:
            self._heartbeat(now)
        p = self.pending
        if p is not None:
            if now >= p.deadline:
                missing = set(p.view.members) - p.acks
                self.log(f"view {p.view.vid}: no ack from {sorted(missing)}")
                self.pending = None
                self.acked = None
                for m in missing:
                    self.last_heard.pop(m, None)  # suspected until heard again
                self._propose(set(p.acks), now)
            elif now >= p.next_tx:
                p.next_tx = now + self.retx_s
                self.send(tuple(sorted(set(p.view.members) - p.acks)), Propose(p.view))
        if self.acked is not None and self.pending is None and \
                now - self.acked_at > self.t.discovery_s:
            self.acked = None  # its proposer went silent
        self.evaluate(now)
        nxt = [now + 1.0, self.next_hb]
        if self.mismatch_since is not None:
            nxt += [self.mismatch_since + self.t.heartbeat_s,
                    self.mismatch_since + self.t.discovery_s]
        if self.pending is not None:
            nxt += [self.pending.next_tx, self.pending.deadline]
        elif self.acked is not None:
            nxt += [self.acked_at + self.ack_timeout + self.retx_s,
                    self.acked_at + self.t.discovery_s]
        if not self.installed:
            nxt.append(self.started + self.t.discovery_s)
        lim = self.t.fault_s
        nxt += [t + lim for p, t in self.last_heard.items() if p not in self.departed]
        nxt += [t + self.grace_s for t in self.differs_since.values()]
        return min(t for t in nxt if t > now)  # the next time anything is due

