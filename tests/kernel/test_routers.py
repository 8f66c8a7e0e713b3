"""Routers on real namespaces: route replacement, proxy ARP, neighbour-table control,
gratuitous ARP, per-node sysctls that are restored, and FRR (OSPF, BGP) converging and
rerouting after a link goes down. Needs root; the FRR tests need the frr package."""

import time

import pytest

from testbed import frr
from testbed.errors import SpecError
from testbed.network import Network
from testbed.topology import Topology

pytestmark = pytest.mark.kernel

needs_frr = pytest.mark.skipif(not frr.available(), reason="FRR not installed (make setup)")


def ping(src, ip: str, count: int = 1) -> bool:
    return src.run(["ping", "-c", str(count), "-W", "1", ip], check=False).returncode == 0


def unreachable(src, ip: str) -> bool:
    """Two pings in a row both fail (one lost echo is not proof of a broken path)."""
    return not ping(src, ip) and not ping(src, ip)


def ttl(src, ip: str):
    out = src.run(["ping", "-c", "1", "-W", "1", ip], check=False).stdout
    for word in out.split():
        if word.startswith("ttl="):
            return int(word[4:])
    return None


def tx_packets(node, ifname: str) -> int:
    ln = node.ipr().get_links(node.ifindex(ifname))[0]
    return ln.get_attr("IFLA_STATS64")["tx_packets"]


def entry(node, ip: str):
    for e in node.neighbours():
        if e["ip"] == ip:
            return e
    return None


def chain() -> Topology:
    t = Topology("routers-chain")
    t.add_host("h1"); t.add_router("r1"); t.add_host("h2")
    t.add_link("h1", "r1"); t.add_link("r1", "h2")
    return t


@pytest.fixture
def net(root_state, run_id):
    with Network(chain(), run_id=run_id()) as n:
        yield n
    root_state.assert_unchanged()


# static routes ------------------------------------------------------------------------------

def test_replaced_route_moves_traffic_to_the_other_path(root_state, run_id, wait_until):
    """r1 reaches h2's router r3 directly or through r2: replacing r1's route moves the
    packets, as the counters of r1's two interfaces show."""
    t = Topology("two-paths")
    t.add_host("h1"); t.add_host("h2")
    for r in ("r1", "r2", "r3"):
        t.add_router(r)
    t.add_link("h1", "r1"); t.add_link("r1", "r3"); t.add_link("r1", "r2")
    t.add_link("r2", "r3"); t.add_link("r3", "h2")
    with Network(t, run_id=run_id()) as net:
        h1, h2, r1 = net["h1"], net["h2"], net["r1"]
        h2net = str(net.plan.address("h2").network)
        direct, detour = "r1-eth1", "r1-eth2"
        assert dict(r1.routes())[h2net] == str(net.plan.address("r3", "r3-eth0").ip)
        wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2")

        def sent(n=20):
            before = {i: tx_packets(r1, i) for i in (direct, detour)}
            assert h1.run(["ping", "-q", "-c", str(n), "-i", "0.01", "-W", "1", h2.ip],
                          check=False).returncode == 0
            return {i: tx_packets(r1, i) - before[i] for i in (direct, detour)}

        d = sent()
        assert d[direct] >= 20 and d[detour] < 5, d
        r1.replace_route(h2net, via=str(net.plan.address("r2", "r2-eth0").ip))
        rows = {r["dst"]: r for r in r1.routes(detail=True)}
        assert rows[h2net]["dev"] == detour
        d = sent()
        assert d[detour] >= 20 and d[direct] < 5, d
    root_state.assert_unchanged()


def test_proxy_arp_answers_for_an_address_behind_the_router(net, wait_until):
    h1, r1, h2 = net["h1"], net["r1"], net["h2"]
    h2net = str(net.plan.address("h2").network)
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 through r1")
    # h1 now believes h2's subnet is on its own wire: it ARPs for h2 itself
    h1.replace_route(h2net, dev="h1-eth0")
    assert {r["dst"]: r for r in h1.routes(detail=True)}[h2net]["via"] is None
    assert unreachable(h1, h2.ip)  # nobody answers for h2 on h1's wire
    assert (entry(h1, h2.ip) or {}).get("mac") is None

    r1.proxy_arp("r1-eth0")
    wait_until(lambda: ping(h1, h2.ip), timeout=5, what="h1 -> h2 with proxy ARP")
    assert entry(h1, h2.ip)["mac"] == r1.mac("r1-eth0")  # r1 answered for h2

    # the on-link route survives a cable cut like any recorded route
    link = net.link("h1", "r1")
    link.set(up=False)
    link.set(up=True)
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2 after a flap")
    assert {r["dst"]: r for r in h1.routes(detail=True)}[h2net]["dev"] == "h1-eth0"

    restored = r1.restore_sysctls()
    assert restored["net/ipv4/conf/r1-eth0/proxy_arp"] == "0"
    h1.neigh_flush("h1-eth0")
    assert unreachable(h1, h2.ip)  # proxy ARP is off again


