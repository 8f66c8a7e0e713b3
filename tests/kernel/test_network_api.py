"""The Network's extension API on real namespaces: own()/owned()/disown() and `running`
(what systems attach is stopped at teardown, newest first, before the nodes' processes),
node.recorded_routes()/reinstall_routes(), and parallel links (net.link(a, b, intf=)).
Signals with an owned thing: tests/kernel/test_lifecycle.py (test_signal_tears_down)."""

import os

import pytest

from testbed import ledger
from testbed.errors import SpecError
from testbed.errors import TestbedError as TBError  # not "Test*": pytest would collect it
from testbed.network import Network
from testbed.topology import Topology
from topologies import pair as pair_topology

pytestmark = pytest.mark.kernel


def pair() -> Topology:
    return pair_topology.build()


def parallel() -> Topology:
    """h1 and h2 joined twice (interfaces h1-a/h2-a and h1-b/h2-b), and h1 - r - h3."""
    t = Topology("parallel")
    for n in ("h1", "h2", "h3"):
        t.add_host(n)
    t.add_router("r")
    t.add_link("h1", "h2", intf_a="h1-a", intf_b="h2-a")
    t.add_link("h1", "h2", intf_a="h1-b", intf_b="h2-b", rate=10)
    t.add_link("h1", "r")
    t.add_link("r", "h3")
    return t


def ping(node, ip: str) -> bool:
    return node.run(["ping", "-c", "1", "-W", "1", ip], check=False).returncode == 0


class Thing:
    """Something with a lifecycle; stop() records the order and whether a process still ran."""

    def __init__(self, name: str, log: list, proc=None, fail: bool = False):
        self.name, self.log, self.proc, self.fail = name, log, proc, fail

    def __repr__(self) -> str:
        return f"<thing {self.name}>"

    def stop(self) -> None:
        self.log.append((self.name, self.proc.alive if self.proc else None))
        if self.fail:
            raise ValueError(f"{self.name} will not stop")


# own / owned / disown ---------------------------------------------------------------------------

def test_owned_things_stop_in_reverse_order_before_the_processes(root_state, run_id,
                                                                run_namespaces):
    rid, log = run_id(), []
    with Network(pair(), run_id=rid) as net:
        assert net.running
        p = net["h1"].start(["sleep", "1000"])
        a = net.own(Thing("a", log, p))
        b = Thing("b", log, p)
        assert net.own(b) is b
        net.own(a)  # owning again changes nothing (a stays first)
        c = net.own(object(), stop=lambda: log.append(("c", p.alive)))
        assert net.owned() == [a, b, c]
        assert net.owned(Thing) == [a, b]
        assert log == []
    assert not net.running
    assert log == [("c", True), ("b", True), ("a", True)]
    assert net.owned() == []
    assert run_namespaces(rid) == []
    root_state.assert_unchanged()


def test_disown_and_bad_own(root_state, run_id):
    log = []
    net = Network(pair(), run_id=run_id())
    with pytest.raises(TBError, match=r"not running"):
        net.own(Thing("early", log))
    with net:
        a, b = net.own(Thing("a", log)), net.own(Thing("b", log))
        assert net.disown(a) is True
        assert net.disown(a) is False
        assert net.owned() == [b]
        with pytest.raises(SpecError, match=r"no stop\(\) method"):
            net.own(object())
    assert log == [("b", None)]
    root_state.assert_unchanged()


def test_owned_things_stop_on_an_exception(root_state, run_id, run_namespaces):
    rid, log = run_id(), []
    with pytest.raises(RuntimeError, match="boom"), Network(pair(), run_id=rid) as net:
        p = net["h2"].start(["sleep", "1000"])
        net.own(Thing("a", log, p))
        net.own(Thing("b", log, p))
        raise RuntimeError("boom")
    assert log == [("b", True), ("a", True)]
    assert run_namespaces(rid) == []
    assert not os.path.exists(ledger.ledger_path(rid))
    root_state.assert_unchanged()


def test_a_failing_stop_is_reported_and_the_rest_torn_down(root_state, run_id, run_namespaces):
    rid, log = run_id(), []
    with pytest.raises(TBError, match=r"^teardown: stopping <thing bad>: bad will not stop$"):
        with Network(pair(), run_id=rid) as net:
            p = net["h1"].start(["sleep", "1000"])
            net.own(Thing("first", log, p))
            net.own(Thing("bad", log, p, fail=True))
            net.own(Thing("last", log, p))
    assert log == [("last", True), ("bad", True), ("first", True)]
    assert not p.alive
    assert run_namespaces(rid) == []
    # the namespaces went: nothing for `testbed cleanup`, so no ledger is kept
    assert not os.path.exists(ledger.ledger_path(rid))
    root_state.assert_unchanged()


