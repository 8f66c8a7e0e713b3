"""The baselines: COReL on a tiny fake total-order bus (commit only when every member
acknowledged, in the agreed order; in-doubt actions on a configuration change answered
with an error and never applied), and the upper-bound 2PC over loopback UDP (two forced
writes on the critical path, 3(n-1) unicasts, abort with an error when a participant is
silent, forged and replayed datagrams dropped)."""

import time
from dataclasses import dataclass

from testbed.daemon import Loop
from testbed.poll import wait_until
from testbed.replication import protocol as p
from testbed.replication import twopc
from testbed.replication.corel import COReL
from testbed.replication.disk import Disk
from testbed.replication.twopc import TwoPC

KEY = b"k" * 32


@dataclass
class Conf:
    conf_id: tuple
    members: tuple
    transitional: bool = False


@dataclass
class Deliv:
    sender: int
    service: int
    payload: bytes
    conf_id: tuple
    in_transitional: bool = False


class Bus:
    """Total order: every multicast is delivered to the connected members in one order
    (run(only=...) can hold one sender's messages back from some members, as a partition
    that starts right after they were sent)."""

    def __init__(self):
        self.nodes: dict = {}
        self.queue: list = []
        self.conf = None
        self.members = ()
        self.sent = 0

    def node(self, me):
        bus = self

        class N:
            def multicast(self, payload, service):
                bus.sent += 1
                bus.queue.append((me, service, payload))
        return N()

    def install(self, conf_id, members, transitional=None):
        """A configuration change: messages still queued are lost to everyone (as if
        their sender had been cut off), then the transitional configurations
        ({member: its transitional members}), then the regular one, then the exchange."""
        self.queue.clear()
        for m, tmembers in (transitional or {}).items():
            self.nodes[m].on_event(Conf(self.conf, tuple(tmembers), True))
        self.conf = conf_id
        self.members = tuple(members)
        for m in members:
            self.nodes[m].on_event(Conf(conf_id, tuple(members)))
        self.run()

    def run(self, hold=None):
        """Deliver everything queued; hold = (sender, {members that miss its messages})."""
        while self.queue:
            sender, service, payload = self.queue.pop(0)
            for m in self.members:
                if hold and sender == hold[0] and m in hold[1]:
                    continue
                self.nodes[m].on_event(Deliv(sender, service, payload, self.conf))


def make_corel(tmp_path, n=3, forced=False):
    bus = Bus()
    disks = {i: Disk(str(tmp_path / f"log{i}"), forced=forced, extra_latency_s=0)
             for i in range(1, n + 1)}
    for i in range(1, n + 1):
        bus.nodes[i] = COReL(i, range(1, n + 1), bus.node(i), disks[i], service=1)
    return bus, disks


def req(seq, cid=7):
    return p.Request(cid, seq, p.UPDATE, p.STRICT, b"x" * 200)


def st(bus, i):
    return bus.nodes[i].status()


def test_corel_commits_in_agreed_order_after_every_ack(tmp_path):
    bus, disks = make_corel(tmp_path, forced=True)
    bus.install((1, 1, 0), (1, 2, 3))
    assert all(st(bus, i)["state"] == "RegPrim" for i in (1, 2, 3))
    sent0 = bus.sent
    got = []
    bus.nodes[1].submit(req(1), got.append)
    bus.nodes[2].submit(req(1, cid=8), got.append)
    bus.run()  # actions delivered; forced writes not done yet: no acks, no commit
    assert got == [] and st(bus, 1)["pending"] == 2
    for d in disks.values():
        d.flush()
    assert got == []  # acks multicast but not delivered yet
    bus.run()
    assert sorted((r.ok, r.ordinal) for r in got) == [(True, 1), (True, 2)]
    assert len({st(bus, i)["hash"] for i in (1, 2, 3)}) == 1
    assert all(d.stats()["forced_writes"] == 2 for d in disks.values())
    assert bus.sent - sent0 == 2 + 3 * 2  # 2 actions + one ack per action per member
    for d in disks.values():
        d.close()


def test_corel_refuses_outside_a_primary(tmp_path):
    bus, disks = make_corel(tmp_path, n=3)
    bus.install((1, 1, 0), (1,))
    got = []
    bus.nodes[1].submit(req(1), got.append)
    assert not got[0].ok and "not in a primary component" in got[0].reason
    bus.nodes[1].submit(p.Request(7, 2, p.QUERY, p.WEAK, b"k"), got.append)
    assert got[1].ok
    bus.install((2, 1, 0), (1, 2, 3))
    bus.nodes[1].submit(p.Request(7, 3, p.UPDATE, p.STRICT, b"x" * 2000), got.append)
    assert not got[2].ok and "corel: an action's payload is at most" in got[2].reason
    for d in disks.values():
        d.close()


