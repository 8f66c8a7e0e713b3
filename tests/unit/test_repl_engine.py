"""The replication engine (testbed/replication/engine.py) in the EVS simulator
(tests/unit/evs_sim.py): seeded random runs (safety at every step, convergence once
healed), then scripted scenarios for the delicate transitions of Figure 4, recovery,
joins and leaves, the query and update semantics, and the forced writes per action.

TESTBED_REPL_LONG=1 runs more seeds with more events each."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from evs_sim import Sim  # noqa: E402

from testbed.replication import actions as A  # noqa: E402
from testbed.replication import protocol as P  # noqa: E402
from testbed.replication.db import COMMUTATIVE, TIMESTAMP, encode_update  # noqa: E402
from testbed.replication.engine import Engine  # noqa: E402
from testbed.replication.engine_exchange import quorum  # noqa: E402

LONG = os.environ.get("TESTBED_REPL_LONG") == "1"
SEEDS = range(40) if LONG else range(6)
EVENTS = 150 if LONG else 20


def settled(sim):
    """Recover everybody, heal, run until quiet; assert one primary and one state."""
    for p in sorted(sim.crashed):
        sim.recover(p)
    sim.settle()
    st = {p: e.status() for p, e in sim.engines.items()}
    assert {v["state"] for v in st.values()} == {"RegPrim"}, st
    assert len({(v["green"], v["hash"]) for v in st.values()}) == 1
    assert len({tuple(v["servers"]) for v in st.values()}) == 1
    assert not sim.all_aids_created() - set(sim.ordinal_of), "an action was lost"
    sim.check_fifo()
    return st


@pytest.mark.parametrize("seed", SEEDS)
def test_random_partitions_merges_crashes(seed):
    sim = Sim(5, seed)
    sim.random_run(EVENTS)          # sim.check() asserts safety after every step
    st = settled(sim)
    assert st[1]["green"] == len(sim.global_order) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_random_runs_with_joins_and_small_messages(seed):
    sim = Sim(4, 100 + seed, max_payload=120)      # STATE messages travel in pieces
    sim.random_run(EVENTS, p_join=0.1)
    st = settled(sim)
    assert not sim.joining
    assert set(st) <= set(next(iter(st.values()))["servers"])


# -- scripted scenarios ----------------------------------------------------------------

def pump(sim, stop=lambda: False, limit=1000):
    """Deliver everything deliverable and complete forced writes, round by round, until
    quiet or stop() holds (checked after each half round)."""
    for _ in range(limit):
        moved = False
        for c in list(sim.confs.values()):
            for p in sorted(c.members):
                c.recv[p] = len(c.queue)
            for p in sorted(c.members):
                c.safe[p] = len(c.queue)
            for p in sorted(c.members):
                if c.deliv[p] < len(c.queue):
                    sim._deliver_upto(c, p, len(c.queue), False)
                    moved = True
        sim.check()
        if stop():
            return
        for p in sorted(sim.force_queue):
            while sim.force_queue[p]:
                done = sim.force_queue[p].pop(0)
                moved = True
                if done is not None:
                    done()
        sim.check()
        if stop() or not moved:
            return


def force_all(sim, p):
    while sim.force_queue[p]:
        done = sim.force_queue[p].pop(0)
        if done is not None:
            done()


def states(sim):
    return {p: e.state for p, e in sim.engines.items()}


def to_cpcs(sim, group):
    """Reconfigure to group | the rest alone; run group until every member is in
    Construct with its CPC multicast, and stop there. Returns the group's Conf."""
    rest = [{p} for p in sim.alive() if p not in group]
    sim.reconfigure([set(group)] + rest)
    pump(sim, lambda: all(sim.engines[p].state == "Construct" for p in group)
         and not any(sim.force_queue[p] for p in group))
    c = sim.confs[sim.conf_of[group[0]]]
    assert sum(m[:1] == A.MSG_CPC for _, m in c.queue[c.deliv[group[0]]:]) == len(group)
    return c


def record_states(sim, p):
    seen = []
    e = sim.engines[p]
    orig = e.on_event

    def spy(ev):
        orig(ev)
        seen.append(e.state)
    e.on_event = spy
    return seen


