"""Static routes in a namespace (pyroute2)."""

from __future__ import annotations

from testbed.errors import TestbedError


def replace(ipr, dst: str, via: str) -> None:
    """Add or replace the route to dst ('a.b.c.d/len' or 'default') via a next hop."""
    kw = {"gateway": via}
    if dst != "default":
        kw["dst"] = dst
    else:
        kw["dst"] = "0.0.0.0/0"
    try:
        ipr.route("replace", **kw)
    except Exception as e:  # pyroute2 raises NetlinkError with errno + text
        raise TestbedError(f"route {dst} via {via}: {e}") from None


def delete(ipr, dst: str) -> None:
    ipr.route("del", dst=dst if dst != "default" else "0.0.0.0/0")


def show(ipr) -> list:
    out = []
    for r in ipr.get_routes(family=2, table=254):
        dst = r.get_attr("RTA_DST")
        dst = f"{dst}/{r['dst_len']}" if dst else "default"
        out.append((dst, r.get_attr("RTA_GATEWAY")))
    return out
