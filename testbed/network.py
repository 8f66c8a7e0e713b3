"""Network: deploy a topology as real namespaces, links and processes; tear it all down.

Order of deployment: ledger -> namespaces -> veths and bridges -> interface config,
addresses, sysctls -> shaping -> delay-line wires -> routes. Teardown stops what the
network owns (`net.own(thing)`: what systems attach, newest first), then every process
(TERM, wait, KILL, reap), and deletes the run's namespaces, which takes their interfaces
and netfilter rules with them. Nothing is created in the root namespace except the
namespaces' names themselves (/run/netns/tb-<run>-*), and the ledger that `testbed cleanup`
reads if a run is SIGKILLed.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Optional, Sequence, Union

from testbed import capabilities, garp, ledger
from testbed.cleanup import kill_in
from testbed.errors import CapabilityError, CommandError, SpecError, TestbedError
from testbed.garp import MAC_RE
from testbed.kernel import bridge as kbridge
from testbed.kernel import delayline as kwire
from testbed.kernel import link as klink
from testbed.kernel import neigh as kneigh
from testbed.kernel import netns as kns
from testbed.kernel import qdisc as kqdisc
from testbed.kernel import route as kroute
from testbed.kernel import vlan as kvlan
from testbed.ledger import PREFIX
from testbed.poll import WaitTimeout, scaled, wait_until
from testbed.process import Process, file_exists
from testbed.run import batch, run
from testbed.queueing import Queue
from testbed.spec import LinkSpec, check_vlan
from testbed.topology import Plan, Topology

LOG_ROOT = os.environ.get("TESTBED_LOG_DIR", "/tmp/testbed-runs")
# Set in every node so results do not depend on what the root namespace happens to have
# (new namespaces copy root's values): TCP autotuning up to 32 MB, which one flow needs at
# 1 Gbit/s x 40 ms. A node's own sysctls (add_host(..., sysctls=)) override these.
# The default congestion control cannot be set here: outside the root namespace the kernel
# only allows those in root's tcp_allowed_congestion_control. It is recorded in env.json;
# pick one per flow with measure.iperf3(..., congestion="cubic").
NODE_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
                "net.ipv4.tcp_rmem": "4096 131072 33554432",
                "net.ipv4.tcp_wmem": "4096 16384 33554432"}
BACKENDS = ("auto", "netem", "delayline")
VLAN_BACKENDS = ("auto",) + kvlan.BACKENDS


class Node:
    """One namespaced host, router or switch."""

    def __init__(self, net: "Network", name: str, kind: str, ns: str):
        self.net, self.name, self.kind, self.ns = net, name, kind, ns
        self.procs: list = []
        self._count = 0
        self._sysctl_saved: dict = {}  # key -> its value before the first set_sysctl()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} ns={self.ns}>"

    @property
    def addresses(self) -> dict:
        """ifname -> IPv4Interface, as planned."""
        return {i: a for (n, i), a in self.net.plan.addressing.addresses.items() if n == self.name}

    @property
    def ip(self) -> str:
        """The address of the node's first interface (no prefix length)."""
        addrs = self.addresses
        if not addrs:
            raise TestbedError(f"{self.name} has no address")
        return str(next(iter(addrs.values())).ip)

    @property
    def intfs(self) -> list:
        return self.net.plan.interfaces(self.name)

    def ip_toward(self, other: "Node") -> str:
        """The address of this node on a segment it shares with other, else its first one."""
        mine = self.addresses
        for a in mine.values():
            for b in other.addresses.values():
                if a.network == b.network:
                    return str(a.ip)
        return self.ip

    def run(self, argv: Sequence[str], timeout: Optional[float] = 60, check: bool = True,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run argv inside the node and wait for it; raise CommandError on failure."""
        return run(argv, netns=self.ns, timeout=timeout, check=check, input=input)

    def start(self, argv: Sequence[str], name: Optional[str] = None, ready=None,
              ready_timeout: float = 10.0, env: Optional[dict] = None) -> Process:
        """Start argv inside the node with its own log file; supervised until teardown.

        ready: a callable probe (see testbed.process), polled until true.
        """
        self._count += 1
        label = name or f"{os.path.basename(str(argv[0]))}{self._count}"
        log_path = os.path.join(self.net.log_dir, f"{self.name}.{label}.log")
        if env is not None:
            env = {**os.environ, **env}
        proc = Process(argv, self.ns, log_path, f"{self.name}:{label}", env=env)
        self.procs.append(proc)
        self.net._record_pid(proc.pid)
        if ready is not None:
            proc.wait_ready(ready, ready_timeout)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    # routing and sysctls ----------------------------------------------------------------
    def ipr(self):
        """The node's pyroute2 IPRoute (a netlink socket inside its namespace), shared and
        closed by the network at teardown: do not close it."""
        return self.net._ipr(self.ns)

    def ifindex(self, ifname: str) -> int:
        """Kernel index of one of this node's interfaces (SpecError if it has no such one)."""
        idx = klink.indexes(self.ipr()).get(ifname)
        if idx is None:
            raise SpecError(f"{self.name} has no interface {ifname!r}")
        return idx

    def _check_ip(self, ip: str, what: str = "address") -> str:

        try:
            if ipaddress.ip_address(ip).version == 4:
                return str(ip)
        except ValueError:
            pass
        raise SpecError(f"{self.name}: bad IPv4 {what} {ip!r}")

    def mac(self, ifname: str) -> str:
        """The MAC address of one of this node's interfaces."""
        idx = self.ifindex(ifname)
        return self.ipr().get_links(idx)[0].get_attr("IFLA_ADDRESS")

    def add_route(self, dst: str, via: Optional[str] = None, dev: Optional[str] = None) -> None:
        """Add or replace the route to dst ('a.b.c.d/len' or 'default') via a next hop, out
        of an interface (dev alone: an on-link route), or both. Recorded, so it survives a
        link flap. Checked first: a bad address or unknown interface changes nothing."""

        if dst != "default":
            try:
                dst = str(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                raise SpecError(f"{self.name}: bad route destination {dst!r}") from None
        if via is None and dev is None:
            raise SpecError(f"{self.name}: route {dst} needs a next hop (via) or a dev")
        if via is not None:
            self._check_ip(via, "next hop")
        if dev is not None:
            self.ifindex(dev)
        kroute.replace(self.ipr(), dst, via, dev)
        self.net._routes.setdefault(self.name, {})[dst] = (
            via if dev is None else kroute.Nexthop(via, dev))

    def replace_route(self, dst: str, via: Optional[str] = None,
                      dev: Optional[str] = None) -> None:
        """Replace the route to dst (add_route does exactly this: the name says the intent)."""
        self.add_route(dst, via, dev)

    def del_route(self, dst: str) -> None:
        kroute.delete(self.ipr(), dst)
        self.net._routes.get(self.name, {}).pop(dst, None)

    def routes(self, detail: bool = False) -> list:
        """[(dst, gateway)] of the main table; detail=True: dicts with dev, proto, metric."""
        return kroute.show(self.ipr(), detail)

    def recorded_routes(self) -> dict:
        """A copy of the routes the network puts back after a link flap: {dst: next hop}, the
        next hop an address or a testbed.kernel.route.Nexthop(via, dev). The topology's and
        those of add_route(), less those of del_route()."""
        return dict(self.net._routes.get(self.name, {}))

    def reinstall_routes(self, reachable_only: bool = False) -> None:
        """Install the recorded routes again (what a link coming up does). reachable_only:
        skip those whose next hop is behind a link that is down, rather than raise."""
        self.net._install_routes(self.name, reachable_only)

    def sysctl(self, key: str, value) -> str:
        """Set a sysctl in this node's namespace; returns the old value."""
        return kns.sysctl(self.ns, key, value)

    def _read_sysctls(self, keys) -> dict:
        """Current values; SpecError for a malformed key or one the namespace lacks."""

        for key in keys:
            if not re.fullmatch(r"[A-Za-z0-9_-]+([./][A-Za-z0-9_.-]+)*", str(key)) or ".." in key:
                raise SpecError(f"{self.name}: bad sysctl name {key!r}")
        values = kns.read_sysctls(self.ns, keys)
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise SpecError(f"{self.name}: no sysctl {missing[0]!r}")
        return values

    def set_sysctl(self, key: str, value) -> str:
        """Set a sysctl and remember the value it had before the first change, for
        restore_sysctls(); returns the value it had just before this call."""
        old = self._read_sysctls([key])[key]
        kns.sysctl(self.ns, key, value)
        self._sysctl_saved.setdefault(key, old)
        return old

    def restore_sysctls(self) -> dict:
        """Put back every sysctl set_sysctl() changed (the last changed first); returns
        {key: restored value}."""
        saved, self._sysctl_saved = self._sysctl_saved, {}
        kns.sysctls(self.ns, dict(reversed(list(saved.items()))))
        return saved

    def sysctls(self, settings: dict):
        """`with node.sysctls({"net.ipv4.ip_forward": 0}):` set for the block, then back to
        the values they had before it (also on an exception). Yields the old values."""

        old = self._read_sysctls(list(settings))  # every key checked before any is set

        @contextmanager
        def block():
            try:
                kns.sysctls(self.ns, settings)
                yield dict(old)
            finally:
                kns.sysctls(self.ns, {k: old[k] for k in reversed(list(settings))})

        return block()

    # neighbours, proxy ARP, gratuitous ARP -------------------------------------------------
    def proxy_arp(self, ifname: str, on: bool = True) -> None:
        """Answer ARP requests on ifname for addresses this node routes out of another
        interface (needs IP forwarding: a router), at once rather than after the kernel's
        random proxy_delay. Recorded like set_sysctl(): restore_sysctls() undoes it."""
        self.ifindex(ifname)
        keys = {f"net/ipv4/conf/{ifname}/proxy_arp": int(bool(on))}
        if on:
            keys[f"net/ipv4/neigh/{ifname}/proxy_delay"] = 0
        self._read_sysctls(list(keys))
        for key, value in keys.items():
            self.set_sysctl(key, value)

    def neigh_add(self, ip: str, mac: str, ifname: str, permanent: bool = True) -> None:
        """A static (permanent) neighbour entry ip -> mac on ifname, replacing any entry."""

        self._check_ip(ip)
        if not MAC_RE.match(str(mac).lower()):
            raise SpecError(f"{self.name}: bad MAC address {mac!r}")
        kneigh.add(self.ipr(), ip, str(mac).lower(), self.ifindex(ifname), permanent)

    def neigh_del(self, ip: str, ifname: str) -> bool:
        """Delete the entry for ip on ifname; False if there was none."""

        self._check_ip(ip)
        return kneigh.delete(self.ipr(), ip, self.ifindex(ifname))

    def neigh_flush(self, ifname: Optional[str] = None, permanent: bool = False) -> int:
        """Flush the dynamic neighbour entries of ifname (or of every interface); permanent
        ones too with permanent=True. Returns how many were removed."""

        idx = None if ifname is None else self.ifindex(ifname)
        return kneigh.flush(self.ipr(), idx, permanent)

    def neighbours(self, ifname: Optional[str] = None) -> list:
        """[{"ip", "mac", "dev", "state"}] of the ARP table (of ifname, or all)."""

        idx = None if ifname is None else self.ifindex(ifname)
        return kneigh.show(self.ipr(), idx)

    def garp(self, ip: str, ifname: str, count: int = 3, interval_s: float = 0.1,
             kind: str = "request", mac: Optional[str] = None) -> int:
        """Send gratuitous ARPs (scapy-built; kind request, reply or both) announcing ip at
        ifname's MAC (or mac) from inside this node; returns the frames sent."""

        self.ifindex(ifname)
        garp.check(ip, mac or "00:00:00:00:00:00", kind, count, interval_s)
        return garp.send(ifname, ip, mac, ns=self.ns, count=count, interval_s=interval_s,
                         kind=kind)


class Link:
    """One emulated link; `set()` changes it at runtime without rebuilding."""

    def __init__(self, net: "Network", spec: LinkSpec, wire_ns: Optional[str]):
        self.net, self.spec, self.wire = net, spec, wire_ns
        self.shaping = {"a_to_b": spec.a_to_b, "b_to_a": spec.b_to_a}
        self.layout = {"a_to_b": "none", "b_to_a": "none"}
        self.queues: dict = {"a_to_b": None, "b_to_a": None}  # testbed.queueing.Queue or None
        self.queue_impl: dict = {"a_to_b": None, "b_to_a": None}  # e.g. 'drr', 'htb-emulated'
        self.daemons: dict = {}
        self.is_up = True

    def __repr__(self) -> str:
        return f"<link {self.spec.a}-{self.spec.b} backend={self.backend}>"

    @property
    def backend(self) -> str:
        """Which emulator does delay/loss on this link: netem, delayline, or none."""
        if self.wire:
            return "delayline"
        if self.net.delay_backend == "netem" and any(s.needs_delay for s in self.shaping.values()):
            return "netem"
        return "none"

    def _egress(self, direction: str) -> tuple:
        """(namespace, device) where this direction is shaped."""
        if self.wire:
            return self.wire, kwire.EGRESS[direction]
        if direction == "a_to_b":
            return self.net[self.spec.a].ns, self.spec.intf_a
        return self.net[self.spec.b].ns, self.spec.intf_b

    def apply(self, direction: str) -> None:
        ns, dev = self._egress(direction)
        s = self.shaping[direction]
        lines, layout = kqdisc.lines(dev, s, netem=not self.wire, installed=self.layout[direction],
                                     queue=self.queues[direction],
                                     impl=self.queue_impl[direction])
        batch("tc", lines, netns=ns)
        self.layout[direction] = layout

    def set(self, direction: str = "both", up: Optional[bool] = None, **params) -> "Link":
        """Change rate_mbit, delay_ms, jitter_ms, loss_pct, queue_pkts (per direction or both),
        or take the link down/up (up=False cuts both ends; up=True restores them and their
        routes). Validated first: a bad value changes nothing."""
        dirs = {"both": ("a_to_b", "b_to_a"), "a_to_b": ("a_to_b",), "b_to_a": ("b_to_a",)}
        if direction not in dirs:
            raise SpecError(f"direction must be both, a_to_b or b_to_a, got {direction!r}")
        new = {d: self.shaping[d].replace(**params) for d in dirs[direction]} if params else {}
        for d, s in new.items():
            if self.queues[d] is not None:  # the queue stays: it must fit the new rate
                self.queues[d].check_rate(s.rate_mbit, f"link {self.spec.a}-{self.spec.b} {d}")
            if s.needs_delay and not self.wire and self.net.delay_backend != "netem":
                raise CapabilityError(
                    f"link {self.spec.a}-{self.spec.b} was built without a delay line; give it "
                    f"emulate=True (or a delay/loss) in the topology to change delay at runtime")
        for d, s in new.items():
            self.shaping[d] = s
            self.apply(d)
            if self.wire:
                kwire.set_params(self.daemons[d], s)
        if up is not None and up != self.is_up:
            self._set_up(up)
        return self

    def _set_up(self, up: bool) -> None:
        for node, ifname in ((self.spec.a, self.spec.intf_a), (self.spec.b, self.spec.intf_b)):
            klink.set_state(self.net[node].ipr(), ifname, up)
        self.is_up = up
        if up:  # admin-down flushed the routes through these interfaces: put them back
            for node in (self.spec.a, self.spec.b):
                self.net[node].reinstall_routes(reachable_only=True)

    def stats(self) -> dict:
        """Counters of the delay-line daemons (received, dropped_loss, released, held)."""
        return {d: kwire.stats(path) for d, path in self.daemons.items()}

    def set_queue(self, direction: str, queue, impl: str = "auto") -> "Link":
        """Put a queueing discipline (testbed.queueing.Queue; None: back to the plain FIFO
        leaf) on a direction ('a_to_b', 'b_to_a' or 'both'), where its rate is shaped. The
        kernel's own discipline is used where it has one, else HTB emulation (impl='auto';
        or name one: drr, qfq, prio, htb-emulated, ...); which one is in queue_impl.
        Validated first (a SpecError changes nothing): the direction needs a rate, an htb
        queue must fit within it. It survives later set() calls that change the rate."""

        dirs = {"both": ("a_to_b", "b_to_a"), "a_to_b": ("a_to_b",), "b_to_a": ("b_to_a",)}
        if direction not in dirs:
            raise SpecError(f"direction must be both, a_to_b or b_to_a, got {direction!r}")
        if queue is not None and not isinstance(queue, Queue):
            raise SpecError(f"queue must be a testbed.queueing.Queue or None, got {queue!r}")
        impls = {}
        for d in dirs[direction]:
            if queue is not None:
                queue.check_rate(self.shaping[d].rate_mbit, f"link {self.spec.a}-{self.spec.b} {d}")
                impls[d] = kqdisc.choose_impl(queue, self.net.caps.qdiscs, impl)
            else:
                impls[d] = None
        for d in dirs[direction]:
            old = (self.queues[d], self.queue_impl[d])
            self.queues[d], self.queue_impl[d] = queue, impls[d]
            try:
                self.apply(d)
            except CommandError:  # the kernel refused: rebuild what was there, then report
                self.queues[d], self.queue_impl[d] = old
                ns, dev = self._egress(d)
                run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                self.layout[d] = "none"
                self.apply(d)
                raise
        return self

    def queue_stats(self, direction: str):
        """Per-class counters of a direction's queue as a pandas DataFrame: class, classid,
        match, configured_share, bytes, packets, drops, backlog_bytes, backlog_pkts (one
        'fifo' row without a queue); attrs: kind, impl."""
        if direction not in ("a_to_b", "b_to_a"):
            raise SpecError(f"direction must be a_to_b or b_to_a, got {direction!r}")
        if self.layout[direction] == "none":
            raise SpecError(f"link {self.spec.a}-{self.spec.b} {direction} has no rate, queue "
                            f"or queue limit: no qdisc to report on")
        ns, dev = self._egress(direction)
        return kqdisc.queue_stats(ns, dev, self.queues[direction], self.queue_impl[direction],
                                  self.shaping[direction].rate_mbit)


class Network:
    """`with Network(topo) as net:` builds the topology; leaving the block tears it down."""

    def __init__(self, topo: Union[Topology, Plan], backend: str = "auto",
                 log_dir: Optional[str] = None, run_id: Optional[str] = None, seed=None,
                 vlan_backend: str = "auto"):
        if backend not in BACKENDS:
            raise SpecError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if vlan_backend not in VLAN_BACKENDS:
            raise SpecError(f"vlan_backend must be one of {', '.join(VLAN_BACKENDS)}, "
                            f"got {vlan_backend!r}")
        self.requested_vlan_backend = vlan_backend
        self.plan = topo.plan() if isinstance(topo, Topology) else topo
        self.requested_backend = backend
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.log_dir = log_dir or os.path.join(LOG_ROOT, self.run_id)
        self.seed = seed
        self.nodes: dict = {}
        self.links: dict = {}  # LinkSpec.ends ((a, intf_a), (b, intf_b)) -> Link
        self._owned: list = []  # [(thing, its stop callable)], in the order of own()
        self._iprs: dict = {}
        self._routes: dict = {}
        self._namespaces: list = []
        self._wire_procs: list = []
        self._started = False
        self._old_handlers: dict = {}
        self._pids: list = []
        self._lock = threading.Lock()
        self.caps = None
        self.delay_backend = "none"
        self.vlan_backend = "none"  # 802.1q or bridges, once a switch separates VLANs
        self.build_s = None

    # context manager -----------------------------------------------------------------------
    def __enter__(self) -> "Network":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __getitem__(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise SpecError(f"unknown node {name!r}") from None

    def link(self, a: str, b: str, intf: Optional[str] = None) -> Link:
        """The link between nodes a and b (in either order). Where several (parallel links)
        join them, intf names one of the interfaces of either end, e.g. intf="s1-priv"."""
        for n in (a, b):
            self[n]
        between = [ln for ln in self.links.values() if {ln.spec.a, ln.spec.b} == {a, b}]
        if not between:
            raise SpecError(f"no link between {a} and {b}")
        if intf is None:
            if len(between) > 1:
                names = ", ".join(f"{ln.spec.intf_a}/{ln.spec.intf_b}" for ln in between)
                raise SpecError(f"{len(between)} links between {a} and {b} ({names}): pick one "
                                f"with net.link({a!r}, {b!r}, intf=...)")
            return between[0]
        for ln in between:
            if intf in (ln.spec.intf_a, ln.spec.intf_b):
                return ln
        names = ", ".join(f"{ln.spec.intf_a}/{ln.spec.intf_b}" for ln in between)
        raise SpecError(f"no link between {a} and {b} on interface {intf!r} (they have "
                        f"{names})")

    def switch(self, name: str) -> "Switch":
        node = self[name]
        if not isinstance(node, Switch):
            raise SpecError(f"{name} is a {node.kind}, not a switch")
        return node

    # what systems attach ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from start() until teardown has run."""
        return self._started

    def own(self, thing, stop=None):
        """Make the network own thing: at teardown, before the nodes' processes and the
        wires are stopped, owned things are stopped, the last owned first (stop(), or
        thing.stop() without it), however the network ends (the end of the with block, an
        exception, SIGTERM/SIGHUP). A stop that raises is reported at the end of teardown,
        which goes on. Returns thing; owning it again changes nothing."""
        if stop is None:
            stop = getattr(thing, "stop", None)
        if not callable(stop):
            raise SpecError(f"own({thing!r}): it has no stop() method; pass stop=a callable")
        if not self._started:
            raise TestbedError(f"own({thing!r}): the network is not running")
        if not any(t is thing for t, _ in self._owned):
            self._owned.append((thing, stop))
        return thing

    def owned(self, cls=None) -> list:
        """What the network owns (instances of cls only, if given), in the order of own()."""
        return [t for t, _ in self._owned if cls is None or isinstance(t, cls)]

    def disown(self, thing) -> bool:
        """Stop owning thing (it will not be stopped at teardown); False if it was not owned."""
        for i, (t, _) in enumerate(self._owned):
            if t is thing:
                del self._owned[i]
                return True
        return False

    def ns_name(self, node: str) -> str:
        return f"{self.prefix}{node}"

    @property
    def backends(self) -> dict:
        """What emulated what, for env.json."""
        return {"delay": self.delay_backend, "rate": "htb", "vlan": self.vlan_backend,
                "links": {self._link_label(ln.spec): ln.backend for ln in self.links.values()}}

    def _link_label(self, spec: LinkSpec) -> str:
        """'a-b', or 'a:intf_a-b:intf_b' for one of several parallel links."""
        if len(self.plan.links_between(spec.a, spec.b)) > 1:
            return f"{spec.a}:{spec.intf_a}-{spec.b}:{spec.intf_b}"
        return f"{spec.a}-{spec.b}"

    # preflight ---------------------------------------------------------------------------
    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("testbed needs root to create network namespaces (run with sudo)")
        self.caps = capabilities.probe()
        needs_delay = any(ln.needs_delay for ln in self.plan.links)
        needs_rate = any(s.rate_mbit for ln in self.plan.links for s in (ln.a_to_b, ln.b_to_a))
        available = self.caps.delay_backend
        want = self.requested_backend
        if want == "auto":
            self.delay_backend = available
        elif want == "netem" and not self.caps.qdiscs.get("netem"):
            raise CapabilityError("backend netem asked for, but this kernel has no netem qdisc")
        elif want == "delayline" and not (self.caps.nfqueue and self.caps.br_netfilter):
            raise CapabilityError("backend delayline needs NFQUEUE and br_netfilter; "
                                  "this kernel lacks them")
        else:
            self.delay_backend = want
        if needs_delay and self.delay_backend == "none":
            raise CapabilityError("links ask for delay/loss but this kernel has neither netem "
                                  "nor NFQUEUE with br_netfilter (see `testbed doctor`)")
        self._preflight_vlans()
        if needs_rate and not self.caps.qdiscs.get("htb"):
            raise CapabilityError("links ask for a rate but this kernel has no htb qdisc")
        for tool in ("ip", "tc", "nsenter"):
            if not self.caps.tools.get(tool):
                raise CapabilityError(f"{tool} is not installed (run `make setup`)")
        if (self.delay_backend == "delayline" and needs_delay
                and not self.caps.tools.get("iptables")):
            raise CapabilityError("iptables is not installed (run `make setup`)")

    def _preflight_vlans(self) -> None:
        switches = [n for n, sp in self.plan.nodes.items()
                    if sp.kind == "switch" and self.plan.vlan_aware(n)]
        if not switches:
            return
        native = self.caps.bridge_vlan_filtering
        want = self.requested_vlan_backend
        if want == "auto":
            want = kvlan.NATIVE if native else kvlan.BRIDGES
        if want == kvlan.NATIVE and not native:
            raise CapabilityError("vlan_backend 802.1q asked for, but this kernel's bridges "
                                  "have no vlan_filtering (see `testbed doctor`)")
        if (want == kvlan.BRIDGES and any(self.plan.trunks(n) for n in switches)
                and not self.caps.links.get("vxlan")):
            raise CapabilityError("trunks need 802.1Q or VXLAN; this kernel has neither")
        self.vlan_backend = want

    # ledger --------------------------------------------------------------------------------
    def _write_ledger(self) -> None:
        ledger.write(self.run_id, self.plan.name, self._namespaces, self._pids, self.log_dir)

    def _record_pid(self, pid: int) -> None:
        with self._lock:
            self._pids.append(pid)

    # deploy --------------------------------------------------------------------------------
    def start(self) -> "Network":
        if self._started:
            raise TestbedError("network already started")
        self._preflight()
        t0 = time.monotonic()
        self._started = True
        self._install_signal_handlers()
        atexit.register(self.stop)
        try:
            self._deploy()
        except BaseException:
            self.stop()
            raise
        self.build_s = time.monotonic() - t0
        return self

    def _wired(self, ln: LinkSpec) -> bool:
        return self.delay_backend == "delayline" and (ln.needs_delay or ln.emulate)

    def _deploy(self) -> None:
        plan = self.plan
        os.makedirs(self.log_dir, exist_ok=True)
        wires = {}
        for i, ln in enumerate(plan.links):
            if self._wired(ln):
                wires[ln] = f"{self.prefix}wire{i}"
        self._namespaces = [self.ns_name(n) for n in plan.nodes] + list(wires.values())
        clash = [n for n in self._namespaces if kns.exists(n)]
        if clash:
            raise TestbedError(f"namespace {clash[0]} already exists (run id in use?)")
        self._write_ledger()

        kns.create(self._namespaces)
        for name, spec in plan.nodes.items():
            cls = Switch if spec.kind == "switch" else Node
            self.nodes[name] = cls(self, name, spec.kind, self.ns_name(name))

        # links and bridges, in one ip process
        lines = []
        for name, spec in plan.nodes.items():
            if spec.kind == "switch":
                if plan.vlan_aware(name):
                    lines += kvlan.create_lines(name, self.ns_name(name),
                                                plan.switch_vlans(name), self.vlan_backend)
                else:
                    lines.append(kbridge.create_line(name, self.ns_name(name)))
        for ln in plan.links:
            na, nb = self.ns_name(ln.a), self.ns_name(ln.b)
            # a trunk over VXLAN carries 1500-byte frames plus the encapsulation
            mtu = kvlan.TRUNK_MTU if ln.trunk and self.vlan_backend == kvlan.BRIDGES else None
            if ln in wires:
                w = wires[ln]
                lines.append(klink.veth_line(ln.intf_a, na, kwire.PORT_A, w, mtu))
                lines.append(klink.veth_line(ln.intf_b, nb, kwire.PORT_B, w, mtu))
            else:
                lines.append(klink.veth_line(ln.intf_a, na, ln.intf_b, nb, mtu))
        batch("ip", lines)

        # per-node configuration over netlink sockets bound in each namespace: one dump
        # for the interface indexes, one request per interface
        addrs = plan.addressing.addresses
        for name, spec in plan.nodes.items():
            node = self.nodes[name]
            settings = dict(NODE_SYSCTLS)
            if spec.kind == "router":
                settings["net.ipv4.ip_forward"] = 1
            settings.update(spec.sysctls)
            kns.sysctls(node.ns, settings)
            ipr = self._ipr(node.ns)
            idx = klink.indexes(ipr)
            ipr.link("set", index=idx["lo"], state="up")
            if spec.kind == "switch":
                self._configure_switch(name, ipr, idx)
                continue
            for ifname in plan.interfaces(name):
                if (name, ifname) in addrs:
                    klink.add_address(ipr, ifname, addrs[(name, ifname)], idx[ifname])
                ipr.link("set", index=idx[ifname], state="up")

        # links: shaping on the nodes' egress, or a wire with its delay lines
        for ln in plan.links:
            link = Link(self, ln, wires.get(ln))
            self.links[ln.ends] = link
            if link.wire:
                self._build_wire(link)
            for d in ("a_to_b", "b_to_a"):
                link.apply(d)

        for r in plan.addressing.routes:
            self._routes.setdefault(r.node, {})[r.dst] = r.via
        for name in self._routes:
            self._install_routes(name)
        self._wait_carrier()

    def _configure_switch(self, name: str, ipr, idx: dict) -> None:
        """Enslave the ports: to the one bridge, or by VLAN (see testbed.kernel.vlan)."""
        plan, backend = self.plan, self.vlan_backend
        if not plan.vlan_aware(name):
            for ifname in plan.interfaces(name):
                ipr.link("set", index=idx[ifname], master=idx[name], state="up")
            ipr.link("set", index=idx[name], state="up")
            return
        access, trunks = plan.access_ports(name), plan.trunks(name)
        for vid in plan.switch_vlans(name):
            br = kvlan.bridge_name(name, vid, backend)
            ipr.link("set", index=idx[br], state="up")
        for ifname, vid in access.items():
            br = kvlan.bridge_name(name, vid, backend)
            ipr.link("set", index=idx[ifname], master=idx[br], state="up")
            if backend == kvlan.NATIVE:
                kvlan.native_port(ipr, idx[ifname], access_vid=vid)
        vx_lines = []
        for ifname, vids in trunks.items():
            if backend == kvlan.NATIVE:
                ipr.link("set", index=idx[ifname], master=idx[name], state="up")
                kvlan.native_port(ipr, idx[ifname], trunk_vids=vids)
                continue
            i, ln = next((i, ln) for i, ln in enumerate(plan.trunk_links)
                         if (ln.a, ln.intf_a) == (name, ifname)
                         or (ln.b, ln.intf_b) == (name, ifname))
            ua, ub = kvlan.trunk_underlay(i)
            local, remote = (ua, ub) if ln.a == name else (ub, ua)
            klink.add_address(ipr, ifname, local, idx[ifname])
            ipr.link("set", index=idx[ifname], state="up")
            vx_lines += kvlan.vxlan_lines(i, vids, local, remote, ifname)
        batch("ip", vx_lines, netns=self.ns_name(name))

    def _wait_carrier(self, timeout: float = 5.0) -> None:
        """Wait until every interface is operationally up. Until the kernel's linkwatch has
        run (up to a second after carrier), a new veth transmits through noop_qdisc and
        drops everything: the first ARP of an experiment would be lost."""
        pending = {n.ns for n in self.nodes.values()}
        pending |= {ln.wire for ln in self.links.values() if ln.wire}

        def all_up() -> bool:
            for ns in list(pending):
                if klink.all_up(self._ipr(ns)):
                    pending.discard(ns)
            return not pending

        try:
            wait_until(all_up, timeout, "interfaces up")
        except WaitTimeout:
            raise TestbedError(f"interfaces in {sorted(pending)[0]} not up after "
                               f"{scaled(timeout):g} s") from None

    def _build_wire(self, link: Link) -> None:
        w = link.wire
        kwire.configure(w)
        procs = []
        for d in ("a_to_b", "b_to_a"):
            ctl = kwire.control_path(self.log_dir, w, d)
            ready = ctl + ".ready"
            # from the topology, not the run id, so the same seed gives the same losses
            where = f"{self.seed}/{link.spec.a}-{link.spec.b}/{d}"
            seed = None if self.seed is None else zlib.crc32(where.encode())
            log_path = os.path.join(self.log_dir, f"{w}.{d}.log")
            p = Process(kwire.daemon_argv(d, link.shaping[d], ctl, ready, seed), w, log_path,
                        f"delayline {link.spec.a}-{link.spec.b} {d}")
            self._record_pid(p.pid)
            self._wire_procs.append(p)
            procs.append((d, p, ctl, ready))
        for d, p, ctl, ready in procs:
            p.wait_ready(file_exists(ready), timeout=15)
            link.daemons[d] = ctl
            kwire.steer(w, d)

    def _ipr(self, ns: str):
        ipr = self._iprs.get(ns)
        if ipr is None:
            ipr = self._iprs[ns] = kns.ipr(ns)
        return ipr

    def _install_routes(self, name: str, reachable_only: bool = False) -> None:
        """Install the node's recorded routes. reachable_only (a link coming back up): skip
        those whose next hop is behind another link that is still down; that link's own
        coming up installs them."""
        ipr = self._ipr(self.nodes[name].ns)
        for dst, via in self._routes.get(name, {}).items():
            try:
                kroute.replace(ipr, dst, via)
            except TestbedError as e:
                if not (reachable_only and "unreachable" in str(e)):
                    raise

    # teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process, delete every namespace this run made. Safe to call twice.

        INT, TERM and HUP are held off while it runs (and delivered after), so a second
        Ctrl-C cannot leave half a network behind."""
        if not self._started:
            return
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._teardown()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _teardown(self) -> None:
        owned_errors = self._stop_owned()
        errors = []
        for node in self.nodes.values():
            try:
                node.stop_all()
            except Exception as e:  # keep tearing down; report at the end
                errors.append(str(e))
        for p in reversed(self._wire_procs):
            try:
                p.stop(grace=2)
            except Exception as e:
                errors.append(str(e))
        self._wire_procs.clear()
        for ipr in self._iprs.values():
            try:
                ipr.close()
            except Exception:
                pass
        self._iprs.clear()
        try:
            kill_in(self._namespaces)
            kns.delete(self._namespaces)
        except Exception as e:
            errors.append(str(e))
        if not errors:  # keep the ledger if anything is left, for `testbed cleanup`
            ledger.remove(self.run_id)
        try:
            os.rmdir(self.log_dir)  # only if empty: logs of processes are kept
        except OSError:
            pass
        self._started = False
        self._restore_signal_handlers()
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        errors = owned_errors + errors
        if errors:
            raise TestbedError("teardown: " + "; ".join(errors))

    def _stop_owned(self) -> list:
        """Stop what the network owns, the last owned first, while the nodes' processes
        still run; the errors, for the end of teardown (which goes on: the namespaces take
        whatever an owned thing failed to stop with them)."""
        errors = []
        while self._owned:
            thing, stop = self._owned.pop()
            try:
                stop()
            except Exception as e:
                what = repr(thing)
                if len(what) > 80:
                    what = type(thing).__name__
                errors.append(f"stopping {what}: {e}")
        return errors

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_term)

    def _restore_signal_handlers(self) -> None:
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    # conveniences -------------------------------------------------------------------------
    def hosts(self) -> list:
        return [n for n in self.nodes.values() if n.kind == "host"]

    def describe(self) -> str:
        out = []
        for n in self.nodes.values():
            addrs = ", ".join(f"{i} {a}" for i, a in n.addresses.items())
            out.append(f"{n.kind:6} {n.name:10} {addrs}")
        return "\n".join(out)


class Switch(Node):
    """A switch: a Linux bridge, or one per VLAN (see testbed.kernel.vlan)."""

    def __init__(self, net: "Network", name: str, kind: str, ns: str):
        super().__init__(net, name, kind, ns)
        self._access = dict(net.plan.access_ports(name))  # ifname -> VLAN, kept current

    @property
    def vlans(self) -> tuple:
        return self.net.plan.switch_vlans(self.name)

    def port(self, peer: str) -> str:
        """The switch's interface toward node peer (or an interface name of the switch)."""
        if peer in self.intfs:
            return peer
        for ln in self.net.plan.links:
            if {ln.a, ln.b} == {self.name, peer}:
                return ln.intf_a if ln.a == self.name else ln.intf_b
        raise SpecError(f"switch {self.name} has no port toward {peer!r}")

    def vlan_of(self, peer: str) -> int:
        """The access VLAN of the port toward peer."""
        ifname = self.port(peer)
        if ifname not in self._access:
            raise SpecError(f"{self.name} {ifname} is a trunk, not an access port")
        return self._access[ifname]

    def set_vlan(self, peer: str, vid: int) -> float:
        """Move the access port toward peer into VLAN vid; returns the seconds it took.

        Validated first (unknown VLAN, trunk port): a bad request changes nothing."""

        check_vlan(vid, f"switch {self.name}")
        old = self.vlan_of(peer)
        ifname = self.port(peer)
        if vid not in self.vlans:
            raise SpecError(f"unknown VLAN {vid} on switch {self.name} (it has "
                            f"{', '.join(map(str, self.vlans))}; declare more with "
                            f"add_switch(..., vlans=[...]))")
        if not self.net.plan.vlan_aware(self.name):  # only VLAN 1, and vid is 1
            return 0.0
        ipr = self.ipr()
        idx = klink.indexes(ipr)
        backend = self.net.vlan_backend
        bridges = {v: idx[kvlan.bridge_name(self.name, v, backend)] for v in self.vlans}
        t0 = time.perf_counter()
        if vid != old:
            kvlan.move(ipr, idx[ifname], old, vid, backend, bridges)
        took = time.perf_counter() - t0
        self._access[ifname] = vid
        return took


__all__ = ["Network", "Node", "Link", "Switch"]
