"""HANet (paper 002): a server address that survives the failure of the server's public NIC,
by backing the NIC up with private server-to-server links and letting the sibling server
carry the packets.

    from testbed.failover import hanet
    with Network(topologies.hanet.build()) as net:
        h = hanet.start(net, service_ips={"s1": "10.20.0.11", "s2": "10.20.0.12"})
        net.link("s1", "sw").set(up=False)            # s1's public NIC fails
        h.wait_active("s1", "priv")                   # s1 now sends through s2
        h.wait_serving("s2", "s1")
        print(h.failovers("s1")[-1])                  # t_tick, Tsrv, Tmid, Tsib, ...
        net.link("s1", "sw").set(up=True)
        h.wait_active("s1", "pub")                    # failback

The harness: one daemon per server (`python -m testbed.failover.hanet_daemon --config
FILE`; how it works, the virtual interface, fault detector, interface manager and packet
transmission agent, is in testbed.failover.hanet_daemon), started with its Config and owned
by the network (`net.own`: stopped at teardown before the nodes' processes). A server's
links to its sibling are parallel links: `link_of(net, "s1", "s1-usb")` picks one.

Every phase is timestamped on the host's shared clock (events.jsonl in the log directory):
the tick that detected the fault (t_tick), the request sent (Tsrv = t_sent - t_tick),
received by the sibling (Tmid), the sibling's first gratuitous ARP sent (Tsib), the ACK
back (failovers()). The daemon's state is in a JSON status file (status()), rewritten on
every change.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from testbed import daemon
from testbed.daemon.keys import MIN_KEY_BYTES
from testbed.errors import SpecError
from testbed.failover.hanet_daemon import (  # noqa: F401  (the daemon's config, re-exported)
    DEFAULT_PORT, DEFAULT_TABLE, METHODS, UNSHAPED_MBIT, Config, Peer, Slave, check_ip,
    check_config, choose_active)
from testbed.poll import wait_until


# the harness: deploy daemons on a Network -----------------------------------------------

@dataclass
class HANet:
    """Handle on the daemons of a Network (see start())."""

    net: object
    configs: dict  # server -> Config
    procs: dict = field(default_factory=dict)  # server -> Process

    def service_ip(self, server: str) -> str:
        return self.configs[server].service_ip

    def status(self, server: str) -> dict:
        try:
            with open(self.configs[server].status_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def events(self, server: str, event: Optional[str] = None) -> list:
        out = []
        try:
            with open(self.configs[server].events_file) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    if event is None or rec.get("event") == event:
                        out.append(rec)
        except OSError:
            pass
        return out

    def failovers(self, server: str, kinds=("failover", "relink")) -> list:
        """Each switch to a private slave with its ACK: t_tick, t_sent, t_sib_recv,
        t_sib_done, t_ack, and the phases tsrv_ms, tmid_ms, tsib_ms, tack_ms (None until
        acknowledged)."""
        acks = {a["req"]: a for a in self.events(server, "ack")}
        out = []
        for sw in self.events(server, "switch"):
            if sw.get("kind") not in kinds:
                continue
            rec = dict(sw)
            a = acks.get(sw.get("req"))
            rec.update(status=None, attempts=None, t_ack=None, t_sib_recv=None, t_sib_done=None,
                       tsrv_ms=(sw["t_sent"] - sw["t_tick"]) * 1000 if "t_sent" in sw else None,
                       tmid_ms=None, tsib_ms=None, tack_ms=None)
            if a is not None:
                rec.update(status=a["status"], attempts=a["attempts"], t_ack=a["t_ack"],
                           t_sib_recv=a["t_sib_recv"], t_sib_done=a["t_sib_done"],
                           tmid_ms=(a["t_sib_recv"] - a["t_sent"]) * 1000,
                           tsib_ms=(a["t_sib_done"] - a["t_sib_recv"]) * 1000,
                           tack_ms=(a["t_ack"] - a["t_sib_done"]) * 1000)
            out.append(rec)
        return out

    def wait(self, cond, timeout: float = 5.0, what: str = "condition"):
        """Poll cond() until true and return its value; TestbedError if a daemon exits,
        WaitTimeout after timeout seconds (scaled by TESTBED_TIMEOUT_SCALE)."""
        def died() -> Optional[str]:
            for name, p in self.procs.items():
                if not p.alive:
                    return f"hanet daemon on {name} exited: {p.log(tail=3)}"
            return None

        return wait_until(cond, timeout, f"hanet: {what}", interval=0.005, abort=died)

    def wait_active(self, server: str, slave: Optional[str], timeout: float = 5.0) -> dict:
        """Until server's active slave is `slave` and no request is pending; its status."""
        def ok():
            st = self.status(server)
            return st if st.get("active") == slave and st.get("pending") is None else None
        return self.wait(ok, timeout, f"{server} active on {slave}")

    def wait_serving(self, sibling: str, peer: Optional[str], timeout: float = 5.0) -> dict:
        """Until sibling carries peer's packets (peer None: nobody's)."""
        def ok():
            st = self.status(sibling)
            serving = st.get("serving")
            if serving is None:
                return None
            if peer is None:
                return st if not serving else None
            return st if peer in serving else None
        return self.wait(ok, timeout, f"{sibling} serving {peer}")

    def stop(self, server: Optional[str] = None) -> None:
        for name in ([server] if server else list(self.procs)):
            p = self.procs.pop(name, None)
            if p is not None:
                p.stop(grace=5)


