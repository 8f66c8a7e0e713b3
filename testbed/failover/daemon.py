"""The Wackamole daemon: membership + VIP manager in one process, one UDP socket, one loop.

    python -m testbed.failover CONFIG.json                     # membership and VIPs
    python -m testbed.failover --membership-only CONFIG.json   # membership only

One process rather than a membership daemon plus a VIP daemon (Spread + Wackamole in the
paper): the VIP manager needs the view changes and its STATE messages on one authenticated
channel in one order, and an extra hop between two processes would only add to the
interruption it is there to shorten. The two layers stay separate classes
(membership.Membership, vip.VipManager), both free of I/O; this module does the I/O.

Runs inside the server's namespace (testbed.failover.start_wackamole starts it there):
- UDP on `port`: to the segment's broadcast address when `broadcast` is set (one datagram
  reaches every member), else to each peer's address;
- VIPs added and removed as secondary addresses of `dev` with pyroute2; configured VIPs
  found on `dev` at start are removed (a new daemon holds nothing);
- gratuitous ARP (frames built by testbed.garp, passed in the configuration or built at
  start) from a packet socket on `dev`: broadcast, and a copy sent straight to every
  neighbour MAC the members have shared (ARP-cache sharing);
- a status file (JSON, replaced atomically) with the view, the VIPs held and the drop
  counters, rewritten at once on every change and every second for the counters;
- the shared HMAC key from a hex key file, the ready file while it runs, the loop, signals
  and one-line usage errors (exit 2) from the daemon runtime (testbed.daemon);
- SIGTERM or SIGINT: a voluntary leave: drain (the representative moves our VIPs to the
  others, each with one hand-over message), release whatever is left, announce LEAVE,
  exit 0.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter
from typing import Optional

from testbed.daemon import (ArgParser, Loop, UsageError, read_key, ready_file, run_main,
                            write_json_atomic)
from testbed.daemon.datagrams import until_dry
from testbed.failover import wire
from testbed.failover.membership import Membership, Timeouts
from testbed.failover.vip import Actuator, VipManager

NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # reachable, stale, delay, probe, permanent
EEXIST, EADDRNOTAVAIL = 17, 99


def log(msg: str) -> None:
    print(f"{time.time():.3f} {msg}", flush=True)


def garp_frames(vips: list, mac: str) -> dict:
    """The gratuitous ARP frames announcing each VIP at mac, built with testbed.garp (scapy):
    {"mac": mac, vip: {"broadcast": [request, reply] as hex, "reply": hex}}. The reply form
    (sender = target = vip, hwsrc = hwdst = mac) is what Linux accepts within its ARP
    locktime; sent to one neighbour, only its Ethernet destination differs.
    start_wackamole builds them once in the caller and passes them in the configuration,
    so that daemons start without importing scapy."""
    from testbed import garp

    out: dict = {"mac": mac}
    for v in vips:
        out[v] = {"broadcast": [f.hex() for f in garp.frames(v, mac, "both")],
                  "reply": garp.frame(v, mac, "reply").hex()}
    return out


class KernelVips(Actuator):
    """VIPs as secondary addresses of dev (pyroute2), gratuitous ARP from a packet socket."""

    def __init__(self, dev: str, prefixlen: int, vips: list, garp_mode: str,
                 neighbours: dict, frames: Optional[dict] = None):
        from pyroute2 import IPRoute

        from testbed import garp

        self.dev, self.prefixlen, self.vips = dev, prefixlen, set(vips)
        self.mode = garp_mode
        self.neighbours = neighbours  # ip -> mac, shared by the members (kept by the daemon)
        self.ipr = IPRoute()
        found = self.ipr.link_lookup(ifname=dev)
        if not found:
            raise UsageError(f"no interface {dev!r} in this namespace")
        self.idx = found[0]
        self.mac = self.ipr.get_links(self.idx)[0].get_attr("IFLA_ADDRESS")
        if frames is None or frames.get("mac") != self.mac:
            frames = garp_frames(vips, self.mac)  # imports scapy: about a second
        self.broadcast = {v: [bytes.fromhex(f) for f in frames[v]["broadcast"]] for v in vips}
        self.tail = {v: bytes.fromhex(frames[v]["reply"])[6:] for v in vips}
        self.psock = garp.open_socket(dev)
        self.counters = Counter()

    def clear(self) -> list:
        """Remove configured VIPs left on dev (by an earlier daemon that was killed)."""
        gone = []
        for a in self.ipr.get_addr(index=self.idx):
            ip = a.get_attr("IFA_ADDRESS")
            if ip in self.vips:
                self.release(ip)
                gone.append(ip)
        return gone

    def acquire(self, vip: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.ipr.addr("add", index=self.idx, address=vip, prefixlen=self.prefixlen)
        except NetlinkError as e:
            if e.code != EEXIST:
                self.counters["addr_errors"] += 1
                log(f"cannot add {vip}: {e}")

    def release(self, vip: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.ipr.addr("del", index=self.idx, address=vip, prefixlen=self.prefixlen)
        except NetlinkError as e:
            if e.code != EADDRNOTAVAIL:
                self.counters["addr_errors"] += 1
                log(f"cannot remove {vip}: {e}")

    def _send(self, frame: bytes) -> None:
        try:
            self.psock.send(frame)
            self.counters["garp_frames"] += 1
        except OSError:  # the interface is down: this server is cut off anyway
            self.counters["garp_errors"] += 1

    def announce(self, vip: str) -> None:
        if self.mode in ("broadcast", "both"):
            for f in self.broadcast[vip]:
                self._send(f)
        if self.mode in ("unicast", "both"):
            for ip, mac in sorted(self.neighbours.items()):
                if ip not in self.vips and mac != self.mac:
                    self._send(bytes.fromhex(mac.replace(":", "")) + self.tail[vip])
                    self.counters["garp_unicast"] += 1

    def own_neighbours(self) -> dict:
        out = {}
        for n in self.ipr.get_neighbours(ifindex=self.idx):
            ip, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
            if ip and mac and n["state"] & NUD_USABLE and ip not in self.vips:
                out[ip] = mac
        return out

    def kernel_held(self) -> list:
        return sorted(a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(index=self.idx)
                      if a.get_attr("IFA_ADDRESS") in self.vips)


class Daemon:
    def __init__(self, cfg: dict, membership_only: bool = False):
        self.cfg = cfg
        self.me = int(cfg["id"])
        self.name = cfg.get("name", str(self.me))
        self.peers = {int(k): v for k, v in cfg["peers"].items() if int(k) != self.me}
        self.port = int(cfg["port"])
        self.bcast = cfg.get("broadcast")
        self.key = read_key(cfg["key_file"])
        self.t = Timeouts(**cfg["timeouts"])
        self.inc = int(time.time() * 1e6)
        self.seq: Counter = Counter()  # dest (0: everyone) -> last sequence number
        self.guard = wire.ReplayGuard(self.inc, self.me, cfg.get("max_age_s", 10.0))
        self.drops: Counter = Counter()
        self.rx: Counter = Counter()
        self.tx: Counter = Counter()
        self.send_errors = 0
        self.status_path = cfg["status"]
        self._status_sig = None
        self.neighbours: dict = {}  # ip -> mac, own and shared

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.bind(("0.0.0.0", self.port))
        self.sock.setblocking(False)

        self.kernel: Optional[KernelVips] = None
        self.vipm: Optional[VipManager] = None
        if not membership_only and cfg.get("vips"):
            self.kernel = KernelVips(cfg["dev"], int(cfg["prefixlen"]), cfg["vips"],
                                     cfg.get("garp", "both"), self.neighbours,
                                     cfg.get("garp_frames"))
            cleared = self.kernel.clear()
            if cleared:
                log(f"removed VIPs left on {cfg['dev']}: {cleared}")
        now = time.monotonic()  # timers start once the slow set-up (scapy) is done
        if self.kernel is not None:
            self.vipm = VipManager(
                self.me, cfg["vips"], self.kernel, self.send,
                regather=lambda t: self.mem.regather(t), now=now,
                mature_s=float(cfg.get("mature_s", self.t.discovery_s)),
                balance_s=float(cfg.get("balance_s", 5.0)),
                handover_s=self.t.discovery_s,
                garp_offsets=cfg.get("garp_offsets", (0.0, 0.1, 0.3)),
                refresh_s=float(cfg.get("garp_refresh_s", 0.0)), log=log)
        self.mem = Membership(self.me, self.peers, self.t, now, self.send, self._on_view, log,
                              mature=lambda: bool(self.vipm and self.vipm.mature), inc=self.inc)
        self.arp_share_s = float(cfg.get("arp_share_s", 1.0))
        self.next_share = now + 0.2
        self.next_status = now

    # transport -------------------------------------------------------------------------------
    def send(self, dests, msg) -> None:
        """To dests (None: every peer): one broadcast if there is a broadcast address and
        more than one, else one unicast per member, each addressed (and numbered) for it."""
        if dests is None:
            dests = tuple(self.peers)
        dests = [d for d in dests if d in self.peers]
        if not dests:
            return
        if self.bcast and len(dests) > 1:
            targets = [(0, self.bcast)]
        else:
            targets = [(d, self.peers[d]) for d in dests]
        for dest, ip in targets:
            self.seq[dest] += 1
            hdr = wire.Header(msg.type, self.me, self.inc, self.seq[dest],
                              int(time.time() * 1e6), dest)
            try:
                self.sock.sendto(wire.encode(self.key, hdr, msg), (ip, self.port))
                self.tx[wire.TYPE_NAMES[msg.type]] += 1
            except OSError:
                self.send_errors += 1  # no route: our interface is down

    def _on_view(self, view) -> None:
        if self.vipm is not None:
            self.vipm.on_view(view, time.monotonic())

    def receive(self, data: bytes, now: float) -> None:
        try:
            hdr, msg = wire.decode(self.key, data)
        except wire.WireError as e:
            self.drops[e.reason] += 1
            return
        if hdr.sender == self.me:
            return  # our own broadcast
        if hdr.sender not in self.peers:
            self.drops["unknown_sender"] += 1
            return
        why = self.guard.check(hdr, int(time.time() * 1e6))
        if why:
            self.drops[why] += 1
            return
        self.rx[wire.TYPE_NAMES[hdr.type]] += 1
        if hdr.type in wire.MEMBERSHIP_TYPES:
            self.mem.receive(hdr.sender, hdr.inc, msg, now)
            return
        if not self.mem.heard(hdr.sender, hdr.inc, now):
            return
        if hdr.type == wire.ARP_SHARE:
            for ip, mac in msg.entries:
                self.neighbours[ip] = mac
        elif self.vipm is None:
            return
        elif hdr.type == wire.STATE:
            self.vipm.on_state(hdr.sender, msg, now)
        elif hdr.type == wire.BALANCE:
            self.vipm.on_balance(hdr.sender, msg, now)
        elif hdr.type == wire.RELEASED:
            self.vipm.on_released(hdr.sender, msg, now)
        elif hdr.type == wire.DRAIN:
            self.vipm.on_drain(hdr.sender, msg, now)

    # status ----------------------------------------------------------------------------------
    def status(self, now: float, leaving: bool = False) -> dict:
        st = {"id": self.me, "name": self.name, "pid": os.getpid(), "inc": self.inc,
              "time": time.time(), "leaving": leaving,
              "timeouts": self.t.as_dict(), **self.mem.status(now),
              "drops": dict(self.drops), "rx": dict(self.rx), "tx": dict(self.tx),
              "send_errors": self.send_errors, "neighbours": dict(sorted(self.neighbours.items()))}
        if self.vipm is not None:
            st.update(self.vipm.status())
            st["kernel"] = dict(self.kernel.counters)
        return st

    def write_status(self, now: float, force: bool = False, leaving: bool = False) -> None:
        mem = self.mem
        sig = (mem.view, mem.installed, mem.phase(now), self.vipm and self.vipm.state,
               self.vipm and tuple(sorted(self.vipm.held)), self.vipm and self.vipm.mature,
               sum(self.drops.values()), len(self.neighbours), leaving)
        if not force and sig == self._status_sig and now < self.next_status:
            return
        self._status_sig = sig
        self.next_status = now + 1.0  # counters; changes are written at once
        write_json_atomic(self.status_path, self.status(now, leaving))

    # loop ------------------------------------------------------------------------------------
    def share_arp(self, now: float) -> None:
        self.next_share = now + self.arp_share_s
        if self.kernel is None:
            return
        own = self.kernel.own_neighbours()
        self.neighbours.update(own)
        entries = tuple(sorted(own.items()))[:wire.MAX_ARP_ENTRIES]
        if entries:
            self.send(None, wire.ArpShare(entries))

    def leave(self) -> None:
        now = time.monotonic()
        if self.vipm is not None:
            self.vipm.release_all()
        log(f"leaving view {self.mem.view.vid}")
        for _ in range(3):
            self.send(None, wire.Leave(self.mem.view))
            time.sleep(0.002)
        self.mem.left = True
        self.write_status(now, force=True, leaving=True)

    def run(self) -> None:
        """Serve until TERM or INT (the loop's wake-up fd ends the select at once), then
        drain and leave."""
        loop = Loop()
        loop.add(self.sock, self.readable)
        loop.stop_on_signals()
        try:
            with ready_file(self.cfg.get("ready")):
                self.write_status(time.monotonic(), force=True)
                log(f"member {self.me} ({self.name}) up: port {self.port}, "
                    f"peers {sorted(self.peers)}, timeouts {self.t.as_dict()}, "
                    f"{len(self.cfg.get('vips') or []) if self.vipm else 0} VIPs")
                self.serve(loop)
                self.leave()
        finally:
            loop.close()

    def serve(self, loop: Loop) -> None:
        """The protocol's timers (tick() says when it is next due) around the loop's select;
        after a stop signal, until the drain is done or its time is up."""
        drain_until = None
        while True:
            now = time.monotonic()
            if loop.stopping:
                if drain_until is None:
                    drain_s = min(1.0, self.t.discovery_s)
                    draining = self.vipm is not None and self.vipm.request_drain(now)
                    drain_until = now + drain_s if draining else now
                    if draining:
                        log(f"draining before the leave (at most {drain_s:g} s)")
                if now >= drain_until or self.vipm is None or self.vipm.drained():
                    return
            nxt = [self.mem.tick(now), self.next_share, self.next_status]
            if drain_until is not None:
                nxt.append(drain_until)
            if self.vipm is not None:
                nxt.append(self.vipm.tick(now))
            if now >= self.next_share:
                self.share_arp(now)
            self.write_status(now)
            loop.run_once(max(0.0, min(nxt) - time.monotonic()))

    def readable(self, mask: int) -> None:
        for data, _addr in until_dry(lambda: self.sock.recvfrom(2048)):
            self.receive(data, time.monotonic())


def main(argv=None) -> int:
    return run_main("failover", _main, argv)


def _main(argv) -> int:
    ap = ArgParser("failover", prog="python -m testbed.failover",
                   description="Wackamole-style membership and VIP failover daemon "
                   "(config: see testbed.failover)")
    ap.add_argument("config", help="JSON configuration file")
    ap.add_argument("--membership-only", action="store_true",
                    help="run the group membership without managing VIPs")
    a = ap.parse_args(argv)
    try:
        with open(a.config) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"bad configuration {a.config}: {e}") from None
    Daemon(cfg, a.membership_only).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
