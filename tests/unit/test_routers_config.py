"""FRR configuration from a topology and gratuitous ARP frames: pure, no root."""

import pytest

from testbed import frr, garp
from testbed.errors import CapabilityError, SpecError
from testbed.topology import Topology


def square() -> Topology:
    t = Topology("square")
    for r in ("r1", "r2", "r3", "r4"):
        t.add_router(r)
    t.add_host("h1"); t.add_host("h2"); t.add_switch("s1"); t.add_router("r5")
    t.add_link("h1", "r1"); t.add_link("r2", "h2")
    t.add_link("r1", "r2"); t.add_link("r2", "r3"); t.add_link("r3", "r4"); t.add_link("r4", "r1")
    t.add_link("r3", "s1"); t.add_link("r5", "s1"); t.add_link("h2", "s1")  # a shared LAN
    return t


def blocks(text: str) -> dict:
    """'interface X' / 'router ...' -> their indented lines."""
    out, head = {}, None
    for line in text.splitlines():
        if line.startswith(("interface ", "router ")):
            head = line
            out[head] = []
        elif line.startswith(" ") and head:
            out[head].append(line.strip())
        elif line == "!":
            head = None
    return out


def test_ospf_config_follows_the_topology():
    plan = square().plan()
    routers = frr.check(plan, ["r1", "r2", "r3", "r4", "r5"], frr.Options())
    cfg = frr.render(plan, "r1", routers, frr.Options(hello_s=2, dead_s=8,
                                                      costs={("r4", "r1"): 50}))
    assert set(cfg) == {"zebra", "ospfd"}
    b = blocks(cfg["ospfd"])
    assert "ip ospf passive" in b["interface r1-eth0"]  # toward h1 only
    for i in ("r1-eth1", "r1-eth2"):  # router-to-router links
        assert "ip ospf network point-to-point" in b[f"interface {i}"]
        assert "ip ospf hello-interval 2" in b[f"interface {i}"]
        assert "ip ospf dead-interval 8" in b[f"interface {i}"]
        assert "ip ospf area 0" in b[f"interface {i}"]
    assert "ip ospf cost 50" in b["interface r1-eth2"]
    assert not any("cost" in x for x in b["interface r1-eth1"])
    assert f"ospf router-id {frr.router_id(plan, 'r1')}" in b["router ospf"]
    # a LAN with two routers and a host: broadcast, not point to point, not passive
    lan = blocks(frr.render(plan, "r5", routers, frr.Options())["ospfd"])["interface r5-eth0"]
    assert not any("point-to-point" in x or "passive" in x for x in lan)
    ids = {frr.router_id(plan, r) for r in routers}
    assert len(ids) == len(routers)


def test_bgp_config_peers_with_routers_on_shared_segments():
    plan = square().plan()
    routers = frr.check(plan, ["r1", "r2", "r3", "r4"], frr.Options())
    opts = frr.Options(ospf=False, bgp=True, asns={"r2": 64999})
    cfg = frr.render(plan, "r1", routers, opts)
    assert set(cfg) == {"zebra", "bgpd"}
    bgp = blocks(cfg["bgpd"])["router bgp 65001"]
    r2_ip = str(plan.address("r2", "r2-eth1").ip)
    r4_ip = str(plan.address("r4", "r4-eth1").ip)
    assert f"neighbor {r2_ip} remote-as 64999" in bgp
    assert f"neighbor {r4_ip} remote-as 65004" in bgp
    assert sum("remote-as" in x for x in bgp) == 2  # r1 has two router neighbours
    assert "redistribute connected" in cfg["bgpd"]
    # r3's LAN peer r5 does not run FRR here: no session toward it
    r3 = frr.render(plan, "r3", routers, opts)["bgpd"]
    r5_ip = str(plan.address("r5").ip)
    assert r5_ip not in r3


@pytest.mark.parametrize("kw, match", [
    ({"hello_s": 0}, "hello_s"),
    ({"hello_s": 4, "dead_s": 4}, "must exceed"),
    ({"dead_s": 2.5}, "dead_s"),
    ({"ospf": False, "bgp": False}, "ospf, bgp"),
    ({"asns": {"r1": 0}}, "ASN"),
    ({"costs": {("r1", "r2"): 0}}, "cost"),
    ({"costs": {"r1": 5}}, "keyed"),
])
def test_bad_options(kw, match):
    with pytest.raises(SpecError, match=match):
        frr.Options(**kw)


@pytest.mark.parametrize("routers, opts, match", [
    (["r1", "nope"], {}, "unknown node"),
    (["r1", "h1"], {}, "not a router"),
    (["r1", "r1"], {}, "twice"),
    ([], {}, "no routers"),
    (["r1"], {"asns": {"r2": 65000}}, "does not run FRR"),
    (["r1"], {"costs": {("r1", "r3"): 5}}, "not a link"),
])
def test_bad_router_lists(routers, opts, match):
    with pytest.raises(SpecError, match=match):
        frr.check(square().plan(), routers, frr.Options(**opts))


def test_missing_frr_is_a_capability_error(monkeypatch):
    monkeypatch.setattr(frr, "FRR_BIN", "/nonexistent")
    assert not frr.available()
    with pytest.raises(CapabilityError, match="make setup"):
        frr.require()


# gratuitous ARP frames (golden bytes) -----------------------------------------------------------

MAC = "02:11:22:33:44:55"
IP = "10.0.0.100"


def test_garp_request_frame():
    f = garp.frame(IP, MAC, "request")
    assert f.hex() == (
        "ffffffffffff" "021122334455" "0806"        # Ethernet: broadcast, from MAC, ARP
        "0001" "0800" "06" "04" "0001"              # Ethernet/IPv4, who-has
        "021122334455" "0a000064"                   # sender MAC, IP
        "000000000000" "0a000064")                  # target MAC unknown, target IP = IP


def test_garp_reply_frame():
    f = garp.frame(IP, MAC, "reply")
    assert f.hex() == (
        "ffffffffffff" "021122334455" "0806"
        "0001" "0800" "06" "04" "0002"              # is-at
        "021122334455" "0a000064"
        "021122334455" "0a000064")                  # target MAC = sender's: a Linux GARP


def test_garp_both_and_bad_input():
    assert garp.frames(IP, MAC, "both") == [garp.frame(IP, MAC, "request"),
                                            garp.frame(IP, MAC, "reply")]
    for args in [("10.0.0.256", MAC, "request", 1, 0.1), ("::1", MAC, "request", 1, 0.1),
                 (IP, "02:11:22:33:44", "request", 1, 0.1), (IP, MAC, "loud", 1, 0.1),
                 (IP, MAC, "reply", 0, 0.1), (IP, MAC, "reply", 1, -1)]:
        with pytest.raises(SpecError):
            garp.check(*args)


def test_wait_converged_polls_missing_and_names_what_is_left(monkeypatch):
    from testbed.errors import TestbedError
    from testbed.poll import WaitTimeout

    answers = [["r1 -> 10.0.0.0/24: no route at r1"], []]
    monkeypatch.setattr(frr, "missing", lambda net, routers=None: answers.pop(0))
    assert 0 <= frr.wait_converged(None, timeout=5) < 5 and not answers
    monkeypatch.setattr(frr, "missing", lambda net, routers=None: ["a: loop", "b: loop"])
    with pytest.raises(WaitTimeout, match=r"^frr: not converged after [0-9.]+ s: a: loop "
                                          r"\(and 1 more\)$") as e:
        frr.wait_converged(None, timeout=0.05)
    assert isinstance(e.value, TestbedError)
