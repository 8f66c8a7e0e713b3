"""Paper 004's replication engine end to end: real servers in namespaces, real group
communication, random partitions, merges, crashes and recoveries (testbed.replication).

The main test runs closed-loop clients on every replica (each one identity: strict `set`s
of its own key alternating with commutative `add 1`s to its own counter; an action whose
outcome is unknown is resubmitted, same client id and sequence number, until answered),
injects random events and checks, while they happen (status files sampled every 20 ms):

- identical hashes for the same green prefix (ordinal -> hash, at every replica);
- at most one primary: one membership per primary index, every replica in RegPrim of the
  newest index is one of its members, and each new primary holds a majority of the
  previous one's members (dynamic linear voting: exactly half with the lowest id);

and once stable (healed, everyone recovered): one primary of all, the same (ordinal, hash)
everywhere, every submitted action answered with one ordinal however often it was sent,
no two actions with one ordinal, each counter equal to the number of `add`s its client
made (nothing applied twice), each key holding its client's last `set`, and a recovered
replica caught up. TESTBED_REPL_REPLICAS (3-5, default 4), TESTBED_REPL_SEED, and
TESTBED_REPL_LONG=1 for 100 events, more of them cuts right after a merge (during the
exchange and the Construct round).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest

from testbed import poll
from testbed.errors import SpecError, TestbedError
from testbed.network import Network
from testbed.replication import db, protocol, start_replicas
from testbed.replication.client import ReplicaError, ReplicaUnavailable
from topologies import replication_lan

pytestmark = pytest.mark.kernel

N = max(3, min(5, int(os.environ.get("TESTBED_REPL_REPLICAS", "4"))))
LONG = os.environ.get("TESTBED_REPL_LONG") == "1"
EVENTS = 100 if LONG else 20
SEED = int(os.environ.get("TESTBED_REPL_SEED", "1"))
NODES = replication_lan.replica_names(N)


@pytest.fixture
def lan(root_state, run_id):
    with Network(replication_lan.build(replicas=N, rate_mbit=0), run_id=run_id()) as net:
        yield net
    root_state.assert_unchanged()


class Worker(threading.Thread):
    """One closed-loop client on one replica: action k is a strict set of its key to k
    (odd k) or an add of 1 to its counter (even k). An action is resubmitted (same id and
    sequence number) until a reply comes; replies[k] collects every ordinal it got (a
    strict update is answered once green, with its ordinal; a commutative one as soon as
    it is delivered)."""

    def __init__(self, rs, node: str, index: int, stop: threading.Event):
        super().__init__(daemon=True, name=f"worker-{node}")
        self.rs, self.node, self.stop_ev = rs, node, stop
        self.draining = threading.Event()
        self.cid = 1000 + index
        self.key = b"k%d" % index
        self.replies: dict = {}  # seq -> [ordinal, ...]
        self.unavailable: list = []  # reasons of ReplicaUnavailable
        self.errors: list = []
        self.sends = 0
        self.seq = 1
        self.client = None

    def action(self, k: int) -> tuple:
        if k % 2:
            return protocol.STRICT, db.encode_update(db.STRICT, self.key, b"%d" % k)
        return protocol.COMMUTATIVE, db.encode_update(db.COMMUTATIVE, self.key, 1)

    def connect(self):
        while not self.stop_ev.is_set():
            if self.rs.alive(self.node) and os.path.exists(
                    self.rs.configs[self.node]["ready_file"]):
                try:
                    return self.rs.client(self.node, timeout=2.0, client_id=self.cid)
                except ReplicaUnavailable as e:
                    self.unavailable.append(str(e))
            self.stop_ev.wait(0.05)
        return None

    def run(self) -> None:
        sent = False  # action self.seq went out at least once
        while not self.stop_ev.is_set() and not (self.draining.is_set() and not sent):
            if self.client is None:
                self.client = self.connect()
                if self.client is None:
                    break
            self.client.seq = self.seq - 1  # the request is action self.seq (again)
            sem, payload = self.action(self.seq)
            sent = True
            self.sends += 1
            try:
                ordinal, _ = self.client.update(payload, semantics=sem)
            except ReplicaUnavailable as e:
                self.unavailable.append(str(e))
                self.client = None
                continue
            except ReplicaError as e:
                self.errors.append(str(e))
                self.stop_ev.wait(0.05)
                continue
            self.replies.setdefault(self.seq, []).append(ordinal)
            self.seq += 1
            sent = False
        if self.client is not None:
            self.client.close()

    def finish(self, timeout: float) -> None:
        """Stop once the action in flight is answered (it is resubmitted until it is)."""
        self.draining.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.node}'s client: action {self.seq} not answered"


class Sampler(threading.Thread):
    """Reads every status file every 20 ms and checks the invariants as it goes."""

    def __init__(self, rs):
        super().__init__(daemon=True, name="sampler")
        self.rs = rs
        self.stop_ev = threading.Event()
        self.hashes: dict = {}  # green ordinal -> (hash, node)
        self.prims: dict = {}  # primary index -> (attempt, members, node)
        self.samples = 0
        self.states: dict = {}  # engine state -> times seen
        self.failure = ""

    def run(self) -> None:
        try:
            while not self.stop_ev.wait(0.02):
                self.sample()
        except AssertionError as e:
            self.failure = str(e)

    def sample(self) -> None:
        sts = self.rs.statuses()
        newest = None
        in_prim = []
        for node, st in sts.items():
            a = (st or {}).get("alg") or {}
            if not a:
                continue
            self.states[a["state"]] = self.states.get(a["state"], 0) + 1
            g, h = a["green"], a["hash"]
            seen = self.hashes.setdefault(g, (h, node))
            assert seen[0] == h, f"ordinal {g}: {node} has hash {h}, {seen[1]} has {seen[0]}"
            p = a["prim"]
            key = (p["attempt"], tuple(sorted(p["members"])))
            if p["index"]:
                first = self.prims.setdefault(p["index"], (*key, node))
                assert first[:2] == key, (f"two primaries with index {p['index']}: {node} "
                                          f"{key}, {first[2]} {first[:2]}")
            if a["state"] == "RegPrim":
                in_prim.append((p["index"], node))
                newest = max(newest or 0, p["index"])
        if newest:  # one primary now: a replica still in an older one is not in the newest
            members = self.prims[newest][1]
            for idx, node in in_prim:
                assert idx == newest or self.rs.ids[node] not in members, (
                    f"{node} in RegPrim of primary {idx} and a member of primary {newest} "
                    f"{members}")
        self.samples += 1

    def check_voting(self) -> int:
        """Each primary seen holds a majority of the previous one seen (exactly half: with
        the lowest id of the previous). Returns how many successions were checked."""
        checked = 0
        idx = sorted(self.prims)
        for a, b in zip(idx, idx[1:]):
            if b != a + 1:
                continue  # an index between them was not seen
            prev, cur = set(self.prims[a][1]), set(self.prims[b][1])
            both = prev & cur
            assert 2 * len(both) > len(prev) or (2 * len(both) == len(prev)
                                                 and min(prev) in both), (a, prev, b, cur)
            checked += 1
        return checked


EXCHANGING = ("ExchangeStates", "ExchangeActions", "Construct")


def states(rs, down) -> set:
    return {(rs.status(n) or {}).get("alg", {}).get("state") for n in NODES if n not in down}


def components(nodes, groups, down) -> list:
    return [[n for n in g if n not in down] for g in (groups or [nodes])]


def settled(rs, comps) -> tuple:
    """(True, "") when every running replica's group communication has exactly its
    component as configuration and its engine rests in RegPrim or NonPrim."""
    for comp in comps:
        ids = sorted(rs.ids[n] for n in comp)
        for n in comp:
            st = rs.status(n)
            if not st or "alg" not in st:
                return False, f"{n}: no status"
            if sorted(st["gc"]["members"]) != ids:
                return False, f"{n}: configuration {st['gc']['members']} != {ids}"
            if st["alg"]["state"] not in ("RegPrim", "NonPrim"):
                return False, f"{n}: {st['alg']['state']}"
        prims = {rs.status(n)["alg"]["state"] for n in comp}
        if len(prims) > 1:
            return False, f"{comp}: mixed {prims}"
    return True, ""


def missing(rs, workers) -> dict:
    """Per client: (adds answered, counter in the database, last set answered, value)."""
    out = {}
    with rs.client(NODES[0]) as c:
        for w in workers:
            _, raw = c.query(w.key, kind=protocol.CONSISTENT)
            v = json.loads(raw)
            sets = [s for s in w.replies if s % 2]
            out[w.node] = (len([s for s in w.replies if s % 2 == 0]), v["counter"],
                           max(sets) if sets else None,
                           bytes.fromhex(v["value"]) if v["value"] else None)
    return out


def test_random_partitions_crashes_and_recoveries_keep_one_order(lan):
    net = lan
    rs = start_replicas(net, NODES, algo="engine", forced=True, extra_latency_ms=1.0)
    rs.wait_primary(NODES, timeout=20)
    stop = threading.Event()
    workers = [Worker(rs, n, i, stop) for i, n in enumerate(NODES)]
    sampler = Sampler(rs)
    sampler.start()
    for w in workers:
        w.start()
    try:
        events_then_check(rs, workers, sampler)
    finally:
        stop.set()
        sampler.stop_ev.set()


def events_then_check(rs, workers, sampler) -> None:
    rng = random.Random(SEED)
    down: set = set()
    groups = None
    kinds: dict = {}
    recovered = []
    flaps: list = []
    for i in range(EVENTS):
        options = ["crash"] if len(down) < (N - 1) // 2 else []
        options += ["recover"] * 2 if down else []
        options += ["heal", "flap"] if groups else ["partition"]
        if LONG and groups:
            options += ["flap"] * 2
        kind = rng.choice(options)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "crash":
            node = rng.choice([n for n in NODES if n not in down])
            rs.crash(node)
            down.add(node)
        elif kind == "recover":
            node = rng.choice(sorted(down))
            rs.recover(node)
            down.discard(node)
            recovered.append(node)
        elif kind == "partition":
            cut = rng.randint(1, N - 1)
            order = rng.sample(NODES, N)
            groups = [order[:cut], order[cut:]]
            rs.partition(groups)
        elif kind == "heal":
            rs.heal()
            groups = None
        else:  # merge, then cut again while the merged component exchanges / constructs
            rs.heal()
            target = ("Construct",) if rng.random() < 0.5 else EXCHANGING
            try:
                seen = poll.wait_until(lambda target=target: states(rs, down) & set(target),
                                       2, "the merge's exchange", interval=0.002)
                flaps.append("Construct" if "Construct" in seen else sorted(seen)[0])
            except poll.WaitTimeout:
                flaps.append("missed")  # no quorum to construct, or it went by unseen
            order = rng.sample(NODES, N)
            cut = rng.randint(1, N - 1)
            groups = [order[:cut], order[cut:]]
            rs.partition(groups)
        comps = components(NODES, groups, down)
        why = ""

        def ok(comps=comps) -> bool:
            nonlocal why
            good, why = settled(rs, comps)
            return good

        try:
            poll.wait_until(ok, 20, "settled", interval=0.02,
                            abort=lambda: sampler.failure or None)
        except poll.WaitTimeout:
            pytest.fail(f"event {i} ({kind}, groups {groups}, down {sorted(down)}): {why}")
        except TestbedError as e:
            pytest.fail(f"event {i} ({kind}, groups {groups}, down {sorted(down)}): {e}")
    # stable: everyone back and connected
    rs.heal()
    for n in sorted(down):
        rs.recover(n)
        recovered.append(n)
    rs.wait_primary(NODES, timeout=30)
    for w in workers:
        w.finish(30)
    rs.wait_converged(timeout=30)
    sampler.stop_ev.set()
    sampler.join(5)
    assert not sampler.failure, sampler.failure
    assert sampler.samples > EVENTS and sampler.check_voting() >= 1, sampler.prims

    ordinals: dict = {}
    adds = {}
    for w in workers:
        for seq, got in w.replies.items():
            if seq % 2 == 0:
                continue  # commutative: answered on delivery, before it has an ordinal
            assert len(set(got)) == 1, (w.node, seq, got)  # one ordinal however often sent
            assert got[0] not in ordinals, (w.node, seq, got[0], ordinals.get(got[0]))
            ordinals[got[0]] = (w.node, seq)
        assert sorted(w.replies) == list(range(1, len(w.replies) + 1)), w.node
        adds[w.node] = len([s for s in w.replies if s % 2 == 0])
    total = sum(len(w.replies) for w in workers)
    assert total > 2 * N  # the clients got work done through the events
    # every answered action applied, each once (statuses lag by up to 0.5 s)
    applied: dict = {}

    def all_applied() -> bool:
        applied.update({n: rs.status(n)["alg"] for n in NODES})
        return all(a["applied"] >= total for a in applied.values())

    try:
        poll.wait_until(all_applied, 10, "every answered action applied")
    except poll.WaitTimeout:
        pass
    for n, a in applied.items():
        assert a["applied"] == total, (n, a["applied"], total, missing(rs, workers))
        assert a["green"] == a["applied"] + a["duplicates"]
    final = rs.wait_converged(timeout=30)
    with rs.client(NODES[0]) as c:
        for w in workers:
            _, raw = c.query(w.key, kind=protocol.CONSISTENT)
            value = json.loads(raw)
            assert value["counter"] == adds[w.node], (w.node, value)  # no add applied twice
            last_set = max(s for s in w.replies if s % 2)
            assert bytes.fromhex(value["value"]) == b"%d" % last_set
    assert final[0] >= total
    # a recovered replica caught up (wait_converged covered every replica)
    assert not recovered or all(rs.applied_hashes()[n] == final for n in recovered)
    assert kinds.get("partition") and (kinds.get("heal") or kinds.get("flap"))
    if LONG:
        assert kinds.get("flap", 0) >= 10 and kinds.get("crash") and kinds.get("recover")
        assert "Construct" in flaps, flaps  # a cut during the Construct round
    print(f"events {kinds}; flaps cut during {flaps}; states seen {sampler.states}; "
          f"{sampler.samples} samples, primaries {sorted(sampler.prims)}; {total} actions, "
          f"{sum(w.sends for w in workers)} sends")
    assert any("unavailable" in u or "closed" in u or "lost" in u or "connect" in u
               for w in workers for u in w.unavailable) or not kinds.get("crash")


def test_a_client_whose_replica_dies_gets_unavailable(lan):
    net = lan
    rs = start_replicas(net, NODES, algo="engine", forced=True, extra_latency_ms=1.0)
    rs.wait_primary(NODES, timeout=20)
    victim, other = NODES[-1], NODES[0]
    rs.partition([NODES[:-1], [victim]])  # alone: its strict update stays red
    rs.wait_primary(NODES[:-1], timeout=20)
    c = rs.client(victim, timeout=30, client_id=77)
    payload = db.encode_update(db.STRICT, b"x", b"1")
    got: dict = {}

    def submit():
        try:
            got["reply"] = c.update(payload)
        except Exception as e:  # noqa: BLE001 -- recorded and asserted on below
            got["error"] = e

    t = threading.Thread(target=submit, daemon=True)
    t.start()
    poll.wait_until(lambda: (rs.status(victim) or {}).get("alg", {}).get("red", 0) >= 1,
                    10, "the action red at the cut-off replica")
    t0 = time.monotonic()
    rs.crash(victim)
    t.join(10)
    assert isinstance(got.get("error"), ReplicaUnavailable), got
    assert time.monotonic() - t0 < 5  # told at once, not after the client's 30 s timeout
    assert "outcome unknown" in str(got["error"])
    with pytest.raises(ReplicaUnavailable):
        c.update(payload)  # the client stays closed
    # recovered and merged: the action it had forced reaches everyone, once
    rs.heal()
    rs.recover(victim)
    rs.wait_primary(NODES, timeout=30)
    with rs.client(other, client_id=77) as c2:
        c2.seq = 0  # resubmit action 1 through another replica
        ordinal, _ = c2.update(payload)
        _, raw = c2.query(b"x")
    assert json.loads(raw)["value"] == b"1".hex()
    final = rs.wait_converged(timeout=20)
    assert all(rs.status(n)["alg"]["applied"] == 1 for n in NODES), final
    assert ordinal >= 1


def test_bad_input_is_refused_before_anything_starts(lan):
    net = lan
    before = set(os.listdir(net.log_dir)) if os.path.isdir(net.log_dir) else set()
    for nodes, kwargs, msg in ((["r1", "nosuch"], {}, "unknown node"),
                               (["r1", "sw1"], {}, "switch"),
                               (["r1", "r2"], {"algo": "paxos"}, "algo"),
                               (["r1", "r2"], {"extra_latency_ms": -1}, "extra_latency_ms")):
        with pytest.raises(SpecError, match=msg) as e:
            start_replicas(net, nodes, **kwargs)
        assert "\n" not in str(e.value)
    after = set(os.listdir(net.log_dir)) if os.path.isdir(net.log_dir) else set()
    assert after == before
    assert all(not net[n].procs for n in NODES)