def test_corel_in_doubt_action_committed_by_one_is_applied_by_the_new_primary(tmp_path):
    """1 sees every ack of x and commits it; 2 (x's originator) and 3 miss 3's ack when 1
    is cut off. x is in doubt at 2 and 3 (2's client gets an error); the new primary
    {2, 3} applies it in the same place, and after the merge all three agree."""
    bus, disks = make_corel(tmp_path)
    bus.install((1, 1, 0), (1, 2, 3))
    got = []
    bus.nodes[2].submit(req(1), got.append)
    bus.run(hold=(3, {2, 3}))
    assert got == [] and st(bus, 1)["applied"] == 1 and st(bus, 2)["applied"] == 0
    bus.install((2, 2, 0), (2, 3), transitional={2: (2, 3), 3: (2, 3)})
    assert not got[0].ok and "outcome unknown" in got[0].reason
    for i in (2, 3):
        assert st(bus, i)["state"] == "RegPrim" and st(bus, i)["applied"] == 1
        assert st(bus, i)["resolved"] == 1
    assert st(bus, 2)["hash"] == st(bus, 3)["hash"] == st(bus, 1)["hash"]
    bus.install((3, 1, 0), (1, 2, 3), transitional={1: (1,), 2: (2, 3), 3: (2, 3)})
    bus.nodes[2].submit(req(2), got.append)
    bus.run()
    assert got[-1].ok and got[-1].ordinal == 2
    assert len({st(bus, i)["hash"] for i in (1, 2, 3)}) == 1
    assert [st(bus, i)["applied"] for i in (1, 2, 3)] == [2, 2, 2]
    for d in disks.values():
        d.close()


def test_corel_laggard_gets_the_committed_actions_at_the_merge(tmp_path):
    bus, disks = make_corel(tmp_path)
    bus.install((1, 1, 0), (1, 2))
    got = []
    for s in range(1, 6):
        bus.nodes[1 + s % 2].submit(req(s), got.append)
        bus.run()
    assert [r.ordinal for r in got] == [1, 2, 3, 4, 5]
    assert st(bus, 3)["applied"] == 0
    bus.install((2, 1, 0), (1, 2, 3), transitional={1: (1, 2), 2: (1, 2), 3: (3,)})
    assert st(bus, 3)["applied"] == 5 and st(bus, 3)["transferred"] == 5
    assert len({st(bus, i)["hash"] for i in (1, 2, 3)}) == 1
    for d in disks.values():
        d.close()
    reopened = COReL(3, (1, 2, 3), bus.node(3), Disk(str(tmp_path / "log3"), forced=False),
                     service=1)
    assert reopened.status()["applied"] == 5
    assert reopened.status()["hash"] == st(bus, 1)["hash"]


def make_twopc(tmp_path, loop, ids, port, peers_extra=(), give_up=5.0):
    peers = {i: f"127.0.0.{i}" for i in list(ids) + list(peers_extra)}
    out = {}
    for i in ids:
        d = Disk(str(tmp_path / f"2pc{i}"), forced=True, extra_latency_s=0.001, loop=loop)
        out[i] = TwoPC(loop, i, peers, port, KEY, d, retransmit_s=0.05, give_up_s=give_up)
    return out


