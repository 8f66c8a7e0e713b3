"""A deterministic simulation of a group communication service with extended virtual
synchrony (EVS), driving N replication engines (testbed.replication.engine) in one
process. Used by tests/unit/test_repl_engine.py.

Model (one seeded random.Random decides every step):

- A **configuration** is a set of live servers with one totally ordered queue of the
  messages its members multicast (all SAFE). Each member p has received a prefix of the
  queue (`recv[p]`), knows a safe line (`safe[p]`: the minimum of the members' `recv` at
  the last "ack" step that reached p, so it lags) and has delivered a prefix (`deliv[p]`,
  at most min(safe[p], recv[p]): Safe delivery in the regular configuration).
- A **configuration change** (partition, merge, crash, recovery, join) gives the servers
  whose group changes, per old configuration C and new group G, T = C ∩ G: each p in T
  delivers in C the messages up to its safe line, then gets Configuration(T,
  transitional=True), then the messages up to the highest `recv` in T (the first sequence
  number nobody in T has) with in_transitional=True, then Configuration(G) regular.
  Messages past that point are lost (the engine must recover them by its exchange);
  messages a server multicasts while it is between the two configurations are queued and
  go first in the new one. This keeps EVS's guarantee: a message delivered in a regular
  configuration was received by all its members, so every member of that configuration
  delivers it (there or in its transitional configuration) unless it crashes.
- **Disks** (`FakeDisk`) keep every record appended (the process crashes, the kernel keeps
  the file); a forced append's done() runs at a later "force" step, in order per disk.
- **Crash**: the engine is dropped (pending done() callbacks too); its group is
  reconfigured without it. **Recovery**: a new engine on the same disk, alone in a new
  configuration. **Join**: a live member issues PERSISTENT_JOIN for a new id; once the
  JOIN is green at some live member, the snapshot is moved in chunks from one member,
  resuming at the same offset from another if that member crashes (the bytes must be
  identical), and the joiner starts alone (it may then merge with anybody, primary or not).

`Sim.check()` asserts the safety properties at any moment; `Sim.settle()` heals the
network and runs until quiet.
"""

from __future__ import annotations

import random
from collections import namedtuple

from testbed.replication import actions as A
from testbed.replication import protocol as P
from testbed.replication.engine import Engine

Configuration = namedtuple("Configuration", "conf_id members transitional")
Delivery = namedtuple("Delivery", "sender service payload conf_id in_transitional")
CHUNK = 1000


class FakeDisk:
    def __init__(self, store: list, sim, node: int):
        self.store, self.sim, self.node = store, sim, node
        self.opened = list(store)
        self.writes = self.forced = self.bytes = 0

    def records(self):
        return list(self.opened)

    def append(self, record: bytes, force: bool, done=None):
        self.store.append(bytes(record))
        self.writes += 1
        self.bytes += len(record)
        if force:
            self.forced += 1
            self.sim.force_queue.setdefault(self.node, []).append(done)
        elif done is not None:
            done()

    def stats(self):
        return {"writes": self.writes, "forced_writes": self.forced, "bytes": self.bytes}


class Conf:
    def __init__(self, cid: int, members):
        self.cid, self.members = cid, set(members)
        self.queue = []
        self.recv = {p: 0 for p in members}
        self.safe = {p: 0 for p in members}
        self.deliv = {p: 0 for p in members}


