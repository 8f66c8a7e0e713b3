"""ping from a node, one row per probe (lost probes have rtt_ms NaN)."""

from __future__ import annotations

import re

import pandas as pd

_LINE = re.compile(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms")


def ping(node, dst: str, count: int = 10, interval: float = 0.2, size: int = 56,
         wait_s: float = 2.0) -> pd.DataFrame:
    """dst: an address, or a Node (its address toward `node`). Columns: seq, rtt_ms.
    df.attrs: sent, received, loss_pct."""
    if hasattr(dst, "ip_toward"):
        dst = dst.ip_toward(node)
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-s", str(size),
            "-W", f"{wait_s:g}", str(dst)]
    res = node.run(argv, timeout=count * interval + wait_s + 30, check=False)
    got = {int(m.group(1)): float(m.group(2)) for m in _LINE.finditer(res.stdout)}
    df = pd.DataFrame({"seq": range(1, count + 1)})
    df["rtt_ms"] = df["seq"].map(got).astype(float)
    df.attrs.update(sent=count, received=len(got),
                    loss_pct=100.0 * (count - len(got)) / count, dst=dst)
    return df
