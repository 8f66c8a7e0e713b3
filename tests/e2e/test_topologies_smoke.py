"""Every topology file builds with its defaults and its hosts reach each other."""

from __future__ import annotations

import importlib
import os

import pytest

from testbed import Network, Topology, measure

TOPO_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "topologies")
NAMES = sorted(f[:-3] for f in os.listdir(TOPO_DIR) if f.endswith(".py") and f[0] != "_")


@pytest.mark.parametrize("name", NAMES)
def test_topology_builds_and_hosts_ping(name):
    mod = importlib.import_module(f"topologies.{name}")
    topo = mod.build()
    assert isinstance(topo, Topology)
    with Network(topo) as net:
        hosts = net.hosts()
        assert len(hosts) >= 2
        # a topology whose first and last hosts are apart by design (VLANs) names a pair
        a, b = (net[n] for n in mod.SMOKE_PING) if hasattr(mod, "SMOKE_PING") else \
            (hosts[0], hosts[-1])
        # a topology may lose packets by design (spines_chain: 1 % each way on c-d, so 3
        # pings all came back only 94 % of the time): there, 10 pings and at least half back
        # (all but 5 of 10 lost at 2 % per round trip: about 1 in a million)
        lossy = any(s.loss_pct for ln in topo.plan().links for s in (ln.a_to_b, ln.b_to_a))
        count = 10 if lossy else 3
        df = measure.ping(a, b, count=count, interval=0.05)
        need = count // 2 if lossy else count
        assert df.attrs["received"] >= need, \
            f"{a.name} cannot reach {b.name}: {df.attrs['received']} of {count} pings back"


def test_mininet_topo_builds_and_pings():
    from mininet.topo import LinearTopo, Topo

    class Shaped(Topo):
        def build(self):
            h1, h2 = self.addHost("h1"), self.addHost("h2")
            s1 = self.addSwitch("s1")
            self.addLink(h1, s1, bw=10, delay="5ms")
            self.addLink(h2, s1)

    with Network(Topology.from_mininet(LinearTopo(3))) as net:
        assert net["h1"].ip == "10.0.0.1" and net["h3"].ip == "10.0.0.3"
        assert measure.ping(net["h1"], net["h3"], count=2, interval=0.05).attrs["received"] == 2
    with Network(Topology.from_mininet(Shaped())) as net:
        df = measure.ping(net["h1"], net["h2"], count=10, interval=0.05)
        # 5 ms each way on h1-s1: the option reached the link (the fastest of 10 pings, so
        # a loaded machine's scheduling delays do not count; fidelity is measured elsewhere)
        assert 9.5 <= df["rtt_ms"].min() <= 11.5, df["rtt_ms"].describe()
