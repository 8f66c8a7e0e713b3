"""Deterministic addressing and static routes for a topology (pure: no I/O).

A *segment* is one layer-2 broadcast domain: the endpoints joined by links and switches
(one domain per VLAN of a switch; trunks join the same VLAN on two switches).
Each segment gets one subnet; each host/router endpoint on it one address. Explicit
addresses are kept and the rest of their segment is filled from the same subnet.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

from testbed.errors import SpecError
from testbed.spec import DEFAULT_VLAN, LinkSpec, NodeSpec, RouteSpec, parse_interface_address

POOL = ipaddress.ip_network("10.0.0.0/8")

Endpoint = tuple  # (node, ifname)


@dataclass(frozen=True)
class Segment:
    subnet: ipaddress.IPv4Network
    endpoints: tuple  # the L3 endpoints ((node, ifname), ...), in link order


@dataclass(frozen=True)
class Addressing:
    addresses: dict  # (node, ifname) -> IPv4Interface
    segments: tuple  # Segment, ...
    routes: tuple  # RouteSpec, ... (automatic ones first, then the user's)


def _segments(nodes: dict, links: list) -> list:
    """Group endpoints into broadcast domains (union-find over links and switches)."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(x, y):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[ry] = rx

    order: list = []
    for ln in links:
        ea, eb = (ln.a, ln.intf_a), (ln.b, ln.intf_b)
        order += [ea, eb]
        if ln.trunk:  # each VLAN of a trunk joins that VLAN's domains on both switches
            for vid in ln.trunk:
                union((ln.a, None, vid), (ln.b, None, vid))
            continue
        union(ea, eb)
        for e in (ea, eb):
            if nodes[e[0]].kind == "switch":
                # the ports of a switch in one VLAN are one domain
                union(e, (e[0], None, ln.vlan or DEFAULT_VLAN))
    groups: dict = {}
    for e in order:
        if nodes[e[0]].kind != "switch":
            groups.setdefault(find(e), []).append(e)
    return list(groups.values())


def _prefix_for(count: int) -> int:
    """Smallest prefix holding count hosts, but never smaller than a /24 (readable addresses)."""
    prefix = 24
    while (2 ** (32 - prefix)) - 2 < count:
        prefix -= 1
        if prefix < 8:
            raise SpecError(f"a segment of {count} interfaces does not fit in 10.0.0.0/8")
    return prefix


def assign(nodes: dict, links: list, user_routes: list, auto_routes: bool) -> Addressing:
    explicit: dict = {}
    for ln in links:
        for node, ifname, ip in ((ln.a, ln.intf_a, ln.ip_a), (ln.b, ln.intf_b, ln.ip_b)):
            if ip is not None:
                if nodes[node].kind == "switch":
                    raise SpecError(f"link {ln.a}-{ln.b}: switch {node} takes no address")
                explicit[(node, ifname)] = parse_interface_address(ip, f"{node} {ifname}")
    groups = _segments(nodes, links)
    domain = {e: i for i, eps in enumerate(groups) for e in eps}
    # One address twice is a conflict, except in two separate broadcast domains that use
    # the same subnet on purpose: twin sites on two VLANs (paper 001's main and backup).
    seen: dict = {}
    for ep, iface in explicit.items():
        if iface.ip in seen:
            other = seen[iface.ip]
            twin = (domain[other] != domain[ep]
                    and explicit[other].network == iface.network)
            if not twin:
                raise SpecError(f"duplicate address {iface.ip} on {other[0]} and {ep[0]}")
        else:
            seen[iface.ip] = ep
    used = [iface.network for iface in explicit.values()]
    addresses: dict = {}
    segments = []
    cursor = POOL.network_address
    for eps in groups:
        nets = {explicit[e].network for e in eps if e in explicit}
        if len(nets) > 1:
            names = ", ".join(sorted(str(n) for n in nets))
            raise SpecError(f"one layer-2 segment ({eps[0][0]}...) has addresses in several "
                            f"subnets: {names}")
        if nets:
            subnet = nets.pop()
        else:
            prefix = _prefix_for(len(eps))
            size = 2 ** (32 - prefix)
            start_ = -(-int(cursor) // size) * size  # align up to the prefix
            while True:
                subnet = ipaddress.ip_network((start_, prefix))
                if not subnet.subnet_of(POOL):
                    raise SpecError("automatic addressing ran out of 10.0.0.0/8")
                start_ += size
                if not any(subnet.overlaps(u) for u in used):
                    break
            cursor = ipaddress.ip_address(start_)
            used.append(subnet)
        taken = {explicit[e].ip for e in eps if e in explicit}
        hosts = (h for h in subnet.hosts() if h not in taken and h not in seen)
        for e in eps:
            if e in explicit:
                addresses[e] = explicit[e]
            else:
                try:
                    ip = next(hosts)
                except StopIteration:
                    raise SpecError(f"subnet {subnet} is too small for its segment") from None
                addresses[e] = ipaddress.ip_interface(f"{ip}/{subnet.prefixlen}")
        segments.append(Segment(subnet, tuple(eps)))

    for r in user_routes:  # a next hop must be on one of the node's own subnets
        nets = [a.network for (n, _), a in addresses.items() if n == r.node]
        if not any(ipaddress.ip_address(r.via) in net for net in nets):
            raise SpecError(f"route on {r.node}: next hop {r.via} is not on any of its subnets")
    routes = _static_routes(nodes, segments, addresses) if auto_routes else []
    return Addressing(addresses, tuple(segments), tuple(routes) + tuple(user_routes))


def _static_routes(nodes: dict, segments: list, addresses: dict) -> list:
    """Shortest-path (hop count) static routes; only routers forward."""
    seg_of_node: dict = {}
    for i, seg in enumerate(segments):
        for node, _ in seg.endpoints:
            seg_of_node.setdefault(node, []).append(i)
    if not any(n.kind == "router" for n in nodes.values()):
        return []
    routes = []
    for src in nodes:
        if src not in seg_of_node:
            continue
        direct = set(seg_of_node[src])
        # BFS over segments; first_hop[seg] = next-hop address used from src
        first_hop: dict = {}
        queue = deque()
        for s in direct:
            for node, ifname in segments[s].endpoints:
                if node != src and nodes[node].kind == "router":
                    via = addresses[(node, ifname)].ip
                    for s2 in seg_of_node[node]:
                        if s2 not in direct and s2 not in first_hop:
                            first_hop[s2] = via
                            queue.append((s2, via))
        while queue:
            s, via = queue.popleft()
            for node, _ in segments[s].endpoints:
                if node != src and nodes[node].kind == "router":
                    for s2 in seg_of_node[node]:
                        if s2 not in direct and s2 not in first_hop:
                            first_hop[s2] = via
                            queue.append((s2, via))
        for s, via in sorted(first_hop.items()):
            routes.append(RouteSpec(src, str(segments[s].subnet), str(via)))
    return routes


def check_routes(nodes: dict, routes: list) -> None:
    for r in routes:
        if r.node not in nodes:
            raise SpecError(f"route on unknown node {r.node!r}")
        if nodes[r.node].kind == "switch":
            raise SpecError(f"route on switch {r.node}: switches have no addresses")


__all__ = ["assign", "Addressing", "Segment", "check_routes", "LinkSpec", "NodeSpec"]