def test_twopc_commits_with_two_forced_writes_and_counts_unicasts(tmp_path):
    loop = Loop()
    reps = make_twopc(tmp_path, loop, (1, 2, 3), 28411)
    got = []
    for s in range(1, 4):
        reps[1].submit(req(s), got.append)
    wait_until(lambda: (loop.run_once(0.05), len(got) == 3)[1], 10, "3 commits")
    assert [r.ordinal for r in got] == [1, 2, 3] and all(r.ok for r in got)
    wait_until(lambda: (loop.run_once(0.05), reps[3].status()["applied"] == 3)[1], 10,
               "participants applied")
    st = reps[1].status()
    assert st["sent"]["prepare"] >= 6 and st["sent"]["commit"] == 6
    assert reps[2].status()["sent"]["yes"] >= 3
    assert reps[1].disk.stats()["forced_writes"] == 3  # the decisions
    # the prepares and the commits: two per action at a participant
    assert reps[2].disk.stats()["forced_writes"] == 6
    assert reps[1].status()["hash"] == reps[2].status()["hash"] == reps[3].status()["hash"]
    big = p.Request(7, 9, p.UPDATE, p.STRICT, b"x" * 65536)
    reps[1].submit(big, got.append)          # more than one PREPARE datagram holds
    assert not got[-1].ok and "2pc: an action's payload is at most" in got[-1].reason
    # a forged datagram and a replayed one are dropped and counted
    now = int(time.time() * 1e6)
    dg = twopc.encode(KEY, twopc.ABORT, 1, 2, reps[1].inc, 10**6, now,
                      twopc.TXN.pack(99, reps[1].inc))
    reps[2].handle(dg[:-1] + bytes([dg[-1] ^ 1]))
    assert reps[2].status()["drops"] == {"bad_hmac": 1}
    reps[2].handle(dg)
    reps[2].handle(dg)
    assert reps[2].status()["drops"] == {"bad_hmac": 1, "replay": 1}
    assert reps[2].status()["received"]["abort"] == 1
    for r in reps.values():
        r.close()
        r.disk.close()
    loop.close()


def test_twopc_silent_participant_aborts_with_an_error(tmp_path):
    loop = Loop()
    reps = make_twopc(tmp_path, loop, (1, 2), 28412, peers_extra=(4,), give_up=0.3)
    got = []
    reps[1].submit(req(1), got.append)
    wait_until(lambda: (loop.run_once(0.05), len(got) == 1)[1], 10, "abort")
    assert not got[0].ok and "[4] did not answer PREPARE" in got[0].reason
    assert reps[1].status()["aborted"] == 1 and reps[1].status()["applied"] == 0
    wait_until(lambda: (loop.run_once(0.05), reps[2].status()["in_doubt"] == 0)[1], 10,
               "participant told of the abort")
    for r in reps.values():
        r.close()
        r.disk.close()
    loop.close()


def test_server_client_and_loadgen_over_loopback(tmp_path):
    """Two 2PC replica servers on 127.0.0.1/2: a ReplicaClient's update gets an ordinal,
    the load generator writes its results, bad configs are one-line errors, and a killed
    replica gives ReplicaUnavailable, not a silent loss."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import pytest

    from testbed.daemon import new_key, write_key
    from testbed.replication.client import ReplicaClient, ReplicaUnavailable

    key = write_key(str(tmp_path / "key"), new_key())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": 1, "algo": "paxos"}))
    r = subprocess.run([sys.executable, "-m", "testbed.replication.server", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "missing key 'peers'" in r.stderr
    procs = {}
    for i in (1, 2):
        cfg = {"id": i, "algo": "2pc", "peers": {"1": "127.0.0.1", "2": "127.0.0.2"},
               "client_port": 28521, "twopc_port": 28522, "key_file": key,
               "data_dir": str(tmp_path / f"d{i}"),
               "disk": {"forced": False, "extra_latency_ms": 8.5},
               "status_file": str(tmp_path / f"s{i}.json"),
               "ready_file": str(tmp_path / f"r{i}.ready")}
        (tmp_path / f"c{i}.json").write_text(json.dumps(cfg))
        procs[i] = subprocess.Popen([sys.executable, "-m", "testbed.replication.server",
                                     str(tmp_path / f"c{i}.json")])
    try:
        for i in (1, 2):
            wait_until(lambda i=i: os.path.exists(tmp_path / f"r{i}.ready"), 20,
                       f"replica {i} ready")
        with ReplicaClient("127.0.0.2", 28521, timeout=5) as c:
            assert c.update(b"hello") == (1, b"")
        out = tmp_path / "load.json"
        r = subprocess.run([sys.executable, "-m", "testbed.replication.loadgen", "--server",
                            "127.0.0.1:28521", "--clients", "3", "--seconds", "0.5",
                            "--out", str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        res = json.loads(out.read_text())
        assert res["completed"] > 10 and res["errors"] == 0 and res["unavailable"] == 0
        assert len(res["latencies_ms"]) == res["completed"] and res["latency_mean_ms"] > 0
        st = json.loads((tmp_path / "s1.json").read_text())
        assert st["alg"]["state"] == "RegPrim" and "disk" in st
        c = ReplicaClient("127.0.0.1", 28521, timeout=5)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        with pytest.raises(ReplicaUnavailable, match="127.0.0.1:28521"):
            c.update(b"lost?")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    assert procs[2].returncode == 0
    assert not os.path.exists(tmp_path / "r2.ready")  # removed at a clean exit
