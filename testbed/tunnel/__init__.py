"""Point-to-point tunnels between two nodes of a running Network, made and removed at runtime.

    from testbed.tunnel import add_tunnel
    t = add_tunnel(net, "pe_a", "pe_b", kind="vxlan")     # or gre, ipip, udp, auto
    net["pe_a"].run(["ping", "-c1", t.ip("pe_b")])          # the inner addresses
    t.stats(); t.remove()

Kinds: `vxlan`, `gre`, `ipip` are kernel devices (testbed.kernel.tunnel), available where
the kernel has them (testbed.capabilities.probe().links; `testbed doctor`); `udp` is the
user-space IP-in-UDP tunnel over TUN (testbed.tunnel.daemon, one daemon per end, started
with Node.start so that teardown stops it), which works wherever /dev/net/tun does. `auto`
takes the one with the least overhead this kernel has: ipip, gre, vxlan, then udp.

The inner MTU is the underlay's MTU (of the interfaces toward the peer, the smaller of the
two ends) minus the encapsulation overhead, so a full-size inner packet crosses without
fragmentation: vxlan 50, gre 24 (28 with a key), ipip 20, udp 28 bytes.

Everything is checked before anything is created (unknown node, a kind this kernel lacks,
an inner address that clashes, no route between the underlay addresses...), and a failure
half-way removes what was made. The network owns each tunnel (`net.own`): its teardown
removes any left, newest first, before it stops the nodes' processes and deletes the
namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Optional

from testbed.errors import CapabilityError, SpecError, TestbedError
from testbed.kernel import tunnel as ktunnel

KINDS = ("vxlan", "gre", "ipip", "udp")
AUTO_ORDER = ("ipip", "gre", "vxlan", "udp")  # least overhead first
#: Inner subnets are taken from here (one /30 per tunnel) unless given.
INNER_POOL = ipaddress.IPv4Network("172.30.0.0/16")
INNER_PREFIX = 30
UDP_OVERHEAD = 28  # outer IPv4 20 + UDP 8 (testbed.tunnel.daemon.OVERHEAD)
UDP_PORT = 4790
MAX_VNI = 2**24 - 1


def tunnels(net) -> list:
    """The tunnels of net that exist now (added and not removed, network running)."""
    if not net.running:
        return []
    return [t for t in net.owned(Tunnel) if not t.removed]


def overhead(kind: str, key: Optional[int] = None) -> int:
    return UDP_OVERHEAD if kind == "udp" else ktunnel.overhead(kind, key)


def availability(caps=None) -> dict:
    """kind -> None if this kernel has it, else the reason it does not."""
    if caps is None:
        from testbed import capabilities

        caps = capabilities.probe()
    out = {}
    for kind in KINDS:
        if kind == "udp":
            ok = bool(caps.tun)
            why = "no TUN devices (/dev/net/tun) on this kernel"
        else:
            ok = bool(caps.links.get(kind))
            why = f"this kernel has no {kind} link kind"
        out[kind] = None if ok else f"{why} (see `testbed doctor`)"
    return out


class Tunnel:
    """One point-to-point tunnel between nodes a and b; `remove()` deletes both ends."""

    def __init__(self, net, kind: str, a: str, b: str, name: str, underlay_a: str,
                 underlay_b: str, inner_a: ipaddress.IPv4Interface,
                 inner_b: ipaddress.IPv4Interface, mtu: int, vni: Optional[int],
                 key: Optional[int], port: Optional[int], offload: bool):
        self.net, self.kind, self.a, self.b, self.name = net, kind, a, b, name
        self.underlay = {a: underlay_a, b: underlay_b}
        self.inner = {a: inner_a, b: inner_b}
        self.mtu, self.vni, self.key, self.port, self.offload = mtu, vni, key, port, offload
        self.overhead = overhead(kind, key)
        self.procs: dict = {}  # node -> Process (udp)
        self.controls: dict = {}  # node -> control socket path (udp)
        self.created: list = []  # nodes whose end exists (kernel kinds)
        self.removed = False

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"mtu {self.mtu}"
        return (f"<tunnel {self.kind} {self.name} {self.a} {self.inner[self.a]} <-> "
                f"{self.b} {self.inner[self.b]} {state}>")

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def inner_a(self) -> ipaddress.IPv4Interface:
        return self.inner[self.a]

    @property
    def inner_b(self) -> ipaddress.IPv4Interface:
        return self.inner[self.b]

    def ip(self, node) -> str:
        """The inner address (no prefix length) of node's end."""
        return str(self.inner[_name(node)].ip)

    def peer_ip(self, node) -> str:
        """The inner address of the other end, as seen from node."""
        n = _name(node)
        return self.ip(self.b if n == self.a else self.a)

    def stats(self) -> dict:
        """node -> counters of its end: the device's rx/tx packets, bytes, errors, dropped;
        for udp also the daemon's (sent_packets, udp_rx_packets, dropped_foreign,
        dropped_malformed, send_drops, tun_write_errors, ...)."""
        if self.removed:
            raise TestbedError(f"tunnel {self.name} was removed")
        out = {}
        for node in (self.a, self.b):
            counts = ktunnel.counters(self.net[node].ns, self.name)
            if self.kind == "udp":
                from testbed.tunnel.daemon import control

                reply = control(self.controls[node], {"stats": True})
                if not reply.get("ok"):
                    raise TestbedError(f"tunnel {self.name} on {node}: {reply.get('error')}")
                counts.update({k: v for k, v in reply.items() if k != "ok"})
            out[node] = counts
        return out

    def remove(self) -> None:
        """Delete both ends (stop the daemons for udp). Safe to call twice; a no-op once the
        network is gone (its teardown took the tunnel with it)."""
        if self.removed:
            return
        self.removed = True
        if not self.net.running:
            return
        errors = []
        for node, proc in list(self.procs.items()):
            n = self.net[node]
            try:
                proc.stop()
            except Exception as e:  # keep removing; report at the end
                errors.append(f"{node}: {e}")
            if proc in n.procs:
                n.procs.remove(proc)
        # the TUN device goes when its daemon closes it; a kernel end is deleted here
        for node in (self.b, self.a):
            try:
                if ktunnel.delete(self.net[node].ns, self.name) and self.kind == "udp":
                    errors.append(f"{node}: {self.name} outlived its daemon (deleted)")
            except Exception as e:
                errors.append(f"{node}: {e}")
        if errors:
            raise TestbedError(f"removing tunnel {self.name}: " + "; ".join(errors))


