"""The group communication daemon (`python -m testbed.replication.gc`) on real namespaces:
three daemons on one switch with a client each (GroupClient over the UNIX socket, which the
test reaches by its path): one order at all three; a partition (netfilter DROP inside one
node's namespace) gives a transitional then a regular configuration on both sides and
the merge brings one back; a daemon killed with SIGKILL leaves the configuration; a forged
datagram is counted as a drop."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import pytest

from testbed import Topology
from testbed.daemon import new_key, write_key
from testbed.kernel import netns as kns
from testbed.network import Network
from testbed.process import file_exists
from testbed.replication.gc import SAFE, Configuration, Delivery
from testbed.replication.gc.client import GroupClient, GroupError

pytestmark = pytest.mark.kernel

PORT = 8300
IDS = (1, 2, 3)
IP = {i: f"10.120.0.{10 + i}" for i in IDS}


def topology() -> Topology:
    t = Topology("gc_lan")
    t.add_switch("sw1")
    for i in IDS:
        t.add_host(f"g{i}")
        t.add_link(f"g{i}", "sw1", ip_a=f"{IP[i]}/24")
    return t


@pytest.fixture
def gc(root_state, run_id, tmp_path):
    with Network(topology(), run_id=run_id()) as net:
        key = str(tmp_path / "key")
        write_key(key, new_key())
        procs, paths = {}, {}
        for i in IDS:
            p = {k: str(tmp_path / f"{k}{i}") for k in ("sock", "status", "ready")}
            cfg = {"id": i, "peers": {str(j): IP[j] for j in IDS}, "port": PORT,
                   "broadcast": "10.120.0.255", "key_file": key, "group": "db",
                   "socket": p["sock"], "status": p["status"], "ready": p["ready"]}
            with open(tmp_path / f"gc{i}.json", "w") as f:
                json.dump(cfg, f)
            procs[i] = net[f"g{i}"].start(
                [sys.executable, "-m", "testbed.replication.gc", str(tmp_path / f"gc{i}.json")],
                name=f"gc{i}", ready=file_exists(p["ready"]))
            paths[i] = p
        yield net, procs, paths
    root_state.assert_unchanged()


def status(paths, i) -> dict:
    try:
        with open(paths[i]["status"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def members(paths, i):
    st = status(paths, i)
    return st.get("state") == "regular" and tuple(st["members"])


def next_conf(client, transitional: bool, timeout: float = 10.0) -> Configuration:
    while True:
        ev = client.receive(timeout)
        assert ev is not None, "no configuration came"
        if isinstance(ev, Configuration) and ev.transitional == transitional:
            return ev


def test_order_partition_merge_kill_and_forgery(gc, wait_until):
    net, procs, paths = gc
    wait_until(lambda: all(members(paths, i) == IDS for i in IDS), 15, what="one configuration")
    clients = {i: GroupClient(paths[i]["sock"]) for i in IDS}
    with pytest.raises(GroupError, match="one group 'db'"):
        GroupClient(paths[1]["sock"]).join("other")
    for c in clients.values():
        c.join("db")
        assert next_conf(c, False).members == IDS
    for k in range(30):
        for i in IDS:
            clients[i].multicast(f"{i}:{k}".encode() * 20, SAFE)
    orders = {}
    for i, c in clients.items():
        got = []
        while len(got) < 90:
            ev = c.receive(10)
            assert ev is not None, f"client {i} got {len(got)} of 90"
            if isinstance(ev, Delivery):
                got.append(ev.payload)
        orders[i] = got
    assert orders[1] == orders[2] == orders[3]
    assert len(set(orders[1])) == 90

    # a partition: g3 drops the group's datagrams both ways
    rules = [["INPUT", "-p", "udp", "--dport", str(PORT)],
             ["OUTPUT", "-p", "udp", "--dport", str(PORT)]]
    for r in rules:
        net["g3"].run(["iptables", "-A", r[0], *r[1:], "-j", "DROP"])
    t1 = next_conf(clients[1], True)
    assert t1.members == (1, 2)
    assert next_conf(clients[1], False).members == (1, 2)
    assert next_conf(clients[3], True).members == (3,)
    assert next_conf(clients[3], False).members == (3,)
    for r in rules:
        net["g3"].run(["iptables", "-D", r[0], *r[1:], "-j", "DROP"])
    assert next_conf(clients[3], False).members == IDS
    assert next_conf(clients[1], False).members == IDS

    # a forged datagram to g2 (a real header, the wrong tag) is counted
    before = status(paths, 2)["drops"]["bad_hmac"]
    with kns.enter(net["g1"].ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx:
        tx.sendto(b"GC\x01\x01" + os.urandom(60), (IP[2], PORT))
    wait_until(lambda: status(paths, 2)["drops"]["bad_hmac"] > before, 5, what="a bad_hmac drop")

    # a daemon killed with SIGKILL leaves the configuration
    procs[3].signal(signal.SIGKILL)
    assert next_conf(clients[1], False).members == (1, 2)
    wait_until(lambda: members(paths, 2) == (1, 2), 5, what="g2 without g3")
    for i in (1, 2):
        clients[i].close()
    clients[3].close()
