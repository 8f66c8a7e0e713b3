"""Topology builder, addressing and Mininet import (testbed.topology, testbed.addressing):
pure, no root."""

import ipaddress
import itertools

import pytest

from testbed.errors import SpecError
from testbed.spec import Shaping
from testbed.topology import Topology


def pair(**link) -> Topology:
    t = Topology("pair")
    t.add_host("h1")
    t.add_host("h2")
    t.add_link("h1", "h2", **link)
    return t


def chain() -> Topology:
    """h1 - r1 - r2 - h2"""
    t = Topology("chain")
    for n in ("h1", "h2"):
        t.add_host(n)
    for n in ("r1", "r2"):
        t.add_router(n)
    t.add_link("h1", "r1")
    t.add_link("r1", "r2")
    t.add_link("r2", "h2")
    return t


# bad input: SpecError naming the problem -------------------------------------------------------

def test_unknown_node_in_link():
    t = Topology()
    t.add_host("h1")
    with pytest.raises(SpecError, match=r"link h1-nope: unknown node 'nope'"):
        t.add_link("h1", "nope")
    with pytest.raises(SpecError, match=r"unknown node 'ghost'"):
        t.add_link("ghost", "h1")
    assert t.links == []


def test_duplicate_node_name():
    t = Topology()
    t.add_host("h1")
    with pytest.raises(SpecError, match=r"duplicate node name 'h1'"):
        t.add_router("h1")
    assert t.nodes == ["h1"]


def test_duplicate_explicit_address():
    t = pair(ip_a="10.9.0.1/24", ip_b="10.9.0.1/24")
    with pytest.raises(SpecError, match=r"duplicate address 10\.9\.0\.1 on h1 and h2"):
        t.plan()


def test_duplicate_address_across_links():
    t = Topology()
    for n in ("h1", "h2", "h3", "h4"):
        t.add_host(n)
    t.add_link("h1", "h2", ip_a="10.9.0.1/24")
    t.add_link("h3", "h4", ip_b="10.9.0.1/16")  # same address, other mask
    with pytest.raises(SpecError, match=r"duplicate address 10\.9\.0\.1 on h1 and h4"):
        t.plan()


@pytest.mark.parametrize("params, pattern", [
    ({"rate": "fast"}, r"link h1-h2: rate: cannot parse 'fast'"),
    ({"rate": -10}, r"link h1-h2: rate: rate must be positive"),
    ({"delay": "-5ms"}, r"link h1-h2: delay: must not be negative"),
    ({"rate": 1e9}, r"link h1-h2: rate: .* is above 100000 Mbit/s"),
    ({"delay": 1e7}, r"link h1-h2: delay: .* is above 60000 ms"),
    ({"loss": 101}, r"link h1-h2: loss: must be between 0 and 100"),
    ({"delay": "5ms", "jitter": "10ms"}, r"link h1-h2: jitter 10 ms exceeds delay 5 ms"),
    ({"bw": 10}, r"link h1-h2: unknown link parameter 'bw'"),
    ({"a_to_b": {"loss": 200}}, r"link h1-h2: loss: must be between 0 and 100"),
    ({"queue_pkts": 0}, r"link h1-h2: queue limit must be a positive whole number"),
])
def test_bad_link_parameters(params, pattern):
    t = Topology()
    t.add_host("h1")
    t.add_host("h2")
    with pytest.raises(SpecError, match=pattern):
        t.add_link("h1", "h2", **params)
    assert t.links == []  # a rejected link leaves nothing behind


def test_interface_name_too_long_explicit():
    t = Topology()
    t.add_host("h1")
    t.add_host("h2")
    with pytest.raises(SpecError, match=r"interface name 'sixteen_chars_xx' is longer than 15"):
        t.add_link("h1", "h2", intf_a="sixteen_chars_xx")
    assert len("sixteen_chars_xx") == 16


