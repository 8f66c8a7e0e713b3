"""VLAN specs and addressing (testbed.spec, testbed.topology, testbed.addressing): pure."""

import ipaddress

import pytest

from testbed.errors import SpecError
from testbed.kernel import vlan as kvlan
from testbed.topology import Topology


def two_switches(trunk=(1, 2)) -> Topology:
    """a, b on s1 in VLANs 1 and 2; c, d on s2 in VLANs 1 and 2; s1 = s2 trunk."""
    t = Topology("vlans")
    t.add_switch("s1")
    t.add_switch("s2")
    for h, vid, sw in (("a", 1, "s1"), ("b", 2, "s1"), ("c", 1, "s2"), ("d", 2, "s2")):
        t.add_host(h)
        t.add_link(h, sw, vlan=vid)
    t.add_link("s1", "s2", trunk=list(trunk))
    return t


def net_of(plan, node):
    return plan.address(node).network


def test_each_vlan_is_its_own_segment_across_the_trunk():
    p = two_switches().plan()
    assert net_of(p, "a") == net_of(p, "c")
    assert net_of(p, "b") == net_of(p, "d")
    assert net_of(p, "a") != net_of(p, "b")
    assert p.switch_vlans("s1") == (1, 2)
    assert p.access_ports("s1") == {"s1-eth0": 1, "s1-eth1": 2}
    assert p.trunks("s2") == {"s2-eth2": (1, 2)}
    assert p.vlan_aware("s1") and p.trunk_links[0].trunk == (1, 2)


def test_plain_switch_is_not_vlan_aware_and_keeps_one_segment():
    t = Topology()
    t.add_switch("s1")
    for h in ("a", "b"):
        t.add_host(h)
        t.add_link(h, "s1")
    p = t.plan()
    assert not p.vlan_aware("s1") and p.switch_vlans("s1") == (1,)
    assert net_of(p, "a") == net_of(p, "b")


def test_declared_vlans_make_a_switch_vlan_aware():
    t = Topology()
    t.add_switch("s1", vlans=[2])
    t.add_host("a")
    t.add_link("a", "s1")
    p = t.plan()
    assert p.vlan_aware("s1") and p.switch_vlans("s1") == (1, 2)


@pytest.mark.parametrize("vid", [0, 4095, -1, 1.5, "2", True])
def test_bad_vlan_ids(vid):
    t = Topology()
    t.add_switch("s1")
    t.add_host("a")
    with pytest.raises(SpecError,
                       match=r"link a-s1: VLAN id must be a whole number from 1 to 4094"):
        t.add_link("a", "s1", vlan=vid)


def test_vlan_needs_a_switch():
    t = Topology()
    t.add_host("a")
    t.add_host("b")
    with pytest.raises(SpecError, match=r"link a-b: vlan= needs a switch"):
        t.add_link("a", "b", vlan=2)


def test_trunk_joins_two_switches_only():
    t = Topology()
    t.add_switch("s1")
    t.add_host("a")
    with pytest.raises(SpecError, match=r"link a-s1: a trunk joins two switches"):
        t.add_link("a", "s1", trunk=[1])


@pytest.mark.parametrize("trunk,msg", [([], "carries at least one VLAN"),
                                       ([2, 2], "VLAN ids repeat"),
                                       (5, "want a list of VLAN ids")])
def test_bad_trunks(trunk, msg):
    t = Topology()
    t.add_switch("s1")
    t.add_switch("s2")
    with pytest.raises(SpecError, match=msg):
        t.add_link("s1", "s2", trunk=trunk)


def test_trunk_that_lacks_a_vlan_of_both_switches():
    with pytest.raises(SpecError, match=r"VLAN 2 is on both switches but the trunk does not "
                                        r"carry it"):
        two_switches(trunk=(1,)).plan()


def test_vlans_only_on_switches():
    t = Topology()
    with pytest.raises(SpecError, match=r"node a: only switches have VLANs"):
        t.add_node("a", "host", vlans=[2])


def test_explicit_same_subnet_in_two_vlans_is_allowed():
    """Two VLANs may reuse one subnet (paper 001: main and backup sites): isolation is L2."""
    t = Topology()
    t.add_switch("s1", vlans=[1, 2])
    t.add_host("a")
    t.add_host("b")
    t.add_link("a", "s1", vlan=1, ip_a="10.5.0.1/24")
    t.add_link("b", "s1", vlan=2, ip_a="10.5.0.2/24")
    p = t.plan()
    assert p.address("a").network == ipaddress.ip_network("10.5.0.0/24") == net_of(p, "b")


def test_trunk_underlay_and_names_fit():
    a, b = kvlan.trunk_underlay(0)
    assert str(a) == "169.254.0.1/30" and str(b) == "169.254.0.2/30"
    a, b = kvlan.trunk_underlay(100)
    assert a.network == b.network and a.ip != b.ip
    assert len(kvlan.vxlan_name(9999, 4094)) <= 15
    lines = kvlan.vxlan_lines(3, (1, 2), a, b, "s1-eth2")
    assert "id 2 " in lines[2] and f"dstport {kvlan.VXLAN_PORT + 3}" in lines[2]
    assert lines[3] == "link set vx3.2 master vbr2 up"
