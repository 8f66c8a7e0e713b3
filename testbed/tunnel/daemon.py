"""A user-space IP-in-UDP tunnel over TUN: works on every kernel that has /dev/net/tun.

One process per tunnel end, inside the node's namespace. It opens a TUN device, gives it
its inner address and MTU, and relays: every IP packet the kernel routes into the TUN
device goes to the peer in one UDP datagram; every valid datagram from the peer is written
to the TUN device. Nothing is authenticated; datagrams from anyone but the configured peer
(address and port) and malformed ones are dropped and counted.

Wire format (one UDP datagram, declared once here and in `classify`):

    plain   := IP packet                        first byte 0x4_ (IPv4) or 0x6_ (IPv6)
    offload := virtio_net_hdr (10 bytes) + IP packet    first byte < 0x10 (the header's flags)

`plain` is what every packet is without offloads, and what an offloaded packet becomes when
it needs no offload (no partial checksum, no segmentation), so a packet of the full inner
MTU still fits the underlay MTU: overhead 28 bytes (outer IPv4 20 + UDP 8). With offloads
(the default, `--offload`), the TUN device takes TCP segmentation and checksum offload
(IFF_VNET_HDR + TUNSETOFFLOAD): the kernel hands us up to `--gso-max` bytes of TCP in one
read, we send it in one UDP datagram (IP-fragmented on the underlay; the peer's kernel
reassembles it) and the peer writes it whole to its TUN device, header included. That is
one Python round per ~40 packets instead of one per packet: Python's per-packet cost
(a few microseconds) is what limits a user-space tunnel.

CLI:  python -m testbed.tunnel --dev NAME --local IP --remote IP --port N [--remote-port N]
          --inner A.B.C.D/LEN --mtu N [--offload|--no-offload] [--gso-max BYTES]
          [--control PATH] [--ready-file PATH]
Control (JSON datagrams on the UNIX socket PATH; the reply goes to the sender's address):
    {"stats": true} -> {"ok": true, "tun_rx_packets", "tun_rx_bytes", "sent_packets",
                        "sent_bytes", "send_drops", "udp_rx_packets", "udp_rx_bytes",
                        "tun_tx_packets", "tun_tx_bytes", "dropped_foreign",
                        "dropped_malformed", "tun_write_errors", "offload"}
Exit codes: 0 on SIGTERM/SIGINT (the TUN device goes with the process), 1 if the device or
socket cannot be set up, 2 for bad arguments (nothing created).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys

from testbed.daemon import ArgParser, Loop, ipv4, port, ready_file, remove_quietly, run_main
from testbed.daemon.control import bind_control, request

# /dev/net/tun
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0

# wire format
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM, F_DATA_VALID = 1, 2
GSO_TYPES = {0, 1, 3, 4, 5, 0x81, 0x84}  # NONE, TCPV4, UDP, TCPV6, UDP_L4 (+ECN)
OVERHEAD = 28  # outer IPv4 (20) + UDP (8); a plain datagram carries no header of its own
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
DEFAULT_PORT = 4790
DEFAULT_GSO_MAX = 60000  # measured: 16 KB 1.1, 32 KB 1.5, 60 KB 2.2 Gbit/s unshaped
BATCH = 256  # packets drained from one fd before looking at the others
SOCKBUF = 16 << 20

PLAIN, OFFLOAD, MALFORMED = 0, 1, 2


def classify(data, offset: int, n: int, offload: bool) -> int:
    """What the datagram data[offset:offset + n] is: PLAIN, OFFLOAD or MALFORMED.

    PLAIN: an IPv4 packet whose total length is n, or an IPv6 packet whose payload length
    plus 40 is n. OFFLOAD (only when this end takes offloads): a 10-byte virtio_net_hdr with
    known flags and GSO type, followed by a PLAIN packet. The kernel checks the rest (a bad
    header makes the TUN write fail, counted as a write error)."""
    if n < 20:
        return MALFORMED
    b0 = data[offset]
    version = b0 >> 4
    if version == 4:
        if b0 & 15 < 5 or (data[offset + 2] << 8 | data[offset + 3]) != n:
            return MALFORMED
        return PLAIN
    if version == 6:
        if n < 40 or (data[offset + 4] << 8 | data[offset + 5]) + 40 != n:
            return MALFORMED
        return PLAIN
    if offload and b0 < 0x10 and n >= VNET_LEN + 20:
        if b0 & ~(F_NEEDS_CSUM | F_DATA_VALID) or data[offset + 1] not in GSO_TYPES:
            return MALFORMED
        if classify(data, offset + VNET_LEN, n - VNET_LEN, False) != PLAIN:
            return MALFORMED
        return OFFLOAD
    return MALFORMED


def needs_header(hdr) -> bool:
    """Whether a packet read with this virtio_net_hdr must travel with it: only when the
    kernel left work for the receiver (segmentation or a partial checksum)."""
    return bool(hdr[1] or hdr[0] & F_NEEDS_CSUM)


def _log(msg: str) -> None:
    print(f"tunnel: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def open_tun(name: str, offload: bool) -> int:
    """Create (or attach to) TUN device `name`; it vanishes when the fd closes, unless it
    was made persistent by someone else."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    return fd