def test_case_1b_cpcs_in_transitional_then_an_action():
    sim = Sim(3, 0)
    pump(sim)
    assert set(states(sim).values()) == {"RegPrim"}
    c = to_cpcs(sim, [1, 2])
    n = len(c.queue)
    c.recv.update({1: n, 2: n})
    c.safe[1] = n                                  # 1 knows the CPCs are safe; 2 does not
    sim._deliver_upto(c, 1, n, False)
    assert sim.engines[1].state == "RegPrim"
    sim.submit(1)
    force_all(sim, 1)                              # forced, then multicast in RegPrim
    c.recv.update({1: len(c.queue), 2: len(c.queue)})
    seen = record_states(sim, 2)
    sim.reconfigure([{1}, {2}, {3}])               # 2 gets CPCs and the action transitional
    assert seen[:4] == ["No", "No", "Un", "TransPrim"], seen
    e1, e2 = sim.engines[1], sim.engines[2]
    assert e2.prim == e1.prim and e2.vulnerable is None
    assert len(e2.yellow) == 1 and e2.yellow == e1.yellow
    sim.reconfigure([{1, 2, 3}])
    settled(sim)


def test_undecided_server_waits_for_a_member_of_its_attempt():
    sim = Sim(3, 1)
    pump(sim)
    c = to_cpcs(sim, [1, 2])
    n = len(c.queue)
    c.recv.update({1: n, 2: n})
    c.safe[1] = n
    sim._deliver_upto(c, 1, n, False)              # 1 installs; 2 will be in Un
    sim.reconfigure([{1}, {2}, {3}])
    pump(sim)
    e2 = sim.engines[2]
    assert e2.vulnerable is not None and e2.state == "NonPrim"
    sim.reconfigure([{1}, {2, 3}])                 # 3 cannot tell 2 what 1 did
    pump(sim)
    assert states(sim)[2] == states(sim)[3] == "NonPrim" and e2.vulnerable is not None
    sim.reconfigure([{1, 2, 3}])                   # 1 installed: resolved, one primary
    pump(sim)
    assert set(states(sim).values()) == {"RegPrim"}
    # {1} alone was a primary meanwhile (half of {1, 2} with the lowest id): 2, 3, 4
    assert sim.engines[3].prim[0] == sim.engines[1].prim[0] == 4


def test_case_3_configuration_before_all_cpcs_clears_the_attempt():
    sim = Sim(3, 2)
    pump(sim)
    c = to_cpcs(sim, [1, 2])
    n = len(c.queue)
    c.recv.update({1: n, 2: n - 1})               # 2 never receives the last CPC
    seen = record_states(sim, 2)
    sim.reconfigure([{1}, {2}, {3}])
    assert "No" in seen and "Un" not in seen
    e1, e2 = sim.engines[1], sim.engines[2]
    assert e2.vulnerable is None                   # knows nobody installed
    assert e1.vulnerable is not None               # got all CPCs transitional: undecided
    sim.reconfigure([{1, 3}, {2}])                 # 3 was not in the attempt
    pump(sim)
    assert states(sim)[1] == "NonPrim" and e1.vulnerable is not None
    sim.reconfigure([{1}, {2, 3}])                 # 2 of 3 without the undecided one
    pump(sim)
    assert states(sim)[2] == "RegPrim"
    sim.reconfigure([{1, 2, 3}])
    pump(sim)
    assert e1.vulnerable is None and set(states(sim).values()) == {"RegPrim"}


def test_recovered_replica_rebuilds_from_its_log_and_catches_up():
    sim = Sim(5, 3)
    for _ in range(10):
        sim.submit()
    pump(sim)
    before = sim.engines[2].status()
    sim.crash(2)
    for _ in range(10):
        sim.submit(1)
    pump(sim)
    sim.recover(2)
    e2 = sim.engines[2]
    assert e2.db.ordinal >= before["green"] == 10    # rebuilt from disk.records()
    pump(sim)
    sim.reconfigure([set(sim.alive())])
    pump(sim)
    st = settled(sim)
    assert st[2]["green"] == 20 and st[2]["hash"] == st[1]["hash"]


