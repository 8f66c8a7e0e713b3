"""Dynamic routing with FRR (Debian package `frr`): zebra + ospfd (and bgpd) per router.

Each router gets its own FRR instance inside its namespace: its own config files, pid files,
zebra socket and vty sockets in `<net.log_dir>/<router>.frr/`, so any number of instances
coexist and none touches Debian's frr service (whatever state it is in) or its files under
/etc/frr and /var/run/frr. The daemons are supervised processes of the node (Node.start):
teardown stops them. The daemons drop privileges to the `frr` user as packaged (FRR refuses
to run as a root that is not in its vty group), so the run directory is owned by frr.

    from testbed import frr
    routers = frr.start(net)                  # OSPF area 0 on every router interface
    took_s = frr.wait_converged(net)          # every router forwards to every live subnet
    routers["r1"].vtysh("show ip ospf neighbor")

Configuration comes from the topology: OSPF on every addressed router interface (point to
point on a link between two routers, passive where no other FRR router is), hello 1 s and
dead 4 s by default, SPF and LSA throttling off so a change is flooded and computed at once.
BGP (bgp=True): one ASN per router (65001, 65002, ... in topology order, or asns=), an eBGP
session to every FRR router on a shared segment, connected networks redistributed.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import shutil
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from testbed import poll
from testbed.errors import CapabilityError, SpecError

FRR_BIN = os.environ.get("TESTBED_FRR_DIR", "/usr/lib/frr")
FRR_USER = "frr"


def available() -> bool:
    """True if FRR's daemons, vtysh and the frr user are installed."""
    if not all(os.access(os.path.join(FRR_BIN, d), os.X_OK) for d in ("zebra", "ospfd", "bgpd")):
        return False
    if shutil.which("vtysh") is None:
        return False
    try:
        pwd.getpwnam(FRR_USER)
    except KeyError:
        return False
    return True


def require() -> None:
    if not available():
        raise CapabilityError(f"FRR is not installed (no {FRR_BIN}/zebra, vtysh or user "
                              f"{FRR_USER}): run `make setup`")