def test_interface_name_too_long_from_node_name():
    # node names stop at 10 characters, so <node>-eth0..9 fit in 15: the 11th link does not
    t = Topology()
    t.add_switch("s1")
    t.add_host("abcdefghij")
    for _ in range(10):
        t.add_link("abcdefghij", "s1")
    assert "abcdefghij-eth9" in t.interfaces_of("abcdefghij")
    with pytest.raises(SpecError, match=r"interface name 'abcdefghij-eth10' is longer than 15"):
        t.add_link("abcdefghij", "s1")
    with pytest.raises(SpecError, match=r"'abcdefghijk' is longer than 10 characters"):
        t.add_host("abcdefghijk")


def test_bad_node_kind():
    with pytest.raises(SpecError, match=r"unknown kind 'firewall'"):
        Topology().add_node("fw", kind="firewall")


def test_self_link():
    t = Topology()
    t.add_host("h1")
    with pytest.raises(SpecError, match=r"link h1-h1: a node cannot link to itself"):
        t.add_link("h1", "h1")


def test_route_on_unknown_node():
    t = pair()
    with pytest.raises(SpecError, match=r"route: unknown node 'nope'"):
        t.add_route("nope", "10.5.0.0/24", "10.0.0.1")


def test_route_on_switch():
    t = Topology()
    t.add_host("h1")
    t.add_switch("s1")
    t.add_link("h1", "s1")
    t.add_route("s1", "default", "10.0.0.1")
    with pytest.raises(SpecError, match=r"route on switch s1"):
        t.plan()


def test_address_without_prefix():
    t = pair(ip_a="10.9.0.1")
    with pytest.raises(SpecError, match=r"h1 h1-eth0: address '10\.9\.0\.1' needs a prefix"):
        t.plan()


def test_address_on_switch():
    t = Topology()
    t.add_host("h1")
    t.add_switch("s1")
    t.add_link("h1", "s1", ip_b="10.0.0.1/24")
    with pytest.raises(SpecError, match=r"switch s1 takes no address"):
        t.plan()


def test_mixed_subnets_on_one_segment():
    t = pair(ip_a="10.9.0.1/24", ip_b="10.8.0.1/24")
    with pytest.raises(SpecError, match=r"several subnets: 10\.8\.0\.0/24, 10\.9\.0\.0/24"):
        t.plan()


def test_duplicate_interface_name():
    t = Topology()
    for n in ("h1", "h2", "h3"):
        t.add_host(n)
    t.add_link("h1", "h2", intf_a="up0")
    with pytest.raises(SpecError, match=r"duplicate interface up0 on h1"):
        t.add_link("h1", "h3", intf_a="up0")


def test_parallel_links_each_get_a_subnet():
    """Two links between the same two nodes (own interfaces): first-class, not a clash."""
    t = Topology()
    t.add_host("h1")
    t.add_host("h2")
    t.add_host("h3")
    one = t.add_link("h1", "h2")
    two = t.add_link("h2", "h1", rate=10)  # either way round
    other = t.add_link("h1", "h3")
    p = t.plan()
    assert (one.intf_a, one.intf_b, two.intf_a, two.intf_b) == (
        "h1-eth0", "h2-eth0", "h2-eth1", "h1-eth1")
    assert p.links_between("h1", "h2") == p.links_between("h2", "h1") == (one, two)
    assert p.links_between("h1", "h3") == (other,)
    assert p.links_between("h2", "h3") == ()
    assert p.link_at("h1", "h1-eth1") is two and p.link_at("h2", "h2-eth0") is one
    with pytest.raises(SpecError, match=r"^h1 has no interface 'h1-eth9'$"):
        p.link_at("h1", "h1-eth9")
    subnets = [p.address("h1", i).network for i in ("h1-eth0", "h1-eth1", "h1-eth2")]
    assert len(set(subnets)) == 3
    assert p.address("h2", "h2-eth1").network == p.address("h1", "h1-eth1").network


def test_empty_topology():
    with pytest.raises(SpecError, match=r"topology 'empty' has no nodes"):
        Topology("empty").plan()


# addressing -----------------------------------------------------------------------------------

def star_and_chain() -> Topology:
    """Several segments: a switch with three hosts, a router chain, a direct host pair."""
    t = Topology("mixed")
    t.add_switch("s1")
    for n in ("a", "b", "c", "d", "e", "f"):
        t.add_host(n)
    for n in ("r1", "r2", "r3"):
        t.add_router(n)
    for n in ("a", "b", "c", "r1"):
        t.add_link(n, "s1")
    t.add_link("r1", "r2")
    t.add_link("r2", "r3")
    t.add_link("r3", "d")
    t.add_link("r3", "e")
    t.add_link("e", "f")
    return t