def test_static_neighbour_entry_is_used(net, wait_until):
    h1, r1, h2 = net["h1"], net["r1"], net["h2"]
    gw = str(net.plan.address("r1", "r1-eth0").ip)
    bogus = "02:00:00:00:00:99"
    h1.neigh_add(gw, bogus, "h1-eth0")
    e = entry(h1, gw)
    assert e == {"ip": gw, "mac": bogus, "dev": "h1-eth0", "state": "permanent"}
    assert unreachable(h1, h2.ip)  # frames go to a MAC nobody has

    h1.neigh_add(gw, r1.mac("r1-eth0"), "h1-eth0")  # replaces the entry
    wait_until(lambda: ping(h1, h2.ip), timeout=5, what="h1 -> h2 through a static entry")
    e = entry(h1, gw)
    assert e["mac"] == r1.mac("r1-eth0") and e["state"] == "permanent"
    assert h1.neigh_del(gw, "h1-eth0") is True
    assert entry(h1, gw) is None
    assert h1.neigh_del(gw, "h1-eth0") is False


def test_flush_removes_dynamic_entries_and_keeps_permanent_ones(net, wait_until):
    h1, r1, h2 = net["h1"], net["r1"], net["h2"]
    gw = str(net.plan.address("r1", "r1-eth0").ip)
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2")
    static = str(net.plan.address("h1").network.network_address + 200)
    h1.neigh_add(static, "02:00:00:00:00:01", "h1-eth0")
    assert entry(h1, gw)["state"] != "permanent"
    assert entry(r1, h2.ip) is not None

    assert h1.neigh_flush("h1-eth0") >= 1
    assert entry(h1, gw) is None
    assert entry(h1, static)["state"] == "permanent"
    assert entry(r1, h2.ip) is not None  # another node's table is untouched

    assert r1.neigh_flush() >= 2  # every interface
    assert r1.neighbours() == []
    assert h1.neigh_flush(permanent=True) == 1
    assert h1.neighbours() == []
    wait_until(lambda: ping(h1, h2.ip), timeout=5, what="h1 -> h2 after the flush")


@pytest.mark.parametrize("kind", ["request", "reply"])
def test_gratuitous_arp_updates_a_peers_cache(root_state, run_id, wait_until, kind):
    """A virtual IP moves from a to b; b's gratuitous ARP repoints p's cache entry."""
    t = Topology("garp")
    t.add_switch("s1")
    for h in ("a", "b", "p"):
        t.add_host(h)
        t.add_link(h, "s1")
    with Network(t, run_id=run_id()) as net:
        a, b, p = net["a"], net["b"], net["p"]
        subnet = net.plan.address("p").network
        vip = str(subnet.network_address + 100)
        a.run(["ip", "addr", "add", f"{vip}/{subnet.prefixlen}", "dev", "a-eth0"])
        wait_until(lambda: ping(p, vip), timeout=10, what="p -> vip on a")
        assert entry(p, vip)["mac"] == a.mac("a-eth0")

        a.run(["ip", "addr", "del", f"{vip}/{subnet.prefixlen}", "dev", "a-eth0"])
        b.run(["ip", "addr", "add", f"{vip}/{subnet.prefixlen}", "dev", "b-eth0"])
        assert entry(p, vip)["mac"] == a.mac("a-eth0")  # nothing told p yet
        assert b.garp(vip, "b-eth0", count=2, interval_s=0.05, kind=kind) == 2
        wait_until(lambda: entry(p, vip)["mac"] == b.mac("b-eth0"), timeout=3,
                   what=f"p's entry for {vip} to move to b")
        assert ping(p, vip)
    root_state.assert_unchanged()


# sysctls ------------------------------------------------------------------------------------

