"""VIP failover on a LAN: a Wackamole-style daemon (paper 004) and keepalived as reference.

    from testbed.failover import start_wackamole, TUNED, set_interface
    with Network(wackamole_lan.build(servers=4)) as net:
        wk = start_wackamole(net, ["s1", "s2", "s3", "s4"], wackamole_lan.vips(10),
                             timeouts=TUNED)
        wk.wait_stable()                       # one view, every VIP held exactly once
        wk.owner("10.100.0.101")               # -> "s2" (from the kernel's addresses)
        wk.status("s1")["view"]                # {"vid", "coord", "members"}
        set_interface(net, "s2", up=False)     # the fault: s2's interface goes down
        wk.leave("s3")                         # a voluntary leave (SIGTERM)

Modules: wire (every message, HMAC and replay protection), membership (heartbeats, failure
detection, view changes), vip (allocation and the GATHER/RUN/BALANCE state machine), daemon
(`python -m testbed.failover`: both in one process; `--membership-only`: the membership
alone), keepalived (VRRP reference). hanet is paper 002's, separate.

Each daemon gets a JSON configuration, a status file (rewritten on every change) and a
ready file in the run's log directory; the shared HMAC key goes to a 0600 file there, in hex
(testbed.daemon.write_key).
Member ids are 1..N in the order of `servers` (the membership order).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from typing import Iterable, Optional

from testbed.daemon import new_key, write_key
from testbed.errors import SpecError, TestbedError
from testbed.failover.membership import DEFAULT, TUNED, Timeouts, comparable
from testbed.poll import WaitTimeout, wait_until

DEFAULT_PORT = 8200
GARP_MODES = ("broadcast", "unicast", "both")

__all__ = ["start_wackamole", "Wackamole", "Timeouts", "DEFAULT", "TUNED", "comparable",
           "set_interface", "server_interface", "held_vips", "DEFAULT_PORT"]


# validation (nothing is created before all of it passed) ---------------------------------------

def _number(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SpecError(f"failover: {what} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def check_servers(net, servers) -> list:
    if isinstance(servers, str) or not hasattr(servers, "__iter__"):
        raise SpecError(f"failover: servers must be a list of node names, got {servers!r}")
    servers = list(servers)
    if not servers:
        raise SpecError("failover: no servers")
    if len(set(servers)) != len(servers):
        raise SpecError("failover: a server is listed twice")
    for s in servers:
        if s not in net.plan.nodes:
            raise SpecError(f"failover: unknown node {s!r}")
        if net.plan.nodes[s].kind == "switch":
            raise SpecError(f"failover: {s} is a switch, not a server")
    return servers


def check_vips(net, servers: list, vips) -> tuple:
    """(vips as strings, {server: (ifname, IPv4Interface)}): every VIP a valid, unused IPv4
    address inside one subnet on which every server has an interface."""
    if isinstance(vips, str) or not hasattr(vips, "__iter__"):
        raise SpecError(f"failover: vips must be a list of addresses, got {vips!r}")
    vips = list(vips)
    if not vips:
        raise SpecError("failover: no VIPs")
    parsed = []
    for v in vips:
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise SpecError(f"failover: bad VIP {v!r}") from None
        if ip.version != 4:
            raise SpecError(f"failover: VIP {v} is not IPv4")
        parsed.append(ip)
    if len(set(parsed)) != len(parsed):
        raise SpecError("failover: a VIP is listed twice")
    used = {a.ip: n for (n, _), a in net.plan.addressing.addresses.items()}
    devs = {}
    for s in servers:
        ifaces = [(i, a) for (n, i), a in net.plan.addressing.addresses.items() if n == s]
        match = [(i, a) for i, a in ifaces if parsed[0] in a.network]
        if not match:
            nets = ", ".join(str(a.network) for _, a in ifaces) or "none"
            raise SpecError(f"failover: VIP {parsed[0]} is outside the subnets of server {s} "
                            f"({nets})")
        devs[s] = match[0]
    subnet = devs[servers[0]][1].network
    for ip in parsed:
        if ip not in subnet:
            raise SpecError(f"failover: VIP {ip} is outside the servers' subnet {subnet}")
        if ip in (subnet.network_address, subnet.broadcast_address):
            raise SpecError(f"failover: VIP {ip} is the network or broadcast address of {subnet}")
        if ip in used:
            raise SpecError(f"failover: VIP {ip} is already the address of {used[ip]}")
    for s in servers:
        if devs[s][1].network != subnet:
            raise SpecError(f"failover: server {s} is not on the VIPs' subnet {subnet}")
    return [str(ip) for ip in parsed], devs


def server_interface(net, server: str, subnet=None) -> str:
    """The server's interface on subnet (default: its first)."""
    for (n, i), a in net.plan.addressing.addresses.items():
        if n == server and (subnet is None or a.network == subnet):
            return i
    raise SpecError(f"failover: {server} has no interface" + (f" on {subnet}" if subnet else ""))