def _name(node) -> str:
    return node if isinstance(node, str) else node.name


def _live_addresses(net, node: str) -> list:
    """IPv4Interfaces configured on node right now."""
    ipr = net[node].ipr()
    return [ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=2)]


def _route_mtu(net, node: str, dst: str, where: str) -> int:
    """The MTU of the interface node uses toward dst; raise if node has no route there."""
    ipr = net[node].ipr()
    try:
        route = ipr.route("get", dst=dst)[0]
    except Exception as e:
        raise TestbedError(f"{where}: {node} has no route to {dst} ({e})") from None
    oif = route.get_attr("RTA_OIF")
    if route["type"] != 1 or oif is None:  # unicast
        raise TestbedError(f"{where}: {node} cannot reach {dst} (route type {route['type']})")
    return int(ipr.get_links(oif)[0].get_attr("IFLA_MTU"))


def _parse_inner(value, where: str) -> ipaddress.IPv4Interface:
    text = str(value)
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise SpecError(f"{where}: not an IPv4 address/len: {text!r}") from None
    if "/" not in text:
        raise SpecError(f"{where}: give the prefix length too, e.g. {text}/30")
    if iface.network.prefixlen < 31 and iface.ip in (iface.network.network_address,
                                                     iface.network.broadcast_address):
        raise SpecError(f"{where}: {iface.ip} is the network or broadcast address of "
                        f"{iface.network}")
    return iface