class Sim:
    def __init__(self, n: int, seed: int, weights=None, max_payload: int = 1200):
        self.rng = random.Random(seed)
        self.initial = list(range(1, n + 1))
        self.next_id = n + 1
        self.store = {p: [] for p in self.initial}
        self.engines, self.traces, self.conf_of = {}, {}, {}
        self.confs, self.cid = {}, 0
        self.force_queue, self.outbox = {}, {}
        self.global_order = {}      # ordinal -> aid
        self.ordinal_of = {}        # aid -> ordinal
        self.prims = {}             # prim index -> (attempt, members)
        self.replies, self.submitted = [], []
        self.client_seq = 0
        self.joining = {}           # joiner -> {"rep", "offset", "peer", "digest", "data"}
        self.crashed = set()
        self.weights, self.max_payload = weights, max_payload
        for p in self.initial:
            self._start(p)
        self.reconfigure([set(self.initial)])

    # -- engines -------------------------------------------------------------------------

    def _start(self, p: int, snapshot: bytes = None):
        self.traces[p] = []
        disk = FakeDisk(self.store[p], self, p)

        def send(payload, service, p=p):
            self._send(p, payload)

        kw = dict(trace=self.traces[p], weights=self.weights, max_payload=self.max_payload)
        if snapshot is not None:
            e = Engine.from_snapshot(p, snapshot, disk, send, **kw)
        else:
            e = Engine(p, self.initial, disk, send, **kw)
        self.engines[p] = e
        self.force_queue[p] = []
        self.check()

    def _send(self, p: int, payload: bytes):
        if p in self.outbox:
            self.outbox[p].append(payload)
        else:
            self.confs[self.conf_of[p]].queue.append((p, payload))

    def alive(self):
        return sorted(self.engines)

    # -- configurations ------------------------------------------------------------------

    def groups(self):
        out = {}
        for p, c in self.conf_of.items():
            out.setdefault(c, set()).add(p)
        return [out[c] for c in sorted(out)]

    def reconfigure(self, new_groups):
        """Install new_groups (a partition of some live servers into groups)."""
        changed = []
        for g in new_groups:
            olds = {self.conf_of.get(p) for p in g}
            if len(olds) == 1 and None not in olds and self.confs[olds.pop()].members == g:
                continue
            changed.append(set(g))
        movers = set().union(*changed) if changed else set()
        for p in movers:
            self.outbox[p] = []
        # transitional phase, per old configuration and new group
        for g in changed:
            by_old = {}
            for p in g:
                if p in self.conf_of:
                    by_old.setdefault(self.conf_of[p], set()).add(p)
            for cid, t in sorted(by_old.items()):
                c = self.confs[cid]
                top = max(c.recv[p] for p in t)
                for p in sorted(t):
                    self._deliver_upto(c, p, min(c.safe[p], c.recv[p]), False)
                for p in sorted(t):
                    self._event(p, Configuration(("t", self.cid + 1), tuple(sorted(t)), True))
                    self._deliver_upto(c, p, top, True)
        for p in movers:
            old = self.conf_of.pop(p, None)
            if old is not None:
                self.confs[old].members.discard(p)
                if not self.confs[old].members:
                    del self.confs[old]
        for g in changed:
            self.cid += 1
            c = self.confs[self.cid] = Conf(self.cid, g)
            for p in sorted(g):
                self.conf_of[p] = self.cid
                c.queue.extend((p, m) for m in self.outbox.pop(p))
            for p in sorted(g):
                self._event(p, Configuration(self.cid, tuple(sorted(g)), False))
        self.check()

    def _deliver_upto(self, c: Conf, p: int, upto: int, trans: bool):
        while c.deliv[p] < upto and p in self.engines:
            sender, payload = c.queue[c.deliv[p]]
            c.deliv[p] += 1
            self._event(p, Delivery(sender, 2, payload, c.cid, trans))

    def _event(self, p: int, ev):
        e = self.engines.get(p)
        if e is not None:
            e.on_event(ev)

    # -- steps ---------------------------------------------------------------------------

    def step_network(self):
        """One receive / ack / deliver / forced-write step, at random; False if idle."""
        options = []
        for c in self.confs.values():
            for p in c.members:
                if c.recv[p] < len(c.queue):
                    options.append(("recv", c, p))
                if c.deliv[p] < min(c.safe[p], c.recv[p]):
                    options.append(("deliver", c, p))
                low = min(c.recv[q] for q in c.members)
                if c.safe[p] < low:
                    options.append(("ack", c, p))
        for p, q in self.force_queue.items():
            if q:
                options.append(("force", None, p))
        if not options:
            return False
        kind, c, p = self.rng.choice(options)
        if kind == "recv":
            c.recv[p] = self.rng.randint(c.recv[p] + 1, len(c.queue))
        elif kind == "ack":
            c.safe[p] = min(c.recv[q] for q in c.members)
        elif kind == "deliver":
            self._deliver_upto(c, p, c.deliv[p] + 1, False)
        else:
            done = self.force_queue[p].pop(0)
            if done is not None:
                done()
        self.check()
        return True

    def submit(self, p: int = None, semantics=P.STRICT, payload: bytes = None):
        p = self.rng.choice(self.alive()) if p is None else p
        self.client_seq += 1
        if payload is None:
            payload = b"opaque-%d" % self.client_seq
        req = P.Request(7, self.client_seq, P.UPDATE, semantics, payload)
        self.submitted.append((p, self.client_seq))
        self.engines[p].submit(req, lambda rep, p=p: self.replies.append((p, rep)))

    def partition(self):
        gs = [g for g in self.groups() if len(g) > 1]
        if not gs:
            return
        g = sorted(self.rng.choice(gs))
        self.rng.shuffle(g)
        k = self.rng.randint(1, len(g) - 1)
        rest = [x for x in self.groups() if x != set(g)]
        self.reconfigure(rest + [set(g[:k]), set(g[k:])])

    def merge(self):
        gs = self.groups()
        if len(gs) < 2:
            return
        a, b = self.rng.sample(range(len(gs)), 2)
        rest = [g for i, g in enumerate(gs) if i not in (a, b)]
        self.reconfigure(rest + [gs[a] | gs[b]])

    def crash(self, p: int = None):
        live = self.alive()
        if len(live) < 2:
            return
        p = self.rng.choice(live) if p is None else p
        self.engines.pop(p).close()
        self.force_queue[p] = []
        self.crashed.add(p)
        gs = [g - {p} for g in self.groups()]
        cid = self.conf_of[p]
        self.reconfigure([g for g in gs if g])
        if p in self.conf_of:
            del self.conf_of[p]
        c = self.confs.get(cid)
        if c is not None:
            c.members.discard(p)
            if not c.members:
                del self.confs[cid]

    def recover(self, p: int = None):
        if not self.crashed:
            return
        p = self.rng.choice(sorted(self.crashed)) if p is None else p
        self.crashed.discard(p)
        self._start(p)
        self.reconfigure(self.groups() + [{p}])

    # -- joins ---------------------------------------------------------------------------

    def request_join(self, rep: int = None) -> int:
        rep = self.rng.choice(self.alive()) if rep is None else rep
        j = self.next_id
        self.next_id += 1
        self.store[j] = []
        self.joining[j] = {"offset": 0, "peer": None, "digest": None, "data": b""}
        self.engines[rep].request_join(j)
        return j

    def step_transfer(self, j: int) -> bool:
        """Move one chunk of j's snapshot; start j's engine when complete."""
        st = self.joining[j]
        if st["peer"] not in self.engines:
            peers = [p for p in self.alive() if self.engines[p].snapshot_for(j)]
            if not peers:
                return False
            st["peer"] = self.rng.choice(peers)
        blob = self.engines[st["peer"]].snapshot_for(j)
        digest = Engine.snapshot_digest(blob)
        assert st["digest"] in (None, digest), "snapshot differs between members"
        st["digest"] = digest
        st["data"] += blob[st["offset"]:st["offset"] + CHUNK]
        st["offset"] = len(st["data"])
        if st["offset"] < len(blob):
            return True
        assert Engine.snapshot_digest(st["data"]) == digest
        del self.joining[j]
        self._start(j, snapshot=st["data"])
        self.reconfigure(self.groups() + [{j}])
        return True

    # -- invariants ----------------------------------------------------------------------

    def check(self):
        for p, trace in self.traces.items():
            for o, aid, _applied in trace:
                seen = self.global_order.setdefault(o, aid)
                assert seen == aid, f"server {p}: ordinal {o} is {aid}, elsewhere {seen}"
                where = self.ordinal_of.setdefault(aid, o)
                assert where == o, f"server {p}: {aid} green at {o} and at {where}"
            del trace[:]
        regprim = {}
        for p, e in self.engines.items():
            if e.state == "RegPrim":
                regprim[p] = e.prim
                seen = self.prims.setdefault(e.prim[0], e.prim[1:])
                assert seen == e.prim[1:], f"two primaries numbered {e.prim[0]}"
        assert len({pr for pr in regprim.values()}) <= 1, f"two primaries at once {regprim}"

    def check_fifo(self):
        """The global order holds each creator's actions 1, 2, ... in order, each once."""
        assert sorted(self.global_order) == list(range(1, len(self.global_order) + 1))
        last = {}
        for o in sorted(self.global_order):
            c, i = self.global_order[o]
            assert i == last.get(c, 0) + 1, f"ordinal {o}: {(c, i)} after {last.get(c)}"
            last[c] = i

    def settle(self, max_steps: int = 200000):
        """Heal the network, recover nobody, and run until quiet with one primary."""
        live = set(self.alive())
        if len(self.groups()) > 1 or (self.groups() and self.groups()[0] != live):
            self.reconfigure([live])
        for _ in range(max_steps):
            while self.joining and any(self.step_transfer(j) for j in list(self.joining)):
                if len(self.groups()) > 1:
                    self.reconfigure([set(self.alive())])
            if not self.step_network():
                if len(self.groups()) > 1:
                    self.reconfigure([set(self.alive())])
                    continue
                return
        raise AssertionError("the simulation did not settle")

    def random_run(self, events: int, p_join: float = 0.0):
        """`events` topology / client events, each followed by a random number of
        network steps."""
        kinds = ["submit"] * 6 + ["partition", "merge", "crash", "recover", "submit_many"]
        for _ in range(events):
            kind = self.rng.choice(kinds)
            if p_join and self.rng.random() < p_join:
                self.request_join()
            elif kind == "submit":
                self.submit()
            elif kind == "submit_many":
                for _ in range(self.rng.randint(2, 6)):
                    self.submit()
            else:
                getattr(self, kind)()
            for j in list(self.joining):
                if self.rng.random() < 0.5:
                    self.step_transfer(j)
            for _ in range(self.rng.randint(0, 60)):
                if not self.step_network():
                    break

    def all_aids_created(self):
        out = set()
        for recs in self.store.values():
            for r in recs:
                if r[:1] == A.REC_CREATED:
                    out.add(A.decode_action(r[1:]).aid)
        return out
