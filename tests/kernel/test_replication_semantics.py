"""The query and update semantics of paper 004's engine (section 6) through the client
library, on real replica servers: strict updates get their global ordinal; in a non-primary
component a commutative update is answered at once, a weak query reads the green state and
a dirty query also the red actions; once the partition heals everything converges.
"""

from __future__ import annotations

import pytest

from testbed import poll
from testbed.network import Network
from testbed.replication import start_replicas
from testbed.replication.client import ReplicaUnavailable
from topologies import replication_lan

pytestmark = pytest.mark.kernel

NODES = replication_lan.replica_names(3)


@pytest.fixture
def lan(root_state, run_id):
    with Network(replication_lan.build(replicas=3, rate_mbit=0), run_id=run_id()) as net:
        yield net
    root_state.assert_unchanged()


def test_semantics_across_a_partition(lan):
    rs = start_replicas(lan, NODES, algo="engine", forced=False)
    rs.wait_primary(NODES)
    with rs.client("r1") as c:
        first = c.set(b"x", b"1")
        assert c.set(b"x", b"2") > first > 0            # one global order of ordinals
        c.add(b"stock", 10)
        c.ts_set(b"pos", b"a", ts=5)
        c.ts_set(b"pos", b"old", ts=3)                  # older: loses
        poll.wait_until(lambda: c.get(b"stock")["counter"] == 10, 10, "the add applied")
        got = c.get(b"x")
        assert got["value"] == b"2" and got["ts"] is None
        assert c.get(b"pos")["ts_value"] == b"a"

    rs.partition([["r1", "r2"], ["r3"]])
    rs.wait_primary(["r1", "r2"])
    with rs.client("r3", timeout=2) as c3:
        assert c3.add(b"stock", -3) == 0                # answered in the non-primary
        poll.wait_until(lambda: c3.get(b"stock", "dirty")["counter"] == 7, 10,
                        "r3's dirty query to see its red add")
        assert c3.get(b"stock", "weak")["counter"] == 10   # green only
    with rs.client("r1") as c1:
        c1.set(b"x", b"3")                              # the primary goes on
    with rs.client("r3", timeout=1) as c3:
        with pytest.raises(ReplicaUnavailable, match="outcome unknown"):
            c3.set(b"y", b"lost?")                      # strict: waits for the primary

    rs.heal()
    rs.wait_primary(NODES)
    rs.wait_converged(NODES)
    for n in NODES:
        with rs.client(n) as c:
            got = c.get(b"stock", "weak")
            assert got["counter"] == 7, (n, got)
            assert c.get(b"x")["value"] == b"3"
            assert c.get(b"y")["value"] == b"lost?"     # the red strict update became green
