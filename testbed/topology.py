"""Topology builder: nodes, links and routes as validated specs; Mininet Topo import. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from testbed import addressing
from testbed.errors import SpecError
from testbed.spec import (DEFAULT_VLAN, LinkSpec, NodeSpec, RouteSpec, Shaping, check_ifname,
                          check_vlan, check_vlans)

_SHAPING_KEYS = {"rate", "delay", "jitter", "loss", "queue_pkts",
                 "rate_mbit", "delay_ms", "jitter_ms", "loss_pct"}


def _shaping(params: dict, where: str) -> Shaping:
    unknown = set(params) - _SHAPING_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown link parameter {sorted(unknown)[0]!r}")
    alias = {"rate_mbit": "rate", "delay_ms": "delay", "jitter_ms": "jitter", "loss_pct": "loss"}
    return Shaping.make(**{alias.get(k, k): v for k, v in params.items()}, where=where)


@dataclass(frozen=True)
class Plan:
    """A validated, addressed topology: what Network deploys."""

    name: str
    nodes: dict  # name -> NodeSpec (insertion order)
    links: tuple  # LinkSpec, ...
    addressing: addressing.Addressing

    def address(self, node: str, ifname: Optional[str] = None):
        """The IPv4Interface of node's interface (its first one by default)."""
        for (n, i), a in self.addressing.addresses.items():
            if n == node and (ifname is None or i == ifname):
                return a
        raise SpecError(f"node {node!r} has no address" + (f" on {ifname}" if ifname else ""))

    def interfaces(self, node: str) -> list:
        """node's interface names, in link order."""
        return self._interfaces.get(node, [])

    def links_between(self, a: str, b: str) -> tuple:
        """The links joining nodes a and b (either way round), in link order: several for
        parallel links (each with its own interfaces and subnet)."""
        return tuple(ln for ln in self.links if {ln.a, ln.b} == {a, b})

    def link_at(self, node: str, ifname: str):
        """The link of node's interface ifname (SpecError if node has no such interface)."""
        for ln in self.links:
            if (node, ifname) in ln.ends:
                return ln
        raise SpecError(f"{node} has no interface {ifname!r}")

    # VLANs ---------------------------------------------------------------------------------
    def vlan_aware(self, switch: str) -> bool:
        """True if the switch separates VLANs (any VLAN but the default, or a trunk)."""
        return self.switch_vlans(switch) != (DEFAULT_VLAN,) or bool(self.trunks(switch))

    def switch_vlans(self, switch: str) -> tuple:
        """Every VLAN the switch has: declared, on access ports, or on trunks."""
        return self._vlans.get(switch, {}).get("vids", ())

    def access_ports(self, switch: str) -> dict:
        """ifname -> VLAN of the switch's access ports."""
        return self._vlans.get(switch, {}).get("access", {})

    def trunks(self, switch: str) -> dict:
        """ifname -> VLANs carried, for the switch's trunk ports."""
        return self._vlans.get(switch, {}).get("trunk", {})

    @cached_property
    def trunk_links(self) -> tuple:
        """The links that are trunks, in link order (their index numbers the underlay)."""
        return tuple(ln for ln in self.links if ln.trunk)

    @cached_property
    def _vlans(self) -> dict:
        out: dict = {}
        for name, spec in self.nodes.items():
            if spec.kind == "switch":
                out[name] = {"access": {}, "trunk": {}, "vids": set(spec.vlans)}
        for ln in self.links:
            for node, ifname in ((ln.a, ln.intf_a), (ln.b, ln.intf_b)):
                if node not in out:
                    continue
                if ln.trunk:
                    out[node]["trunk"][ifname] = ln.trunk
                    out[node]["vids"].update(ln.trunk)
                else:
                    vid = ln.vlan or DEFAULT_VLAN
                    out[node]["access"][ifname] = vid
                    out[node]["vids"].add(vid)
        for v in out.values():
            v["vids"] = tuple(sorted(v["vids"])) or (DEFAULT_VLAN,)
        return out

    @cached_property
    def _interfaces(self) -> dict:
        out: dict = {}
        for ln in self.links:
            out.setdefault(ln.a, []).append(ln.intf_a)
            out.setdefault(ln.b, []).append(ln.intf_b)
        return out


