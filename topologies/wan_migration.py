"""Paper 003's setup: two data centres joined by a WAN core, a client behind an ingress PE.

    client -- ingress ==(access: access_delay_ms)== pe_a -- vs_a      (data centre A)
                     \\==(access: access_delay_ms)== pe_b -- vs_b      (data centre B)
                      pe_a ==(WAN core: wan_mbit, wan_delay_ms one way)== pe_b

The virtual server's address VS_IP (a /32, not in any link's subnet) starts at A: the
ingress PE routes it to pe_a, pe_a to vs_a (testbed.migration.wan.WanMigration.setup, to
which the caller passes VS_IP). The migration moves it to vs_b; pe_a's /32 goes onto a
tunnel PE_a -> PE_b (local switchover), then the ingress PE routes it straight to pe_b
(signal 3). Links with a delay get a wire
namespace (delay line) where the kernel lacks netem. Routers do not filter on the reverse
path (the tunnel phase is asymmetric: requests through pe_a and the tunnel, replies from
pe_b straight to the ingress).
"""

from testbed import SpecError, Topology

VS_IP = "10.200.0.10"
BIG_TCP = {"net.ipv4.tcp_rmem": "4096 131072 67108864",
           "net.ipv4.tcp_wmem": "4096 65536 67108864"}
NO_RPF = {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}


def _num(v, what: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            lo < v <= hi if lo_open else lo <= v <= hi):
        raise SpecError(f"wan_migration: {what} must be a number in "
                        f"{'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def build(wan_mbit=100, wan_delay_ms=10, access_delay_ms=2, access_mbit=1000,
          dc_mbit=1000) -> Topology:
    """Rates in Mbit/s, delays one way in ms (the WAN core's RTT is 2 x wan_delay_ms)."""
    wan_mbit = _num(wan_mbit, "wan_mbit", 0, 10000, lo_open=True)
    access_mbit = _num(access_mbit, "access_mbit", 0, 10000, lo_open=True)
    dc_mbit = _num(dc_mbit, "dc_mbit", 0, 10000, lo_open=True)
    wan_delay_ms = _num(wan_delay_ms, "wan_delay_ms", 0, 1000)
    access_delay_ms = _num(access_delay_ms, "access_delay_ms", 0, 1000)
    t = Topology("wan_migration")
    t.add_host("client")
    for r in ("ingress", "pe_a", "pe_b"):
        t.add_router(r, sysctls={**NO_RPF, **BIG_TCP})
    t.add_host("vs_a", sysctls={**BIG_TCP, **NO_RPF})
    t.add_host("vs_b", sysctls={**BIG_TCP, **NO_RPF})
    t.add_link("client", "ingress", rate=access_mbit)
    acc = {"rate": access_mbit}
    if access_delay_ms:
        acc["delay"] = access_delay_ms
    t.add_link("ingress", "pe_a", **acc)
    t.add_link("ingress", "pe_b", **acc)
    wan = {"rate": wan_mbit}
    if wan_delay_ms:
        wan["delay"] = wan_delay_ms
    t.add_link("pe_a", "pe_b", **wan)
    t.add_link("pe_a", "vs_a", rate=dc_mbit)
    t.add_link("pe_b", "vs_b", rate=dc_mbit)
    return t
