"""`python -m testbed.overlay.ctl SOCK neighbours|routes|stats [--json]`: what a daemon knows.

neighbours: each overlay link (up or down, RTT, loss each way, last heard);
routes: destination, next hop, cost and path by the daemon's cost metric;
stats: drops by reason, daemon counters and per-link protocol statistics.
Exit codes: 0, 1 if the daemon cannot be reached, 2 for bad arguments.
"""

from __future__ import annotations

import json
import sys

from testbed.daemon.args import ArgParser
from testbed.overlay.client import OverlayError, connect

WHAT = ("neighbours", "routes", "stats")


def _table(rows: list, cols: list) -> str:
    cells = [[str("-" if r.get(c) is None else r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def render(what: str, data: dict) -> str:
    if what == "neighbours":
        return _table(data["neighbours"], ["id", "addr", "up", "rtt_ms", "loss_out_pct",
                                           "loss_in_pct", "last_heard_ms", "downs"])
    if what == "routes":
        rows = [dict(r, path=" ".join(map(str, r["path"]))) for r in data["routes"]]
        head = f"node {data['id']}, cost {data['cost']}, {data['route_changes']} changes"
        return head + "\n" + _table(rows, ["dst", "next_hop", "cost", "path"])
    out = [f"node {data['id']}, up {data['uptime_s']} s"]
    drops = {k: v for k, v in data["drops"].items() if v}
    out.append("drops: " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
    out.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(data["counters"].items())))
    rows = []
    for nid, ln in data["links"].items():
        rel = ln["reliable"]
        rows.append({"link": nid, "up": ln["up"], "tx": ln.get("tx", 0), "rx": ln.get("rx", 0),
                     "data_tx": ln.get("data_tx", 0), "data_rx": ln.get("data_rx", 0),
                     "retx": rel["retransmitted"], "cwnd": rel["cwnd"], "queue": ln["queue"],
                     "srtt_ms": rel["srtt_ms"], "rt_expired": ln.get("rt_expired", 0)})
    out.append(_table(rows, ["link", "up", "tx", "rx", "data_tx", "data_rx", "retx", "cwnd",
                             "queue", "srtt_ms", "rt_expired"]))
    if data["sessions"]:
        out.append(_table(data["sessions"], ["session", "port", "dst", "dport", "link", "cwnd",
                                             "outstanding", "pending", "retransmitted",
                                             "congestion_acks"]))
    return "\n".join(out)


def main(argv=None) -> int:
    p = ArgParser("overlay ctl", prog="python -m testbed.overlay.ctl",
                  description="show an overlay daemon's neighbours, routes, stats")
    p.add_argument("sock", help="the daemon's control socket")
    p.add_argument("what", choices=WHAT)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    a = p.parse_args(argv)
    try:
        with connect(a.sock) as c:
            data = c.request(a.what)
    except OverlayError as e:
        print(f"overlay ctl: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=1, sort_keys=True) if a.json else render(a.what, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
