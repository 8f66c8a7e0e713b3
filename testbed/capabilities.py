"""Kernel probe: what works here, found by creating it in a scratch namespace.

Nothing else in the package assumes a kernel feature: it asks probe().
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
from dataclasses import asdict, dataclass, field

from testbed.run import run

QDISCS = {  # kind -> tc arguments that make a valid root qdisc of that kind
    "htb": ["htb", "default", "1"], "tbf": ["tbf", "rate", "1mbit", "burst", "10k",
                                            "latency", "50ms"],
    "netem": ["netem", "delay", "1ms"], "pfifo": ["pfifo"], "bfifo": ["bfifo"],
    "sfq": ["sfq"], "drr": ["drr"], "qfq": ["qfq"], "prio": ["prio"], "hfsc": ["hfsc"],
    "fq": ["fq"], "fq_codel": ["fq_codel"], "red": ["red", "limit", "400000", "avpkt", "1000",
                                                    "bandwidth", "10mbit", "min", "30000",
                                                    "max", "90000", "burst", "55"],
    "cake": ["cake"], "ingress": [], "clsact": [],
}
LINKS = {  # kind -> `ip link add NAME ...` tail
    "veth": ["type", "veth", "peer", "name", "pb"], "bridge": ["type", "bridge"],
    "vlan": ["link", "pa", "type", "vlan", "id", "10"],
    "vxlan": ["type", "vxlan", "id", "42", "dstport", "4789", "local", "10.99.0.1", "dev", "pa"],
    "gre": ["type", "gre", "local", "10.99.0.1", "remote", "10.99.0.2"],
    "ipip": ["type", "ipip", "local", "10.99.0.1", "remote", "10.99.0.2"],
    "sit": ["type", "sit", "local", "10.99.0.1", "remote", "10.99.0.2"],
    "geneve": ["type", "geneve", "id", "42", "remote", "10.99.0.2"],
    "macvlan": ["link", "pa", "type", "macvlan"], "ifb": ["type", "ifb"],
    "dummy": ["type", "dummy"], "bond": ["type", "bond"], "vrf": ["type", "vrf", "table", "10"],
    "wireguard": ["type", "wireguard"],
}
TOOLS = ("ip", "tc", "iptables", "nsenter", "iperf3", "ping", "tcpdump", "mn", "keepalived",
         "qemu-system-x86_64")
TCP_REPAIR = 19


@dataclass
class Capabilities:
    kernel: str
    qdiscs: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    bridge_vlan_filtering: bool = False
    tun: bool = False
    nfqueue: bool = False
    br_netfilter: bool = False
    tcp_repair: bool = False
    tools: dict = field(default_factory=dict)

    @property
    def delay_backend(self) -> str:
        """How delay/jitter/loss is emulated: 'netem', or the NFQUEUE 'delayline' fallback."""
        if self.qdiscs.get("netem"):
            return "netem"
        if self.nfqueue and self.br_netfilter:
            return "delayline"
        return "none"

    @property
    def delay_backends(self) -> list:
        """Every delay/loss backend this kernel offers (experiments compare them)."""
        out = ["netem"] if self.qdiscs.get("netem") else []
        if self.nfqueue and self.br_netfilter:
            out.append("delayline")
        return out

    @property
    def vlan_backend(self) -> str:
        """How switches separate VLANs: real '802.1q' (vlan_filtering bridges), or
        'bridges' (one bridge per VLAN, trunks over VXLAN; see testbed.kernel.vlan)."""
        return "802.1q" if self.bridge_vlan_filtering else "bridges"

    def to_json(self) -> str:
        d = asdict(self)
        d["delay_backend"] = self.delay_backend
        d["vlan_backend"] = self.vlan_backend
        return json.dumps(d, indent=2, sort_keys=True)


def _probe_in(ns: str) -> Capabilities:
    caps = Capabilities(kernel=platform.release())
    ip = ["ip", "-n", ns]
    run(ip + ["link", "add", "pa", "type", "veth", "peer", "name", "pb"])
    run(ip + ["addr", "add", "10.99.0.1/24", "dev", "pa"])
    run(ip + ["link", "set", "pa", "up"])
    run(ip + ["link", "set", "pb", "up"])
    caps.links["veth"] = True
    for kind, args in QDISCS.items():
        ok = run(["tc", "-n", ns, "qdisc", "add", "dev", "pb", "root" if kind not in
                  ("ingress", "clsact") else kind] + ([] if kind in ("ingress", "clsact")
                                                      else ["handle", "1:"]) + args,
                 check=False).returncode == 0
        caps.qdiscs[kind] = ok
        if ok:
            run(["tc", "-n", ns, "qdisc", "del", "dev", "pb",
                 kind if kind in ("ingress", "clsact") else "root"], check=False)
    for kind, args in LINKS.items():
        if kind == "veth":
            continue
        name = f"t{kind[:6]}"
        ok = run(ip + ["link", "add", name] + args, check=False).returncode == 0
        caps.links[kind] = ok
        if ok:
            run(ip + ["link", "del", name], check=False)
    if caps.links.get("bridge"):
        ok = run(ip + ["link", "add", "tbr0", "type", "bridge", "vlan_filtering", "1"],
                 check=False).returncode == 0
        if ok:
            out = run(ip + ["-d", "link", "show", "tbr0"], check=False).stdout
            caps.bridge_vlan_filtering = "vlan_filtering 1" in out
            run(ip + ["link", "del", "tbr0"], check=False)
    caps.tun = run(ip + ["tuntap", "add", "dev", "ttun0", "mode", "tun"],
                   check=False).returncode == 0
    if caps.tun:
        run(ip + ["tuntap", "del", "dev", "ttun0", "mode", "tun"], check=False)
    if shutil.which("iptables"):
        rule = ["-A", "FORWARD", "-m", "physdev", "--physdev-in", "pa", "-j", "NFQUEUE",
                "--queue-num", "7"]
        caps.nfqueue = run(["iptables", "-w"] + rule, netns=ns, check=False).returncode == 0
    caps.br_netfilter = os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables") or \
        run(["sh", "-c", "test -e /proc/sys/net/bridge/bridge-nf-call-iptables"], netns=ns,
            check=False).returncode == 0
    caps.tcp_repair = _tcp_repair_works()
    for t in TOOLS:
        caps.tools[t] = shutil.which(t)
    return caps


def _tcp_repair_works() -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
        return True
    except OSError:
        return False


_cache: dict = {}


def probe(refresh: bool = False) -> Capabilities:
    """Probe once per process (the kernel does not change under us)."""
    if "caps" in _cache and not refresh:
        return _cache["caps"]
    ns = f"tb-probe-{os.getpid()}"
    run(["ip", "netns", "add", ns])
    try:
        caps = _probe_in(ns)
    finally:
        run(["ip", "netns", "del", ns], check=False)
    _cache["caps"] = caps
    return caps


def report(caps: Capabilities) -> str:
    """A human-readable table for `testbed doctor`."""
    def yn(b):
        return "yes" if b else "no"

    lines = [f"kernel {caps.kernel}", ""]
    lines.append("qdiscs:      " + "  ".join(f"{k}:{yn(v)}" for k, v in caps.qdiscs.items()))
    lines.append("link kinds:  " + "  ".join(f"{k}:{yn(v)}" for k, v in caps.links.items()))
    lines.append(f"tun/tap: {yn(caps.tun)}   bridge vlan_filtering: "
                 f"{yn(caps.bridge_vlan_filtering)}   NFQUEUE: {yn(caps.nfqueue)}   "
                 f"br_netfilter: {yn(caps.br_netfilter)}   TCP_REPAIR: {yn(caps.tcp_repair)}")
    lines.append("tools:       " + "  ".join(f"{k}:{'yes' if v else 'no'}"
                                             for k, v in caps.tools.items()))
    lines.append("")
    backend = caps.delay_backend
    lines.append(f"delay/loss backend: {backend}" + {
        "netem": " (kernel netem qdisc)",
        "delayline": " (netem missing: NFQUEUE delay line in a wire namespace)",
        "none": " (NO WAY to emulate delay or loss on this kernel)"}[backend])
    lines.append("rate backend: " + ("htb" if caps.qdiscs.get("htb") else "none (htb missing)"))
    lines.append("vlan backend: " + ("802.1q (vlan_filtering bridges)" if caps.vlan_backend ==
                                     "802.1q" else "bridges (802.1Q missing: one bridge per "
                                     "VLAN, trunks over VXLAN)"))
    return "\n".join(lines)