def held_vips(net, server: str, ifname: str, vips: list) -> list:
    """The VIPs among vips on the server's interface, from the kernel (in vips' order)."""
    n = net[server]
    idx = n.ifindex(ifname)
    found = {a.get_attr("IFA_ADDRESS") for a in n.ipr().get_addr(index=idx)}
    return [v for v in vips if v in found]


class VipHolders:
    """Who holds which VIP, read from the kernel: for a group of servers (self.net,
    self.servers, self.devs: server -> interface, self.vips), whatever daemon runs them."""

    def held(self, server: str) -> list:
        """The VIPs on the server's interface, from the kernel."""
        return held_vips(self.net, self._check(server), self.devs[server], self.vips)

    def holders(self) -> dict:
        """vip -> [servers holding it], from the kernel."""
        out = {v: [] for v in self.vips}
        for s in self.servers:
            for v in self.held(s):
                out[v].append(s)
        return out

    def owner(self, vip: str) -> Optional[str]:
        """The one server holding vip, or None (none, or several)."""
        h = self.holders()[vip]
        return h[0] if len(h) == 1 else None

    def _check(self, server: str) -> str:
        if server not in self.servers:
            raise SpecError(f"failover: {server!r} is not a server of this cluster "
                            f"({', '.join(self.servers)})")
        return server


def set_interface(net, node: str, up: bool, ifname: Optional[str] = None) -> None:
    """Take a node's interface down or up from inside the node (`ip link set down`), as
    unplugging its cable would; on the way up its static routes are put back (the kernel
    dropped those through the interface)."""
    from testbed.kernel import link as klink

    n = net[node]
    ifname = ifname or server_interface(net, node)
    net[node].ifindex(ifname)
    klink.set_state(n.ipr(), ifname, up)
    if up:
        for r in net.plan.addressing.routes:
            if r.node == node:
                n.add_route(r.dst, r.via)


# the daemons -------------------------------------------------------------------------------------