def _ip(*args: str, check: bool = True) -> bool:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0 and check:
        raise OSError(f"ip {' '.join(args)}: {(p.stderr or p.stdout).strip()}")
    return p.returncode == 0


def configure(dev: str, inner: ipaddress.IPv4Interface, mtu: int, gso_max: int | None) -> None:
    """Address, MTU, up (we are already in the node's namespace); then cap the size of
    offloaded packets so one fits a UDP datagram. A kernel that cannot change gso_max_size
    keeps its default (64 KB): TCP's own packets still fit (it leaves room for headers),
    the rare larger forwarded one is counted in send_drops."""
    _ip("address", "add", str(inner), "dev", dev)
    _ip("link", "set", "dev", dev, "mtu", str(mtu), "up")
    if gso_max and not _ip("link", "set", "dev", dev, "gso_max_size", str(gso_max), check=False):
        _log(f"{dev}: cannot set gso_max_size {gso_max}; keeping the kernel's default")


class Tunnel:
    """One TUN device and one UDP socket, relayed by one runtime Loop."""

    COUNTERS = ("tun_rx_packets", "tun_rx_bytes", "sent_packets", "sent_bytes", "send_drops",
                "udp_rx_packets", "udp_rx_bytes", "tun_tx_packets", "tun_tx_bytes",
                "dropped_foreign", "dropped_malformed", "tun_write_errors", "wakeups")

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.offload = args.offload
        self.peer = (args.remote, args.remote_port)
        self.tun = -1
        self.sock: socket.socket | None = None
        self.ctl: socket.socket | None = None
        self.counts = dict.fromkeys(self.COUNTERS, 0)

    def open(self) -> None:
        a = self.args
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
            except OSError:  # not privileged: as large as the sysctls allow
                self.sock.setsockopt(socket.SOL_SOCKET, plain, SOCKBUF)
        # offloaded datagrams are larger than the underlay MTU: let IP fragment them
        self.sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        self.sock.bind((a.local, a.port))
        self.sock.setblocking(False)
        self.tun = open_tun(a.dev, self.offload)
        configure(a.dev, a.inner, a.mtu, a.gso_max if self.offload else None)
        if a.control:
            self.ctl = bind_control(a.control)

    def close(self) -> None:
        if self.tun >= 0:
            os.close(self.tun)
            self.tun = -1
        for s in (self.sock, self.ctl):
            if s is not None:
                s.close()
        if self.ctl is not None:
            remove_quietly(self.args.control)

    def stats(self) -> dict:
        return {"ok": True, **self.counts, "offload": self.offload, "dev": self.args.dev,
                "mtu": self.args.mtu, "peer": f"{self.peer[0]}:{self.peer[1]}"}

    def handle_control(self, data: bytes) -> dict:
        try:
            msg = json.loads(data)
            if isinstance(msg, dict) and msg.get("stats"):
                return self.stats()
            return {"ok": False, "error": "unknown command; use {\"stats\": true}"}
        except ValueError as e:
            return {"ok": False, "error": f"bad JSON: {e}"}

    def _on_control(self, mask: int = 0) -> None:
        while True:
            try:
                data, addr = self.ctl.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            if addr:
                try:
                    self.ctl.sendto(json.dumps(self.handle_control(data)).encode(), addr)
                except OSError as e:
                    _log(f"control reply to {addr} failed: {e}")

    def run(self, loop: Loop) -> None:
        """Relay until the loop stops (SIGTERM/SIGINT: loop.stop_on_signals()). The hot
        paths keep everything in locals; each drains up to BATCH packets per wake-up."""
        tun, sock, peer, offload = self.tun, self.sock, self.peer, self.offload
        # tun -> udp: read into rbuf; with offload, rbuf starts with the virtio_net_hdr
        rbuf = bytearray(MAX_DATAGRAM + VNET_LEN + 64)
        rmv = memoryview(rbuf)
        # udp -> tun: receive at offset VNET_LEN; a plain packet is written with the zero
        # header in front of it (offload) or alone; an offload datagram as it came
        ubuf = bytearray(VNET_LEN + MAX_DATAGRAM + 64)
        umv = memoryview(ubuf)
        into = umv[VNET_LEN:]
        readv, write = os.readv, os.write
        recvfrom_into, sendto = sock.recvfrom_into, sock.sendto
        rbufs = [rbuf]
        c = self.counts

        def from_tun(mask: int) -> None:
            pk = by = sent = sby = drops = 0
            for _ in range(BATCH):
                try:
                    n = readv(tun, rbufs)
                except BlockingIOError:
                    break
                pk += 1
                by += n
                if offload:
                    out = rmv[:n] if (rbuf[1] or rbuf[0] & 1) else rmv[VNET_LEN:n]
                else:
                    out = rmv[:n]
                try:
                    sby += sendto(out, peer)
                    sent += 1
                except OSError:  # EAGAIN, ENOBUFS, EMSGSIZE, unreachable
                    drops += 1
            c["tun_rx_packets"] += pk
            c["tun_rx_bytes"] += by
            c["sent_packets"] += sent
            c["sent_bytes"] += sby
            c["send_drops"] += drops

        def from_udp(mask: int) -> None:
            pk = by = wp = wby = foreign = bad = werr = 0
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(into)
                except BlockingIOError:
                    break
                pk += 1
                by += n
                if addr != peer:
                    foreign += 1
                    continue
                kind = classify(ubuf, VNET_LEN, n, offload)
                if kind == PLAIN:
                    out = umv[:VNET_LEN + n] if offload else umv[VNET_LEN:VNET_LEN + n]
                elif kind == OFFLOAD:
                    out = umv[VNET_LEN:VNET_LEN + n]
                else:
                    bad += 1
                    continue
                try:
                    write(tun, out)
                    wp += 1
                    wby += n
                except OSError:
                    werr += 1
            c["udp_rx_packets"] += pk
            c["udp_rx_bytes"] += by
            c["tun_tx_packets"] += wp
            c["tun_tx_bytes"] += wby
            c["dropped_foreign"] += foreign
            c["dropped_malformed"] += bad
            c["tun_write_errors"] += werr

        loop.add(tun, from_tun)
        loop.add(sock, from_udp)
        if self.ctl is not None:
            loop.add(self.ctl, self._on_control)
        while not loop.stopping:
            loop.run_once()
            c["wakeups"] += 1


