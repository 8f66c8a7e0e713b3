"""Gratuitous ARP: frames built with scapy, sent from inside a namespace.

A gratuitous ARP announces "ip is at mac" to a whole segment, so that neighbours holding an
entry for ip update it (a virtual IP moving to another host, a router taking over). Linux
updates an existing entry at once, even within its locktime, when the frame is a proper
GARP: sender and target IP equal, and for the reply form also sender and target MAC equal
(arp_is_garp() in net/ipv4/arp.c). Both forms are built here:

    request  Ether(dst=broadcast) / ARP(op=who-has, psrc=ip, pdst=ip, hwdst=00:00:00:00:00:00)
    reply    Ether(dst=broadcast) / ARP(op=is-at,   psrc=ip, pdst=ip, hwdst=mac)

Sending uses a packet socket opened inside the namespace (a socket belongs to the namespace
of the thread that created it), so scapy's own interface table, which describes the root
namespace, is never consulted. `python -m testbed.garp IFNAME IP` does the same from
whatever namespace it runs in.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
import time
from typing import Optional

from testbed.daemon import ArgParser, UsageError, run_main
from testbed.errors import SpecError

KINDS = ("request", "reply", "both")
BROADCAST = "ff:ff:ff:ff:ff:ff"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check(ip: str, mac: str, kind: str, count: int, interval_s: float) -> None:
    """Validate before anything is sent: one-line SpecErrors."""
    try:
        if ipaddress.ip_address(ip).version != 4:
            raise ValueError
    except ValueError:
        raise SpecError(f"gratuitous ARP: bad IPv4 address {ip!r}") from None
    if not MAC_RE.match(str(mac).lower()):
        raise SpecError(f"gratuitous ARP: bad MAC address {mac!r}")
    if kind not in KINDS:
        raise SpecError(f"gratuitous ARP: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1000:
        raise SpecError(f"gratuitous ARP: count must be an integer from 1 to 1000, got {count!r}")
    if not 0 <= interval_s <= 60:
        raise SpecError(f"gratuitous ARP: interval must be 0-60 s, got {interval_s!r}")


def frame(ip: str, mac: str, kind: str = "request") -> bytes:
    """One gratuitous ARP frame (Ethernet header included), request or reply form."""
    from scapy.layers.l2 import ARP, Ether  # slow import (~0.5 s): only when used

    if kind == "request":
        arp = ARP(op="who-has", hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip)
    elif kind == "reply":
        arp = ARP(op="is-at", hwsrc=mac, psrc=ip, hwdst=mac, pdst=ip)
    else:
        raise SpecError(f"gratuitous ARP frame: kind must be request or reply, got {kind!r}")
    return bytes(Ether(dst=BROADCAST, src=mac) / arp)


def frames(ip: str, mac: str, kind: str = "request") -> list:
    return [frame(ip, mac, k) for k in (("request", "reply") if kind == "both" else (kind,))]


def open_socket(ifname: str, ns: Optional[str] = None) -> socket.socket:
    """A raw packet socket bound to ifname, created inside namespace ns (None: this one)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((ifname, 0))
        except OSError as e:
            s.close()
            raise SpecError(f"gratuitous ARP: no interface {ifname!r}: {e.strerror}") from None
        return s

    if ns is None:
        return make()
    from testbed.kernel import netns as kns

    with kns.enter(ns):  # only the creation: the socket stays in ns afterwards
        return make()


def send(ifname: str, ip: str, mac: Optional[str] = None, ns: Optional[str] = None,
         count: int = 3, interval_s: float = 0.1, kind: str = "request") -> int:
    """Send count gratuitous ARPs (count of each form for kind="both") announcing ip at mac
    (default: ifname's own MAC) from ifname, interval_s apart; returns the frames sent."""
    check(ip, mac or "00:00:00:00:00:00", kind, count, interval_s)
    with open_socket(ifname, ns) as s:
        mac = str(mac).lower() if mac else s.getsockname()[4].hex(":")
        data = frames(ip, mac, kind)
        sent = 0
        for i in range(count):
            if i:
                time.sleep(interval_s)
            for f in data:
                s.send(f)
                sent += 1
    return sent


def main(argv=None) -> int:
    return run_main("garp", _main, argv)


def _main(argv) -> int:
    ap = ArgParser("garp", description="send gratuitous ARPs from this namespace")
    ap.add_argument("ifname")
    ap.add_argument("ip")
    ap.add_argument("--mac", help="announced MAC (default: the interface's)")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between frames")
    ap.add_argument("--kind", choices=KINDS, default="request")
    a = ap.parse_args(argv)
    try:
        n = send(a.ifname, a.ip, a.mac, count=a.count,
                 interval_s=a.interval, kind=a.kind)
    except SpecError as e:
        raise UsageError(str(e)) from None
    print(f"sent {n} gratuitous ARP frame(s) for {a.ip} on {a.ifname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
