"""Paper 004's replication set-up (section 7): N replicas on one 100 Mbit/s switch.

    r1 .. rN --- sw1                    (switches=2: r1, r3, .. on sw1; r2, r4, .. on sw2,
                                         and one sw1-sw2 link between them)

The paper ran 14 replicas, each on its own machine, on one 100 Mbit/s LAN switch. The
replicas' segment is 10.120.0.0/24 with r1 at .11, r2 at .12 and so on; its broadcast
address (10.120.0.255) is what the group communication's sequencer sends to. There is no
router: the clients run on the replicas' machines (one load generator per replica, each
talking to its own replica), as closed-loop clients spread over the replicas did in the
paper. With switches=2 taking the sw1-sw2 link down splits the replicas in two without
touching any of them (the harness's partition() uses netfilter rules instead, which can
cut any set of groups).
"""

from __future__ import annotations

import ipaddress

from testbed import SpecError, Topology

SUBNET = ipaddress.ip_network("10.120.0.0/24")
FIRST_REPLICA = 11
MAX_REPLICAS = 200  # .11 .. .210
BROADCAST = str(SUBNET.broadcast_address)


def _count(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"replication_lan: {what} must be a whole number from {lo} to {hi}, "
                        f"got {value!r}")
    return value


def replica_names(n: int) -> list:
    """["r1", .., "rn"]."""
    _count(n, "replicas", 1, MAX_REPLICAS)
    return [f"r{i}" for i in range(1, n + 1)]


def replica_ip(i: int) -> str:
    """The address of replica i (1-based)."""
    _count(i, "replica number", 1, MAX_REPLICAS)
    return str(SUBNET.network_address + FIRST_REPLICA + i - 1)


def build(replicas=14, rate_mbit=100, switches=1) -> Topology:
    """replicas r1..rN on one switch (or alternating over two joined by one link); every
    link rate_mbit (0: unshaped)."""
    _count(replicas, "replicas", 1, MAX_REPLICAS)
    _count(switches, "switches", 1, 2)
    if isinstance(rate_mbit, bool) or not isinstance(rate_mbit, (int, float)) \
            or not 0 <= rate_mbit <= 100_000:
        raise SpecError(f"replication_lan: rate_mbit must be a number from 0 to 100000 "
                        f"(0: unshaped), got {rate_mbit!r}")
    rate = rate_mbit or None
    t = Topology("replication_lan")
    sws = [t.add_switch(f"sw{i}") for i in range(1, switches + 1)]
    if switches == 2:
        t.add_link(sws[0], sws[1], rate=rate)
    for i, name in enumerate(replica_names(replicas)):
        t.add_host(name)
        t.add_link(name, sws[i % switches], ip_a=f"{replica_ip(i + 1)}/{SUBNET.prefixlen}",
                   rate=rate)
    return t
