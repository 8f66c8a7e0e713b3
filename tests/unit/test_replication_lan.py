"""The replication LAN topology and the replication harness's input checks (no root: the
harness only reads the network's plan before it creates anything)."""

from __future__ import annotations

import json
import os
import types

import pytest

from testbed.errors import SpecError
from testbed.replication import (Replicas, applied_of, check_groups, counters, primary_view,
                                 start_replicas)
from topologies import replication_lan


def fake_net(tmp_path, **build):
    """What start_replicas reads of a Network before it starts anything."""
    return types.SimpleNamespace(plan=replication_lan.build(**build).plan(), running=True,
                                 log_dir=str(tmp_path / "logs"))


def test_the_papers_lan_has_14_replicas_on_one_100_mbit_switch():
    plan = replication_lan.build().plan()
    hosts = sorted((n for n, s in plan.nodes.items() if s.kind == "host"),
                   key=lambda n: int(n[1:]))
    assert hosts == replication_lan.replica_names(14)
    assert [n for n, s in plan.nodes.items() if s.kind == "switch"] == ["sw1"]
    assert all(ln.a_to_b.rate_mbit == 100 and ln.b_to_a.rate_mbit == 100 for ln in plan.links)
    addrs = {n: str(a) for (n, _), a in plan.addressing.addresses.items()}
    assert addrs["r1"] == "10.120.0.11/24" and addrs["r14"] == "10.120.0.24/24"
    assert replication_lan.replica_ip(3) == "10.120.0.13"
    assert replication_lan.BROADCAST == "10.120.0.255"


def test_two_switches_alternate_the_replicas_and_unshaped_has_no_rate():
    plan = replication_lan.build(replicas=4, rate_mbit=0, switches=2).plan()
    sw = {ln.a: ln.b for ln in plan.links if ln.a.startswith("r")}
    assert sw == {"r1": "sw1", "r2": "sw2", "r3": "sw1", "r4": "sw2"}
    assert any({ln.a, ln.b} == {"sw1", "sw2"} for ln in plan.links)
    assert all(ln.a_to_b.rate_mbit is None for ln in plan.links)