def test_sysctls_are_restored(net, wait_until):
    h1, r1, h2 = net["h1"], net["r1"], net["h2"]
    wait_until(lambda: ping(h1, h2.ip), timeout=10, what="h1 -> h2")
    assert r1.set_sysctl("net.ipv4.ip_forward", 0) == "1"
    assert r1.set_sysctl("net.ipv4.ip_forward", 0) == "0"  # the original is kept
    assert r1.set_sysctl("net.ipv4.conf.all.rp_filter", 2) in ("0", "1", "2")
    assert unreachable(h1, h2.ip)
    restored = r1.restore_sysctls()
    assert restored["net.ipv4.ip_forward"] == "1"
    assert r1.sysctl("net.ipv4.ip_forward", 1) == "1"
    assert r1.restore_sysctls() == {}
    wait_until(lambda: ping(h1, h2.ip), timeout=5, what="h1 -> h2 once forwarding is back")

    # the context manager, also when the block raises
    with pytest.raises(RuntimeError):
        with r1.sysctls({"net.ipv4.ip_forward": 0, "net.ipv4.icmp_echo_ignore_all": 1}) as old:
            assert old == {"net.ipv4.ip_forward": "1", "net.ipv4.icmp_echo_ignore_all": "0"}
            assert unreachable(h1, h2.ip)
            raise RuntimeError("inside the block")
    assert r1.sysctl("net.ipv4.icmp_echo_ignore_all", 0) == "0"
    assert ping(h1, h2.ip) and ping(h1, str(net.plan.address("r1", "r1-eth1").ip))


def test_bad_input_is_refused_before_anything_changes(net):
    h1, r1 = net["h1"], net["r1"]
    routes = sorted(map(str, h1.routes()))
    r1_routes = sorted(map(str, r1.routes()))
    fwd = r1.sysctl("net.ipv4.ip_forward", 1)
    bad = [
        lambda: r1.proxy_arp("nope0"),
        lambda: h1.neigh_add("10.0.0.300", "02:00:00:00:00:01", "h1-eth0"),
        lambda: h1.neigh_add("10.0.0.9", "02:00:00:00:00", "h1-eth0"),
        lambda: h1.neigh_add("10.0.0.9", "02:00:00:00:00:01", "r1-eth0"),  # r1's, not h1's
        lambda: h1.neigh_flush("nope0"),
        lambda: h1.replace_route("10.9.0.0/33", via="10.0.0.2"),
        lambda: h1.replace_route("10.9.0.0/24", via="10.0.0.256"),
        lambda: h1.replace_route("10.9.0.0/24", dev="nope0"),
        lambda: h1.replace_route("10.9.0.0/24"),
        lambda: h1.garp("10.0.0.1", "nope0"),
        lambda: h1.garp("not-an-ip", "h1-eth0"),
        lambda: h1.garp(h1.ip, "h1-eth0", kind="loud"),
        lambda: h1.garp(h1.ip, "h1-eth0", count=0),
        lambda: h1.set_sysctl("net.ipv4.no_such_thing", 1),
        lambda: h1.set_sysctl("../../etc/passwd", 1),
        lambda: r1.sysctls({"net.ipv4.ip_forward": 0, "net.ipv4.no_such_thing": 1}),
        lambda: net["nope"],
        lambda: frr.start(net, routers=["h1"]),
        lambda: frr.start(net, routers=["nope"]),
        lambda: frr.start(net, hello_s=4, dead_s=4),
    ]
    for f in bad:
        with pytest.raises(SpecError) as e:
            f()
        assert "\n" not in str(e.value)
    assert sorted(map(str, h1.routes())) == routes
    assert sorted(map(str, r1.routes())) == r1_routes  # frr.start removed nothing
    assert r1.sysctl("net.ipv4.ip_forward", 1) == fwd == "1"
    assert r1.restore_sysctls() == {}
    assert entry(h1, "10.0.0.9") is None
    assert r1.procs == [] and h1.procs == []


# FRR ----------------------------------------------------------------------------------------

def square(**r1r2) -> Topology:
    """r1-r2 directly (the short path) or r1-r4-r3-r2; h1 on r1, h2 on r2."""
    t = Topology("square")
    for r in ("r1", "r2", "r3", "r4"):
        t.add_router(r)
    t.add_host("h1"); t.add_host("h2")
    t.add_link("h1", "r1"); t.add_link("r2", "h2")
    t.add_link("r1", "r2", **r1r2); t.add_link("r2", "r3"); t.add_link("r3", "r4")
    t.add_link("r4", "r1")
    return t


def _dev(node, dst: str):
    return {r["dst"]: r for r in node.routes(detail=True)}.get(dst, {}).get("dev")


