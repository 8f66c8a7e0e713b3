"""Paper 004's Wackamole LAN: N servers and a router on one 100 Mbit/s switch, clients behind
the router (the paper's clients reach the cluster through a router, whose ARP cache is what
gratuitous ARP must fix).

    c1 --- r1 --- sw1 --- s1 .. sN        (lan_clients: lc1.. on sw1 too)

The servers' segment is 10.100.0.0/24: r1 is .1, LAN clients .2-.10, servers .11 and up,
and the virtual addresses (`vips(n)`) .101 and up, so they sit inside the servers' subnet
(as secondary addresses of the servers' interfaces). With switches=2 the servers alternate
between sw1 (with r1) and sw2, joined by one sw1-sw2 link: taking it down splits the
cluster in two (a partition) without touching any server.
"""

import ipaddress

from testbed import SpecError, Topology

SUBNET = ipaddress.ip_network("10.100.0.0/24")
ROUTER_IP = SUBNET.network_address + 1
FIRST_SERVER = 11
FIRST_VIP = 101
MAX_SERVERS = 89  # .11 .. .99
MAX_VIPS = 154  # .101 .. .254
MAX_LAN_CLIENTS = 9  # .2 .. .10


def _count(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"wackamole_lan: {what} must be a whole number from {lo} to {hi}, "
                        f"got {value!r}")
    return value


def vips(n: int = 10) -> list:
    """The first n virtual addresses of the servers' subnet."""
    _count(n, "vips", 1, MAX_VIPS)
    return [str(SUBNET.network_address + FIRST_VIP + i) for i in range(n)]


def server_names(n: int) -> list:
    return [f"s{i}" for i in range(1, n + 1)]


def build(servers=3, clients=1, vips=10, rate_mbit=100, lan_clients=0, switches=1) -> Topology:
    """servers on the LAN switch(es) with r1; clients c1.. behind r1; every link rate_mbit
    (0: unshaped). vips is only checked here (the addresses come from vips(n))."""
    _count(servers, "servers", 1, MAX_SERVERS)
    _count(clients, "clients", 0, 50)
    _count(vips, "vips", 1, MAX_VIPS)
    _count(lan_clients, "lan_clients", 0, MAX_LAN_CLIENTS)
    _count(switches, "switches", 1, 2)
    if clients + lan_clients < 1:
        raise SpecError("wackamole_lan: need at least one client (clients or lan_clients)")
    rate = rate_mbit or None
    prefix = SUBNET.prefixlen
    t = Topology("wackamole_lan")
    sws = [t.add_switch(f"sw{i}") for i in range(1, switches + 1)]
    t.add_router("r1")
    t.add_link("r1", sws[0], ip_a=f"{ROUTER_IP}/{prefix}", rate=rate)
    if switches == 2:
        t.add_link(sws[0], sws[1], rate=rate)
    for i, name in enumerate(server_names(servers)):
        ip = SUBNET.network_address + FIRST_SERVER + i
        t.add_host(name)
        t.add_link(name, sws[i % switches], ip_a=f"{ip}/{prefix}", rate=rate)
    for i in range(1, lan_clients + 1):
        t.add_host(f"lc{i}")
        t.add_link(f"lc{i}", sws[0], ip_a=f"{SUBNET.network_address + 1 + i}/{prefix}",
                   rate=rate)
    for i in range(1, clients + 1):
        t.add_host(f"c{i}")
        t.add_link(f"c{i}", "r1", rate=rate)
    return t