def test_automatic_subnets_are_disjoint_and_addresses_unique():
    plan = star_and_chain().plan()
    segs = plan.addressing.segments
    assert len(segs) == 6  # the switch domain, r1-r2, r2-r3, r3-d, r3-e, e-f
    for x, y in itertools.combinations(segs, 2):
        assert not x.subnet.overlaps(y.subnet), (x.subnet, y.subnet)
    addrs = plan.addressing.addresses
    assert len({a.ip for a in addrs.values()}) == len(addrs)
    for seg in segs:
        for ep in seg.endpoints:
            assert addrs[ep].network == seg.subnet
            assert addrs[ep].ip not in (seg.subnet.network_address, seg.subnet.broadcast_address)
    # switch ports carry no address; every host/router port does
    assert not any(n == "s1" for n, _ in addrs)
    assert set(addrs) == {(ln.a, ln.intf_a) for ln in plan.links if ln.a != "s1"} | \
        {(ln.b, ln.intf_b) for ln in plan.links if ln.b != "s1"}
    # the switch domain holds all four endpoints in one subnet
    big = next(s for s in segs if len(s.endpoints) == 4)
    assert {n for n, _ in big.endpoints} == {"a", "b", "c", "r1"}


def test_addressing_is_deterministic():
    p1, p2 = star_and_chain().plan(), star_and_chain().plan()
    assert p1.addressing.addresses == p2.addressing.addresses
    assert p1.addressing.segments == p2.addressing.segments
    assert p1.addressing.routes == p2.addressing.routes
    # and planning the same Topology twice gives the same plan too
    t = star_and_chain()
    assert t.plan().addressing == t.plan().addressing


def test_explicit_addresses_kept_and_segment_filled_from_them():
    t = Topology()
    t.add_switch("s1")
    for n in ("h1", "h2", "h3"):
        t.add_host(n)
    t.add_link("h1", "s1", ip_a="192.168.7.1/24")
    t.add_link("h2", "s1")
    t.add_link("h3", "s1", ip_a="192.168.7.2/24")
    t.add_link("h1", "h2")  # an automatic segment next to the explicit one
    plan = t.plan()
    a = plan.addressing.addresses
    assert str(a[("h1", "h1-eth0")]) == "192.168.7.1/24"
    assert str(a[("h3", "h3-eth0")]) == "192.168.7.2/24"
    h2 = a[("h2", "h2-eth0")]
    assert h2.network == ipaddress.ip_network("192.168.7.0/24")
    assert h2.ip not in (ipaddress.ip_address("192.168.7.1"), ipaddress.ip_address("192.168.7.2"))
    auto = a[("h1", "h1-eth1")]
    assert auto.network.subnet_of(ipaddress.ip_network("10.0.0.0/8"))
    assert plan.address("h1") == a[("h1", "h1-eth0")]
    assert plan.address("h1", "h1-eth1") == auto


def test_automatic_subnet_avoids_explicit_one():
    t = Topology()
    for n in ("h1", "h2", "h3", "h4"):
        t.add_host(n)
    t.add_link("h1", "h2")  # automatic, would be 10.0.0.0/24
    t.add_link("h3", "h4", ip_a="10.0.0.1/24")  # explicit, declared later
    a = t.plan().addressing.addresses
    assert a[("h3", "h3-eth0")].network == ipaddress.ip_network("10.0.0.0/24")
    assert not a[("h1", "h1-eth0")].network.overlaps(ipaddress.ip_network("10.0.0.0/24"))


def test_big_segment_gets_a_bigger_subnet():
    t = Topology()
    t.add_switch("s1")
    for i in range(300):
        t.add_host(f"h{i}")
        t.add_link(f"h{i}", "s1")
    plan = t.plan()
    (seg,) = plan.addressing.segments
    assert seg.subnet.prefixlen == 23
    assert len({a.ip for a in plan.addressing.addresses.values()}) == 300


