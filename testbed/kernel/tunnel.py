"""Kernel tunnels (VXLAN, GRE, IPIP) inside a node's namespace; `show` also lists the TUN
devices of the user-space tunnel (testbed.tunnel.daemon).

One end of a point-to-point tunnel: a device between two underlay addresses, with an inner
address and an MTU small enough that an inner packet of the full MTU still fits the
underlay's MTU once encapsulated (so TCP works without fragmentation or PMTU discovery).
Which kinds this kernel has is for testbed.capabilities.probe() to say, not for us.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Optional

from testbed.errors import CommandError, TestbedError
from testbed.run import run

KINDS = ("vxlan", "gre", "ipip")
#: Encapsulation overhead per packet, bytes, over IPv4: outer IPv4 header (20) plus
#: vxlan: UDP 8 + VXLAN 8 + the inner Ethernet header 14; gre: the 4-byte GRE header
#: (+4 with a key); ipip: nothing more.
OVERHEAD = {"vxlan": 50, "gre": 24, "ipip": 20}
VXLAN_PORT = 4789  # IANA
TTL = 64  # outer TTL (the default "inherit" would copy the inner packet's)
#: Made by the kernel in every namespace once the gre/ipip modules are loaded: not tunnels
#: of ours, and the reason our devices are never called gre0 or tunl0.
FALLBACK = ("gre0", "gretap0", "erspan0", "tunl0", "sit0", "ip6tnl0", "ip6gre0")


def overhead(kind: str, key: Optional[int] = None) -> int:
    if kind not in OVERHEAD:
        raise TestbedError(f"unknown kernel tunnel kind {kind!r} (known: {', '.join(KINDS)})")
    return OVERHEAD[kind] + (4 if kind == "gre" and key is not None else 0)


def link_argv(name: str, kind: str, local: str, remote: str, vni: Optional[int] = None,
              key: Optional[int] = None, port: Optional[int] = None) -> list:
    """The `ip link add` arguments (after `ip -n NS`) for one end."""
    argv = ["link", "add", "name", name, "type", kind]
    if kind == "vxlan":
        if vni is None:
            raise TestbedError("a vxlan tunnel needs a VNI")
        argv += ["id", str(vni), "dstport", str(port or VXLAN_PORT)]
    argv += ["local", local, "remote", remote, "ttl", str(TTL)]
    if kind == "gre" and key is not None:
        argv += ["key", str(key)]
    return argv


def create(ns: str, name: str, kind: str, local: str, remote: str,
           inner: ipaddress.IPv4Interface, mtu: int, vni: Optional[int] = None,
           key: Optional[int] = None, port: Optional[int] = None) -> None:
    """Create one end in namespace ns: the device, its inner address, its MTU, up.
    All or nothing: if a later step fails, the device is deleted again."""
    ip = ["ip", "-n", ns]
    run(ip + link_argv(name, kind, local, remote, vni, key, port))
    try:
        run(ip + ["address", "add", str(inner), "dev", name])
        run(ip + ["link", "set", "dev", name, "mtu", str(mtu), "up"])
    except BaseException:
        delete(ns, name)
        raise


def delete(ns: str, name: str) -> bool:
    """Delete the device if it exists; True if it did."""
    try:
        run(["ip", "-n", ns, "link", "del", "dev", name])
    except CommandError as e:
        if "does not exist" in (e.err or "") or "Cannot find device" in (e.err or ""):
            return False
        raise
    return True


def exists(ns: str, name: str) -> bool:
    return run(["ip", "-n", ns, "link", "show", "dev", name], check=False).returncode == 0


def show(ns: str) -> list:
    """The tunnel devices of namespace ns (vxlan, gre, ipip, tun; not the kernel's fallback
    devices), one dict each: name, kind, mtu, state, local, remote, id (VNI, GRE key, or
    None), addresses ['a.b.c.d/len']."""
    out = run(["ip", "-n", ns, "-d", "-j", "address", "show"]).stdout
    found = []
    for ln in json.loads(out or "[]"):
        info = ln.get("linkinfo", {})
        kind = info.get("info_kind")
        if kind not in KINDS + ("tun",) or ln["ifname"] in FALLBACK:
            continue
        data = info.get("info_data", {})
        found.append({
            "name": ln["ifname"], "kind": kind, "mtu": ln.get("mtu"),
            "state": ln.get("operstate"), "local": data.get("local"),
            "remote": data.get("remote"), "id": data.get("id", data.get("ikey")),
            "addresses": [f"{a['local']}/{a['prefixlen']}" for a in ln.get("addr_info", [])
                          if a.get("family") == "inet"],
        })
    return found


def counters(ns: str, name: str) -> dict:
    """The device's kernel counters: rx/tx packets, bytes, errors, dropped."""
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", name]).stdout
    data = json.loads(out)[0].get("stats64", {})
    flat = {}
    for d in ("rx", "tx"):
        for k in ("packets", "bytes", "errors", "dropped"):
            flat[f"{d}_{k}"] = data.get(d, {}).get(k, 0)
    return flat
