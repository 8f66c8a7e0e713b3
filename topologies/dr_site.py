"""Paper 000's disaster-recovery setup: a primary site and a DR site joined by a shaped
WAN link, with a client on the primary's LAN.

    c1 ---- sw1 ---- prim          (LAN, lan_rate_mbit)
             |
             +====== dr            (the WAN link: wan_rate_mbit each way, e.g. 5 or a 1.544 T1)

One layer-2 segment, 10.200.0.0/24 (the paper's DR site takes over the primary's virtual
host, so its address must be reachable from the client's LAN): c1 .2, prim .11, dr .12 and
the virtual host VIP .100 (an alias on prim, moved to dr at failover). The mirror traffic
prim -> dr crosses sw1 -> dr, shaped by HTB at the WAN rate; background load from c1 to dr
shares that link. Cut the WAN with net.link("dr", "sw1").set(up=False).
"""

import ipaddress

from testbed import SpecError, Topology

SUBNET = ipaddress.ip_network("10.200.0.0/24")
CLIENT_IP, PRIMARY_IP, DR_IP, VIP = "10.200.0.2", "10.200.0.11", "10.200.0.12", "10.200.0.100"
T1_MBIT = 1.544


def _rate(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SpecError(f"dr_site: {what} must be a number from {lo:g} to {hi:g} Mbit/s, "
                        f"got {value!r}")
    return float(value)


def build(wan_rate_mbit=5.0, lan_rate_mbit=100.0, wan_delay_ms=0) -> Topology:
    """wan_rate_mbit shapes the WAN link both ways (the paper: 5 Mbit/s, or a 1.544 T1);
    wan_delay_ms adds one-way delay there (needs netem or the delay line)."""
    wan = _rate(wan_rate_mbit, "wan_rate_mbit", 0.064, 1000)
    lan = _rate(lan_rate_mbit, "lan_rate_mbit", 1, 10000)
    if isinstance(wan_delay_ms, bool) or not isinstance(wan_delay_ms, (int, float)) or \
            not 0 <= wan_delay_ms <= 1000:
        raise SpecError(f"dr_site: wan_delay_ms must be 0..1000, got {wan_delay_ms!r}")
    p = SUBNET.prefixlen
    t = Topology("dr_site")
    t.add_switch("sw1")
    t.add_host("prim")
    t.add_host("dr")
    t.add_host("c1")
    t.add_link("c1", "sw1", ip_a=f"{CLIENT_IP}/{p}", rate=lan)
    t.add_link("prim", "sw1", ip_a=f"{PRIMARY_IP}/{p}", rate=lan)
    t.add_link("dr", "sw1", ip_a=f"{DR_IP}/{p}", rate=wan, delay=wan_delay_ms or 0)
    return t