def link_of(net, node: str, ifname: str):
    """The Link of node's interface ifname, for set(up=...): the servers have parallel
    links (public, and up to three private ones to the sibling), so the interface picks
    one."""
    try:
        ln = net.plan.link_at(node, ifname)
    except SpecError as e:
        raise SpecError(f"hanet: {e}") from None
    return net.link(ln.a, ln.b, intf=ifname)


def _slaves_of(net, server: str, sibling: str, detect, targets: dict) -> tuple:
    plan = net.plan
    addrs = plan.addressing.addresses
    out = []
    for ln in plan.links:
        if server not in (ln.a, ln.b):
            continue
        mine = ln.intf_a if ln.a == server else ln.intf_b
        other = ln.b if ln.a == server else ln.a
        peer_if = ln.intf_b if ln.a == server else ln.intf_a
        shaping = ln.a_to_b if ln.a == server else ln.b_to_a
        speed = shaping.rate_mbit or UNSHAPED_MBIT
        public = other != sibling
        name = mine[len(server) + 1:] if mine.startswith(server + "-") else mine
        local = addrs.get((server, mine))
        peer_ip = str(addrs[(other, peer_if)].ip) if not public and (other, peer_if) in addrs \
            else None
        method = detect.get(name, detect.get(mine, "carrier")) if isinstance(detect, dict) \
            else detect
        if method not in METHODS:
            raise SpecError(f"hanet: detect for {server} {name} must be one of "
                            f"{', '.join(METHODS)}, got {method!r}")
        tg = targets.get((server, name))
        if tg is None and method != "carrier":
            tg = _default_targets(net, server, mine, peer_ip, method)
        out.append(Slave(name, mine, public, float(speed), method, tuple(tg or ()),
                         str(local.ip) if local else None, peer_ip,
                         str(local.network) if local else None))
    return tuple(out)


def _default_targets(net, server: str, ifname: str, peer_ip: Optional[str], method: str):
    """Private slave: the sibling's address on it. Public: a router on the segment (else the
    first other host), for the ARP monitor; the routers and hosts of the segment (at most
    three), for the ping list."""
    if peer_ip:
        return [peer_ip]
    plan = net.plan
    mine = plan.addressing.addresses.get((server, ifname))
    if mine is None:
        raise SpecError(f"hanet: {server} {ifname} has no address to probe from")
    others = [(n, a) for (n, i), a in plan.addressing.addresses.items()
              if n != server and a.network == mine.network]
    others.sort(key=lambda na: (plan.nodes[na[0]].kind != "router", str(na[1].ip)))
    if not others:
        raise SpecError(f"hanet: nothing else on {server} {ifname}'s segment to probe")
    ips = [str(a.ip) for _, a in others]
    return ips[:1] if method == "arp" else ips[:3]


