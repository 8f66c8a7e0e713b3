"""Static routing on real namespaces: a routed chain h1 - r1 - r2 - h2 with automatic routes,
runtime route replacement, and link down/up restoring reachability. Needs root."""

import ipaddress

import pytest

from testbed.network import Network
from testbed.topology import Topology

pytestmark = pytest.mark.kernel


def chain() -> Topology:
    t = Topology("chain")
    t.add_host("h1")
    t.add_router("r1")
    t.add_router("r2")
    t.add_host("h2")
    t.add_link("h1", "r1")
    t.add_link("r1", "r2")
    t.add_link("r2", "h2")
    return t


def ping(src, ip: str) -> bool:
    return src.run(["ping", "-c", "1", "-W", "1", ip], check=False).returncode == 0


def unreachable(src, ip: str) -> bool:
    """Two pings in a row both fail (one lost echo is not proof of a broken path)."""
    return not ping(src, ip) and not ping(src, ip)


@pytest.fixture
def net(root_state, run_id):
    with Network(chain(), run_id=run_id()) as n:
        yield n
    root_state.assert_unchanged()


def addr(net, node: str, ifname: str) -> str:
    return str(net.plan.address(node, ifname).ip)


def test_auto_routes_reach_end_to_end(net, wait_until):
    h1, h2 = net["h1"], net["h2"]
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2")
    wait_until(lambda: ping(h2, h1.ip), timeout=10, what="h2 -> h1")
    # and every interface of the far router, not just the hosts
    for ifname in net["r2"].intfs:
        assert ping(h1, addr(net, "r2", ifname)), ifname
    # TTL shows the path: two routers in between
    out = h1.run(["ping", "-c", "1", "-W", "1", h2.ip]).stdout
    assert "ttl=62" in out, out


def test_routes_installed_as_planned(net):
    h2net = str(net.plan.address("h2").network)
    r1 = dict(net["r1"].routes())
    assert r1[h2net] == addr(net, "r2", "r2-eth0")
    r2 = dict(net["r2"].routes())
    assert r2[str(net.plan.address("h1").network)] == addr(net, "r1", "r1-eth1")
    assert net["r1"].sysctl("net.ipv4.ip_forward", 1) == "1"
    assert net["h1"].sysctl("net.ipv4.ip_forward", 0) == "0"


def test_replacing_a_route_takes_effect(net, wait_until):
    h1, h2, r1 = net["h1"], net["h2"], net["r1"]
    h2net = str(net.plan.address("h2").network)
    good = addr(net, "r2", "r2-eth0")
    core = net.plan.address("r1", "r1-eth1").network
    wrong = str(core.network_address + 200)  # on the r1-r2 segment, but nobody has it
    assert ipaddress.ip_address(wrong) in core
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 before the change")

    r1.add_route(h2net, wrong)
    assert dict(r1.routes())[h2net] == wrong
    assert unreachable(h1, h2.ip)

    r1.add_route(h2net, good)
    assert dict(r1.routes())[h2net] == good
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 after restoring the route")


def test_replaced_route_survives_a_link_flap(net, wait_until):
    h1, h2, r1 = net["h1"], net["h2"], net["r1"]
    h2net = str(net.plan.address("h2").network)
    good = addr(net, "r2", "r2-eth0")
    wrong = str(net.plan.address("r1", "r1-eth1").network.network_address + 200)
    r1.add_route(h2net, wrong)
    link = net.link("r1", "r2")
    link.set(up=False)
    link.set(up=True)
    assert dict(r1.routes())[h2net] == wrong  # the user's change, not the planned route
    assert unreachable(h1, h2.ip)
    r1.add_route(h2net, good)
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 after restoring the route")


@pytest.mark.parametrize("a, b", [("h1", "r1"), ("r1", "r2"), ("r2", "h2")])
def test_link_down_up_restores_reachability(net, wait_until, a, b):
    h1, h2 = net["h1"], net["h2"]
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 before the flap")
    before = {n: sorted(net[n].routes()) for n in ("h1", "r1", "r2", "h2")}

    link = net.link(a, b)
    assert link.is_up
    assert link.set(up=False) is link
    assert not link.is_up
    assert unreachable(h1, h2.ip)

    link.set(up=True)
    assert link.is_up
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what=f"h1 -> h2 after {a}-{b} came back")
    assert ping(h2, h1.ip)
    after = {n: sorted(net[n].routes()) for n in ("h1", "r1", "r2", "h2")}
    assert after == before  # including the routes the admin-down flushed


def test_link_set_up_twice_is_harmless(net, wait_until):
    link = net.link("r1", "r2")
    link.set(up=True)  # already up: nothing to do
    link.set(up=False)
    link.set(up=False)
    link.set(up=True)
    wait_until(lambda: ping(net["h1"], net["h2"].ip), timeout=10, what="h1 -> h2")


def test_link_up_while_another_link_of_the_node_is_down(net, wait_until):
    """r1 has two links; bring one back while the other is still down: no error, and the
    routes behind the down link return when it does."""
    h1, h2 = net["h1"], net["h2"]
    wait_until(lambda: ping(h1, h2.ip), what="h1 -> h2")
    net.link("h1", "r1").set(up=False)
    net.link("r1", "r2").set(up=False)
    net.link("h1", "r1").set(up=True)  # r1's routes via r2 cannot be installed yet
    assert unreachable(h1, h2.ip)
    net.link("r1", "r2").set(up=True)
    wait_until(lambda: ping(h1, h2.ip), what="h1 -> h2 after both links are back")
