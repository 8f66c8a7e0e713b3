"""The HANet daemon (paper 002): a server address that survives the failure of the server's
public NIC, by backing the NIC up with private server-to-server links and letting the
sibling server carry the packets. testbed.failover.hanet deploys it (and shows its use).

One daemon per server, `python -m testbed.failover.hanet_daemon --config FILE`, does what the
paper's kernel module does, in user space:

- Virtual communication interface (VCI). The service address is a /32 on `lo`, so it stays
  local whatever happens to the NICs (an address on a NIC that goes down stops being local).
  The active slave is expressed by routing: while a public slave is active the main table
  routes the server's traffic out of it (the server answers ARP for its service address
  there); while a private slave is active, a policy rule's table (`table`, empty otherwise)
  sends everything but the private subnets via the sibling's address on that link, with the
  service address as source.
- Fault detector, every `tick_ms` (100 ms in the paper), per slave: `carrier` (interface
  up and running: the MII link status of the bonding driver), `arp` (an ARP request to a
  target each tick; bad after `missed_max` ticks without a reply: the bonding ARP monitor)
  or `ping` (an ICMP echo to each host of a list each tick; bad after `missed_max` ticks
  without any reply: the paper's host ping file).
- Interface manager (`choose_active`): a public slave first, then the live slave with the
  highest bandwidth; the current one is kept among equals.
- Packet transmission agent (testbed.failover.hanet_wire): the requester sends TAKEOVER
  (UDP, HMAC-authenticated, retried until acknowledged) over the newly active private link,
  naming it; the responder on the sibling turns on IP forwarding, routes the server's
  service address over that link, adds a proxy-ARP entry for it on its public interface
  (proxy_delay 0) and sends gratuitous ARPs there. When the public link returns the server
  drops its sibling routes, sends gratuitous ARPs itself and sends RELEASE; the sibling
  undoes everything.

Every phase is timestamped on the host's shared clock (events.jsonl in the log directory):
the tick that detected the fault (t_tick), the request sent (Tsrv = t_sent - t_tick),
received by the sibling (Tmid), the sibling's first gratuitous ARP sent (Tsib), the ACK
back. The daemon's state is in a JSON status file, rewritten on every change. Its loop
(ticks, retries, queued gratuitous ARPs as timers), signals, ready file, key file (hex) and
one-line usage errors come from the daemon runtime (testbed.daemon).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from testbed.daemon import (ArgParser, Loop, Stop, UsageError, raise_stop_on_signals, read_key,
                            ready_file, run_main, write_json_atomic)
from testbed.daemon.datagrams import until_dry
from testbed.errors import SpecError
from testbed.failover import hanet_wire as wire


METHODS = ("carrier", "arp", "ping")
DEFAULT_PORT = 7410
DEFAULT_TABLE = 100
DEFAULT_RULE_PRIORITY = 100
UNSHAPED_MBIT = 10000.0  # the speed given to a slave whose link has no rate


# configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class Slave:
    """One physical interface under the VCI."""

    name: str  # role, e.g. pub, priv, usb, ser
    ifname: str
    public: bool
    speed_mbit: float
    detect: str = "carrier"
    targets: tuple = ()  # arp: one target IP; ping: the hosts
    local_ip: Optional[str] = None  # this server's address on the slave
    peer_ip: Optional[str] = None  # private slaves: the sibling's address on the link
    subnet: Optional[str] = None  # the slave's subnet (a.b.c.d/len)


@dataclass(frozen=True)
class Peer:
    name: str
    id: int
    service_ip: str


@dataclass(frozen=True)
class Config:
    name: str
    id: int
    service_ip: str
    slaves: tuple  # Slave, ...
    sibling: Peer  # the server this one asks to take over
    peers: tuple  # Peer, ...: the servers this one takes over for
    key_file: str
    status_file: str
    events_file: str
    ready_file: str
    tick_ms: float = 100.0
    missed_max: int = 2
    port: int = DEFAULT_PORT
    table: int = DEFAULT_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    vci: str = "lo"
    garp_count: int = 3
    garp_interval_ms: float = 100.0
    garp_kind: str = "request"
    retry_ms: float = 50.0
    max_age_s: float = 5.0
    rt_priority: int = 0  # >0: SCHED_FIFO at this priority (as keepalived's vrrp_rt_priority)

    def slave(self, name: str) -> Slave:
        for s in self.slaves:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        d["slaves"] = tuple(Slave(**{**s, "targets": tuple(s.get("targets", ()))})
                            for s in d["slaves"])
        d["sibling"] = Peer(**d["sibling"])
        d["peers"] = tuple(Peer(**p) for p in d["peers"])
        cfg = cls(**d)
        check_config(cfg)
        return cfg


def check_ip(ip, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise SpecError(f"hanet: bad IPv4 address for {what}: {ip!r}") from None


def _check_number(value, what: str, lo: float, hi: float, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "a whole number" if integer else "a number"
        raise SpecError(f"hanet: {what} must be {kind} from {lo:g} to {hi:g}, got {value!r}")
    return value


def check_config(cfg: Config) -> None:
    """Everything a daemon needs, checked before anything is changed: one-line SpecErrors."""
    check_ip(cfg.service_ip, f"{cfg.name} service address")
    _check_number(cfg.id, "id", 1, 65535, integer=True)
    _check_number(cfg.tick_ms, "tick_ms", 10, 5000)
    _check_number(cfg.missed_max, "missed_max", 1, 100, integer=True)
    _check_number(cfg.port, "port", 1, 65535, integer=True)
    _check_number(cfg.table, "table", 1, 252, integer=True)
    _check_number(cfg.rule_priority, "rule_priority", 1, 32765, integer=True)
    _check_number(cfg.garp_count, "garp_count", 1, 100, integer=True)
    _check_number(cfg.garp_interval_ms, "garp_interval_ms", 0, 10000)
    _check_number(cfg.retry_ms, "retry_ms", 1, 10000)
    _check_number(cfg.rt_priority, "rt_priority", 0, 99, integer=True)
    if cfg.garp_kind not in ("request", "reply", "both"):
        raise SpecError(f"hanet: garp_kind must be request, reply or both, got {cfg.garp_kind!r}")
    if not cfg.slaves:
        raise SpecError(f"hanet: {cfg.name} has no slaves")
    names = [s.name for s in cfg.slaves]
    if len(set(names)) != len(names):
        raise SpecError(f"hanet: {cfg.name}: duplicate slave names {names}")
    if not any(s.public for s in cfg.slaves):
        raise SpecError(f"hanet: {cfg.name} has no public slave")
    for s in cfg.slaves:
        where = f"{cfg.name} slave {s.name}"
        if len(s.name.encode()) > wire.MAX_NAME or not s.name.isascii():
            raise SpecError(f"hanet: {where}: name longer than {wire.MAX_NAME} ASCII bytes")
        if s.detect not in METHODS:
            raise SpecError(f"hanet: {where}: detect must be one of {', '.join(METHODS)}, "
                            f"got {s.detect!r}")
        _check_number(s.speed_mbit, f"{where} speed_mbit", 0.001, 1e6)
        for t in s.targets:
            check_ip(t, f"{where} target")
        if s.detect == "arp" and len(s.targets) != 1:
            raise SpecError(f"hanet: {where}: the ARP monitor needs exactly one target")
        if s.detect == "ping" and not s.targets:
            raise SpecError(f"hanet: {where}: the ping list needs at least one host")
        if not s.public and (s.peer_ip is None or s.local_ip is None):
            raise SpecError(f"hanet: {where}: a private slave needs local_ip and peer_ip")
        for ip in (s.local_ip, s.peer_ip):
            if ip is not None:
                check_ip(ip, where)
    for p in (cfg.sibling,) + tuple(cfg.peers):
        check_ip(p.service_ip, f"peer {p.name}")
        _check_number(p.id, f"peer {p.name} id", 1, 65535, integer=True)
        if p.id == cfg.id:
            raise SpecError(f"hanet: peer {p.name} has this daemon's id {cfg.id}")


# the interface manager ------------------------------------------------------------------

def choose_active(slaves, good: dict, current: Optional[str] = None) -> Optional[str]:
    """The next active slave among the good ones: public before private, then the highest
    speed; the current one is kept if no good slave ranks above it; else config order breaks
    ties. None if no slave is good."""
    live = [(i, s) for i, s in enumerate(slaves) if good.get(s.name)]
    if not live:
        return None

    def rank(item):
        i, s = item
        return (0 if s.public else 1, -s.speed_mbit, i)

    best = min(live, key=rank)[1]
    if current is not None:
        cur = next((s for _, s in live if s.name == current), None)
        if cur is not None and (cur.public, cur.speed_mbit) == (best.public, best.speed_mbit):
            return current
    return best.name


# fault detection methods ----------------------------------------------------------------

SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40
ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def if_flags(sock: socket.socket, ifname: str) -> int:
    """The interface's flags (SIOCGIFFLAGS); 0 if it does not exist."""
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH14x", ifname.encode(), 0))
    except OSError:
        return 0
    return struct.unpack_from("16sH", res)[1]


