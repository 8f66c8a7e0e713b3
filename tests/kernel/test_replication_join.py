"""PERSISTENT_JOIN and PERSISTENT_LEAVE through the real replica servers (paper 004, the
dynamic replica instantiation; testbed.replication.transfer).

Three replicas form the first primary (server config `servers`), take updates, and a
fourth joins via r1 while a load generator runs on r3. The transfer is paced (a test knob:
small chunks, one every few ms) so that r1 can be SIGKILLed in the middle of it: the
joiner must go on from r2 at the same offset (the snapshot is the same bytes at every
member), end with the same applied hash as r2 and r3, take part in the next primary and
order new actions. Then r2 issues PERSISTENT_LEAVE for the dead r1 (over its control
socket): once green, no replica counts r1 among the servers (the voters). Last, the
joiner is SIGKILLed and restarted: it recovers from its own log (no second transfer).
"""

from __future__ import annotations

import json
import threading

import pytest

from testbed import poll
from testbed.network import Network
from testbed.replication import db, start_replicas
from testbed.replication.transfer import join, join_status, leave, wait_joined
from topologies import replication_lan

pytestmark = pytest.mark.kernel

NODES = replication_lan.replica_names(4)
CHUNK = 512


@pytest.fixture
def lan(root_state, run_id):
    with Network(replication_lan.build(replicas=4, rate_mbit=0), run_id=run_id()) as net:
        yield net
    root_state.assert_unchanged()


def test_join_resumes_from_another_member_and_leave_removes_a_voter(lan):
    rs = start_replicas(lan, NODES, algo="engine", extra_latency_ms=1.0, start=False,
                        options={"servers": [1, 2, 3], "transfer_chunk": CHUNK,
                                 "transfer_pace_ms": 40, "transfer_timeout": 2.0})
    rs.start("r1", "r2", "r3")
    rs.wait_primary(["r1", "r2", "r3"])
    with rs.client("r1") as c:
        for i in range(40):                       # ~20 KB of database for the snapshot
            c.update(db.encode_update(db.STRICT, b"key%02d" % i, b"v" * 200))
    assert rs.status("r1")["alg"]["servers"] == [1, 2, 3]

    load: dict = {}
    t = threading.Thread(target=lambda: load.update(r3=rs.loadgen("r3", clients=2, seconds=4)))
    t.start()
    try:
        join(rs, "r4", via=["r1", "r2"], wait=False)
        poll.wait_until(lambda: join_status(rs, "r4").get("offset", 0) >= 4 * CHUNK, 20,
                        "r4 receiving from r1", interval=0.02)
        js = join_status(rs, "r4")
        assert js["phase"] == "transfer" and js["peer"] == rs.ips["r1"]
        assert js["offset"] < js["size"] - 4 * CHUNK   # well before the end
        rs.crash("r1")
        done = wait_joined(rs, "r4", timeout=30)
    finally:
        t.join(30)
    assert load["r3"]["completed"] > 0             # the load went on during the join
    srcs = done["sources"]
    assert [s["peer"] for s in srcs] == [rs.ips["r1"], rs.ips["r2"]], srcs
    assert 0 < srcs[0]["to"] == srcs[1]["from"] and srcs[1]["to"] == done["size"]
    assert rs.status("r2")["transfer"]["resumed"] == 1
    print(f"join: {done['size']} bytes in {done['seconds']:.2f} s, {srcs[0]['to']} from r1, "
          f"the rest from r2; load on r3: {load['r3']['completed']} actions")

    rs.wait_primary(["r2", "r3", "r4"])
    before = rs.wait_converged(["r2", "r3", "r4"])
    assert before[0] > 40
    with rs.client("r4") as c:                   # the joiner orders new actions
        ordinal, _ = c.update(db.encode_update(db.STRICT, b"from-r4", b"hello"))
        assert ordinal > before[0]
        _, value = c.query(b"key07")
        assert json.loads(value)["value"] == (b"v" * 200).hex()   # the transferred db
    after = rs.wait_converged(["r2", "r3", "r4"], at_least=ordinal)
    assert after[0] >= ordinal and after[1] != before[1]
    assert rs.status("r4")["alg"]["servers"] == [1, 2, 3, 4]

    leave(rs, "r1", via="r2")
    poll.wait_until(lambda: all(rs.status(n)["alg"]["servers"] == [2, 3, 4]
                                for n in ("r2", "r3", "r4")), 20, "r1 gone everywhere")
    rs.wait_primary(["r2", "r3", "r4"])

    rs.crash("r4")                               # a joiner restarts from its own log
    rs.recover("r4")
    st = poll.wait_until(lambda: rs.status("r4"), 10, "r4's status")
    assert "join" not in st and st["alg"]["state"] != "Joining"   # no second transfer
    rs.wait_primary(["r2", "r3", "r4"])
    last = rs.wait_converged(["r2", "r3", "r4"], at_least=after[0])
    assert rs.status("r4")["alg"]["servers"] == [2, 3, 4] and last[0] >= after[0]
