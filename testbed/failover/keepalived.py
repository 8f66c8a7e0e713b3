"""keepalived (VRRP, Debian's package) as the reference for VIP failover.

    from testbed.failover import keepalived
    ka = keepalived.start(net, ["s1", "s2", "s3"], vips, advert_int=0.1)
    ka.wait_ready()                 # every VIP held once, by its highest-priority server
                                    # (preempt=False: by whichever server took it first)
    ka.owner(vips[0])               # -> "s1"
    ka.stop()

One keepalived per server, started inside the server's namespace as a supervised process
(Node.start: its own log, stopped at teardown) with its own configuration and pid files in
`<net.log_dir>/<server>.keepalived/`; the root namespace, /etc/keepalived and the Debian
service are never used. VRRPv3 (sub-second advert_int); one VRRP instance per VIP by
default, VIP i's priorities rotating so that server i (mod N) is its master and the next
servers its backups in order (group=True: one instance holding every VIP, s1 master).
Multicast adverts work across the emulated switch; unicast=True sends them to the other
servers' addresses instead. A backup takes over after VRRP's master-down interval,
3 x advert_int + (256 - priority) / 256 x advert_int, and sends gratuitous ARPs.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from testbed.errors import CapabilityError, SpecError, TestbedError
from testbed.failover import VipHolders
from testbed.poll import WaitTimeout, wait_until


def binary() -> Optional[str]:
    return shutil.which("keepalived") or next(
        (p for p in ("/usr/sbin/keepalived", "/sbin/keepalived") if os.access(p, os.X_OK)), None)


def available() -> bool:
    return binary() is not None


def require() -> str:
    b = binary()
    if b is None:
        raise CapabilityError("keepalived is not installed (run `make setup`, or "
                              "apt-get install keepalived)")
    return b


@dataclass(frozen=True)
class Options:
    """VRRP settings, validated at construction."""

    advert_int: float = 1.0
    unicast: bool = False
    group: bool = False
    vrid_base: int = 51
    preempt: bool = True

    def __post_init__(self):
        a = self.advert_int
        if (isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a)
                or not 0.01 <= a <= 40.95):
            raise SpecError(f"keepalived: advert_int must be 0.01-40.95 s, got {a!r}")
        if abs(round(a * 100) - a * 100) > 1e-6:
            raise SpecError(f"keepalived: advert_int is in centiseconds (VRRPv3), got {a!r}")
        v = self.vrid_base
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 255:
            raise SpecError(f"keepalived: vrid_base must be 1-255, got {v!r}")

    def master_down_s(self, priority: int) -> float:
        """VRRPv3's master-down interval for a backup of this priority."""
        return 3 * self.advert_int + (256 - priority) / 256 * self.advert_int


@dataclass(frozen=True)
class Instance:
    name: str
    vrid: int
    vips: tuple
    priorities: dict  # server -> priority

    @property
    def master(self) -> str:
        return max(self.priorities, key=self.priorities.get)