class Carrier:
    """MII-style link status: the interface is administratively up and has carrier
    (operationally up: IFF_RUNNING)."""

    def __init__(self, slave: Slave, ctl: socket.socket):
        self.slave, self.ctl = slave, ctl

    def probe(self, now: float) -> None:
        pass

    def good(self, now: float) -> bool:
        f = if_flags(self.ctl, self.slave.ifname)
        return bool(f & IFF_UP and f & IFF_RUNNING)

    def sockets(self) -> list:
        return []


class _Replies:
    """Good while a reply came within missed_max ticks (a grace period at start)."""

    def __init__(self, slave: Slave, tick_s: float, missed_max: int, now: float):
        self.slave = slave
        self.window = missed_max * tick_s + tick_s / 2
        self.last_reply = now
        self.sent = 0
        self.replies = 0

    def good(self, now: float) -> bool:
        return now - self.last_reply <= self.window


class ArpMonitor(_Replies):
    """The bonding driver's ARP monitor: an ARP request for the target every tick from a
    packet socket on the slave; a reply from the target keeps the slave good."""

    def __init__(self, slave: Slave, mac: bytes, src_ip: str, tick_s, missed_max, now):
        super().__init__(slave, tick_s, missed_max, now)
        self.target = socket.inet_aton(slave.targets[0])
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind((slave.ifname, ETH_P_ARP))
        self.sock.setblocking(False)
        self.frame = (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
                      + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + mac
                      + socket.inet_aton(src_ip) + b"\x00" * 6 + self.target)

    def probe(self, now: float) -> None:
        try:
            self.sock.send(self.frame)
            self.sent += 1
        except OSError:
            pass  # interface down: no reply will come

    def readable(self, now: float) -> None:
        for data in until_dry(lambda: self.sock.recv(128), quiet=True):
            # Ethernet 14 | htype ptype hlen plen op (8) | sha 6 | spa 4 | tha 6 | tpa 4
            if len(data) >= 42 and data[20:22] == b"\x00\x02" and data[28:32] == self.target:
                self.last_reply = now
                self.replies += 1

    def sockets(self) -> list:
        return [self.sock]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class PingList(_Replies):
    """The paper's host ping file: an ICMP echo to every host of the list each tick, out of
    the slave (SO_BINDTODEVICE); a reply from any of them keeps the slave good."""

    def __init__(self, slave: Slave, ident: int, tick_s, missed_max, now):
        super().__init__(slave, tick_s, missed_max, now)
        self.ident = ident & 0xFFFF
        self.hosts = {socket.inet_aton(h) for h in slave.targets}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, slave.ifname.encode())
        self.sock.setblocking(False)
        self.seq = 0

    def probe(self, now: float) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        payload = struct.pack("!d", now)
        hdr = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
        pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), self.ident, self.seq) + payload
        for h in self.slave.targets:
            try:
                self.sock.sendto(pkt, (h, 0))
                self.sent += 1
            except OSError:
                pass

    def readable(self, now: float) -> None:
        for data, _addr in until_dry(lambda: self.sock.recvfrom(2048), quiet=True):
            ihl = (data[0] & 0x0F) * 4 if data else 0
            if len(data) < ihl + 8:
                continue
            typ, _code, _ck, ident = struct.unpack_from("!BBHH", data, ihl)
            if typ == 0 and ident == self.ident and data[12:16] in self.hosts:
                self.last_reply = now
                self.replies += 1

    def sockets(self) -> list:
        return [self.sock]


