"""GroupNode on a deterministic simulated network (no sockets): ordering, EVS, security.

The simulation runs every node on one virtual clock (a heap of events): each datagram
arrives after a random LAN delay unless the sender and the receiver are in different
components, or it is lost (a small seeded loss rate). Random runs (3-5 nodes, seeded)
partition, merge, crash and restart nodes while every live node multicasts, then heal and
settle; the checks are the EVS properties of docs/replication.md.
"""

from __future__ import annotations

import heapq
import random

import pytest

from testbed.replication.gc import (AGREED, SAFE, Configuration, Delivery, GroupNode,
                                    Timeouts)
from testbed.replication.gc import wire

KEY = b"k" * 32
EPOCH = 1.8e9


class Sim:
    def __init__(self, n: int, seed: int = 1, loss: float = 0.0):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.heap: list = []
        self.k = 0
        self.loss = loss
        self.ids = list(range(1, n + 1))
        self.comp = {i: 0 for i in self.ids}
        self.nodes: dict = {}
        self.logs: list = []         # one per incarnation: dict(node, inc, events, sent, ...)
        self.current: dict = {}     # id -> its log
        self.captured: list = []    # (dest, data) of every datagram sent
        self.msg = 0
        for i in self.ids:
            self.boot(i)

    # the event heap ----------------------------------------------------------------------
    def at(self, when: float, fn) -> None:
        self.k += 1
        heapq.heappush(self.heap, (max(when, self.now), self.k, fn))

    def run(self, until: float) -> None:
        while self.heap and self.heap[0][0] <= until:
            when, _, fn = heapq.heappop(self.heap)
            self.now = when
            fn()
        self.now = until

    # nodes -------------------------------------------------------------------------------
    def boot(self, i: int) -> None:
        sim = self
        log = {"id": i, "events": [], "sent": [], "alive": True, "queued": []}
        self.logs.append(log)
        self.current[i] = log

        class Loop:
            def at(self, when, fn):
                sim.at(when, lambda: node.closed or fn(sim.now))

        class Transport:
            def send(self, dest, data):
                sim.captured.append((i, dest, data))
                for j in (sim.ids if dest == wire.BROADCAST else [dest]):
                    if j != i and sim.comp[j] == sim.comp[i] and sim.rng.random() >= sim.loss:
                        sim.at(sim.now + sim.rng.uniform(0.0002, 0.002),
                               lambda j=j: sim.arrive(j, data))

        node = GroupNode(Loop(), i, {j: f"10.0.0.{j}" for j in self.ids}, key=KEY,
                         on_event=log["events"].append, timeouts=Timeouts(),
                         transport=Transport(), clock=lambda: sim.now,
                         wallclock=lambda: EPOCH + sim.now,
                         incarnation=int((EPOCH + sim.now) * 1e6))
        log["node"] = node
        self.nodes[i] = node
        node.start()

    def arrive(self, j: int, data: bytes) -> None:
        node = self.nodes.get(j)
        if node is not None and not node.closed:
            node.receive(data)
            node.flush()

    def crash(self, i: int) -> None:
        self.nodes[i].close()
        self.current[i]["alive"] = False
        del self.nodes[i]

    def send(self, i: int, service: int = SAFE) -> bytes:
        self.msg += 1
        payload = f"m{self.msg}-{i}".encode() + b"x" * 180
        node = self.nodes[i]
        log = self.current[i]
        log["sent"].append(payload)
        if node.state != "regular":
            log["queued"].append((payload, node.conf))
        node.multicast(payload, service)  # sent by the flush armed for "now"
        return payload

    def partition(self, groups) -> None:
        for g, members in enumerate(groups):
            for m in members:
                self.comp[m] = g

    def regular(self, ids) -> bool:
        confs = {self.nodes[i].conf for i in ids}
        return len(confs) == 1 and all(self.nodes[i].state == "regular" and
                                       set(self.nodes[i].members) == set(ids) for i in ids)