def test_action_forced_before_a_crash_survives_through_the_exchange():
    sim = Sim(3, 4)
    pump(sim)
    sim.submit(3)
    force_all(sim, 3)                              # on disk and multicast ...
    sim.confs[sim.conf_of[3]].queue.clear()        # ... but lost with the configuration
    sim.crash(3)
    sim.recover(3)
    assert len(sim.engines[3].red) == 1            # its own forced action, held red
    st = settled(sim)
    assert st[1]["green"] == 1


def test_join_through_a_non_primary_component_with_a_resumed_transfer():
    sim = Sim(3, 5)
    big = b"v" * 900
    for i in range(8):
        sim.submit(1 + i % 3, payload=encode_update(1, b"key%d" % i, big))
    pump(sim)
    j = sim.request_join(2)
    pump(sim)
    blobs = {sim.engines[p].snapshot_for(j) for p in (1, 2, 3)}
    assert len(blobs) == 1 and None not in blobs   # identical at every member
    blob = blobs.pop()
    assert len(blob) > 3 * 1000 and json.loads(blob)["ordinal"] == 9
    sim.reconfigure([{1}, {2, 3}])                 # 2, 3 go on as the primary
    for _ in range(3):
        sim.submit(2)
    pump(sim)
    st = sim.joining[j]
    st["peer"] = 2
    assert sim.step_transfer(j)                    # one chunk from 2, then 2 dies
    sim.crash(2)
    while j in sim.joining:
        assert sim.step_transfer(j)                # resumed from 1 or 3, same bytes
    assert j in sim.engines and sim.engines[j].db.ordinal == 9
    sim.reconfigure([g for g in sim.groups() if j not in g and 1 not in g] + [{1, j}])
    pump(sim)
    assert sim.engines[j].state == "NonPrim" and sim.engines[j].prim == sim.engines[1].prim
    st = settled(sim)
    assert st[j]["hash"] == st[1]["hash"] and j in st[1]["servers"]
    assert j in sim.engines[1].prim[2]             # a member of the primary now


def test_persistent_leave_shrinks_the_voters():
    sim = Sim(4, 6)
    pump(sim)
    assert sim.engines[1].request_leave(4)
    pump(sim)
    assert all(4 not in e.servers for e in sim.engines.values())
    replies = []
    sim.engines[4].submit(P.Request(1, 1, P.UPDATE, P.STRICT, b""), replies.append)
    assert replies[0].status == P.ERROR and "left" in replies[0].reason
    assert sim.engines[1].prim[2] == (1, 2, 3, 4)
    sim.reconfigure([{1}, {2, 3}, {4}])            # 2 of the 3 remaining voters
    pump(sim)
    assert states(sim)[2] == "RegPrim"


def test_quorum_is_a_weighted_majority_with_the_lowest_id_breaking_ties():
    prim = (3, 1, (1, 2, 3, 4))
    s = {1, 2, 3, 4}
    assert quorum({1, 2}, prim, s, {}) and not quorum({3, 4}, prim, s, {})
    assert quorum({2, 3, 4}, prim, s, {}) and not quorum({5, 6}, prim, s, {})
    assert quorum({4}, prim, s, {4: 5}) and not quorum({1, 2, 3}, prim, s, {4: 5})
    assert quorum({2, 3}, prim, {1, 2, 3}, {})     # 4 left: 2 of 3