# netlink on the critical path ------------------------------------------------------------

class Netlink:
    """A few rtnetlink requests packed by hand and sent as one batch (one sendto, then the
    ACKs): the takeover's route and proxy-neighbour changes cost tens of microseconds this
    way instead of about a millisecond each through pyroute2. pyroute2 does the rest."""

    NEWROUTE, DELROUTE, NEWNEIGH, DELNEIGH = 24, 25, 28, 29
    F_REQUEST, F_ACK, F_REPLACE, F_CREATE = 0x1, 0x4, 0x100, 0x400
    ERROR = 2
    HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
    RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table proto scope type flags
    NDMSG = struct.Struct("=BxxxiHBB")  # family ifindex state flags type
    RTA = struct.Struct("=HH")
    RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
    NDA_DST, NTF_PROXY, NUD_PERMANENT = 1, 0x08, 0x80

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.bind((0, 0))
        self.seq = int(time.time()) & 0xFFFF
        self.batch: list = []

    @classmethod
    def _attr(cls, typ: int, data: bytes) -> bytes:
        n = cls.RTA.size + len(data)
        return cls.RTA.pack(n, typ) + data + b"\0" * (-n % 4)

    def _add(self, typ: int, flags: int, body: bytes) -> None:
        self.seq += 1
        self.batch.append(self.HDR.pack(self.HDR.size + len(body), typ,
                                        flags | self.F_REQUEST | self.F_ACK, self.seq, 0) + body)

    def route(self, dst: str, gateway: Optional[str] = None, oif: Optional[int] = None,
              table: int = 254, prefsrc: Optional[str] = None, delete: bool = False) -> None:
        net = ipaddress.ip_network(dst)
        scope = 255 if delete else 0  # delete: any scope; add: universe
        body = self.RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, table if table < 256 else 252,
                               0 if delete else 4, scope, 0 if delete else 1, 0)
        if net.prefixlen:
            body += self._attr(self.RTA_DST, net.network_address.packed)
        body += self._attr(self.RTA_TABLE, struct.pack("=I", table))
        if gateway:
            body += self._attr(self.RTA_GATEWAY, socket.inet_aton(gateway))
        if oif:
            body += self._attr(self.RTA_OIF, struct.pack("=i", oif))
        if prefsrc:
            body += self._attr(self.RTA_PREFSRC, socket.inet_aton(prefsrc))
        if delete:
            self._add(self.DELROUTE, 0, body)
        else:
            self._add(self.NEWROUTE, self.F_CREATE | self.F_REPLACE, body)

    def proxy(self, ip: str, ifindex: int, delete: bool = False) -> None:
        body = self.NDMSG.pack(socket.AF_INET, ifindex, self.NUD_PERMANENT, self.NTF_PROXY, 0)
        body += self._attr(self.NDA_DST, socket.inet_aton(ip))
        if delete:
            self._add(self.DELNEIGH, 0, body)
        else:
            self._add(self.NEWNEIGH, self.F_CREATE | self.F_REPLACE, body)

    def commit(self, ignore=()) -> None:
        """Send the batch; raise OSError for the first request the kernel refused (errnos in
        ignore excepted, e.g. ENOENT/ESRCH when deleting what is already gone)."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        self.sock.sendto(b"".join(batch), (0, 0))
        want = {self.HDR.unpack_from(m)[3] for m in batch}
        first_err = None
        while want:
            data = self.sock.recv(65536)
            off = 0
            while off + self.HDR.size <= len(data):
                n, typ, _f, seq, _pid = self.HDR.unpack_from(data, off)
                if typ == self.ERROR and seq in want:
                    want.discard(seq)
                    err = -struct.unpack_from("=i", data, off + self.HDR.size)[0]
                    if err and err not in ignore and first_err is None:
                        first_err = OSError(err, os.strerror(err))
                off += max(n + (-n % 4), self.HDR.size)
        if first_err is not None:
            raise first_err

    def close(self) -> None:
        self.sock.close()


# the daemon -----------------------------------------------------------------------------

def _now_us() -> int:
    return int(time.time() * 1e6)


class Daemon:
    """One server's HANet: fault detector, interface manager, PTA requester and responder."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.key = read_key(cfg.key_file)
        self.tick_s = cfg.tick_ms / 1000.0
        self.started_us = _now_us()
        self.inc = self.started_us
        self.seq = 0
        self.req = 0
        self.guard = wire.ReplayGuard(self.started_us, cfg.max_age_s)
        self.counters = {"rx": {n: 0 for n in wire.TYPE_NAMES.values()},
                         "tx": {n: 0 for n in wire.TYPE_NAMES.values()},
                         "drops": {r: 0 for r in wire.DROP_REASONS + (
                             "wrong_interface", "source_mismatch", "unknown_request")},
                         "ticks": 0, "late_ticks": 0, "garps": 0}
        self.good = {s.name: False for s in cfg.slaves}
        self.active: Optional[str] = None
        self.pending: Optional[dict] = None  # the request awaiting its ACK
        self.serving: dict = {}  # peer name -> {via, link, ifname, req, since, ack}
        self.loop = Loop()  # the sockets; ticks, retries and queued GARPs as its timers
        self.saved_sysctls: dict = {}
        self.events = open(cfg.events_file, "a", buffering=1)
        self.dirty = True
        self.added_vip = False
        self.ipr = None
        self.tick_epoch_wall = None

    # plumbing -------------------------------------------------------------------------
    def setup(self) -> None:
        from pyroute2 import IPRoute

        from testbed import garp

        cfg = self.cfg
        self.ipr = IPRoute()
        self.nl = Netlink()
        self.idx = {}
        links = {ln.get_attr("IFLA_IFNAME"): ln for ln in self.ipr.get_links()}
        for s in cfg.slaves + (Slave("vci", cfg.vci, False, 1.0),):
            if s.ifname not in links:
                raise SpecError(f"hanet: {cfg.name} has no interface {s.ifname!r}")
            self.idx[s.ifname] = links[s.ifname]["index"]
        self.mac = {s.ifname: bytes.fromhex(links[s.ifname].get_attr("IFLA_ADDRESS")
                                            .replace(":", "")) for s in cfg.slaves}
        # the service address on the VCI
        have = {(a.get_attr("IFA_ADDRESS"), a["index"]) for a in self.ipr.get_addr(family=2)}
        if (cfg.service_ip, self.idx[cfg.vci]) not in have:
            self.ipr.addr("add", index=self.idx[cfg.vci], address=cfg.service_ip, prefixlen=32)
            self.added_vip = True
        # the sibling table: throw routes for the private subnets (they stay direct)
        self._del_rule()
        self.ipr.rule("add", table=cfg.table, priority=cfg.rule_priority)
        self._flush_table()
        for s in cfg.slaves:
            if not s.public and s.subnet:
                self.ipr.route("replace", dst=s.subnet, table=cfg.table, type="throw")
        # the destinations the public slaves reach, to send via the sibling when they fail
        self.public_dsts = sorted({s.subnet for s in cfg.slaves if s.public and s.subnet})
        self.public_dsts.append("0.0.0.0/0")
        # sockets: PTA, control (ioctl), detectors, gratuitous ARP
        self.pta = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.pta.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.pta.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.pta.bind(("0.0.0.0", cfg.port))
        self.pta.setblocking(False)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        now = time.monotonic()
        self.detectors = {}
        for i, s in enumerate(cfg.slaves):
            if s.detect == "carrier":
                d = Carrier(s, self.ctl)
            elif s.detect == "arp":
                d = ArpMonitor(s, self.mac[s.ifname], s.local_ip or cfg.service_ip,
                               self.tick_s, cfg.missed_max, now)
            else:
                d = PingList(s, (os.getpid() << 2) + i, self.tick_s, cfg.missed_max, now)
            self.detectors[s.name] = d
        self.garp_socks = {}
        self.garp_frames = {}  # (ifname, ip) -> [frame, ...]
        for s in cfg.slaves:
            if not s.public:
                continue
            self.garp_socks[s.ifname] = garp.open_socket(s.ifname)
            mac = self.mac[s.ifname].hex(":")
            for ip in (cfg.service_ip,) + tuple(p.service_ip for p in cfg.peers):
                self.garp_frames[(s.ifname, ip)] = garp.frames(ip, mac, cfg.garp_kind)
        self.warm_up()
        self.loop.add(self.pta, lambda mask: self.on_pta(time.monotonic()))
        for d in self.detectors.values():
            for sock in d.sockets():
                self.loop.add(sock, lambda mask, d=d: d.readable(time.monotonic()))

    def warm_up(self) -> None:
        """Run once every netlink request of a switch and a takeover on a documentation
        prefix (192.0.2.0/24, TEST-NET-1), so that the first real failover does not pay for
        pyroute2's lazy set-up (about 3 ms for the first route request)."""
        cfg = self.cfg
        priv = next((s for s in cfg.slaves if not s.public), None)
        pub = next(s for s in cfg.slaves if s.public)
        if priv is not None:
            self.nl.route("192.0.2.0/24", priv.peer_ip, self.idx[priv.ifname], cfg.table,
                          cfg.service_ip)
            self.nl.route("192.0.2.1/32", priv.peer_ip, self.idx[priv.ifname])
            self.nl.commit()
            self.nl.route("192.0.2.0/24", table=cfg.table, delete=True)
            self.nl.route("192.0.2.1/32", delete=True)
            self.nl.commit()
        self.nl.proxy("192.0.2.1", self.idx[pub.ifname])
        self.nl.commit()
        self.nl.proxy("192.0.2.1", self.idx[pub.ifname], delete=True)
        self.nl.commit()
        wire.decode(self.key, wire.encode(self.key, wire.Header(wire.ACK, self.cfg.id, 0, 0, 0),
                                          wire.Ack(0, wire.OK, 0, 0)))

    def _unroute(self) -> None:
        """Remove the routes via the sibling (not the throw routes), without a dump."""
        for dst in self.public_dsts:
            self.nl.route(dst, table=self.cfg.table, delete=True)
        self.nl.commit(ignore=(errno.ENOENT, errno.ESRCH))

    def _del_rule(self) -> None:
        for r in self.ipr.get_rules(family=2):
            if r.get_attr("FRA_PRIORITY") == self.cfg.rule_priority and \
                    (r.get_attr("FRA_TABLE") or r["table"]) == self.cfg.table:
                try:
                    self.ipr.rule("del", table=self.cfg.table, priority=self.cfg.rule_priority)
                except Exception:
                    pass

    def _flush_table(self, keep_throw: bool = False) -> None:
        for r in self.ipr.get_routes(family=2, table=self.cfg.table):
            if keep_throw and r["type"] == 9:  # RTN_THROW
                continue
            dst = r.get_attr("RTA_DST")
            try:
                self.ipr.route("del", dst=f"{dst or '0.0.0.0'}/{r['dst_len']}",
                               table=self.cfg.table, type=r["type"])
            except Exception:
                pass

    def cleanup(self) -> None:
        if self.ipr is None:
            return
        for peer in list(self.serving):
            try:
                self.release_for(peer)
            except Exception as e:
                self.log({"event": "error", "where": "cleanup", "error": str(e)})
        try:
            self._flush_table()
            self._del_rule()
            if self.added_vip:
                self.ipr.addr("del", index=self.idx[self.cfg.vci], address=self.cfg.service_ip,
                              prefixlen=32)
        except Exception as e:
            self.log({"event": "error", "where": "cleanup", "error": str(e)})
        self.restore_sysctls()
        self.active = None
        self.write_status(stopped=True)
        self.ipr.close()
        self.nl.close()
        self.ipr = None

    # sysctls (of this namespace: /proc/sys/net follows the opener's namespace) ----------
    def set_sysctl(self, key: str, value) -> None:
        path = "/proc/sys/" + key.replace(".", "/") if "/" not in key else "/proc/sys/" + key
        with open(path) as f:
            old = f.read().strip()
        self.saved_sysctls.setdefault(path, old)
        if old != str(value):
            with open(path, "w") as f:
                f.write(str(value))

    def restore_sysctls(self, prefix: str = "") -> None:
        for path in [p for p in self.saved_sysctls if p.startswith("/proc/sys/" + prefix)]:
            old = self.saved_sysctls.pop(path)
            try:
                with open(path, "w") as f:
                    f.write(old)
            except OSError:
                pass

    # output ---------------------------------------------------------------------------
    def log(self, rec: dict) -> None:
        rec.setdefault("t", time.time())
        rec.setdefault("server", self.cfg.name)
        self.events.write(json.dumps(rec) + "\n")

    def status(self, stopped: bool = False) -> dict:
        cfg = self.cfg
        return {"name": cfg.name, "pid": os.getpid(), "t": time.time(), "stopped": stopped,
                "service_ip": cfg.service_ip, "active": self.active,
                "mode": ("none" if self.active is None else
                         "direct" if cfg.slave(self.active).public else "via_sibling"),
                "slaves": {s.name: {"ifname": s.ifname, "public": s.public,
                                    "speed_mbit": s.speed_mbit, "detect": s.detect,
                                    "good": self.good[s.name], "active": s.name == self.active}
                           for s in cfg.slaves},
                "pending": None if self.pending is None else
                {k: self.pending[k] for k in ("type", "req", "link", "attempts")},
                "serving": {p: {k: v for k, v in st.items() if k != "ack"}
                            for p, st in self.serving.items()},
                "tick_ms": cfg.tick_ms, "tick_epoch": self.tick_epoch_wall,
                "counters": self.counters}

    def write_status(self, stopped: bool = False) -> None:
        write_json_atomic(self.cfg.status_file, self.status(stopped))
        self.dirty = False

    def send(self, body, dst: tuple) -> float:
        """Seal and send one message; returns the time of the send call (the receiver can
        run before sendto returns here)."""
        self.seq += 1
        hdr = wire.Header(body.TYPE, self.cfg.id, self.inc, self.seq, _now_us())
        data = wire.encode(self.key, hdr, body)
        t = time.time()
        try:
            self.pta.sendto(data, dst)
        except OSError as e:
            self.log({"event": "send_error", "type": wire.TYPE_NAMES[body.TYPE], "dst": dst[0],
                      "error": e.strerror})
        self.counters["tx"][wire.TYPE_NAMES[body.TYPE]] += 1
        return t

    def send_garp(self, ifname: str, ip: str) -> Optional[float]:
        """The first frame now, the others queued; returns when the first one left."""
        frames = self.garp_frames.get((ifname, ip))
        sock = self.garp_socks.get(ifname)
        if not frames or sock is None:
            return None
        sent_at = None
        for f in frames:
            try:
                sock.send(f)
                self.counters["garps"] += 1
                sent_at = sent_at or time.time()
            except OSError:
                pass
        now = time.monotonic()
        for k in range(1, self.cfg.garp_count):
            for f in frames:
                self.loop.at(now + k * self.cfg.garp_interval_ms / 1000,
                             lambda now, sock=sock, f=f: self.send_queued_garp(sock, f))
        return sent_at

    def send_queued_garp(self, sock: socket.socket, frame: bytes) -> None:
        try:
            sock.send(frame)
            self.counters["garps"] += 1
        except OSError:
            pass

    # the requester --------------------------------------------------------------------
    def tick(self) -> None:
        t_tick = time.time()
        now = time.monotonic()
        self.counters["ticks"] += 1
        for d in self.detectors.values():
            d.probe(now)
        good = {name: d.good(now) for name, d in self.detectors.items()}
        t_detected = time.time()
        changed = good != self.good
        self.good = good
        nxt = choose_active(self.cfg.slaves, good, self.active)
        if nxt != self.active:
            self.switch(self.active, nxt, t_tick, t_detected)
        if changed:  # logged after the switch, which it would delay
            self.dirty = True
            self.log({"event": "detect", "t_tick": t_tick, "good": good})

    def switch(self, old: Optional[str], new: Optional[str], t_tick: float,
               t_detected: float) -> None:
        cfg = self.cfg
        rec = {"event": "switch", "from": old, "to": new, "t_tick": t_tick,
               "t_detected": t_detected}
        self.active = new
        self.dirty = True
        was_private = old is not None and not cfg.slave(old).public
        if new is None:
            rec["kind"] = "lost"
            self.pending = None
        elif cfg.slave(new).public:
            rec["kind"] = "failback" if was_private else "direct"
            if was_private:
                self._unroute()
            rec["t_switched"] = time.time()
            rec["t_garp"] = self.send_garp(cfg.slave(new).ifname, cfg.service_ip)
            if was_private:
                self.request(wire.Release(self.next_req(), cfg.service_ip), old, rec)
        else:
            rec["kind"] = "relink" if was_private else "failover"
            s = cfg.slave(new)
            for dst in self.public_dsts:
                self.nl.route(dst, s.peer_ip, self.idx[s.ifname], cfg.table, cfg.service_ip)
            self.nl.commit()
            rec["t_switched"] = time.time()
            self.request(wire.Takeover(self.next_req(), cfg.service_ip, s.local_ip,
                                       int(s.speed_mbit * 1000), s.name), new, rec)
        if "req" not in rec:
            self.log(rec)

    def next_req(self) -> int:
        self.req += 1
        return self.req

    def request(self, body, link: str, rec: dict) -> None:
        """Send body to the sibling over private slave `link` (or, for a RELEASE whose link
        is gone, any good private slave) and keep it pending until ACKed."""
        s = self.cfg.slave(link)
        if not self.good.get(link):
            alt = [x for x in self.cfg.slaves if not x.public and self.good.get(x.name)]
            if alt:
                s = max(alt, key=lambda x: x.speed_mbit)
        dst = (s.peer_ip, self.cfg.port)
        t_sent = self.send(body, dst)
        rec.update(req=body.req, type=wire.TYPE_NAMES[body.TYPE], via_link=s.name, t_sent=t_sent)
        self.log(rec)
        self.pending = {"type": wire.TYPE_NAMES[body.TYPE], "req": body.req, "body": body,
                        "link": s.name, "dst": dst, "attempts": 1, "t_sent": t_sent,
                        "next": time.monotonic() + self.cfg.retry_ms / 1000,
                        "backoff": self.cfg.retry_ms / 1000}
        self.loop.at(self.pending["next"], self.retry)
        self.dirty = True

    def retry(self, now: float) -> None:
        """A timer: resend the pending request if it is (still) due, and re-arm."""
        p = self.pending
        if p is None or time.monotonic() < p["next"]:
            return  # acknowledged, or a newer request with its own timer
        p["attempts"] += 1
        p["backoff"] = min(p["backoff"] * 2, 1.0)
        p["next"] = time.monotonic() + p["backoff"]
        self.loop.at(p["next"], self.retry)
        self.send(p["body"], p["dst"])

    def on_ack(self, hdr, ack: wire.Ack) -> None:
        p = self.pending
        if p is None or ack.req != p["req"] or hdr.sender != self.cfg.sibling.id:
            self.counters["drops"]["unknown_request"] += 1
            return
        self.pending = None
        self.dirty = True
        self.log({"event": "ack", "req": ack.req, "type": p["type"], "link": p["link"],
                  "status": wire.STATUS_NAMES[ack.status], "attempts": p["attempts"],
                  "t_sent": p["t_sent"], "t_ack": time.time(),
                  "t_sib_recv": ack.t_recv_us / 1e6, "t_sib_done": ack.t_done_us / 1e6})

    # the responder --------------------------------------------------------------------
    def on_pta(self, now: float) -> None:
        for data, anc, _flags, src in until_dry(
                lambda: self.pta.recvmsg(256, socket.CMSG_SPACE(12))):
            t_recv = time.time()
            ifindex = None
            for level, typ, val in anc:
                if level == socket.IPPROTO_IP and typ == IP_PKTINFO and len(val) >= 4:
                    ifindex = struct.unpack_from("I", val)[0]
            # authentic, from a known daemon, over a private link, from the address it names,
            # and fresh: checked in this order, and only a message that passes everything
            # updates the replay state
            private = {self.idx[s.ifname]: s for s in self.cfg.slaves if not s.public}
            try:
                hdr, body = wire.decode(self.key, data)
                if hdr.sender not in {p.id for p in self.cfg.peers} | {self.cfg.sibling.id}:
                    raise wire.WireError("unknown_sender", str(hdr.sender))
                if not isinstance(body, wire.Ack):
                    if ifindex not in private:
                        raise wire.WireError("wrong_interface", str(ifindex))
                    if isinstance(body, wire.Takeover) and body.via_ip != src[0]:
                        raise wire.WireError("source_mismatch", f"{body.via_ip} from {src[0]}")
                self.guard.check(hdr, _now_us())
            except wire.WireError as e:
                self.drop(e.reason, src)
                continue
            self.counters["rx"][wire.TYPE_NAMES[hdr.type]] += 1
            self.dirty = True
            if isinstance(body, wire.Ack):
                self.on_ack(hdr, body)
                continue
            peer = next((p for p in self.cfg.peers if p.id == hdr.sender), None)
            if isinstance(body, wire.Takeover):
                status, t_done = self.takeover_for(peer, body, private[ifindex], hdr, t_recv)
            else:
                status, t_done = self.release_for(peer.name if peer else None,
                                                  body.service_ip), time.time()
            ack = wire.Ack(body.req, status, int(t_recv * 1e6), int((t_done or time.time()) * 1e6))
            self.send(ack, src)

    def drop(self, reason: str, src) -> None:
        self.counters["drops"][reason] = self.counters["drops"].get(reason, 0) + 1
        self.dirty = True
        if sum(self.counters["drops"].values()) <= 1000:
            self.log({"event": "drop", "reason": reason, "src": src[0]})

    def takeover_for(self, peer: Optional[Peer], req: wire.Takeover, arrived: Slave, hdr,
                     t_recv: float):
        cfg = self.cfg
        if peer is None or req.service_ip != peer.service_ip:
            self.log({"event": "refused", "why": "not a peer's service address",
                      "service_ip": req.service_ip, "sender": hdr.sender})
            return wire.REFUSED, None
        link = next((s for s in cfg.slaves if not s.public and s.subnet
                     and ipaddress.ip_address(req.via_ip) in ipaddress.ip_network(s.subnet)),
                    None)
        if link is None:
            self.log({"event": "refused", "why": "via address on no private link",
                      "via": req.via_ip})
            return wire.REFUSED, None
        pub = self.public_slave()
        if pub is None:
            self.log({"event": "takeover", "peer": peer.name, "status": "no_public"})
            return wire.NO_PUBLIC, None
        prev = self.serving.get(peer.name)
        if prev and prev["req"] == req.req and prev["inc"] == hdr.inc:
            return wire.OK, prev["t_done"]  # a retry of a request already carried out
        # forwarding, the route to the server over the named link, proxy ARP, GARP
        self.set_sysctl("net/ipv4/ip_forward", 1)
        self.set_sysctl(f"net/ipv4/neigh/{pub.ifname}/proxy_delay", 0)
        self.nl.route(f"{req.service_ip}/32", req.via_ip, self.idx[link.ifname])
        self.nl.proxy(req.service_ip, self.idx[pub.ifname])
        self.nl.commit()
        t_done = self.send_garp(pub.ifname, req.service_ip) or time.time()
        self.serving[peer.name] = {"service_ip": req.service_ip, "via": req.via_ip,
                                   "link": req.link, "ifname": link.ifname,
                                   "public": pub.ifname, "req": req.req, "inc": hdr.inc,
                                   "since": t_recv, "t_done": t_done}
        self.dirty = True
        self.log({"event": "takeover", "peer": peer.name, "req": req.req, "link": req.link,
                  "via": req.via_ip, "t_recv": t_recv, "t_done": t_done})
        return wire.OK, t_done

    def public_slave(self) -> Optional[Slave]:
        if self.active is not None and self.cfg.slave(self.active).public:
            return self.cfg.slave(self.active)
        return None

    def release_for(self, peer: Optional[str], service_ip: Optional[str] = None) -> int:
        st = self.serving.pop(peer, None) if peer else None
        if st is None:
            return wire.OK  # nothing to undo (a retry, or a reset after a restart)
        self.nl.proxy(st["service_ip"], self.idx[st["public"]], delete=True)
        self.nl.route(f"{st['service_ip']}/32", delete=True)
        self.nl.commit(ignore=(errno.ENOENT, errno.ESRCH))
        if not self.serving:
            self.restore_sysctls()
        self.dirty = True
        self.log({"event": "release", "peer": peer, "t_done": time.time()})
        return wire.OK

    # the loop -------------------------------------------------------------------------
    def run(self) -> None:
        """Tick every tick_s on a fixed grid (an overrun skips to the next tick ahead) and
        serve the sockets until TERM or INT; the status file after every round that changed
        something, and at least every second."""
        mono0 = time.monotonic()
        self.tick_epoch_mono = mono0
        self.tick_epoch_wall = time.time() - (time.monotonic() - mono0)
        self.k = 0
        loop = self.loop
        loop.stop_on_signals()
        self.write_status()
        with ready_file(self.cfg.ready_file):
            loop.at(mono0, self.on_tick)
            next_status = mono0 + 1.0
            while not loop.stopping:
                loop.run_once()
                now = time.monotonic()
                if self.dirty or now >= next_status:
                    self.write_status()
                    next_status = now + 1.0

    def on_tick(self, now: float) -> None:
        now = time.monotonic()
        due = self.tick_epoch_mono + self.k * self.tick_s
        if now - due > self.tick_s:  # overran: skip to the next tick in the future
            self.counters["late_ticks"] += 1
            self.k = int((now - self.tick_epoch_mono) / self.tick_s) + 1
        else:
            self.tick()
            self.k += 1
        self.loop.at(self.tick_epoch_mono + self.k * self.tick_s, self.on_tick)


def main(argv=None) -> int:
    return run_main("hanet", _main, argv)


def _main(argv) -> int:
    ap = ArgParser("hanet", prog="python -m testbed.failover.hanet_daemon",
                   description="HANet interface backup and sibling takeover")
    ap.add_argument("--config", required=True, help="JSON configuration (see hanet.start)")
    a = ap.parse_args(argv)
    try:
        with open(a.config) as f:
            cfg = Config.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError, SpecError) as e:
        raise UsageError(f"bad configuration {a.config}: {e}") from None

    raise_stop_on_signals()  # during set-up; the loop then stops at the end of a round
    if cfg.rt_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(cfg.rt_priority))
        except (OSError, AttributeError) as e:
            print(f"hanet {cfg.name}: no real-time priority ({e}); running at normal priority",
                  flush=True)
    d = Daemon(cfg)
    try:
        d.setup()
        print(f"hanet {cfg.name}: service {cfg.service_ip}, slaves "
              + ", ".join(f"{s.name}={s.ifname}({'public' if s.public else 'private'} "
                          f"{s.speed_mbit:g} Mbit/s, {s.detect})" for s in cfg.slaves),
              flush=True)
        d.run()
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        d.cleanup()
        d.loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