# configuration (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """What to run and its timers. Validated at construction."""

    ospf: bool = True
    bgp: bool = False
    hello_s: int = 1
    dead_s: int = 4
    asns: dict = field(default_factory=dict)  # router -> ASN; default 65001, 65002, ...
    costs: dict = field(default_factory=dict)  # (a, b) -> OSPF cost of both ends of link a-b

    def __post_init__(self):
        if not (self.ospf or self.bgp):
            raise SpecError("frr: enable ospf, bgp or both")
        for what, v in (("hello_s", self.hello_s), ("dead_s", self.dead_s)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
                raise SpecError(f"frr: {what} must be a whole number of seconds, 1-65535, "
                                f"got {v!r}")
        if self.dead_s <= self.hello_s:
            raise SpecError(f"frr: dead_s ({self.dead_s}) must exceed hello_s ({self.hello_s})")
        for r, asn in self.asns.items():
            if not isinstance(asn, int) or isinstance(asn, bool) or not 1 <= asn <= 4294967294:
                raise SpecError(f"frr: ASN of {r} must be 1-4294967294, got {asn!r}")
        for key, cost in self.costs.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise SpecError(f"frr: costs are keyed by (node, node), got {key!r}")
            if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= 65535:
                raise SpecError(f"frr: OSPF cost of {key} must be 1-65535, got {cost!r}")


def check(plan, routers: Iterable[str], opts: Options) -> list:
    """Validate the router list against the plan; return it in topology order."""
    routers = list(routers)
    for r in routers:
        if r not in plan.nodes:
            raise SpecError(f"frr: unknown node {r!r}")
        if plan.nodes[r].kind != "router":
            raise SpecError(f"frr: {r} is a {plan.nodes[r].kind}, not a router")
    if not routers:
        raise SpecError("frr: no routers to run")
    if len(set(routers)) != len(routers):
        raise SpecError("frr: a router is listed twice")
    for r in opts.asns:
        if r not in routers:
            raise SpecError(f"frr: ASN given for {r!r}, which does not run FRR")
    links = {ln.key for ln in plan.links}
    for a, b in opts.costs:
        if frozenset((a, b)) not in links:
            raise SpecError(f"frr: cost given for {a}-{b}, which is not a link")
    for r in routers:
        if not any(n == r for n, _ in plan.addressing.addresses):
            raise SpecError(f"frr: router {r} has no addressed interface")
    return [n for n in plan.nodes if n in set(routers)]


def asns(routers: list, opts: Options) -> dict:
    return {r: opts.asns.get(r, 65001 + i) for i, r in enumerate(routers)}


def router_id(plan, name: str) -> str:
    """The lowest address of the router: unique, stable across runs."""
    return str(min(a.ip for (n, _), a in plan.addressing.addresses.items() if n == name))


def _interfaces(plan, name: str, routers: list) -> list:
    """(ifname, IPv4Interface, segment endpoints, [(peer, peer_ip)]) per addressed interface."""
    addrs = plan.addressing.addresses
    seg_of = {ep: seg for seg in plan.addressing.segments for ep in seg.endpoints}
    out = []
    for ifname in plan.interfaces(name):
        if (name, ifname) not in addrs:
            continue
        seg = seg_of[(name, ifname)]
        peers = [(n, str(addrs[(n, i)].ip)) for n, i in seg.endpoints
                 if n != name and n in routers]
        out.append((ifname, addrs[(name, ifname)], seg.endpoints, peers))
    return out


def _cost(plan, name: str, ifname: str, opts: Options) -> Optional[int]:
    for ln in plan.links:
        if (ln.a, ln.intf_a) == (name, ifname) or (ln.b, ln.intf_b) == (name, ifname):
            return opts.costs.get((ln.a, ln.b), opts.costs.get((ln.b, ln.a)))
    return None


def render(plan, name: str, routers: list, opts: Options) -> dict:
    """{daemon: config text} for router `name` (zebra always; ospfd and/or bgpd)."""
    head = ["frr version 8.4", "frr defaults traditional", f"hostname {name}", "!"]
    rid = router_id(plan, name)
    intfs = _interfaces(plan, name, routers)
    out = {"zebra": "\n".join(head + [f"interface {i}\n!" for i, *_ in intfs]) + "\n"}
    if opts.ospf:
        lines = list(head)
        for ifname, _, endpoints, peers in intfs:
            lines += [f"interface {ifname}", " ip ospf area 0"]
            if not peers:
                lines.append(" ip ospf passive")
            elif len(endpoints) == 2:
                lines.append(" ip ospf network point-to-point")
            lines += [f" ip ospf hello-interval {opts.hello_s}",
                      f" ip ospf dead-interval {opts.dead_s}",
                      " ip ospf retransmit-interval 1"]
            cost = _cost(plan, name, ifname, opts)
            if cost is not None:
                lines.append(f" ip ospf cost {cost}")
            lines.append("!")
        lines += ["router ospf", f" ospf router-id {rid}", " log-adjacency-changes",
                  " timers throttle spf 0 50 1000", " timers throttle lsa all 0",
                  " timers lsa min-arrival 0", "!"]
        out["ospfd"] = "\n".join(lines) + "\n"
    if opts.bgp:
        asn = asns(routers, opts)
        lines = head + [f"router bgp {asn[name]}", f" bgp router-id {rid}",
                        " no bgp ebgp-requires-policy", " no bgp network import-check",
                        " bgp log-neighbor-changes", " timers bgp 1 3"]
        for _, _, _, peers in intfs:
            for peer, ip in peers:
                lines += [f" neighbor {ip} remote-as {asn[peer]}",
                          f" neighbor {ip} timers connect 1",
                          f" neighbor {ip} advertisement-interval 0"]
        lines += [" !", " address-family ipv4 unicast", "  redistribute connected",
                  " exit-address-family", "!"]
        out["bgpd"] = "\n".join(lines) + "\n"
    return out


# running ---------------------------------------------------------------------------------------

class Router:
    """One router's FRR instance: its run directory, daemons and a vtysh bound to them."""

    def __init__(self, node, run_dir: str, configs: dict):
        self.node, self.run_dir, self.configs = node, run_dir, configs
        self.procs: dict = {}

    def __repr__(self) -> str:
        return f"<frr {self.node.name} {' '.join(self.procs)}>"

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def running(self) -> bool:
        return bool(self.procs) and all(p.alive for p in self.procs.values())

    def stop(self) -> None:
        """Stop this router's daemons now (a router failure), protocols first, then zebra,
        which removes the routes it installed."""
        for d in reversed(list(self.procs)):
            p = self.procs.pop(d)
            p.stop()
            if p in self.node.procs:
                self.node.procs.remove(p)

    @property
    def daemons(self) -> list:
        return list(self.configs)

    def path(self, what: str) -> str:
        return os.path.join(self.run_dir, what)

    def argv(self, daemon: str) -> list:
        return [os.path.join(FRR_BIN, daemon), "-f", self.path(f"{daemon}.conf"),
                "-i", self.path(f"{daemon}.pid"), "-z", self.path("zserv.api"),
                "--vty_socket", self.run_dir, "-P", "0", "--log", "stdout"]

    def vtysh(self, *commands: str, daemon: Optional[str] = None, check: bool = True) -> str:
        """Run vtysh commands against this instance (its own vty sockets); stdout."""
        argv = ["vtysh", "--vty_socket", self.run_dir, "--config_dir", self.run_dir]
        if daemon:
            argv += ["-d", daemon]
        for c in commands:
            argv += ["-c", c]
        return self.node.run(argv, timeout=30, check=check).stdout

    def up(self) -> list:
        """The daemons vtysh can reach (`show daemons`)."""
        out = self.vtysh("show daemons", check=False)
        return out.split()

    def ospf_neighbours(self) -> list:
        """[{"router_id", "state", "ifname", "address"}] from `show ip ospf neighbor json`."""
        data = json.loads(self.vtysh("show ip ospf neighbor json", daemon="ospfd") or "{}")
        out = []
        for rid, entries in data.get("neighbors", {}).items():
            for e in entries if isinstance(entries, list) else [entries]:
                out.append({"router_id": rid, "state": e.get("nbrState", e.get("state")),
                            "ifname": str(e.get("ifaceName", "")).split(":")[0],
                            "address": e.get("ifaceAddress", e.get("address"))})
        return out

    def bgp_peers(self) -> dict:
        """peer address -> state, from `show bgp summary json`."""
        data = json.loads(self.vtysh("show bgp ipv4 unicast summary json", daemon="bgpd") or "{}")
        return {ip: p.get("state") for ip, p in data.get("peers", {}).items()}


def _prepare(router: Router) -> None:
    try:
        uid, gid = pwd.getpwnam(FRR_USER).pw_uid, grp.getgrnam(FRR_USER).gr_gid
    except KeyError:
        require()
        raise
    os.makedirs(router.run_dir, exist_ok=True)
    os.chown(router.run_dir, uid, gid)
    for daemon, text in {**router.configs, "vtysh": ""}.items():
        p = router.path(f"{daemon}.conf")
        with open(p, "w") as f:
            f.write(text)
        os.chown(p, uid, gid)
        os.chmod(p, 0o640)


def _wait(routers: list, what: str, cond, timeout: float) -> None:
    """Until cond(router) holds for every router: a TestbedError at once if a daemon of a
    router still pending has exited, a WaitTimeout naming the first pending router."""
    pending = list(routers)

    def done() -> bool:
        pending[:] = [r for r in pending if not cond(r)]
        return not pending

    def died() -> Optional[str]:
        for r in pending:
            for d, p in r.procs.items():
                if not p.alive:
                    return (f"frr: {d} on {r.node.name} exited with {p.returncode}: "
                            f"{p.log(tail=3).strip() or '(empty log)'}")
        return None

    try:
        poll.wait_until(done, timeout, f"frr: {what}", interval=0.02, abort=died)
    except poll.WaitTimeout:
        r = pending[0]
        raise poll.WaitTimeout(f"frr: {what} on {r.node.name} not ready after "
                               f"{poll.scaled(timeout):g} s (logs in {r.node.net.log_dir})"
                               ) from None


def start(net, routers: Optional[Iterable[str]] = None, ospf: bool = True, bgp: bool = False,
          hello_s: int = 1, dead_s: int = 4, asns: Optional[dict] = None,
          costs: Optional[dict] = None, keep_static: bool = False,
          timeout: float = 15) -> dict:
    """Run FRR on routers (default: every router of the network); return {name: Router}.

    The static routes the testbed installed on those routers are removed first (FRR decides
    their routes; keep_static=True keeps them, and they then win over OSPF and BGP); hosts
    keep theirs. Returns once every daemon answers on its vty socket; routing converges
    later: see wait_converged()."""
    opts = Options(ospf=ospf, bgp=bgp, hello_s=hello_s, dead_s=dead_s, asns=dict(asns or {}),
                   costs=dict(costs or {}))
    names = [n for n, s in net.plan.nodes.items() if s.kind == "router"] \
        if routers is None else list(routers)
    names = check(net.plan, names, opts)
    require()
    for name in names:
        if any(p.name == f"{name}:frr-zebra" and p.alive for p in net[name].procs):
            raise SpecError(f"frr: already running on {name}")
    out = {}
    for name in names:
        node = net[name]
        run_dir = os.path.join(net.log_dir, f"{name}.frr")
        out[name] = Router(node, run_dir, render(net.plan, name, names, opts))
    for r in out.values():
        _prepare(r)
        if not keep_static:
            for dst, via in r.node.routes():
                if via is not None:
                    r.node.del_route(dst)
    # zebra first everywhere (the others connect to its socket), then the protocols
    for r in out.values():
        r.procs["zebra"] = r.node.start(r.argv("zebra"), name="frr-zebra")
    _wait(list(out.values()), "zebra",
          lambda r: all(os.path.exists(r.path(f)) for f in ("zserv.api", "zebra.vty")), timeout)
    for r in out.values():
        for d in r.daemons[1:]:
            r.procs[d] = r.node.start(r.argv(d), name=f"frr-{d}")
    _wait(list(out.values()), "daemons", lambda r: set(r.daemons) <= set(r.up()), timeout)
    return out


# convergence ------------------------------------------------------------------------------------

def _snapshot(node) -> dict:
    """A router's view from netlink: live subnets, its live addresses, main-table routes."""
    from testbed.kernel import route as kroute

    ipr = node.ipr()
    up = {ln["index"] for ln in ipr.get_links()
          if ln["flags"] & 1 and ln.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN")}
    nets, ips = set(), set()
    for a in ipr.get_addr(family=2):
        if a["index"] in up and not a.get_attr("IFA_ADDRESS").startswith("127."):
            iface = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            nets.add(iface.network)
            ips.add(iface.ip)
    routes = [(ipaddress.ip_network("0.0.0.0/0" if r["dst"] == "default" else r["dst"]),
               [h[0] for h in r["nexthops"]]) for r in kroute.show(ipr, detail=True)]
    return {"nets": nets, "ips": ips, "routes": routes}


def _lookup(routes: list, dst) -> Optional[list]:
    best = None
    for net, hops in routes:
        if dst in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, hops)
    return None if best is None else best[1]


def missing(net, routers: Optional[Iterable[str]] = None) -> list:
    """Why the routers have not converged, as strings; [] when every router forwards toward
    every subnet another of them has on a live interface, hop by hop without a loop or a
    dead end (the data plane, read from each router's kernel table)."""
    names = [n for n, s in net.plan.nodes.items() if s.kind == "router"] \
        if routers is None else [getattr(r, "name", r) for r in routers]
    for n in names:
        net[n]  # SpecError for an unknown node
    snap = {n: _snapshot(net[n]) for n in names}
    owner = {ip: n for n, s in snap.items() for ip in s["ips"]}
    subnets = set().union(*(s["nets"] for s in snap.values()))
    def trace(here: str, subnet, path: tuple) -> Optional[str]:
        if subnet in snap[here]["nets"]:
            return None
        if here in path:
            return f"loop {' -> '.join(path + (here,))}"
        hops = _lookup(snap[here]["routes"], subnet.network_address)
        if not hops:
            return f"no route at {here}"
        for h in hops:  # every next hop of a multipath route must lead there
            nxt = owner.get(ipaddress.ip_address(h)) if h else None
            if nxt is None:
                return f"{here} forwards to {h or 'an on-link route'}, not a live router"
            why = trace(nxt, subnet, path + (here,))
            if why:
                return why
        return None

    problems = []
    for src in names:
        for subnet in sorted(subnets):
            why = trace(src, subnet, ())
            if why:
                problems.append(f"{src} -> {subnet}: {why}")
    return problems


def wait_converged(net, routers: Optional[Iterable[str]] = None, timeout: float = 30) -> float:
    """Poll until missing() is empty; return the seconds it took (on timeout a WaitTimeout,
    a TestbedError, with what is still missing). It reads the kernel tables, so a failure
    that leaves the interfaces up (a wire that drops everything) looks converged until the
    protocol notices it (the OSPF dead interval) and changes the routes: wait for the route
    you expect."""
    t0 = time.monotonic()
    left: list = []

    def converged() -> bool:
        left[:] = missing(net, routers)
        return not left

    try:
        poll.wait_until(converged, timeout, "frr: convergence", interval=0.02)
    except poll.WaitTimeout:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise poll.WaitTimeout(f"frr: not converged after {poll.scaled(timeout):g} s: "
                               f"{left[0]}{more}") from None
    return time.monotonic() - t0


__all__ = ["available", "start", "wait_converged", "missing", "render", "Options", "Router"]
