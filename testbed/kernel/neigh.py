"""The IPv4 neighbour (ARP) table of a namespace (pyroute2): static entries, delete, flush, show.

Every function takes an IPRoute bound in the namespace (testbed.kernel.netns.ipr) and
interface indexes, so callers validate names once and nothing here parses `ip neigh` text.
"""

from __future__ import annotations

import socket
from typing import Optional

from pyroute2.netlink.rtnl import ndmsg

from testbed.errors import TestbedError

# NUD_* bits (include/uapi/linux/neighbour.h) -> the names `ip neigh` prints
STATES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe",
          0x20: "failed", 0x40: "noarp", 0x80: "permanent"}
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80


def state_name(state: int) -> str:
    names = [n for bit, n in STATES.items() if state & bit]
    return "+".join(names) if names else "none"


def add(ipr, ip: str, mac: str, idx: int, permanent: bool = True) -> None:
    """Add or replace the entry for ip on interface idx: permanent (never re-resolved, never
    expires), or reachable (a dynamic entry the kernel will age and re-check)."""
    state = ndmsg.states["permanent"] if permanent else ndmsg.states["reachable"]
    try:
        ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state=state, family=socket.AF_INET)
    except Exception as e:  # NetlinkError carries errno and text
        raise TestbedError(f"neighbour {ip} lladdr {mac}: {e}") from None


def delete(ipr, ip: str, idx: int) -> bool:
    """Delete the entry for ip on interface idx; False if there was none."""
    try:
        ipr.neigh("del", dst=ip, ifindex=idx, family=socket.AF_INET)
    except Exception as e:
        if getattr(e, "code", None) == 2:  # ENOENT
            return False
        raise TestbedError(f"delete neighbour {ip}: {e}") from None
    return True


def _entries(ipr, idx: Optional[int] = None) -> list:
    msgs = ipr.get_neighbours(family=socket.AF_INET)
    return [m for m in msgs if idx is None or m["ifindex"] == idx]


def flush(ipr, idx: Optional[int] = None, permanent: bool = False) -> int:
    """Delete the dynamic entries (of interface idx, or of every interface), like
    `ip neigh flush`: permanent entries stay unless permanent=True; NOARP entries
    (broadcast, multicast, loopback) always stay. Returns how many were deleted."""
    n = 0
    for m in _entries(ipr, idx):
        if m["state"] & NUD_NOARP or (m["state"] & NUD_PERMANENT and not permanent):
            continue
        ip = m.get_attr("NDA_DST")
        if ip and delete(ipr, ip, m["ifindex"]):
            n += 1
    return n


def show(ipr, idx: Optional[int] = None) -> list:
    """[{"ip", "mac", "dev", "state"}] for IPv4 entries (of interface idx, or all); mac is
    None while an entry is unresolved (incomplete, failed)."""
    names = {ln["index"]: ln.get_attr("IFLA_IFNAME") for ln in ipr.get_links()}
    out = []
    for m in _entries(ipr, idx):
        out.append({"ip": m.get_attr("NDA_DST"), "mac": m.get_attr("NDA_LLADDR"),
                    "dev": names.get(m["ifindex"]), "state": state_name(m["state"])})
    return out


__all__ = ["add", "delete", "flush", "show", "STATES", "state_name"]