@pytest.mark.parametrize("kwargs, msg", [
    ({"replicas": 0}, "replicas must be a whole number from 1 to 200, got 0"),
    ({"replicas": 2.5}, "replicas must be a whole number"),
    ({"replicas": True}, "replicas must be a whole number"),
    ({"switches": 3}, "switches must be a whole number from 1 to 2"),
    ({"rate_mbit": -1}, "rate_mbit must be a number"),
    ({"rate_mbit": "100"}, "rate_mbit must be a number"),
])
def test_bad_topology_input_is_one_line(kwargs, msg):
    with pytest.raises(SpecError, match=msg) as e:
        replication_lan.build(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("nodes, kwargs, msg", [
    (["r1", "nosuch"], {}, "unknown node 'nosuch'"),
    (["r1", "sw1"], {}, "sw1 is a switch"),
    (["r1", "r1"], {}, "listed twice"),
    ([], {}, "no replicas"),
    ("r1", {}, "must be a list"),
    (["r1", "r2"], {"algo": "paxos"}, "algo must be one of engine, corel, 2pc"),
    (["r1", "r2"], {"forced": "yes"}, "forced must be True or False"),
    (["r1", "r2"], {"extra_latency_ms": -1}, "extra_latency_ms must be a number"),
    (["r1", "r2"], {"gc_port": 0}, "gc_port must be a port"),
    (["r1", "r2"], {"client_port": 8300}, "must differ"),
    (["r1", "r2"], {"key": b"short"}, "at least 16 bytes"),
    (["r1", "r2"], {"name": "a b"}, "bad name"),
    (["r1", "r2"], {"options": {"peers": {}}}, "may not set peers"),
    (["r1", "r2"], {"profile": ["r3"]}, "profile: 'r3' is not a replica"),
])
def test_bad_harness_input_is_refused_before_anything_is_written(tmp_path, nodes, kwargs, msg):
    net = fake_net(tmp_path, replicas=3)
    with pytest.raises(SpecError, match=msg) as e:
        start_replicas(net, nodes, **kwargs)
    assert "\n" not in str(e.value)
    assert not os.path.exists(net.log_dir)  # no key, no configuration


def test_a_stopped_network_is_refused(tmp_path):
    net = fake_net(tmp_path)
    net.running = False
    with pytest.raises(SpecError, match="not running"):
        start_replicas(net, ["r1"])


def test_configs_follow_the_documented_keys(tmp_path):
    net = fake_net(tmp_path, replicas=3)
    owned = []
    net.own = lambda x: owned.append(x) or x
    rs = start_replicas(net, ["r2", "r1", "r3"], algo="corel", forced=False,
                        extra_latency_ms=3, start=False)
    assert owned == [rs] and isinstance(rs, Replicas)
    cfg = rs.configs["r1"]
    assert cfg["id"] == 2 and rs.ids == {"r2": 1, "r1": 2, "r3": 3}
    assert cfg["peers"] == {"1": "10.120.0.12", "2": "10.120.0.11", "3": "10.120.0.13"}
    assert cfg["disk"] == {"forced": False, "extra_latency_ms": 3.0}
    assert cfg["broadcast_ip"] == "10.120.0.255" and cfg["algo"] == "corel"
    assert os.path.isdir(cfg["data_dir"]) and cfg["data_dir"].startswith(net.log_dir)
    with open(cfg["key_file"]) as f:
        assert len(bytes.fromhex(f.read().strip())) == 32
    assert oct(os.stat(cfg["key_file"]).st_mode & 0o777) == "0o600"
    with open(cfg["path"]) as f:
        on_disk = json.load(f)
    assert set(on_disk) == {"id", "algo", "peers", "gc_port", "client_port", "twopc_port",
                            "key_file", "data_dir", "disk", "status_file", "ready_file",
                            "broadcast_ip"}
    with pytest.raises(SpecError, match="'r9' is not a replica"):
        rs.status("r9")
    with pytest.raises(SpecError, match="r3 in no group"):
        rs.partition([["r1"], ["r2"]])


def test_groups_must_cover_every_replica_once():
    nodes = ["r1", "r2", "r3"]
    assert check_groups(nodes, [["r1", "r2"], ["r3"]]) == [["r1", "r2"], ["r3"]]
    for groups, msg in (([["r1", "r2"], ["r2", "r3"]], "r2 is in two groups"),
                        ([["r1", "r2", "r3"], []], "empty group"),
                        ([["r1", "r4"], ["r2", "r3"]], "'r4' is not a replica"),
                        ("r1", "must be a list")):
        with pytest.raises(SpecError, match=msg):
            check_groups(nodes, groups)


def test_status_readers():
    st = {"alg": {"state": "RegPrim", "primary": True,
                  "prim": {"index": 4, "attempt": 2, "members": [3, 1]},
                  "members": [1, 2, 3], "green": 17, "applied": 16, "hash": "ab"},
          "disk": {"writes": 9, "forced_writes": 0, "force_requests": 5},
          "gc": {"packets_sent": {"data": 10, "ordered": 30, "ack": 2, "membership": 50},
                 "bytes_sent": 99}}
    assert primary_view(st) == ("RegPrim", 4, 2, (1, 3))
    assert applied_of(st) == (17, "ab")
    c = counters(st)
    assert c["forced_writes"] == 5 and c["packets_sent"] == 42 and c["applied"] == 17
    assert c["multicasts"] == 30 and c["unicasts"] == 12 and c["gc_packets_sent"] == 92
    twopc = {"alg": {"state": "RegPrim", "members": [2, 1], "applied": 3, "hash": "cd",
                     "packets_sent": 12}, "disk": {"force_requests": 6}}
    assert primary_view(twopc) == ("RegPrim", None, None, (1, 2))
    assert counters(twopc)["packets_sent"] == 12
    assert primary_view(None) is None and applied_of({}) is None
