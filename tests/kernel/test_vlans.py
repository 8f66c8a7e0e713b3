"""VLANs on real namespaces, on every VLAN backend this kernel offers (802.1Q bridges where
the kernel has vlan_filtering, else one bridge per VLAN with trunks over VXLAN): isolation,
trunks, runtime change-over with a TCP connection surviving it, bad input. Needs root."""

import os
import re

import pytest

from testbed import capabilities, measure
from testbed.errors import CapabilityError, SpecError
from testbed.kernel import vlan as kvlan
from testbed.network import Network
from testbed.process import log_matches
from testbed.topology import Topology

pytestmark = [pytest.mark.kernel, pytest.mark.fullkernel]

ADDR = {"a": "10.5.0.1/24", "b": "10.5.0.2/24", "c": "10.5.0.3/24", "d": "10.5.0.4/24"}


def available() -> list:
    """The VLAN backends this kernel offers."""
    caps = capabilities.probe()
    out = [kvlan.BRIDGES] if caps.links.get("vxlan") else []
    if caps.bridge_vlan_filtering:
        out.insert(0, kvlan.NATIVE)
    return out


def backends() -> list:
    """The backends to test here: in the VM tier only the native one (the host tests the
    fallback; the slow VM only what the host cannot)."""
    out = available()
    if os.environ.get("TESTBED_NATIVE_ONLY") == "1" and kvlan.NATIVE in out:
        out = [kvlan.NATIVE]
    return out


def campus() -> Topology:
    """s1 (VLANs 1, 2, 3) = trunk(1, 2) = s2. a, c in VLAN 1 and b, d in VLAN 2, all in ONE
    subnet, so only layer-2 isolation keeps them apart (as paper 001's main and backup sites
    share a subnet on two VLANs)."""
    t = Topology("campus", auto_routes=False)
    t.add_switch("s1", vlans=[3])
    t.add_switch("s2")
    for h, vid, sw in (("a", 1, "s1"), ("b", 2, "s1"), ("c", 1, "s2"), ("d", 2, "s2")):
        t.add_host(h)
        t.add_link(h, sw, vlan=vid, ip_a=ADDR[h])
    t.add_link("s1", "s2", trunk=[1, 2])
    return t


def ip(h: str) -> str:
    return ADDR[h].split("/")[0]


def ping(src, dst_ip: str, count: int = 1) -> bool:
    return src.run(["ping", "-c", str(count), "-W", "1", "-i", "0.2", dst_ip],
                   check=False).returncode == 0


def mac(node) -> str:
    (ln,) = [x for x in node.ipr().get_links() if x.get_attr("IFLA_IFNAME") == node.intfs[0]]
    return ln.get_attr("IFLA_ADDRESS")


def capture(node, src_mac: str):
    """tcpdump on node's interface for frames from src_mac; returns the Process (its log
    ends with tcpdump's 'N packets captured' once stopped)."""
    p = node.start(["tcpdump", "-nei", node.intfs[0], "-l", "ether", "src", src_mac],
                   name=f"tcpdump-{src_mac[-5:].replace(':', '')}")
    p.wait_ready(log_matches(lambda: p, "listening on"), timeout=10)
    return p


def captured(p) -> int:
    p.stop()
    m = re.search(r"(\d+) packets? captured", p.log())
    assert m, p.log()
    return int(m.group(1))


@pytest.fixture(params=backends())
def net(request, root_state, run_id):
    with Network(campus(), run_id=run_id(), vlan_backend=request.param) as n:
        assert n.vlan_backend == request.param == n.backends["vlan"]
        yield n
    root_state.assert_unchanged()