def plan_configs(net, service_ips: dict, siblings: Optional[dict] = None,
                 tick_ms: float = 100, detect="carrier", targets: Optional[dict] = None,
                 missed_max: int = 2, port: int = DEFAULT_PORT, garp_count: int = 3,
                 garp_kind: str = "request", retry_ms: float = 50.0,
                 key_file: Optional[str] = None, table: int = DEFAULT_TABLE,
                 rt_priority: int = 0) -> dict:
    """Every daemon's Config, validated (SpecError, nothing created). service_ips: server ->
    its service address (in the subnet of its public slave, used by nothing else); siblings:
    server -> the server it asks (default: two servers, each the other's); detect: one
    method for all slaves, or {slave role or ifname: method}; targets: {(server, role):
    [IPs]} for arp/ping (default: see _default_targets); rt_priority: run the daemons
    SCHED_FIFO at this priority (0: normal), as keepalived can, so that other load on the
    machine does not delay detection and takeover."""
    if not isinstance(service_ips, dict) or not service_ips:
        raise SpecError("hanet: service_ips must map each server to its service address")
    servers = list(service_ips)
    for s in servers:
        node = net.plan.nodes.get(s)
        if node is None:
            raise SpecError(f"hanet: unknown server {s!r}")
        if node.kind != "host":
            raise SpecError(f"hanet: {s} is a {node.kind}, not a host")
    if siblings is None:
        if len(servers) != 2:
            raise SpecError("hanet: give siblings= unless there are exactly two servers")
        siblings = {servers[0]: servers[1], servers[1]: servers[0]}
    used = {str(a.ip) for a in net.plan.addressing.addresses.values()}
    ips = [check_ip(ip, f"{s} service address") for s, ip in service_ips.items()]
    if len(set(ips)) != len(ips):
        raise SpecError(f"hanet: service addresses must differ, got {ips}")
    for s, ip in service_ips.items():
        if ip in used:
            raise SpecError(f"hanet: service address {ip} of {s} is already an interface "
                            f"address of the network")
        sib = siblings.get(s)
        if sib not in service_ips or sib == s:
            raise SpecError(f"hanet: {s} needs a sibling among the other servers, got {sib!r}")
    targets = targets or {}
    key_file = key_file or os.path.join(net.log_dir, "hanet.key")
    ids = {s: i + 1 for i, s in enumerate(servers)}
    configs = {}
    for s in servers:
        sib = siblings[s]
        slaves = _slaves_of(net, s, sib, detect, targets)
        if not any(not x.public for x in slaves):
            raise SpecError(f"hanet: {s} has no private link to its sibling {sib}")
        pub = [x for x in slaves if x.public and x.subnet]
        if not pub or not any(ipaddress.ip_address(service_ips[s]) in
                              ipaddress.ip_network(x.subnet) for x in pub):
            raise SpecError(f"hanet: service address {service_ips[s]} of {s} is not in the "
                            f"subnet of any of its public interfaces")
        peers = tuple(Peer(p, ids[p], service_ips[p]) for p in servers
                      if siblings.get(p) == s)
        base = os.path.join(net.log_dir, f"hanet-{s}")
        cfg = Config(s, ids[s], service_ips[s], slaves, Peer(sib, ids[sib], service_ips[sib]),
                     peers, key_file, base + ".status.json", base + ".events.jsonl",
                     base + ".ready", tick_ms=tick_ms, missed_max=missed_max, port=port,
                     garp_count=garp_count, garp_kind=garp_kind, retry_ms=retry_ms, table=table,
                     rt_priority=rt_priority)
        check_config(cfg)
        configs[s] = cfg
    return configs


def start(net, service_ips: dict, ready_timeout: float = 20.0, key: Optional[bytes] = None,
          **kw) -> HANet:
    """Start a HANet daemon on each server of service_ips (see plan_configs for the
    options); returns once every daemon is ready."""
    from testbed.process import file_exists

    configs = plan_configs(net, service_ips, **kw)
    key_file = next(iter(configs.values())).key_file
    if key is not None and (not isinstance(key, (bytes, bytearray))
                            or len(key) < MIN_KEY_BYTES):
        raise SpecError(f"hanet: the key must be at least {MIN_KEY_BYTES} bytes")
    if not os.path.exists(key_file) or key is not None:
        daemon.write_key(key_file, bytes(key or daemon.new_key()))
    h = net.own(HANet(net, configs))  # its daemons stop first at teardown
    try:
        for s, cfg in configs.items():
            for path in (cfg.ready_file, cfg.status_file):
                if os.path.exists(path):
                    os.unlink(path)
            cpath = os.path.join(net.log_dir, f"hanet-{s}.config.json")
            with open(cpath, "w") as f:
                f.write(cfg.to_json())
            h.procs[s] = net[s].start([sys.executable, "-m", "testbed.failover.hanet_daemon",
                                       "--config", cpath], name="hanet")
        for s, cfg in configs.items():
            h.procs[s].wait_ready(file_exists(cfg.ready_file), ready_timeout)
    except BaseException:
        net.disown(h)
        h.stop()
        raise
    return h


def read_key(h: HANet) -> bytes:
    return daemon.read_key(next(iter(h.configs.values())).key_file)


__all__ = ["start", "plan_configs", "link_of", "HANet", "Config", "Slave", "Peer", "choose_active",
           "check_config"]
