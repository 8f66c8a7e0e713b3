"""HANet without root: the interface manager's choice, configuration checks and the daemons'
configurations planned from the paper's topology, the hand-packed netlink requests (parsed
back with pyroute2), and the web workload's pure parts (file set, picker, summaries,
interruption)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest

from testbed.errors import SpecError
from testbed.failover import hanet, hanet_daemon
from testbed.failover import hanet_web as web
from topologies import hanet as topo

PUB = hanet.Slave("pub", "s1-pub", True, 100.0)
PRIV = hanet.Slave("priv", "s1-priv", False, 100.0, local_ip="10.21.1.1", peer_ip="10.21.1.2")
USB = hanet.Slave("usb", "s1-usb", False, 12.0, local_ip="10.21.2.1", peer_ip="10.21.2.2")
SER = hanet.Slave("ser", "s1-ser", False, 0.1152, local_ip="10.21.3.1", peer_ip="10.21.3.2")
SLAVES = (PUB, PRIV, USB, SER)


def good(*names):
    return {s.name: s.name in names for s in SLAVES}


# the interface manager --------------------------------------------------------------------

def test_public_first_then_the_fastest_live_slave():
    assert hanet.choose_active(SLAVES, good("pub", "priv", "usb", "ser")) == "pub"
    assert hanet.choose_active(SLAVES, good("priv", "usb", "ser"), "pub") == "priv"
    assert hanet.choose_active(SLAVES, good("usb", "ser"), "priv") == "usb"
    assert hanet.choose_active(SLAVES, good("ser"), "usb") == "ser"
    assert hanet.choose_active(SLAVES, good(), "ser") is None
    # the public link comes back: it wins over every private one, whatever their speed
    assert hanet.choose_active(SLAVES, good("pub", "usb"), "usb") == "pub"
    fast_private = (replace(PUB, speed_mbit=10.0), replace(PRIV, speed_mbit=10000.0))
    assert hanet.choose_active(fast_private, {"pub": True, "priv": True}, "priv") == "pub"
    # the order in the configuration does not matter, only public and speed do
    assert hanet.choose_active((SER, USB, PRIV, PUB), good("ser", "usb", "priv")) == "priv"


def test_the_current_slave_is_kept_among_equals():
    pub2 = hanet.Slave("pub2", "s1-pub2", True, 100.0)
    slaves = (PUB, pub2, PRIV)
    both = {"pub": True, "pub2": True, "priv": True}
    assert hanet.choose_active(slaves, both, None) == "pub"  # config order breaks ties
    assert hanet.choose_active(slaves, both, "pub2") == "pub2"  # no flapping back
    faster = (PUB, replace(pub2, speed_mbit=1000.0), PRIV)
    assert hanet.choose_active(faster, both, "pub") == "pub2"  # a better one takes over
    assert hanet.choose_active(slaves, {"pub": False, "pub2": True, "priv": True},
                               "pub") == "pub2"


# configuration ----------------------------------------------------------------------------

def fake_net(tmp_path, **build):
    return SimpleNamespace(plan=topo.build(**build).plan(), log_dir=str(tmp_path))


def test_configs_planned_from_the_topology(tmp_path):
    cfgs = hanet.plan_configs(fake_net(tmp_path), topo.SERVICE_IPS)
    s1, s2 = cfgs["s1"], cfgs["s2"]
    assert [(s.name, s.ifname, s.public, s.speed_mbit) for s in s1.slaves] == [
        ("pub", "s1-pub", True, 100.0), ("priv", "s1-priv", False, 100.0),
        ("usb", "s1-usb", False, 12.0), ("ser", "s1-ser", False, 0.1152)]
    assert s1.slave("usb").peer_ip == "10.21.2.2" and s2.slave("usb").peer_ip == "10.21.2.1"
    assert s1.slave("pub").local_ip == topo.PUBLIC_IPS["s1"]
    assert s1.slave("pub").subnet == "10.20.0.0/24"
    assert s1.sibling.name == "s2" and [p.name for p in s1.peers] == ["s2"]
    assert s1.id != s2.id and s1.key_file == s2.key_file
    assert all(s.detect == "carrier" for s in s1.slaves)
    # the config travels as JSON to the daemon and comes back equal
    assert hanet.Config.from_dict(json.loads(s1.to_json())) == s1


def test_arp_and_ping_targets_default_to_the_segment(tmp_path):
    cfgs = hanet.plan_configs(fake_net(tmp_path), topo.SERVICE_IPS,
                              detect={"pub": "arp", "priv": "ping", "usb": "arp"})
    s1 = cfgs["s1"]
    assert s1.slave("pub").targets == (topo.ROUTER_IP,)  # the LAN's router first
    assert s1.slave("priv").targets == ("10.21.1.2",)
    assert s1.slave("usb").detect == "arp" and s1.slave("ser").detect == "carrier"
    cfgs = hanet.plan_configs(fake_net(tmp_path), topo.SERVICE_IPS, detect="ping",
                              targets={("s1", "pub"): ["10.20.0.51", "10.20.0.52"]})
    assert cfgs["s1"].slave("pub").targets == ("10.20.0.51", "10.20.0.52")
    assert len(cfgs["s2"].slave("pub").targets) == 3


@pytest.mark.parametrize("kw, match", [
    ({"service_ips": {"s1": "10.20.0.11", "zz": "10.20.0.12"}}, "unknown server"),
    ({"service_ips": {"s1": "10.20.0.11", "r1": "10.20.0.12"}}, "not a host"),
    ({"service_ips": {"s1": "10.20.0.101", "s2": "10.20.0.12"}}, "already an interface"),
    ({"service_ips": {"s1": "10.20.0.11", "s2": "10.20.0.11"}}, "must differ"),
    ({"service_ips": {"s1": "10.99.0.11", "s2": "10.20.0.12"}}, "not in the subnet"),
    ({"service_ips": {"s1": "10.20.0.300", "s2": "10.20.0.12"}}, "bad IPv4"),
    ({"service_ips": {"s1": "10.20.0.11"}}, "exactly two servers"),
    ({"service_ips": {"s1": "10.20.0.11", "s2": "10.20.0.12"}, "siblings": {"s1": "s1"}},
     "needs a sibling"),
    ({"service_ips": {"s1": "10.20.0.11", "c1": "10.20.0.12"}}, "no private link"),
    ({"service_ips": topo.SERVICE_IPS, "detect": "mii"}, "detect"),
    ({"service_ips": topo.SERVICE_IPS, "tick_ms": 1}, "tick_ms"),
    ({"service_ips": topo.SERVICE_IPS, "tick_ms": True}, "tick_ms"),
    ({"service_ips": topo.SERVICE_IPS, "port": 70000}, "port"),
    ({"service_ips": topo.SERVICE_IPS, "garp_kind": "loud"}, "garp_kind"),
    ({"service_ips": topo.SERVICE_IPS, "rt_priority": 100}, "rt_priority"),
    ({"service_ips": topo.SERVICE_IPS, "detect": "ping", "targets": {("s1", "pub"): ["x"]}},
     "bad IPv4"),
    ({"service_ips": "10.20.0.11"}, "map each server"),
])
def test_bad_configuration_is_one_line_spec_error(tmp_path, kw, match):
    with pytest.raises(SpecError, match=match) as e:
        hanet.plan_configs(fake_net(tmp_path), **kw)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing written


def test_check_config_catches_what_a_hand_written_config_gets_wrong(tmp_path):
    cfg = hanet.plan_configs(fake_net(tmp_path), topo.SERVICE_IPS)["s1"]
    bad = {
        "ARP monitor needs exactly one": replace(cfg, slaves=(replace(cfg.slaves[0],
                                                                      detect="arp"),)),
        "needs at least one host": replace(cfg, slaves=(replace(cfg.slaves[0],
                                                                detect="ping"),)),
        "no public slave": replace(cfg, slaves=cfg.slaves[1:]),
        "duplicate slave": replace(cfg, slaves=cfg.slaves + cfg.slaves[:1]),
        "needs local_ip and peer_ip": replace(cfg, slaves=(cfg.slaves[0],
                                                           replace(cfg.slaves[1], peer_ip=None))),
        "this daemon's id": replace(cfg, sibling=replace(cfg.sibling, id=cfg.id)),
        "longer than 15": replace(cfg, slaves=(replace(cfg.slaves[0], name="p" * 16),)),
    }
    for match, c in bad.items():
        with pytest.raises(SpecError, match=match):
            hanet.check_config(c)


def test_daemon_refuses_a_bad_config_file_in_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "s1"}))
    p = subprocess.run([sys.executable, "-m", "testbed.failover.hanet_daemon",
                        "--config", str(path)],
                       capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 2
    assert p.stderr.startswith("hanet: bad configuration") and p.stderr.count("\n") == 1


def test_topology_validates_its_parameters():
    t = topo.build()
    plan = t.plan()
    assert {n for n, s in plan.nodes.items() if s.kind == "host"} == {
        "s1", "s2", "c1", "c2", "c3", "c4", "c5", "w1"}
    rates = {(ln.a, ln.intf_a): ln.a_to_b.rate_mbit for ln in plan.links}
    assert rates[("s1", "s1-usb")] == 12 and rates[("s1", "s1-ser")] == pytest.approx(0.1152)
    assert topo.build(private=("usb",), clients=1, remote_clients=0).plan()
    for kw in ({"clients": -1}, {"clients": 41}, {"clients": True}, {"remote_clients": 10},
               {"clients": 0, "remote_clients": 0}, {"private": ("eth",)}, {"private": ()},
               {"private": ("usb", "usb")}, {"usb_mbit": 0}, {"serial_kbit": "fast"}):
        with pytest.raises(SpecError):
            topo.build(**kw)


# netlink requests -------------------------------------------------------------------------

def _parse(data: bytes, cls):
    msg = cls(data)
    msg.decode()
    return msg


def test_route_requests_parse_as_rtnetlink():
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    nl = hanet_daemon.Netlink.__new__(hanet_daemon.Netlink)  # no socket: only the packing
    nl.seq, nl.batch = 41, []
    nl.route("10.20.0.0/24", "10.21.1.2", 7, 100, "10.20.0.11")
    nl.route("0.0.0.0/0", "10.21.1.2", 7, 100)
    nl.route("10.20.0.11/32", table=254, delete=True)
    add, dflt, dele = (_parse(m, rtmsg) for m in nl.batch)
    assert add["header"]["type"] == 24 and add["header"]["flags"] & 0x500 == 0x500
    assert add["header"]["sequence_number"] == 42
    assert add["dst_len"] == 24 and add.get_attr("RTA_DST") == "10.20.0.0"
    assert add.get_attr("RTA_GATEWAY") == "10.21.1.2" and add.get_attr("RTA_OIF") == 7
    assert add.get_attr("RTA_PREFSRC") == "10.20.0.11" and add.get_attr("RTA_TABLE") == 100
    assert add["type"] == 1 and add["proto"] == 4  # unicast, static
    assert dflt["dst_len"] == 0 and dflt.get_attr("RTA_DST") is None
    assert dele["header"]["type"] == 25 and dele.get_attr("RTA_DST") == "10.20.0.11"
    assert dele["scope"] == 255 and dele.get_attr("RTA_TABLE") == 254
    assert all(len(m) % 4 == 0 for m in nl.batch)


def test_proxy_neighbour_requests_parse_as_rtnetlink():
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    nl = hanet_daemon.Netlink.__new__(hanet_daemon.Netlink)
    nl.seq, nl.batch = 0, []
    nl.proxy("10.20.0.11", 5)
    nl.proxy("10.20.0.11", 5, delete=True)
    add, dele = (_parse(m, ndmsg) for m in nl.batch)
    assert add["header"]["type"] == 28 and dele["header"]["type"] == 29
    for m in (add, dele):
        assert m["family"] == socket.AF_INET and m["ifindex"] == 5
        assert m["flags"] == 0x08  # NTF_PROXY
        assert m.get_attr("NDA_DST") == "10.20.0.11"


# the web workload -------------------------------------------------------------------------

def test_surge_sizes_are_deterministic_and_bounded(tmp_path):
    a, b = web.surge_sizes(2000, 3), web.surge_sizes(2000, 3)
    assert a == b and a != web.surge_sizes(2000, 4)
    assert min(a) >= 100 and max(a) <= 1_000_000
    big = sum(x > 133_000 for x in a) / len(a)
    assert 0.05 < big < 0.25  # the Pareto tail and the lognormal body's upper part
    manifest = web.make_files(str(tmp_path / "www"), n=50, seed=1)
    entries = json.load(open(manifest))
    assert len(entries) == 50 and sum(e["weight"] for e in entries) == pytest.approx(1)
    for e in entries[:5]:
        assert os.path.getsize(str(tmp_path / "www") + e["path"]) == e["bytes"]
    mean = web.mean_bytes(manifest)
    assert mean == pytest.approx(sum(e["bytes"] * e["weight"] for e in entries))


def test_picker_follows_the_popularity(tmp_path):
    manifest = web.make_files(str(tmp_path), n=20, seed=2)
    entries = json.load(open(manifest))
    p = web.Picker(manifest, random.Random(1))
    counts = pd.Series([p.pick() for _ in range(20000)]).value_counts(normalize=True)
    top = max(entries, key=lambda e: e["weight"])
    assert counts.index[0] == top["path"]
    assert counts[top["path"]] == pytest.approx(top["weight"], abs=0.02)
    # the same seed picks the same sequence (runs are compared request by request)
    q1, q2 = web.Picker(manifest, random.Random(5)), web.Picker(manifest, random.Random(5))
    assert [q1.pick() for _ in range(50)] == [q2.pick() for _ in range(50)]


def test_summarize_counts_bytes_as_they_arrive():
    df = pd.DataFrame({"user": [0, 1, 2, 3], "t_start": [0.0, 1.0, 2.0, 9.0],
                       "t_end": [0.5, 1.5, 2.5, 9.5], "bytes": [1000, 2000, 0, 500],
                       "status": [200, 200, 0, 200], "error": ["", "", "TimeoutError", ""]})
    df["latency_ms"] = (df["t_end"] - df["t_start"]) * 1000
    df.attrs["bins"] = pd.DataFrame({"t": [0.0, 1.0, 5.0, 9.9], "bytes": [125_000] * 4})
    s = web.summarize(df, 0.0, 10.0)
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["throughput_mbit"] == pytest.approx(4 * 125_000 * 8 / 10 / 1e6)
    assert s["latency_mean_ms"] == pytest.approx(500)
    s = web.summarize(df, 1.0, 6.0)  # bins at 1.0 and 5.0 only
    assert s["throughput_mbit"] == pytest.approx(2 * 125_000 * 8 / 5 / 1e6)
    assert s["requests"] == 1


def test_interruption_is_the_longest_wait_between_replies():
    t = [i * 0.01 for i in range(100)]
    recv = [x + 0.001 for x in t]
    for i in range(30, 38):  # replies 30..37 lost: 90 ms between replies 29 and 38
        recv[i] = float("nan")
    df = pd.DataFrame({"seq": range(100), "t_send": t, "t_recv": recv})
    assert web.interruption_ms(df, 0.305) == pytest.approx(90, abs=0.01)
    assert web.interruption_ms(df, 0.75) == pytest.approx(10, abs=0.01)  # nothing lost
