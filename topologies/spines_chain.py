"""The chain of paper 004 (Spines): a - b - ... on `hops` emulated links (the ends are
hosts, the middle nodes routers so that kernel TCP crosses the chain too).

Paper setup: A-F, five links of 10 ms and ~10 Mbit/s, loss on C-D. Every link carries
delay (and rate); the lossy link gets loss_pct and is always prepared for runtime changes
(emulate=True), so `net.link("c", "d").set(loss_pct=...)` works without a rebuild.
"""

from __future__ import annotations

from typing import Optional

from testbed import Topology
from testbed.errors import SpecError

NAMES = "abcdefghijklmnopqrstuvwxyz"


def build(hops: int = 5, delay_ms: float = 10, rate_mbit: Optional[float] = 10,
          lossy=("c", "d"), loss_pct: float = 1.0, queue_pkts: Optional[int] = None,
          total_delay_ms: Optional[float] = None) -> Topology:
    """hops+1 hosts named a, b, ... in a chain. delay_ms is one way per link, or give
    total_delay_ms to split a fixed path delay evenly across the hops. lossy: the link
    (pair of adjacent node names) with loss_pct in both directions, or None."""
    if not isinstance(hops, int) or not 1 <= hops < len(NAMES):
        raise SpecError(f"hops must be 1..{len(NAMES) - 1}, got {hops!r}")
    if total_delay_ms is not None:
        delay_ms = total_delay_ms / hops
    names = list(NAMES[:hops + 1])
    pairs = list(zip(names, names[1:]))
    if lossy is not None:
        lossy = tuple(x.lower() for x in lossy)
        if lossy not in pairs and lossy[::-1] not in pairs:
            raise SpecError(f"lossy link {lossy} is not on the chain {'-'.join(names)}")
    t = Topology(f"spines-chain{hops}")
    for i, n in enumerate(names):  # the middle nodes forward IP for the kernel-TCP baseline
        (t.add_host if i in (0, hops) else t.add_router)(n)
    for x, y in pairs:
        is_lossy = lossy is not None and {x, y} == set(lossy)
        t.add_link(x, y, rate=rate_mbit, delay=delay_ms, queue_pkts=queue_pkts,
                   loss=loss_pct if is_lossy else 0, emulate=is_lossy)
    return t