def control(path: str, message: dict, timeout: float = 2.0) -> dict:
    """Send one control message to the daemon listening on `path`; return its reply.
    Raises TimeoutError without a reply, OSError if the socket is missing."""
    return request(path, message, timeout, what="tunnel")


def _inner(text: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address/len: {text!r}") from None
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"--inner needs a prefix length: {text!r}")
    return iface


def parse_args(argv) -> argparse.Namespace:
    p = ArgParser("tunnel", description=__doc__.splitlines()[0])
    p.add_argument("--dev", required=True, help="TUN device name (created, at most 15 chars)")
    p.add_argument("--local", type=ipv4, required=True, help="underlay address to bind")
    p.add_argument("--remote", type=ipv4, required=True, help="the peer's underlay address")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help="local UDP port")
    p.add_argument("--remote-port", type=port, default=None, help="peer's port (= --port)")
    p.add_argument("--inner", type=_inner, required=True, help="inner address/len of the TUN")
    p.add_argument("--mtu", type=int, required=True, help="MTU of the TUN device")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="TSO/checksum offload on the TUN device (both ends must agree)")
    p.add_argument("--gso-max", type=int, default=DEFAULT_GSO_MAX,
                   help="largest offloaded packet, bytes (one UDP datagram)")
    p.add_argument("--control", default=None, help="UNIX datagram socket path to create")
    p.add_argument("--ready-file", default=None, help="written once the device is up")
    a = p.parse_args(argv)
    if not 1 <= len(a.dev) <= 15 or "/" in a.dev or any(ch.isspace() for ch in a.dev):
        p.error(f"--dev must be 1..15 characters without '/' or spaces, got {a.dev!r}")
    if not 68 <= a.mtu <= 65535:
        p.error(f"--mtu must be in 68..65535, got {a.mtu}")
    if not 1500 <= a.gso_max <= MAX_DATAGRAM - VNET_LEN:
        p.error(f"--gso-max must be in 1500..{MAX_DATAGRAM - VNET_LEN}, got {a.gso_max}")
    if a.remote_port is None:
        a.remote_port = a.port
    return a


def serve(argv) -> int:
    args = parse_args(argv)
    t = Tunnel(args)
    loop = Loop()
    loop.stop_on_signals()  # before the device exists: a TERM during set-up ends it cleanly
    try:
        try:
            t.open()
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno == errno.ENOENT and t.tun < 0:
                reason = "no /dev/net/tun (see `testbed doctor`)"
            _log(f"cannot set up {args.dev}: {reason}")
            return 1
        with ready_file(args.ready_file, {
                "dev": args.dev, "local": args.local, "port": args.port,
                "remote": args.remote, "remote_port": args.remote_port,
                "inner": str(args.inner), "mtu": args.mtu, "offload": args.offload,
                "control": args.control}):
            t.run(loop)
    finally:
        loop.close()
        t.close()
    return 0


def main(argv=None) -> int:
    return run_main("tunnel", serve, argv)