def _reroute(net, wait_until, cut, bound_s: float) -> float:
    """Converge, check the short path, cut r1-r2 with cut(link), and measure until both
    r1 and r2 forward on the long path and every router has converged; returns seconds."""
    h1, h2, r1, r2 = net["h1"], net["h2"], net["r1"], net["r2"]
    h1net, h2net = (str(net.plan.address(h).network) for h in ("h1", "h2"))
    frr.wait_converged(net, timeout=20)
    assert frr.missing(net) == []
    wait_until(lambda: ttl(h1, h2.ip) == 62, timeout=10, what="h1 -> h2 over r1-r2")
    route = {r["dst"]: r for r in r1.routes(detail=True)}[h2net]
    assert route["dev"] == "r1-eth1" and route["proto"] in ("ospf", "bgp"), route

    t0 = time.monotonic()
    cut(net.link("r1", "r2"))
    wait_until(lambda: _dev(r1, h2net) == "r1-eth2" and _dev(r2, h1net) == "r2-eth2",
               timeout=bound_s + 10, interval=0.01, what="r1 and r2 to use the long path")
    frr.wait_converged(net, timeout=10)
    elapsed = time.monotonic() - t0
    assert ttl(h1, h2.ip) == 60  # four routers on the way now
    print(f"\nrerouted after {elapsed:.2f} s (bound {bound_s} s)")
    assert elapsed < bound_s, f"rerouted after {elapsed:.2f} s (bound {bound_s} s)"
    return elapsed


@needs_frr
def test_ospf_converges_and_reroutes_after_a_link_goes_down(root_state, run_id, wait_until):
    with Network(square(), run_id=run_id()) as net:
        routers = frr.start(net, hello_s=1, dead_s=4)
        assert sorted(routers) == ["r1", "r2", "r3", "r4"]
        for r in routers.values():
            assert r.up() == ["zebra", "ospfd"]
            assert all(p.alive for p in r.procs.values())
        frr.wait_converged(net, timeout=20)
        states = {n["ifname"]: n["state"] for n in routers["r1"].ospf_neighbours()}
        assert set(states) == {"r1-eth1", "r1-eth2"} and all(
            s.startswith("Full") for s in states.values()), states
        # interface down: both ends see it at once; bounded well under the dead interval
        _reroute(net, wait_until, lambda ln: ln.set(up=False), bound_s=4 + 3)
        link = net.link("r1", "r2")
        link.set(up=True)  # the short path comes back
        wait_until(lambda: ttl(net["h1"], net["h2"].ip) == 62, timeout=15,
                   what="h1 -> h2 back over r1-r2")
        procs = [p for r in routers.values() for p in r.procs.values()]
        # a router failure: its daemons stop, and zebra takes its OSPF routes with it
        r4 = routers["r4"]
        assert any(r["proto"] == "ospf" for r in net["r4"].routes(detail=True))
        r4.stop()
        assert not r4.running and r4.procs == {} and net["r4"].procs == []
        assert not any(r["proto"] == "ospf" for r in net["r4"].routes(detail=True))
        assert all(r.running for n, r in routers.items() if n != "r4")
    assert all(not p.alive for p in procs)  # teardown stopped every daemon
    root_state.assert_unchanged()


@needs_frr
def test_ospf_dead_interval_detects_a_silent_failure(root_state, run_id, wait_until):
    """The r1-r2 wire drops everything but stays up: only the dead interval notices."""
    with Network(square(emulate=True), run_id=run_id()) as net:
        frr.start(net, hello_s=1, dead_s=3)
        elapsed = _reroute(net, wait_until, lambda ln: ln.set(loss_pct=100),
                           bound_s=3 + 3)
        assert elapsed > 3 - 1 - 0.5  # at least dead - hello: hellos stop, nothing else
    root_state.assert_unchanged()


@needs_frr
def test_bgp_converges_and_reroutes_after_a_link_goes_down(root_state, run_id, wait_until):
    with Network(square(), run_id=run_id()) as net:
        routers = frr.start(net, ospf=False, bgp=True, asns={"r1": 65100})
        assert routers["r1"].up() == ["zebra", "bgpd"]
        assert "router bgp 65100" in routers["r1"].configs["bgpd"]
        frr.wait_converged(net, timeout=20)
        assert set(routers["r1"].bgp_peers().values()) == {"Established"}
        _reroute(net, wait_until, lambda ln: ln.set(up=False), bound_s=3 + 3)
    root_state.assert_unchanged()


def test_frr_missing_is_a_capability_error(monkeypatch, net):
    from testbed.errors import CapabilityError

    routes = sorted(map(str, net["r1"].routes()))
    monkeypatch.setattr(frr, "FRR_BIN", "/nonexistent/frr")
    with pytest.raises(CapabilityError, match="make setup"):
        frr.start(net)
    assert net["r1"].procs == []
    assert sorted(map(str, net["r1"].routes())) == routes  # static routes still there
    assert ping(net["h1"], net["h2"].ip)
