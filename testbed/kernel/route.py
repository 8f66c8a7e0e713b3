"""Static routes in a namespace (pyroute2)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

from testbed.errors import TestbedError

PROTOS = {2: "kernel", 3: "boot", 4: "static", 11: "zebra", 186: "bgp", 187: "isis", 188: "ospf",
          189: "rip", 196: "frr-static"}  # 186-196: FRR (zebra/rt_netlink.h)


class Nexthop(NamedTuple):
    """A next hop given by address, by interface, or both (`via 10.0.1.1 dev r1-eth0`)."""

    via: Optional[str] = None
    dev: Optional[str] = None


def replace(ipr, dst: str, via: Union[str, Nexthop, None] = None,
            dev: Optional[str] = None) -> None:
    """Add or replace the route to dst ('a.b.c.d/len' or 'default') via a next-hop address,
    out of an interface (dev, for an on-link route), or both. via may be a Nexthop."""
    if isinstance(via, Nexthop):
        via, dev = via.via, dev or via.dev
    kw = {"dst": "0.0.0.0/0" if dst == "default" else dst}
    if via:
        kw["gateway"] = via
    if dev:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            raise TestbedError(f"route {dst}: no interface {dev}")
        kw["oif"] = found[0]
    if len(kw) == 1:
        raise TestbedError(f"route {dst}: needs a next hop (via) or an interface (dev)")
    try:
        ipr.route("replace", **kw)
    except Exception as e:  # pyroute2 raises NetlinkError with errno + text
        where = " ".join(f"{k} {v}" for k, v in (("via", via), ("dev", dev)) if v)
        raise TestbedError(f"route {dst} {where}: {e}") from None


def delete(ipr, dst: str) -> None:
    ipr.route("del", dst=dst if dst != "default" else "0.0.0.0/0")


def show(ipr, detail: bool = False) -> list:
    """The main table: [(dst, gateway)], or with detail=True [{"dst", "via", "dev", "proto",
    "metric", "nexthops": [(via, dev), ...]}] (several next hops for a multipath route)."""
    names = {ln["index"]: ln.get_attr("IFLA_IFNAME") for ln in ipr.get_links()} if detail else {}
    out = []
    for r in ipr.get_routes(family=2, table=254):
        dst = r.get_attr("RTA_DST")
        dst = f"{dst}/{r['dst_len']}" if dst else "default"
        gw = r.get_attr("RTA_GATEWAY")
        if not detail:
            out.append((dst, gw))
            continue
        hops = [(gw, names.get(r.get_attr("RTA_OIF")))]
        multi = r.get_attr("RTA_MULTIPATH")
        if multi:
            hops = [(h.get_attr("RTA_GATEWAY"), names.get(h["oif"])) for h in multi]
        out.append({"dst": dst, "via": gw, "dev": names.get(r.get_attr("RTA_OIF")),
                    "proto": PROTOS.get(r["proto"], str(r["proto"])),
                    "metric": r.get_attr("RTA_PRIORITY") or 0, "nexthops": hops})
    return out