class Topology:
    """Build a topology with add_host/add_router/add_switch/add_link/add_route, then plan()."""

    def __init__(self, name: str = "topo", auto_routes: bool = True):
        self.name = name
        self.auto_routes = auto_routes
        self._nodes: dict = {}
        self._links: list = []
        self._routes: list = []
        self._ifcount: dict = {}

    # nodes
    def add_node(self, name: str, kind: str = "host", sysctls: Optional[dict] = None,
                 vlans=()) -> str:
        if name in self._nodes:
            raise SpecError(f"duplicate node name {name!r}")
        vids = check_vlans(vlans, f"switch {name}") if vlans else ()
        self._nodes[name] = NodeSpec(name, kind, tuple(sorted((sysctls or {}).items())), vids)
        self._ifcount[name] = 0
        return name

    def add_host(self, name: str, **kw) -> str:
        return self.add_node(name, "host", **kw)

    def add_router(self, name: str, **kw) -> str:
        return self.add_node(name, "router", **kw)

    def add_switch(self, name: str, vlans=(), **kw) -> str:
        """A learning switch (a Linux bridge). vlans: VLANs it has from the start, beyond
        those its links use, so that ports can be moved into them at runtime."""
        return self.add_node(name, "switch", vlans=vlans, **kw)

    # links
    def add_link(self, a: str, b: str, *, ip_a: Optional[str] = None, ip_b: Optional[str] = None,
                 intf_a: Optional[str] = None, intf_b: Optional[str] = None,
                 a_to_b: Optional[dict] = None, b_to_a: Optional[dict] = None,
                 emulate: bool = False, vlan: Optional[int] = None, trunk=None,
                 **params) -> LinkSpec:
        """Link a and b. rate/delay/jitter/loss/queue_pkts apply to each direction (so RTT is
        twice the delay); a_to_b / b_to_a override per direction. emulate=True prepares the
        link for delay/loss set at runtime even if it starts with none.

        vlan=N makes the switch end an access port of VLAN N (default 1); trunk=[N, ...]
        joins two switches by a trunk carrying those VLANs."""
        for n in (a, b):
            if n not in self._nodes:
                raise SpecError(f"link {a}-{b}: unknown node {n!r}")
        if a == b:
            raise SpecError(f"link {a}-{b}: a node cannot link to itself")
        where = f"link {a}-{b}"
        switches = [n for n in (a, b) if self._nodes[n].kind == "switch"]
        if vlan is not None:
            vlan = check_vlan(vlan, where)
            if not switches:
                raise SpecError(f"{where}: vlan= needs a switch at one end")
        if trunk is not None:
            trunk = check_vlans(trunk, f"{where}: trunk")
            if not trunk:
                raise SpecError(f"{where}: a trunk carries at least one VLAN")
        else:
            trunk = ()
        if trunk:
            if len(switches) != 2:
                raise SpecError(f"{where}: a trunk joins two switches")
            if vlan is not None:
                raise SpecError(f"{where}: give vlan= (access) or trunk=, not both")
            if ip_a or ip_b:
                raise SpecError(f"{where}: a trunk takes no addresses")
        base = dict(params)
        fwd = _shaping({**base, **(a_to_b or {})}, where)
        rev = _shaping({**base, **(b_to_a or {})}, where)
        ia = check_ifname(intf_a or f"{a}-eth{self._ifcount[a]}")
        ib = check_ifname(intf_b or f"{b}-eth{self._ifcount[b]}")
        for n, i in ((a, ia), (b, ib)):
            if i in self.interfaces_of(n):
                raise SpecError(f"{where}: duplicate interface {i} on {n}")
        spec = LinkSpec(a, b, ia, ib, fwd, rev, ip_a, ip_b, bool(emulate), vlan, trunk)
        self._links.append(spec)
        self._ifcount[a] += 1
        self._ifcount[b] += 1
        return spec

    def interfaces_of(self, node: str) -> list:
        return [ln.intf_a if ln.a == node else ln.intf_b
                for ln in self._links if node in (ln.a, ln.b)]

    def add_route(self, node: str, dst: str, via: str) -> None:
        if node not in self._nodes:
            raise SpecError(f"route: unknown node {node!r}")
        self._routes.append(RouteSpec(node, dst, via))

    @property
    def nodes(self) -> list:
        return list(self._nodes)

    @property
    def links(self) -> list:
        return list(self._links)

    def plan(self) -> Plan:
        """Validate the whole graph and assign addresses and routes (no I/O)."""
        if not self._nodes:
            raise SpecError(f"topology {self.name!r} has no nodes")
        addressing.check_routes(self._nodes, self._routes)
        self._check_trunks()
        addr = addressing.assign(self._nodes, self._links, self._routes, self.auto_routes)
        return Plan(self.name, dict(self._nodes), tuple(self._links), addr)

    def _check_trunks(self) -> None:
        """A VLAN on both ends of a trunk must be carried by it (VLAN ids are network-wide)."""
        vids: dict = {}
        for n, spec in self._nodes.items():
            if spec.kind == "switch":
                vids[n] = set(spec.vlans)
        for ln in self._links:
            if not ln.trunk:
                for n in (ln.a, ln.b):
                    if n in vids:
                        vids[n].add(ln.vlan or DEFAULT_VLAN)
        for ln in self._links:
            if ln.trunk:
                missing = sorted((vids[ln.a] & vids[ln.b]) - set(ln.trunk))
                if missing:
                    raise SpecError(f"link {ln.a}-{ln.b}: VLAN {missing[0]} is on both switches "
                                    f"but the trunk does not carry it (trunk={list(ln.trunk)})")

    # Mininet compatibility
    @classmethod
    def from_mininet(cls, mtopo, name: Optional[str] = None) -> "Topology":
        """Build from a mininet.topo.Topo, with its link options (bw, delay, jitter, loss,
        max_queue_size) and Mininet's addressing (hosts 10.0.0.N/8 in order)."""
        import ipaddress

        topo = cls(name or type(mtopo).__name__, auto_routes=False)
        hosts = [n for n in mtopo.nodes() if not mtopo.isSwitch(n)]
        host_ip: dict = {}
        base = ipaddress.ip_network("10.0.0.0/8")
        for i, h in enumerate(hosts, start=1):
            info = mtopo.nodeInfo(h)
            ip = info.get("ip") or f"{base.network_address + i}/{base.prefixlen}"
            host_ip[h] = ip if "/" in ip else f"{ip}/8"
        for n in mtopo.nodes():
            info = mtopo.nodeInfo(n)
            if mtopo.isSwitch(n):
                topo.add_switch(n)
            elif info.get("cls") is not None and "Router" in getattr(info["cls"], "__name__", ""):
                topo.add_router(n)
            else:
                topo.add_host(n)
        given: set = set()
        for a, b, info in mtopo.links(sort=True, withKeys=False, withInfo=True):
            opts = {}
            if info.get("bw") is not None:
                opts["rate"] = info["bw"]
            for k in ("delay", "jitter"):
                if info.get(k):
                    opts[k] = info[k]
            if info.get("loss"):
                opts["loss"] = info["loss"]
            if info.get("max_queue_size"):
                opts["queue_pkts"] = int(info["max_queue_size"])
            ips = {}
            for end, node in (("ip_a", a), ("ip_b", b)):
                if node in host_ip and node not in given:
                    ips[end] = host_ip[node]
                    given.add(node)
            pa, pb = info.get("port1"), info.get("port2")
            topo.add_link(a, b, intf_a=f"{a}-eth{pa}" if pa is not None else None,
                          intf_b=f"{b}-eth{pb}" if pb is not None else None, **ips, **opts)
        return topo