class Wackamole(VipHolders):
    """The daemons of one cluster on a running Network (see start_wackamole)."""

    def __init__(self, net, servers: list, vips: list, devs: dict, configs: dict,
                 membership_only: bool):
        self.net, self.servers, self.vips = net, list(servers), list(vips)
        self.ids = {s: i + 1 for i, s in enumerate(servers)}
        self.names = {i: s for s, i in self.ids.items()}
        self.devs = {s: devs[s][0] for s in servers}
        self.subnet = devs[servers[0]][1].network
        self.configs = configs  # server -> config dict
        self.membership_only = membership_only
        self.procs: dict = {}
        self._macs: dict = {}

    def __repr__(self) -> str:
        return f"<wackamole {len(self.servers)} servers, {len(self.vips)} VIPs>"

    def config_path(self, server: str) -> str:
        return self.configs[self._check(server)]["path"]

    def argv(self, server: str) -> list:
        only = ["--membership-only"] if self.membership_only else []
        return [sys.executable, "-m", "testbed.failover", *only, self.config_path(server)]

    # lifecycle -----------------------------------------------------------------------------
    def start(self, *servers: str, timeout: float = 20.0) -> None:
        """Start (or restart) the daemons of servers (default: all not running)."""
        from testbed.process import file_exists

        names = [self._check(s) for s in servers] or [s for s in self.servers
                                                      if not self.alive(s)]
        for s in names:
            if self.alive(s):
                raise TestbedError(f"failover: the daemon on {s} is already running")
        for s in names:
            for key in ("ready", "status"):
                try:
                    os.unlink(self.configs[s][key])
                except FileNotFoundError:
                    pass
            self.procs[s] = self.net[s].start(self.argv(s), name="wackamole")
        for s in names:
            self.procs[s].wait_ready(file_exists(self.configs[s]["ready"]), timeout)

    def alive(self, server: str) -> bool:
        p = self.procs.get(self._check(server))
        return p is not None and p.alive

    def leave(self, server: str, timeout: float = 10.0) -> int:
        """A voluntary leave: SIGTERM; the daemon has its VIPs moved to the others (a drain
        through the representative), releases anything left, announces LEAVE and exits.
        Returns its exit code."""
        p = self.procs.get(self._check(server))
        if p is None or not p.alive:
            raise TestbedError(f"failover: no daemon running on {server}")
        p.signal(signal.SIGTERM)
        return p.wait(timeout)

    def kill(self, server: str) -> None:
        """SIGKILL the daemon (its VIPs stay on the interface, as on a hung machine)."""
        p = self.procs.get(self._check(server))
        if p is not None and p.alive:
            p.signal(signal.SIGKILL)
            p.wait(5)

    def stop(self) -> None:
        """Every daemon leaves (releasing its VIPs)."""
        for s in self.servers:
            p = self.procs.get(s)
            if p is not None and p.alive:
                p.stop(grace=5)

    # observation -----------------------------------------------------------------------------
    def status(self, server: str) -> Optional[dict]:
        """The daemon's last status (None before it wrote one)."""
        try:
            with open(self.configs[self._check(server)]["status"]) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def statuses(self) -> dict:
        return {s: self.status(s) for s in self.servers}

    def mac(self, server: str) -> str:
        if server not in self._macs:
            self._macs[server] = self.net[self._check(server)].mac(self.devs[server])
        return self._macs[server]

    def arp_owners(self, node: str, ifname: Optional[str] = None) -> dict:
        """vip -> the server whose MAC node's ARP table has for it (None: no usable entry;
        "?": a MAC of no server)."""
        by_mac = {self.mac(s): s for s in self.servers}
        out = {v: None for v in self.vips}
        for e in self.net[node].neighbours(ifname):
            if e["ip"] in out and e["mac"]:
                out[e["ip"]] = by_mac.get(e["mac"], "?")
        return out

    def stable(self, groups: Optional[Iterable] = None, balanced: bool = False) -> tuple:
        """(True, "") when, in each group of servers (the connected components; default:
        the running daemons whose interface is up, plus each cut-off one alone), every
        daemon runs in one view of exactly that group and the group's servers hold every
        VIP exactly once; else (False, why)."""
        if groups is None:
            running = [s for s in self.servers if self.alive(s)]
            up = [s for s in running if self._oper_up(s)]
            groups = ([up] if up else []) + [[s] for s in running if s not in up]
        for g in groups:
            g = [s for s in g if self.alive(s)]
            if not g:
                continue
            ids = sorted(self.ids[s] for s in g)
            views = set()
            for s in g:
                st = self.status(s)
                if st is None:
                    return False, f"{s}: no status yet"
                if st.get("state") != "run" or (not self.membership_only
                                                and st.get("vip_state") != "run"):
                    return False, f"{s}: {st.get('state')}/{st.get('vip_state')}"
                if st["view"]["members"] != ids:
                    return False, f"{s}: view {st['view']['members']} != {ids}"
                views.add((st["view"]["vid"], st["view"]["coord"]))
                if not self.membership_only and sorted(
                        st["held"], key=self.vips.index) != self.held(s):
                    return False, f"{s}: status and kernel disagree"
            if len(views) > 1:
                return False, f"group {g}: several views {sorted(views)}"
            if self.membership_only:
                continue
            count = {v: 0 for v in self.vips}
            per = {}
            for s in g:
                held = self.held(s)
                per[s] = len(held)
                for v in held:
                    count[v] += 1
            bad = {v: c for v, c in count.items() if c != 1}
            if bad:
                return False, f"group {g}: VIPs not held exactly once: {bad}"
            if balanced and max(per.values()) - min(per.values()) > 1:
                return False, f"group {g}: unbalanced {per}"
        return True, ""

    def _oper_up(self, server: str) -> bool:
        idx = self.net[server].ifindex(self.devs[server])
        ln = self.net[server].ipr().get_links(idx)[0]
        return ln.get_attr("IFLA_OPERSTATE") == "UP"

    def wait_stable(self, timeout: float = 30.0, groups=None, balanced: bool = False,
                    interval: float = 0.02) -> float:
        """Poll stable(); returns the seconds it took, raises TestbedError with the reason."""
        t0 = time.monotonic()
        why = ""

        def done() -> bool:
            nonlocal why
            ok, why = self.stable(groups, balanced)
            return ok

        try:
            wait_until(done, timeout, "failover: stable", interval=interval)
        except WaitTimeout:
            raise TestbedError(f"failover: not stable after {timeout:g} s: {why}") from None
        return time.monotonic() - t0