def instances(servers: list, vips: list, opts: Options) -> list:
    """The VRRP instances: one per VIP (or one for all), priorities 200, 190, ... in the
    order in which the servers take over."""
    n = len(servers)
    step = max(1, min(10, 190 // n))
    groups = [tuple(vips)] if opts.group else [(v,) for v in vips]
    if opts.vrid_base + len(groups) - 1 > 255:
        raise SpecError(f"keepalived: {len(groups)} VRRP instances from vrid {opts.vrid_base} "
                        f"exceed 255")
    out = []
    for i, g in enumerate(groups):
        prio = {s: 200 - step * ((j - i) % n) for j, s in enumerate(servers)}
        out.append(Instance(f"vip{i}", opts.vrid_base + i, g, prio))
    return out


def config(server: str, ifname: str, own_ip: str, peer_ips: list, prefixlen: int,
           insts: list, opts: Options) -> str:
    """keepalived.conf for one server."""
    lines = ["global_defs {", f"    router_id {server}", "    vrrp_version 3", "}", ""]
    adv = f"{opts.advert_int:g}"
    for inst in insts:
        lines += [f"vrrp_instance {inst.name} {{", "    state BACKUP", f"    interface {ifname}",
                  f"    virtual_router_id {inst.vrid}", f"    priority {inst.priorities[server]}",
                  f"    advert_int {adv}"]
        if not opts.preempt:
            lines.append("    nopreempt")
        if opts.unicast:
            lines += [f"    unicast_src_ip {own_ip}", "    unicast_peer {"]
            lines += [f"        {ip}" for ip in peer_ips]
            lines.append("    }")
        lines.append("    virtual_ipaddress {")
        lines += [f"        {v}/{prefixlen} dev {ifname}" for v in inst.vips]
        lines += ["    }", "}", ""]
    return "\n".join(lines)


class Keepalived(VipHolders):
    """The keepalived daemons of one cluster on a running Network."""

    def __init__(self, net, servers: list, vips: list, devs: dict, opts: Options,
                 insts: list, dirs: dict):
        self.net, self.servers, self.vips = net, list(servers), list(vips)
        self.devs = {s: devs[s][0] for s in servers}
        self.opts, self.instances, self.dirs = opts, insts, dirs
        self.procs: dict = {}

    def __repr__(self) -> str:
        return (f"<keepalived {len(self.servers)} servers, {len(self.instances)} VRRP "
                f"instances, advert {self.opts.advert_int:g} s>")

    def argv(self, server: str) -> list:
        d = self.dirs[server]
        return [require(), "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                "--no-syslog", "--dont-respawn", "-f", os.path.join(d, "keepalived.conf"),
                "-p", os.path.join(d, "keepalived.pid"), "-r", os.path.join(d, "vrrp.pid"),
                "-c", os.path.join(d, "checkers.pid"), "-b", os.path.join(d, "bfd.pid")]

    def start(self, *servers: str) -> None:
        from testbed.process import log_matches

        names = list(servers) or self.servers
        for s in names:
            p = self.net[s].start(self.argv(s), name="keepalived")
            self.procs[s] = p
        for s in names:
            p = self.procs[s]
            p.wait_ready(log_matches(lambda p=p: p, r"Entering (BACKUP|MASTER) STATE"), 15)

    def stop(self, *servers: str) -> None:
        """Stop keepalived (it removes its VIPs); all servers by default."""
        for s in list(servers) or self.servers:
            p = self.procs.get(s)
            if p is not None and p.alive:
                p.stop(grace=5)

    def alive(self, server: str) -> bool:
        p = self.procs.get(server)
        return p is not None and p.alive

    def expected_owner(self, vip: str, up: Optional[list] = None) -> str:
        """The highest-priority server (among up, default all) of vip's instance."""
        up = self.servers if up is None else up
        inst = next(i for i in self.instances if vip in i.vips)
        return max(up, key=lambda s: inst.priorities[s])

    def wait_ready(self, timeout: float = 20.0, up: Optional[list] = None,
                   any_owner: bool = False) -> float:
        """Wait until every VIP is held by exactly its highest-priority server (of up; with
        any_owner, by exactly one server: after a failover without preemption); returns
        the seconds it took."""
        import time

        t0 = time.monotonic()
        bad: dict = {}

        def settled() -> bool:
            nonlocal bad
            h = self.holders()
            bad = {v: hs for v, hs in h.items()
                   if (len(hs) != 1 if any_owner else hs != [self.expected_owner(v, up)])}
            return not bad

        def died() -> Optional[str]:
            for s in self.servers:
                p = self.procs.get(s)
                if p is not None and not p.alive:
                    return (f"keepalived on {s} exited with {p.returncode}: "
                            f"{p.log(tail=3).strip()}")
            return None

        try:
            wait_until(settled, timeout, "keepalived: VIPs settled", interval=0.02, abort=died)
        except WaitTimeout:
            raise TestbedError(f"keepalived: VIPs not settled after {timeout:g} s: {bad}") \
                from None
        return time.monotonic() - t0

def start(net, servers, vips, advert_int: float = 1.0, unicast: bool = False,
          group: bool = False, vrid_base: int = 51, preempt: bool = True,
          wait: bool = True, timeout: float = 20.0) -> Keepalived:
    """Configure and start keepalived on each server for vips (checked like
    start_wackamole's: one-line SpecError before anything is written or started)."""
    from testbed.failover import check_servers, check_vips

    servers = check_servers(net, servers)
    vips, devs = check_vips(net, servers, vips)
    opts = Options(advert_int, bool(unicast), bool(group), vrid_base, bool(preempt))
    insts = instances(servers, vips, opts)
    require()
    prefixlen = devs[servers[0]][1].network.prefixlen
    dirs = {}
    for s in servers:
        d = os.path.join(net.log_dir, f"{s}.keepalived")
        os.makedirs(d, exist_ok=True)
        own = str(devs[s][1].ip)
        peers = [str(devs[o][1].ip) for o in servers if o != s]
        with open(os.path.join(d, "keepalived.conf"), "w") as f:
            f.write(config(s, devs[s][0], own, peers, prefixlen, insts, opts))
        dirs[s] = d
    ka = Keepalived(net, servers, vips, devs, opts, insts, dirs)
    ka.start()
    if wait:  # without preemption, whoever became master first stays master
        ka.wait_ready(timeout, any_owner=not opts.preempt)
    return ka
