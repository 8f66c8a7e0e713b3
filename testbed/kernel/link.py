"""veth links between namespaces, and interface state and addresses."""

from __future__ import annotations

from typing import Iterable

from testbed.run import batch


def veth_line(name_a: str, ns_a: str, name_b: str, ns_b: str, mtu=None) -> str:
    """An `ip -batch` line creating a veth pair straight into two namespaces (never in root)."""
    m = f" mtu {mtu}" if mtu else ""
    return (f"link add name {name_a} netns {ns_a}{m} type veth "
            f"peer name {name_b} netns {ns_b}{m}")


def create_veths(pairs: Iterable[tuple]) -> None:
    """pairs: (name_a, ns_a, name_b, ns_b), all in one `ip -batch` process."""
    batch("ip", [veth_line(*p) for p in pairs])


def set_state(ipr, ifname: str, up: bool) -> None:
    idx = index(ipr, ifname)
    ipr.link("set", index=idx, state="up" if up else "down")


def index(ipr, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        from testbed.errors import TestbedError

        raise TestbedError(f"no interface {ifname}")
    return found[0]


def indexes(ipr) -> dict:
    """ifname -> index for every interface of the namespace, in one dump."""
    return {ln.get_attr("IFLA_IFNAME"): ln["index"] for ln in ipr.get_links()}


def all_up(ipr) -> bool:
    """True when every interface that is administratively up is also operationally up
    (loopback reports UNKNOWN, which counts as up)."""
    for ln in ipr.get_links():
        if ln["flags"] & 1 and ln.get_attr("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            return False
    return True


def add_address(ipr, ifname: str, iface, idx=None) -> None:
    """iface: an ipaddress.IPv4Interface."""
    ipr.addr("add", index=idx if idx is not None else index(ipr, ifname), address=str(iface.ip),
             prefixlen=iface.network.prefixlen, broadcast=str(iface.network.broadcast_address))


def show(ipr) -> list:
    """[(ifname, operstate, [addresses])] of the namespace ipr is bound to."""
    addrs: dict = {}
    for a in ipr.get_addr(family=2):
        addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
    return [(ln.get_attr("IFLA_IFNAME"), ln.get_attr("IFLA_OPERSTATE"), addrs.get(ln["index"], []))
            for ln in ipr.get_links()]
