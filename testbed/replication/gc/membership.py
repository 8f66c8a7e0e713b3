"""Membership with extended virtual synchrony (Totem-like, simplified): a GroupNode mixin.

States: `regular` (a configuration is installed; ordering.py runs), `gather` (JOIN
consensus), `recovery` (a COMMIT was accepted: old messages are exchanged).

- Liveness: every datagram counts; a node broadcasts at least every `heartbeat` (a
  HEARTBEAT or, gathering, a JOIN). In `regular`, a member not heard for `fail_timeout`,
  a datagram from a node outside the configuration (another component: a merge) or a
  member's datagram of another configuration starts a GATHER.
- GATHER: from then on the node neither acknowledges nor delivers (everything it ever
  acknowledged is at most what it reports). Each gathering node broadcasts
  JOIN(its set: itself and every node heard within `fail_timeout`, its old configuration,
  what it holds of it) every `join_interval`. Consensus: every node of my set has sent,
  since I began gathering, a JOIN with exactly my set (after `min_gather`). Nodes that
  still disagree after `consensus_timeout` are excluded until the next install. The
  lowest id of the set, the representative, then broadcasts COMMIT(new conf id, per member
  its old configuration and holdings), again every tick until it installs.
- Recovery: the members that come from the same old configuration (the transitional
  configuration) compute from the COMMIT alone the same cutoff: the last seq up to which
  the union of their reported holdings has every message. Each asks by NACK (unicast) a
  member that reported a seq for what it lacks up to the cutoff; messages above the
  cutoff are discarded. Complete, it sends RECOVERED to the representative, which, having
  all, broadcasts INSTALL (a member also takes the new configuration's HEARTBEAT or
  ORDERED as INSTALL). A step that stalls for `commit_timeout` goes back to GATHER.
- INSTALL, at each member: the old messages up to the cutoff that are deliverable in the
  old regular configuration (contiguous; Safe ones at or below the old safe line);
  Configuration(transitional=True, the transitional members); the rest up to the cutoff,
  `in_transitional=True`; Configuration(transitional=False); then its own messages the
  old sequencer never ordered, and those multicast meanwhile, are sent in the new one.

Assumes symmetric connectivity; an asymmetric link makes the nodes gather again now and
then (no safety loss). The configuration id is (max seq any member has seen + 1, the
representative, its incarnation).
"""

from __future__ import annotations

from testbed.replication.gc import wire
from testbed.replication.gc.wire import Commit, Configuration, ConfId, Hold, Join

INF = float("inf")