def _int_in(value, lo: int, hi: int, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpecError(f"{where}: {what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def add_tunnel(net, a, b, kind: str = "auto", inner_a=None, inner_b=None,
               underlay_a: Optional[str] = None, underlay_b: Optional[str] = None,
               vni: Optional[int] = None, key: Optional[int] = None,
               port: Optional[int] = None, mtu: Optional[int] = None, name: Optional[str] = None,
               offload: bool = True) -> Tunnel:
    """Make a tunnel between nodes a and b of the running network net.

    kind: vxlan | gre | ipip | udp | auto. inner_a/inner_b: 'x.x.x.x/len' in one subnet
    (default: the next free /30 of 172.30.0.0/16). underlay_a/underlay_b: addresses of a and
    b to tunnel between (default: a's address toward b and b's toward a). vni (vxlan; default
    a fresh one), key (gre, optional), port (UDP port: vxlan 4789, udp 4790 + n), mtu (default
    and maximum: underlay MTU minus the overhead), name (device name on both ends), offload
    (udp: TSO through the tunnel, both ends). Raises SpecError/CapabilityError/TestbedError
    before creating anything; removes what it made if a later step fails."""
    a, b = _name(a), _name(b)
    if not net.running:
        raise TestbedError("the network is not running (use add_tunnel inside `with Network`)")
    where = f"tunnel {a}-{b}"
    na, nb = net[a], net[b]  # SpecError("unknown node 'x'")
    if a == b:
        raise SpecError(f"{where}: a tunnel joins two different nodes")
    for n in (na, nb):
        if n.kind == "switch":
            raise SpecError(f"{where}: {n.name} is a switch (no IP address to tunnel from)")
    if kind not in KINDS + ("auto",):
        raise SpecError(f"{where}: kind must be one of {', '.join(KINDS)} or auto, got {kind!r}")
    avail = availability(getattr(net, "caps", None))
    if kind == "auto":
        have = [k for k in AUTO_ORDER if avail[k] is None]
        if not have:
            raise CapabilityError(f"{where}: this kernel has no tunnel kind at all "
                                  f"(see `testbed doctor`)")
        kind = have[0]
    elif avail[kind] is not None:
        others = [k for k in KINDS if avail[k] is None]
        raise CapabilityError(f"{where}: {avail[kind]}; available here: "
                              f"{', '.join(others) or 'none'}")
    if vni is not None and kind != "vxlan":
        raise SpecError(f"{where}: vni= is for vxlan tunnels, not {kind}")
    if key is not None and kind != "gre":
        raise SpecError(f"{where}: key= is for gre tunnels, not {kind}")
    if port is not None and kind not in ("vxlan", "udp"):
        raise SpecError(f"{where}: port= is for vxlan and udp tunnels, not {kind}")
    if key is not None:
        key = _int_in(key, 0, 2**32 - 1, "key", where)
    if port is not None:
        port = _int_in(port, 1, 65535, "port", where)

    live = tunnels(net)
    on_ends = [t for t in live if {t.a, t.b} & {a, b}]

    # underlay addresses: must be the nodes' own, and each end must reach the other
    addrs = {a: _live_addresses(net, a), b: _live_addresses(net, b)}
    under = {}
    for node, given, other in ((a, underlay_a, b), (b, underlay_b, a)):
        if given is None:
            given = net[node].ip_toward(net[other])
        try:
            ip = ipaddress.IPv4Address(str(given))
        except ValueError:
            raise SpecError(f"{where}: underlay address of {node} is not IPv4: {given!r}") \
                from None
        if ip not in [i.ip for i in addrs[node]]:
            raise SpecError(f"{where}: {ip} is not an address of {node}")
        under[node] = str(ip)
    mtu_under = min(_route_mtu(net, a, under[b], where), _route_mtu(net, b, under[a], where))
    max_mtu = mtu_under - overhead(kind, key)
    if mtu is None:
        mtu = max_mtu
    else:
        try:
            mtu = _int_in(mtu, 68, max_mtu, "mtu", where)
        except SpecError as e:
            raise SpecError(f"{e} (the underlay MTU {mtu_under} minus {overhead(kind, key)} "
                            f"bytes of {kind} header)") from None

    # inner addresses: one subnet, clashing with nothing of the network or its tunnels
    taken = {}  # network -> what holds it
    for t in live:
        taken.setdefault(t.inner_a.network, f"tunnel {t.name} ({t.a}-{t.b})")
    for (node, ifname), iface in net.plan.addressing.addresses.items():
        taken.setdefault(iface.network, f"{node} {ifname}")
    for node in (a, b):
        for iface in addrs[node]:
            if not iface.ip.is_loopback:
                taken.setdefault(iface.network, f"{node} {iface}")
    if (inner_a is None) != (inner_b is None):
        raise SpecError(f"{where}: give both inner_a and inner_b, or neither")
    if inner_a is None:
        inner_a, inner_b = _free_inner(taken, where)
    else:
        inner_a = _parse_inner(inner_a, f"{where}: inner_a")
        inner_b = _parse_inner(inner_b, f"{where}: inner_b")
        if inner_a.network != inner_b.network:
            raise SpecError(f"{where}: inner addresses {inner_a} and {inner_b} are not in one "
                            f"subnet")
        if inner_a.ip == inner_b.ip:
            raise SpecError(f"{where}: both ends have inner address {inner_a.ip}")
        for netw, holder in taken.items():
            if inner_a.network.overlaps(netw):
                raise SpecError(f"{where}: inner subnet {inner_a.network} overlaps {netw} "
                                f"({holder})")

    # identifiers: device name, VNI, ports
    if name is None:  # the first free t<kind><n> on both ends
        n = len(net.owned(Tunnel))  # every tunnel added, removed ones too
        while any(ktunnel.exists(net[x].ns, f"t{kind}{n}") for x in (a, b)):
            n += 1
        name = f"t{kind}{n}"
    if not isinstance(name, str) or not 1 <= len(name) <= 15 or "/" in name or \
            any(c.isspace() for c in name):
        raise SpecError(f"{where}: device name must be 1..15 characters without '/' or "
                        f"spaces, got {name!r}")
    for node in (a, b):
        if ktunnel.exists(net[node].ns, name):
            raise SpecError(f"{where}: {node} already has an interface {name}")
    if kind == "vxlan":
        port = port or ktunnel.VXLAN_PORT
        used = {t.vni for t in on_ends if t.kind == "vxlan" and t.port == port}
        if vni is None:
            vni = next(v for v in range(1, MAX_VNI) if v not in used)
        vni = _int_in(vni, 1, MAX_VNI, "vni", where)
        if vni in used:
            raise SpecError(f"{where}: VNI {vni} on port {port} is already used by a tunnel "
                            f"of {a} or {b}")
    elif kind == "udp":
        used = {t.port for t in on_ends if t.kind == "udp"}
        if port is None:
            port = next(p for p in range(UDP_PORT, 65536) if p not in used)
        if port in used:
            raise SpecError(f"{where}: UDP port {port} is already used by a tunnel of {a} "
                            f"or {b}")

    t = Tunnel(net, kind, a, b, name, under[a], under[b], inner_a, inner_b, mtu, vni, key,
               port, bool(offload) if kind == "udp" else False)
    try:
        if kind == "udp":
            _start_daemons(t)
        else:
            for node, other in ((a, b), (b, a)):
                ktunnel.create(net[node].ns, name, kind, under[node], under[other],
                               t.inner[node], mtu, vni=vni, key=key, port=port)
                t.created.append(node)
    except BaseException:
        try:
            t.remove()
        except TestbedError:
            pass  # the first error is the one to report
        raise
    # owned until teardown even once removed (remove() again is a no-op), so that the
    # count of tunnels ever added, which names the next one, stays as it was
    return net.own(t, stop=t.remove)


def _free_inner(taken: dict, where: str) -> tuple:
    for sub in INNER_POOL.subnets(new_prefix=INNER_PREFIX):
        if not any(sub.overlaps(n) for n in taken):
            hosts = list(sub.hosts())
            return (ipaddress.IPv4Interface(f"{hosts[0]}/{INNER_PREFIX}"),
                    ipaddress.IPv4Interface(f"{hosts[1]}/{INNER_PREFIX}"))
    raise SpecError(f"{where}: no free /{INNER_PREFIX} left in {INNER_POOL} for inner "
                    f"addresses; give inner_a and inner_b")


def daemon_argv(t: Tunnel, node: str, control: str, ready: str) -> list:
    other = t.b if node == t.a else t.a
    return [sys.executable, "-m", "testbed.tunnel", "--dev", t.name,
            "--local", t.underlay[node], "--remote", t.underlay[other],
            "--port", str(t.port), "--inner", str(t.inner[node]), "--mtu", str(t.mtu),
            "--offload" if t.offload else "--no-offload",
            "--control", control, "--ready-file", ready]


def _start_daemons(t: Tunnel) -> None:
    """Start both daemons, then wait for both (they start in parallel)."""
    from testbed.process import file_exists

    net = t.net
    waits = []
    for node in (t.a, t.b):
        base = os.path.join(net.log_dir, f"{node}.{t.name}")
        control, ready = base + ".sock", base + ".ready"
        for stale in (control, ready):
            if os.path.exists(stale):
                os.unlink(stale)
        proc = net[node].start(daemon_argv(t, node, control, ready), name=f"tunnel-{t.name}")
        t.procs[node] = proc
        t.controls[node] = control
        waits.append((proc, ready))
    for proc, ready in waits:
        proc.wait_ready(file_exists(ready), timeout=10)


def remove_all(net) -> None:
    """Remove every tunnel of net (newest first)."""
    errors = []
    for t in reversed(tunnels(net)):
        try:
            t.remove()
        except TestbedError as e:
            errors.append(str(e))
    if errors:
        raise TestbedError("; ".join(errors))


__all__ = ["Tunnel", "add_tunnel", "tunnels", "remove_all", "availability", "KINDS"]