def test_vlans_are_isolated_and_trunk_carries_each(net, wait_until):
    a, b, c, d = (net[h] for h in "abcd")
    wait_until(lambda: ping(a, ip("c")), what="a -> c across the trunk, VLAN 1")
    wait_until(lambda: ping(b, ip("d")), what="b -> d across the trunk, VLAN 2")
    a.run(["ip", "neigh", "flush", "all"])
    caps = {h: capture(net[h], mac(a)) for h in "bcd"}
    # a asks for b's and d's addresses: the ARP broadcasts flood VLAN 1 only
    assert not ping(a, ip("b"), count=3)
    assert not ping(a, ip("d"), count=3)
    n = {h: captured(p) for h, p in caps.items()}
    assert n["b"] == 0, "a frame from VLAN 1 reached b in VLAN 2"
    assert n["d"] == 0, "a frame from VLAN 1 crossed the trunk into VLAN 2"
    assert n["c"] >= 3, f"VLAN 1's broadcasts should reach c: {n}"


def test_native_backend_uses_8021q_tags(net):
    if net.vlan_backend != kvlan.NATIVE:
        pytest.skip("802.1Q backend only")
    out = net["s1"].run(["bridge", "vlan", "show"]).stdout
    # the trunk port carries 1 and 2 tagged; the access ports their own VLAN, untagged PVID
    trunk = net.switch("s1").port("s2")
    block = out.split(trunk, 1)[1].split("\n\n")[0] if trunk in out else ""
    assert " 1" in block and " 2" in block and "PVID" not in block, out


def test_changeover_moves_the_host_and_its_tcp_connection_survives(net, wait_until):
    a, c = net["a"], net["c"]
    sw = net.switch("s1")
    wait_until(lambda: ping(a, ip("c")), what="a -> c")
    seen = {}

    def move_and_back():
        seen["to2"] = sw.set_vlan("a", 2)
        assert sw.vlan_of("a") == 2
        seen["reach_d"] = ping(a, ip("d"), count=2)  # now a's neighbours are VLAN 2's
        seen["reach_c"] = ping(a, ip("c"))
        seen["to1"] = sw.set_vlan("a", 1)

    sent, got = measure.tcp_stream(a, c, port=5601, rate_mbit=5, seconds=3,
                                   during=move_and_back)
    assert seen["reach_d"] and not seen["reach_c"], seen
    assert 0 <= seen["to2"] < 1 and 0 <= seen["to1"] < 1
    assert not sent["reset"] and not got["reset"]
    assert sent["bytes"] == got["bytes"] > 100_000
    assert sent["sha256"] == got["sha256"]
    assert got["peer"] == sent["local"]  # one connection, the same 4-tuple throughout


def test_bad_changeover_requests_change_nothing(net, wait_until):
    a = net["a"]
    sw = net.switch("s1")
    with pytest.raises(SpecError, match=r"unknown VLAN 7 on switch s1 \(it has 1, 2, 3"):
        sw.set_vlan("a", 7)
    with pytest.raises(SpecError, match=r"s1 s1-eth2 is a trunk, not an access port"):
        sw.set_vlan("s2", 2)
    with pytest.raises(SpecError, match=r"switch s1 has no port toward 'nope'"):
        sw.set_vlan("nope", 2)
    with pytest.raises(SpecError, match=r"VLAN id must be a whole number"):
        sw.set_vlan("a", 0)
    with pytest.raises(SpecError, match=r"a is a host, not a switch"):
        net.switch("a")
    assert sw.vlan_of("a") == 1
    wait_until(lambda: ping(a, ip("c")), what="a -> c still in VLAN 1")
    # VLAN 3 exists on s1 only (declared): a moved there reaches nobody
    sw.set_vlan("a", 3)
    assert not ping(a, ip("c"), count=2)


def test_unavailable_vlan_backend_fails_before_anything_exists(root_state, run_id,
                                                               run_namespaces):
    missing = [b for b in kvlan.BACKENDS if b not in available()]
    if not missing:
        pytest.skip("this kernel has every VLAN backend")
    rid = run_id()
    with pytest.raises(CapabilityError, match=r"vlan_backend 802.1q asked for"):
        Network(campus(), run_id=rid, vlan_backend=missing[0]).start()
    assert run_namespaces(rid) == []
    root_state.assert_unchanged()