def routes_of(plan, node) -> dict:
    return {r.dst: r.via for r in plan.addressing.routes if r.node == node}


def test_static_routes_through_routers_both_ways():
    plan = chain().plan()
    a = plan.address
    net = {n: a(n).network for n in ("h1", "h2")}
    core = a("r1", "r1-eth1").network  # r1-r2
    assert a("r2", "r2-eth0").network == core
    r1_h1side, r1_core = a("r1", "r1-eth0").ip, a("r1", "r1-eth1").ip
    r2_core, r2_h2side = a("r2", "r2-eth0").ip, a("r2", "r2-eth1").ip

    assert routes_of(plan, "h1") == {str(core): str(r1_h1side), str(net["h2"]): str(r1_h1side)}
    assert routes_of(plan, "h2") == {str(core): str(r2_h2side), str(net["h1"]): str(r2_h2side)}
    assert routes_of(plan, "r1") == {str(net["h2"]): str(r2_core)}
    assert routes_of(plan, "r2") == {str(net["h1"]): str(r1_core)}


def test_user_routes_come_after_automatic_ones():
    t = chain()
    t.add_route("h1", "default", "10.0.0.2")
    routes = t.plan().addressing.routes
    assert routes[-1].node == "h1" and routes[-1].dst == "default"
    assert len(routes) == 7


def test_no_auto_routes_when_disabled():
    t = Topology(auto_routes=False)
    for n in ("h1", "h2"):
        t.add_host(n)
    t.add_router("r1")
    t.add_link("h1", "r1")
    t.add_link("r1", "h2")
    assert t.plan().addressing.routes == ()


def test_plan_interfaces():
    plan = chain().plan()
    assert plan.interfaces("r1") == ["r1-eth0", "r1-eth1"]
    assert plan.interfaces("h2") == ["h2-eth0"]
    with pytest.raises(SpecError, match=r"node 'nope' has no address"):
        plan.address("nope")


# Mininet import --------------------------------------------------------------------------------

def test_from_mininet_linear():
    from mininet.topo import LinearTopo

    t = Topology.from_mininet(LinearTopo(4))
    plan = t.plan()
    kinds = {n: s.kind for n, s in plan.nodes.items()}
    assert kinds == {**{f"h{i}": "host" for i in range(1, 5)},
                     **{f"s{i}": "switch" for i in range(1, 5)}}
    assert len(plan.links) == 7
    for i in range(1, 5):
        assert str(plan.address(f"h{i}")) == f"10.0.0.{i}/8"
    assert len(plan.addressing.segments) == 1  # switches join everything into one LAN
    assert all(ln.a_to_b.is_plain and ln.b_to_a.is_plain for ln in plan.links)


def test_from_mininet_link_options():
    from mininet.topo import Topo

    class Custom(Topo):
        def build(self):
            h1, h2, s1 = self.addHost("h1"), self.addHost("h2"), self.addSwitch("s1")
            self.addLink(h1, s1, bw=10, delay="5ms", loss=1, max_queue_size=100, jitter="1ms")
            self.addLink(h2, s1)

    plan = Topology.from_mininet(Custom()).plan()
    assert plan.name == "Custom"
    links = {ln.key: ln for ln in plan.links}
    shaped = links[frozenset(("h1", "s1"))]
    want = Shaping(rate_mbit=10.0, delay_ms=5.0, jitter_ms=1.0, loss_pct=1.0, queue_pkts=100)
    assert shaped.a_to_b == want and shaped.b_to_a == want
    plain = links[frozenset(("h2", "s1"))]
    assert plain.a_to_b.is_plain and plain.b_to_a.is_plain
    assert str(plan.address("h1")) == "10.0.0.1/8"
    assert str(plan.address("h2")) == "10.0.0.2/8"


def test_from_mininet_bad_option_is_a_spec_error():
    from mininet.topo import Topo

    class Bad(Topo):
        def build(self):
            self.addLink(self.addHost("h1"), self.addHost("h2"), bw=-1)

    with pytest.raises(SpecError, match=r"rate must be positive"):
        Topology.from_mininet(Bad())