class Membership:
    """See the module's docstring."""

    def init_membership(self) -> None:
        self.heard_at: dict = {}
        self.joins: dict = {}          # member -> (Join, time received)
        self.gather_start = 0.0
        self.excluded: set = set()
        self.sent_set: tuple = ()
        self.join_time = -1.0
        self.top = 0                   # highest configuration seq seen
        self.commit = None
        self.new_conf = None
        self.commit_time = 0.0
        self.cut = 0
        self.trans: tuple = ()
        self.holds: dict = {}
        self.recovered: set = set()
        self.installed_at = -1.0

    def start_membership(self) -> None:
        self.start_gather(self.clock())

    # liveness and triggers ---------------------------------------------------------------
    def heard(self, sender: int, inc: int) -> None:
        self.heard_at[sender] = self.clock()

    def beacon_conf(self) -> ConfId:
        return self.new_conf if self.state == "recovery" else self.conf

    def cutoff_limit(self) -> float:
        return self.cut if self.state == "recovery" else INF

    def check_conf(self, sender: int, conf: ConfId, flags: int = wire.HF_INSTALLED) -> bool:
        """Whether regular traffic (HEARTBEAT, DATA, ORDERED, ACK) of `conf` from sender is
        to be processed; starts a GATHER (or finishes an install) as it implies."""
        if self.state == "regular":
            if conf == self.conf and sender in self.members:
                return True
            if sender in self.members and conf < self.conf and \
                    self.clock() - self.installed_at < self.timeouts.fail_timeout:
                return False  # late traffic of the configuration before
            self.start_gather(self.clock())
            return False
        if conf == self.conf:
            return True  # the old configuration's messages, until the cutoff
        if self.state == "recovery" and conf == self.new_conf and flags & wire.HF_INSTALLED \
                and sender in self.commit.members:
            self.install()  # the representative installed: its INSTALL was lost
            return True
        return False

    # gather ------------------------------------------------------------------------------
    def start_gather(self, now: float) -> None:
        if self.state == "gather":
            return
        self.state = "gather"
        self.gather_start = now
        self.excluded = set()
        self.commit = self.new_conf = None
        self.send_join()

    def my_set(self, now: float) -> tuple:
        ft = self.timeouts.fail_timeout
        live = {m for m, t in self.heard_at.items() if now - t < ft and m not in self.excluded}
        live.add(self.me)
        return tuple(sorted(live))

    def my_hold(self) -> Hold:
        above = sorted(s for s in self.store if s > self.aru)
        ranges: list = []
        for s in above:
            if ranges and ranges[-1][1] == s - 1:
                ranges[-1][1] = s
            else:
                ranges.append([s, s])
        return Hold(self.aru, tuple((a, b) for a, b in ranges[:wire.MAX_RANGES]))

    def send_join(self) -> None:
        now = self.clock()
        self.sent_set = self.my_set(now)
        self.join_time = now
        self.send(wire.JOIN, wire.BROADCAST,
                  Join(self.conf, self.top, self.sent_set, self.my_hold()).pack())

    def gather_step(self, now: float) -> None:
        t = self.timeouts
        s = self.my_set(now)
        if s != self.sent_set or now - self.join_time >= t.join_interval:
            self.send_join()
        if now - self.gather_start < t.min_gather:
            return
        agree = [m for m in s if m == self.me or self.joined(m, s)]
        if len(agree) == len(s):
            if s[0] == self.me:
                self.send_commit(s)
            return
        if now - self.gather_start > t.consensus_timeout:
            self.excluded |= set(s) - set(agree)
            self.gather_start = now
            self.send_join()

    def joined(self, m: int, s: tuple) -> bool:
        j = self.joins.get(m)
        return j is not None and j[1] >= self.gather_start and j[0].members == s

    def send_commit(self, s: tuple) -> None:
        top = max([self.top, self.conf.seq] + [self.joins[m][0].top for m in s if m != self.me]
                  + [self.joins[m][0].old.seq for m in s if m != self.me])
        entries = []
        for m in s:
            if m == self.me:
                entries.append((m, self.conf, self.my_hold()))
            else:
                j = self.joins[m][0]
                entries.append((m, j.old, j.hold))
        commit = Commit(ConfId(top + 1, self.me, self.inc), tuple(entries))
        self.send(wire.COMMIT, wire.BROADCAST, commit.pack())
        self.accept_commit(commit)

    # messages ----------------------------------------------------------------------------
    def on_membership(self, mtype: int, sender: int, body) -> None:
        now = self.clock()
        if mtype == wire.JOIN:
            self.top = max(self.top, body.top, body.old.seq)
            if self.state == "regular":
                if sender in self.members and body.old < self.conf and \
                        now - self.installed_at < self.timeouts.fail_timeout:
                    return  # sent before it got the COMMIT
                self.start_gather(now)
            elif self.state == "recovery" and sender in self.commit.members \
                    and body.members != self.commit.members:
                self.start_gather(now)  # it went back to gathering
            self.joins[sender] = (body, now)
            if self.state == "gather":
                self.gather_step(now)
        elif mtype == wire.COMMIT:
            self.top = max(self.top, body.conf.seq)
            self.on_commit(body)
        elif mtype == wire.RECOVERED:
            if body == self.new_conf and self.state == "recovery" and self.me == body.coord:
                self.recovered.add(sender)
                self.try_install()
            elif self.state == "regular" and body == self.conf and self.me == body.coord:
                self.send(wire.INSTALL, sender, wire.conf_body(body))
        elif mtype == wire.INSTALL:
            if self.state == "recovery" and body == self.new_conf:
                self.install()

    def on_commit(self, commit: Commit) -> None:
        if self.state == "regular" or self.me not in commit.members:
            return
        if commit.conf <= self.conf or (self.new_conf is not None
                                        and commit.conf <= self.new_conf):
            return
        mine = dict((m, old) for m, old, _ in commit.entries)[self.me]
        if mine != self.conf:
            return
        self.accept_commit(commit)

    def accept_commit(self, commit: Commit) -> None:
        self.state = "recovery"
        self.commit, self.new_conf = commit, commit.conf
        self.top = max(self.top, commit.conf.seq)
        self.commit_time = self.clock()
        self.holds = {m: h for m, old, h in commit.entries if old == self.conf}
        self.trans = tuple(sorted(self.holds))
        cut = max(h.aru for h in self.holds.values())
        grown = True
        while grown:
            grown = False
            for h in self.holds.values():
                for a, b in h.extra:
                    if a <= cut + 1 <= b:
                        cut, grown = b, True
        self.cut = cut
        for s in [s for s in self.store if s > cut]:
            del self.store[s]
        self.recovered = set()
        self.recover_step()

    # recovery ----------------------------------------------------------------------------
    def recover_step(self) -> None:
        if self.state != "recovery":
            return
        need = self.missing(self.delivered, self.cut)
        if not need:
            if self.me == self.new_conf.coord:
                self.recovered.add(self.me)
                self.try_install()
            else:
                self.send(wire.RECOVERED, self.new_conf.coord, wire.conf_body(self.new_conf))
            return
        asks: dict = {}
        for a, b in need:
            for s in range(a, b + 1):
                holder = next((m for m in self.trans
                               if m != self.me and self.holds[m].covers(s)), None)
                if holder is None:
                    continue
                r = asks.setdefault(holder, [])
                if r and r[-1][1] == s - 1:
                    r[-1][1] = s
                else:
                    r.append([s, s])
        for holder, ranges in asks.items():
            self.send(wire.NACK, holder, wire.nack_body(self.conf, ranges))

    def try_install(self) -> None:
        if self.recovered >= set(self.commit.members):
            self.send(wire.INSTALL, wire.BROADCAST, wire.conf_body(self.new_conf))
            self.install()

    def install(self) -> None:
        """The EVS order at a change (see the module's docstring)."""
        commit, cut = self.commit, self.cut
        self.state = "installing"
        self.deliver(upto=cut)
        self.emit(Configuration(commit.conf, self.trans, True))
        self.deliver(upto=cut, transitional=True)
        resend = [(service, payload) for _, service, payload in self.pending.values()]
        self.queued = resend + self.queued
        self.conf, self.members = commit.conf, commit.members
        self.state = "regular"
        self.installed_at = self.clock()
        self.commit = self.new_conf = None
        self.excluded = set()
        self.stats["configurations"] += 1
        self.reset_ordering()
        self.emit(Configuration(self.conf, self.members, False))
        queued, self.queued = self.queued, []
        for service, payload in queued:
            if self.state != "regular":
                self.queued.append((service, payload))
            else:
                self.submit(service, payload)
        self.flush()

    # timers ------------------------------------------------------------------------------
    def membership_tick(self, now: float) -> None:
        t = self.timeouts
        if self.state == "regular":
            for m in self.members:
                if m != self.me and now - self.heard_at.get(m, self.installed_at) \
                        > t.fail_timeout and now - self.installed_at > t.fail_timeout:
                    self.start_gather(now)
                    break
        elif self.state == "gather":
            self.gather_step(now)
        elif self.state == "recovery":
            if now - self.commit_time > t.commit_timeout:
                self.start_gather(now)
                return
            if self.me == self.new_conf.coord:
                self.send(wire.COMMIT, wire.BROADCAST, self.commit.pack())
            self.recover_step()

    def membership_timer(self, name: str) -> None:
        pass
