"""Paper 002's HANet testbed: two servers (each the other's sibling) and five clients on a
100 Mbit/s public switch, and three private server-to-server links.

            c1 .. c5     r1 --- w1 (a client behind the LAN's router)
               \\  |  /  /
                  sw                  public LAN 10.20.0.0/24, 100 Mbit/s
                 /    \\
          s1-pub        s2-pub
        s1 ===priv=== s2        private Fast Ethernet, 100 Mbit/s   10.21.1.0/24
           ===usb====           USB-like link, 12 Mbit/s            10.21.2.0/24
           ===ser====           RS232-like link, 115.2 kbit/s       10.21.3.0/24

Each link is a veth pair shaped with HTB in each direction at the rate of the medium it
stands for (a USB 1.1 host-to-host link and a serial PPP link are emulated by their rate
only: framing and half-duplex sharing are not). The servers' interfaces are named by role,
`<server>-pub`, `-priv`, `-usb`, `-ser`, so that HANet finds its slaves by link.

The public interfaces have their own addresses (.101, .102: the NICs'); the servers'
service addresses (`SERVICE_IPS`, .11 and .12) are not on any interface of the topology:
the HANet daemon puts each on its server's virtual interface (see testbed.failover.hanet).
Without HANet, serve on the public addresses.
"""

import ipaddress

from testbed import SpecError, Topology

LAN = ipaddress.ip_network("10.20.0.0/24")
ROUTER_IP = "10.20.0.1"
SERVERS = ("s1", "s2")
SERVICE_IPS = {"s1": "10.20.0.11", "s2": "10.20.0.12"}
PUBLIC_IPS = {"s1": "10.20.0.101", "s2": "10.20.0.102"}
FIRST_CLIENT = 51  # c1 = .51
# private links: role -> (subnet, default rate in Mbit/s)
PRIVATE = {"priv": ("10.21.1.0/24", 100.0), "usb": ("10.21.2.0/24", 12.0),
           "ser": ("10.21.3.0/24", 0.1152)}
REMOTE = "10.22.0.0/24"
MAX_CLIENTS = 40


def client_names(n: int = 5) -> list:
    return [f"c{i}" for i in range(1, n + 1)]


def _rate(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"hanet: {what} must be a positive rate in Mbit/s, got {value!r}")
    return float(value)


def build(clients=5, remote_clients=1, public_mbit=100, priv_mbit=100, usb_mbit=12,
          serial_kbit=115.2, private=("priv", "usb", "ser"), usb_queue_pkts=100,
          serial_queue_pkts=10) -> Topology:
    """The servers s1, s2 with their public and private links; clients c1.. on the public
    switch sw, a router r1 on it with remote_clients w1.. behind it. private: which private
    links to build (a subset of priv, usb, ser, in any order; at least one). The slow
    links get short queues (usb 100 packets = 0.1 s at 12 Mbit/s, ser 10 packets; a PPP
    device's queue is 3) rather than the 1000-packet default, which on 115.2 kbit/s would
    hold 100 s of packets."""
    if isinstance(clients, bool) or not isinstance(clients, int) or not 0 <= clients <= MAX_CLIENTS:
        raise SpecError(f"hanet: clients must be a whole number from 0 to {MAX_CLIENTS}, "
                        f"got {clients!r}")
    if (isinstance(remote_clients, bool) or not isinstance(remote_clients, int)
            or not 0 <= remote_clients <= 9):
        raise SpecError(f"hanet: remote_clients must be a whole number from 0 to 9, "
                        f"got {remote_clients!r}")
    if clients + remote_clients < 1:
        raise SpecError("hanet: need at least one client (clients or remote_clients)")
    rates = {"priv": _rate(priv_mbit, "priv_mbit"), "usb": _rate(usb_mbit, "usb_mbit"),
             "ser": _rate(serial_kbit, "serial_kbit") / 1000}
    queues = {"priv": None, "usb": usb_queue_pkts, "ser": serial_queue_pkts}
    pub = _rate(public_mbit, "public_mbit")
    private = tuple(private)
    unknown = [p for p in private if p not in PRIVATE]
    if unknown or not private or len(set(private)) != len(private):
        raise SpecError(f"hanet: private must name some of {', '.join(PRIVATE)} once each, "
                        f"got {list(private)!r}")
    prefix = LAN.prefixlen
    t = Topology("hanet")
    for s in SERVERS:
        t.add_host(s)
    for c in client_names(clients):
        t.add_host(c)
    t.add_switch("sw")
    t.add_router("r1")
    t.add_link("r1", "sw", ip_a=f"{ROUTER_IP}/{prefix}", rate=pub)
    for s in SERVERS:
        t.add_link(s, "sw", intf_a=f"{s}-pub", ip_a=f"{PUBLIC_IPS[s]}/{prefix}", rate=pub)
    for i, c in enumerate(client_names(clients)):
        t.add_link(c, "sw", ip_a=f"{LAN.network_address + FIRST_CLIENT + i}/{prefix}", rate=pub)
    for role in private:
        net = ipaddress.ip_network(PRIVATE[role][0])
        t.add_link("s1", "s2", intf_a=f"s1-{role}", intf_b=f"s2-{role}",
                   ip_a=f"{net.network_address + 1}/{net.prefixlen}",
                   ip_b=f"{net.network_address + 2}/{net.prefixlen}", rate=rates[role],
                   queue_pkts=queues[role])
    remote = ipaddress.ip_network(REMOTE)
    for i in range(1, remote_clients + 1):
        name = f"w{i}"
        t.add_host(name)
        # each remote client on its own /28 of REMOTE, one link to r1
        sub = list(remote.subnets(new_prefix=28))[i - 1]
        t.add_link("r1", name, ip_a=f"{sub.network_address + 1}/28",
                   ip_b=f"{sub.network_address + 2}/28", rate=pub)
    return t