def start_wackamole(net, servers, vips, timeouts: Timeouts = TUNED, port: int = DEFAULT_PORT,
                    key: Optional[bytes] = None, balance_s: float = 5.0,
                    mature_s: Optional[float] = None, garp: str = "both",
                    arp_share_s: float = 1.0, garp_refresh_s: float = 10.0,
                    broadcast: bool = True, start: bool = True,
                    membership_only: bool = False, name: str = "wackamole",
                    timeout: float = 20.0) -> Wackamole:
    """Start a daemon on each server (ids 1..N in this order) managing vips, which must lie
    in the subnet the servers share. Everything is checked first (one-line SpecError,
    nothing started). start=False only writes the configurations (call .start()).
    garp_refresh_s: holders re-announce their VIPs this often (0: only on changes)."""
    servers = check_servers(net, servers)
    vips, devs = check_vips(net, servers, vips)
    if isinstance(timeouts, dict):
        timeouts = Timeouts(**timeouts)
    if not isinstance(timeouts, Timeouts):
        raise SpecError(f"failover: timeouts must be a Timeouts, got {timeouts!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError(f"failover: port must be 1-65535, got {port!r}")
    if key is not None and (not isinstance(key, bytes) or len(key) < 16):
        raise SpecError("failover: key must be at least 16 bytes")
    balance_s = _number(balance_s, "balance_s", 0.05, 86400)
    mature_s = timeouts.discovery_s if mature_s is None else _number(mature_s, "mature_s", 0,
                                                                     3600)
    arp_share_s = _number(arp_share_s, "arp_share_s", 0.05, 3600)
    if garp_refresh_s != 0:
        garp_refresh_s = _number(garp_refresh_s, "garp_refresh_s", 0.05, 86400)
    if garp not in GARP_MODES:
        raise SpecError(f"failover: garp must be one of {', '.join(GARP_MODES)}, got {garp!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"failover: bad cluster name {name!r}")
    if len(servers) > 255:
        raise SpecError("failover: at most 255 servers")

    os.makedirs(net.log_dir, exist_ok=True)
    key_file = os.path.join(net.log_dir, f"{name}.key")
    write_key(key_file, key or new_key())
    subnet = devs[servers[0]][1].network
    peers = {str(i + 1): str(devs[s][1].ip) for i, s in enumerate(servers)}
    frames = {}
    if not membership_only:
        from testbed.failover.daemon import garp_frames

        frames = {s: garp_frames(vips, net[s].mac(devs[s][0])) for s in servers}
    configs = {}
    for i, s in enumerate(servers):
        base = os.path.join(net.log_dir, f"{s}.{name}")
        cfg = {"id": i + 1, "name": s, "port": port, "key_file": key_file, "peers": peers,
               "broadcast": str(subnet.broadcast_address) if broadcast else None,
               "timeouts": timeouts.as_dict(), "vips": vips, "dev": devs[s][0],
               "prefixlen": subnet.prefixlen, "status": base + ".status.json",
               "ready": base + ".ready", "balance_s": balance_s, "mature_s": mature_s,
               "garp": garp, "arp_share_s": arp_share_s, "garp_refresh_s": garp_refresh_s,
               "path": base + ".json",
               "garp_frames": frames.get(s)}
        with open(cfg["path"], "w") as f:
            json.dump(cfg, f, indent=1)
        configs[s] = cfg
    wk = Wackamole(net, servers, vips, devs, configs, membership_only)
    if start:
        wk.start(timeout=timeout)
    return wk