# routes ----------------------------------------------------------------------------------------

def test_recorded_routes_and_reinstall(root_state, run_id):
    with Network(parallel(), run_id=run_id()) as net:
        h1, h3 = net["h1"], net["h3"]
        rec = h1.recorded_routes()
        r_ip = net["r"].ip_toward(h1)
        want = str(net.plan.address("h3").network)
        assert rec[want] == r_ip
        rec.clear()  # a copy
        assert want in h1.recorded_routes()
        assert ping(h1, h3.ip)
        h1.del_route(want)  # not recorded any more
        assert want not in h1.recorded_routes()
        h1.add_route(want, via=r_ip)  # recorded again
        h1.ipr().route("del", dst=want)  # gone behind the network's back
        assert not ping(h1, h3.ip)
        h1.reinstall_routes()
        assert ping(h1, h3.ip)
    root_state.assert_unchanged()


# parallel links ----------------------------------------------------------------------------------

def test_parallel_links(root_state, run_id, wait_until):
    with Network(parallel(), run_id=run_id()) as net:
        assert len(net.links) == 4
        with pytest.raises(SpecError, match=r"^2 links between h1 and h2 \(h1-a/h2-a, h1-b/h2-b\):"
                                            r" pick one with net.link\('h1', 'h2', intf=\.\.\.\)$"):
            net.link("h1", "h2")
        a = net.link("h1", "h2", intf="h1-a")
        b = net.link("h2", "h1", intf="h2-b")  # an interface of either end
        assert (a.spec.intf_a, b.spec.intf_a) == ("h1-a", "h1-b")
        assert net.link("h1", "h2", intf="h2-a") is a
        assert b.shaping["a_to_b"].rate_mbit == 10 and a.shaping["a_to_b"].rate_mbit is None
        with pytest.raises(SpecError, match=r"no link between h1 and h2 on interface 'r-eth0'"):
            net.link("h1", "h2", intf="r-eth0")
        assert net.link("h1", "r") is net.link("r", "h1", intf="r-eth0")
        assert set(net.backends["links"]) == {"h1:h1-a-h2:h2-a", "h1:h1-b-h2:h2-b", "h1-r",
                                              "r-h3"}

        h1 = net["h1"]
        ip_a, ip_b = str(net.plan.address("h2", "h2-a").ip), str(net.plan.address("h2", "h2-b").ip)
        assert ping(h1, ip_a) and ping(h1, ip_b)
        a.set(up=False)  # one of them down: the other carries on
        assert not ping(h1, ip_a)
        assert ping(h1, ip_b)
        a.set(up=True)
        wait_until(lambda: ping(h1, ip_a), timeout=10, what="h1 -> h2 over h1-a again")
    root_state.assert_unchanged()


# the systems' registries are net.own() now --------------------------------------------------------

def test_tunnels_are_owned_and_removed_at_teardown(root_state, run_id):
    from testbed.tunnel import Tunnel, add_tunnel, availability, tunnels

    kinds = [k for k, why in availability().items() if why is None and k != "udp"]
    if not kinds:
        pytest.skip("this kernel has no kernel tunnel kind")
    with Network(pair(), run_id=run_id()) as net:
        t1 = add_tunnel(net, "h1", "h2", kind=kinds[0])
        t2 = add_tunnel(net, "h1", "h2", kind=kinds[0])
        assert net.owned(Tunnel) == [t1, t2] == tunnels(net)
        t1.remove()
        assert tunnels(net) == [t2]
        t3 = add_tunnel(net, "h1", "h2", kind=kinds[0])  # named after the count ever added
        assert t3.name == f"t{kinds[0]}2"
    assert t2.removed and t3.removed
    assert tunnels(net) == []
    root_state.assert_unchanged()


def test_overlay_is_owned_and_closed_at_teardown(root_state, run_id):
    from testbed.overlay import Overlay, start_overlay

    with Network(pair(), run_id=run_id()) as net:
        ov = start_overlay(net, ["h1", "h2"], hello_ms=100)
        assert net.owned(Overlay) == [ov]
        with pytest.raises(SpecError, match=r"already runs on port"):
            start_overlay(net, ["h1", "h2"], hello_ms=100)
        procs = dict(ov.procs)
    assert all(not p.alive for p in procs.values())
    assert all(p.popen.returncode == 0 for p in procs.values())  # TERM, not KILL
    root_state.assert_unchanged()