def test_queries_and_commutative_updates_in_a_non_primary_component():
    sim = Sim(5, 7)
    pump(sim)
    sim.reconfigure([{1}, {2}, {3, 4, 5}])
    pump(sim)
    r, seq = {}, [100]

    def submit(p, sem, payload, kind=P.UPDATE):
        seq[0] += 1                                # one client per replica
        sim.engines[p].submit(P.Request(p, seq[0], kind, sem, payload),
                              lambda rep, s=seq[0]: r.__setitem__(s, rep))
        return seq[0]

    a = submit(1, P.COMMUTATIVE, encode_update(COMMUTATIVE, b"n", 5))
    b = submit(2, P.COMMUTATIVE, encode_update(COMMUTATIVE, b"n", 7))
    t1 = submit(1, P.TIMESTAMP, encode_update(TIMESTAMP, b"t", b"new", ts=10))
    t2 = submit(2, P.TIMESTAMP, encode_update(TIMESTAMP, b"t", b"old", ts=4))
    pump(sim)
    assert r[t2].ok
    s = submit(1, P.STRICT, encode_update(1, b"s", b"x"))
    pump(sim)
    assert r[a].ok and r[a].ordinal == 0 and r[b].ok and r[t1].ok
    assert s not in r                              # strict: waits for the global order
    c = submit(1, P.CONSISTENT, b"n", kind=P.QUERY)
    w = submit(1, P.WEAK, b"n", kind=P.QUERY)
    d = submit(1, P.DIRTY, b"n", kind=P.QUERY)
    assert c not in r and json.loads(r[w].result)["counter"] == 0
    assert json.loads(r[d].result)["counter"] == 5
    sim.reconfigure([{1, 2}, {3, 4, 5}])           # still not a primary
    pump(sim)
    dirty = [submit(p, P.DIRTY, k, kind=P.QUERY) for p in (1, 2) for k in (b"n", b"t")]
    assert r[dirty[0]].result == r[dirty[2]].result  # converged without a primary
    assert json.loads(r[dirty[0]].result)["counter"] == 12
    assert json.loads(r[dirty[1]].result)["ts_value"] == b"new".hex()
    assert r[dirty[1]].result == r[dirty[3]].result
    sim.reconfigure([{1, 2, 3, 4, 5}])
    pump(sim)
    assert r[s].ok and r[s].ordinal > 0 and c in r
    assert json.loads(r[c].result)["counter"] == 12


def test_exactly_once_across_replicas():
    sim = Sim(3, 8)
    pump(sim)
    out = []
    req = P.Request(77, 1, P.UPDATE, P.COMMUTATIVE, encode_update(COMMUTATIVE, b"n", 1))
    sim.engines[1].submit(req, out.append)
    sim.engines[2].submit(req, out.append)         # the client retried elsewhere
    pump(sim)
    assert all(e.db.duplicates == 1 and e.db.applied == 1 for e in sim.engines.values())
    assert json.loads(sim.engines[3].db.read(b"n"))["counter"] == 1


def test_strict_reply_carries_the_ordinal_and_consistent_query_waits_for_it():
    sim = Sim(3, 9)
    pump(sim)
    out = []
    e = sim.engines[2]
    e.submit(P.Request(5, 1, P.UPDATE, P.STRICT, encode_update(1, b"k", b"v")), out.append)
    e.submit(P.Request(5, 2, P.QUERY, P.CONSISTENT, b"k"), out.append)
    assert out == []
    pump(sim)
    assert [x.client_seq for x in out] == [1, 2] and out[0].ordinal == 1
    assert json.loads(out[1].result)["value"] == b"v".hex() and out[1].ordinal == 1


def test_forced_writes_per_action_are_one_over_n():
    n, actions = 5, 200
    sim = Sim(n, 10)
    pump(sim)
    forced0 = sum(sum(r[:1] == A.REC_CREATED for r in s) for s in sim.store.values())
    calls0 = sum(sim.engines[p].disk.forced for p in sim.engines)
    sent0 = {p: e.counts["sent"] for p, e in sim.engines.items()}
    for _ in range(actions):
        sim.submit()
        for _ in range(sim.rng.randint(0, 5)):
            sim.step_network()
    pump(sim)
    calls = sum(sim.engines[p].disk.forced for p in sim.engines) - calls0
    writes = sum(sim.engines[p].disk.writes for p in sim.engines)
    assert forced0 == 0 and calls == actions       # only the creator forces
    assert calls / (actions * n) == pytest.approx(1 / n)
    assert all(e.db.ordinal == actions for e in sim.engines.values())
    assert writes >= actions * n                   # every replica logs every action
    # one multicast per action
    assert sum(e.counts["sent"] - sent0[p] for p, e in sim.engines.items()) == actions