# the EVS checks --------------------------------------------------------------------------------

def deliveries(log) -> list:
    return [e for e in log["events"] if isinstance(e, Delivery)]


def check_evs(sim: Sim) -> None:
    # no duplicates; Configuration events come as transitional then regular
    for log in sim.logs:
        payloads = [d.payload for d in deliveries(log)]
        assert len(payloads) == len(set(payloads)), f"duplicates at {log['id']}"
        confs = [e for e in log["events"] if isinstance(e, Configuration)]
        assert [c.transitional for c in confs] == [True, False] * (len(confs) // 2)
    # one total order per configuration: every node's sequence is a prefix of the longest
    per_conf: dict = {}
    for log in sim.logs:
        seqs: dict = {}
        for d in deliveries(log):
            seqs.setdefault(d.conf_id, []).append(d.payload)
        for conf, seq in seqs.items():
            per_conf.setdefault(conf, []).append(seq)
    for conf, seqs in per_conf.items():
        longest = max(seqs, key=len)
        for seq in seqs:
            assert seq == longest[:len(seq)], f"order differs in {conf}"
    # transitional members deliver the same set of the old configuration's messages
    trans: dict = {}
    for log in sim.logs:
        regular = None
        for e in log["events"]:
            if isinstance(e, Configuration):
                if e.transitional and regular is not None:
                    got = frozenset(d.payload for d in deliveries(log) if d.conf_id == regular)
                    trans.setdefault((e.conf_id, e.members, regular), []).append(got)
                elif not e.transitional:
                    regular = e.conf_id
    for key, sets in trans.items():
        assert all(s == sets[0] for s in sets), f"transitional sets differ at {key}"
    # Safe in a regular configuration at one node -> at every member that did not crash
    for log in sim.logs:
        for d in deliveries(log):
            if d.service != SAFE or d.in_transitional:
                continue
            for other in sim.logs:
                if other["alive"] and any(isinstance(e, Configuration) and not e.transitional
                                          and e.conf_id == d.conf_id for e in other["events"]):
                    assert any(o.payload == d.payload for o in deliveries(other)), \
                        f"safe message {d.payload[:8]} missing at {other['id']}"
    # self-delivery, and a message queued while changing goes out in the next regular one
    for log in sim.logs:
        if not log["alive"]:
            continue
        mine = {d.payload: d for d in deliveries(log)}
        for p in log["sent"]:
            assert p in mine, f"{log['id']} never delivered its own {p[:8]}"
        for p, conf in log["queued"]:
            assert mine[p].conf_id > conf


def settle(sim: Sim, t: float = 4.0) -> None:
    sim.partition([sim.ids])
    sim.run(sim.now + t)
    assert sim.regular(list(sim.nodes)), {i: (n.state, n.members) for i, n in sim.nodes.items()}


# tests -----------------------------------------------------------------------------------------

def test_one_configuration_orders_and_delivers_everything():
    sim = Sim(3, seed=3)
    sim.run(1.0)
    assert sim.regular([1, 2, 3])
    for k in range(60):
        sim.send(1 + k % 3, SAFE if k % 2 else AGREED)
        if k % 6 == 5:
            sim.run(sim.now + 0.001)
    sim.run(sim.now + 0.5)
    for i in (1, 2, 3):
        assert len(deliveries(sim.current[i])) == 60
    check_evs(sim)
    st = sim.nodes[1].status()
    assert st["packets_sent"]["ordered"] < 60  # batched
    assert st["delivered"] == 60


@pytest.mark.parametrize("loss", [0.05])
def test_losses_are_repaired(loss):
    sim = Sim(4, seed=5, loss=loss)
    sim.run(2.0)
    for k in range(200):
        sim.send(1 + k % 4)
        sim.run(sim.now + 0.002)
    settle(sim)
    assert all(len(deliveries(sim.current[i])) == 200 for i in sim.ids)
    check_evs(sim)
    assert sum(n.status()["packets_sent"]["nack"] for n in sim.nodes.values()) > 0


def test_partition_then_merge_gives_transitional_then_regular():
    sim = Sim(4, seed=7)
    sim.run(1.0)
    assert sim.regular([1, 2, 3, 4])
    sim.partition([[1, 2], [3, 4]])
    sim.send(1)
    sim.send(3)
    sim.run(sim.now + 2.0)
    assert sim.regular([1, 2]) and sim.regular([3, 4])
    queued = None
    sim.partition([[1, 2, 3, 4]])
    for _ in range(400):
        sim.run(sim.now + 0.005)
        if sim.nodes[2].state != "regular":
            queued = sim.send(2)
            break
    assert queued is not None
    settle(sim)
    events = sim.current[2]["events"]
    confs = [e for e in events if isinstance(e, Configuration)]
    assert confs[-2].transitional and confs[-2].members == (1, 2)
    assert confs[-1].members == (1, 2, 3, 4)
    assert [d for d in deliveries(sim.current[4]) if d.payload == queued][0].conf_id \
        == confs[-1].conf_id
    check_evs(sim)


def test_crash_is_removed_and_restart_rejoins():
    sim = Sim(3, seed=11)
    sim.run(1.0)
    sim.crash(3)
    sim.run(sim.now + 1.5)
    assert sim.regular([1, 2])
    sim.boot(3)
    settle(sim)
    assert sim.regular([1, 2, 3])
    check_evs(sim)


@pytest.mark.parametrize("seed", range(8))
def test_random_partitions_merges_crashes(seed):
    rng = random.Random(seed)
    n = rng.choice([3, 4, 5])
    sim = Sim(n, seed=seed, loss=rng.choice([0.0, 0.01]))
    sim.run(0.5)
    for _ in range(12):
        step_end = sim.now + rng.uniform(0.2, 1.2)
        while sim.now < step_end:
            for i in list(sim.nodes):
                if rng.random() < 0.3:
                    sim.send(i, rng.choice([AGREED, SAFE]))
            sim.run(sim.now + 0.01)
        r = rng.random()
        dead = [i for i in sim.ids if i not in sim.nodes]
        if r < 0.45:
            ids = sim.ids[:]
            rng.shuffle(ids)
            cut = rng.randint(1, n - 1)
            sim.partition([ids[:cut], ids[cut:]])
        elif r < 0.65:
            sim.partition([sim.ids])
        elif r < 0.8 and len(sim.nodes) > 2:
            sim.crash(rng.choice(list(sim.nodes)))
        elif dead:
            sim.boot(rng.choice(dead))
    for i in sim.ids:
        if i not in sim.nodes:
            sim.boot(i)
    settle(sim, 5.0)
    check_evs(sim)
    assert sum(n.status()["configurations"] for n in sim.nodes.values()) >= len(sim.nodes)


def test_forged_and_replayed_datagrams_are_dropped_and_counted():
    sim = Sim(3, seed=2)
    sim.run(1.0)
    sim.send(1)
    sim.run(sim.now + 0.2)
    node = sim.nodes[2]
    before = len(deliveries(sim.current[2]))
    ordered = [d for src, dst, d in sim.captured if src == 1 and d[3] == wire.ORDERED]
    node.receive(ordered[-1])                       # replayed
    forged = bytearray(ordered[-1])
    forged[-20] ^= 1                                # a payload byte changed
    node.receive(bytes(forged))
    other = wire.encode(b"x" * 32, wire.HEARTBEAT, 1, 0, node.inc, 99999,
                        int((EPOCH + sim.now) * 1e6),
                        wire.heartbeat_body(node.conf, 1, 0, 0))
    node.receive(other)                             # the wrong key
    node.receive(b"\x00" * 10)
    drops = node.status()["drops"]
    assert drops["replay"] == 1 and drops["bad_hmac"] == 2 and drops["truncated"] == 1
    assert len(deliveries(sim.current[2])) == before