def test_snapshot_for_another_server_is_refused():
    sim = Sim(3, 11)
    pump(sim)
    j = sim.request_join(1)
    pump(sim)
    blob = sim.engines[1].snapshot_for(j)
    with pytest.raises(ValueError, match="snapshot is for server"):
        Engine.from_snapshot(j + 1, blob, None, None)
    assert sim.engines[1].snapshot_for(j + 5) is None
    assert not sim.engines[1].request_join(j)        # already a server


def test_only_the_first_green_join_counts():
    sim = Sim(3, 12)
    pump(sim)
    j = sim.request_join(1)
    assert sim.engines[2].request_join(j)          # 2 has not ordered 1's JOIN yet
    pump(sim)
    joins = [o for o, aid in sorted(sim.global_order.items()) if aid[1] == 1]
    assert len(joins) == 2                         # both ordered, the second a no-op
    for e in sim.engines.values():
        assert e.join_points[j] == joins[0] and j in e.servers
        assert json.loads(e.snapshot_for(j))["ordinal"] == joins[0]


def test_engine_takes_a_gc_node_for_send():
    class Node:
        def __init__(self):
            self.sent = []

        def multicast(self, payload, service):
            self.sent.append((payload, service))

    class Disk:
        def records(self):
            return []

        def append(self, record, force, done=None):
            if done is not None:
                done()

    node = Node()
    e = Engine(me=2, servers=[1, 2], node=node, disk=Disk(), loop=None,
               config={"weights": {"2": 3}})
    assert e.weights == {2: 3}
    e.on_event(type("Conf", (), {"conf_id": 1, "members": (2,), "transitional": False})())
    assert node.sent and node.sent[0][0][:1] == A.MSG_STATE and node.sent[0][1] == 2
    with pytest.raises(ValueError, match="needs send"):
        Engine(1, [1], Disk())


def test_server_restarted_inside_a_primary_does_not_form_the_next_one_alone():
    sim = Sim(3, 13)
    pump(sim)
    sim.reconfigure([{1, 3}, {2}])
    pump(sim)
    assert states(sim)[1] == states(sim)[3] == "RegPrim"
    sim.submit(3)
    force_all(sim, 3)
    c = sim.confs[sim.conf_of[3]]
    c.recv.update({1: len(c.queue), 3: len(c.queue)})
    c.safe[3] = len(c.queue)
    sim._deliver_upto(c, 3, len(c.queue), False)   # green at 3; 1 crashes before it
    assert sim.engines[3].db.ordinal == 1 and sim.engines[1].db.ordinal == 0
    sim.crash(1)
    sim.recover(1)                                 # alone: the lowest id of {1, 3}
    pump(sim)
    e1 = sim.engines[1]
    assert e1.amnesic and e1.state == "NonPrim" and e1.db.ordinal == 0
    sim.reconfigure([{1, 3}, {2}])
    pump(sim)
    assert states(sim)[1] == "RegPrim" and not e1.amnesic and e1.db.ordinal == 1
    settled(sim)


def test_malformed_messages_are_counted_and_dropped():
    sim = Sim(2, 14)
    pump(sim)
    e = sim.engines[1]
    conf = sim.confs[sim.conf_of[1]].cid
    for junk in (b"A\x09", b"T\x00", b"F\x00", b"S{not json"):   # S: not read in RegPrim
        e.on_event(sim_delivery(2, junk, conf))
    assert e.counts["bad_messages"] == 3 and e.state == "RegPrim"


def sim_delivery(sender, payload, conf):
    from evs_sim import Delivery
    return Delivery(sender, 2, payload, conf, False)


def test_close_answers_every_waiting_client():
    sim = Sim(3, 10)
    pump(sim)
    sim.reconfigure([{1}, {2, 3}])                # 1 alone: not a primary
    pump(sim)
    out = []
    e = sim.engines[1]
    e.submit(P.Request(5, 1, P.UPDATE, P.STRICT, encode_update(1, b"k", b"v")), out.append)
    e.submit(P.Request(5, 2, P.QUERY, P.CONSISTENT, b"k"), out.append)
    pump(sim)
    assert out == []                              # both wait for a primary
    e.close()
    assert sorted(x.client_seq for x in out) == [1, 2]
    assert all(not x.ok and "shutting down" in x.reason for x in out)
