"""Per-direction shaping on one interface: HTB for rate, netem (where the kernel has it)
for delay/jitter/loss, pfifo for the queue limit.

The tree is  root 1: htb -> class 1:1 (rate) -> leaf 10: (netem or pfifo),  or just a root
netem/pfifo when no rate is set. `lines()` gives `tc -batch` lines that replace the tree
in place, so a runtime change never leaves the interface unshaped.
"""

from __future__ import annotations

import math

from testbed.spec import Shaping

MTU_BYTES = 1514


def default_limit(s: Shaping) -> int:
    """Queue limit in packets: the configured one, else one bandwidth-delay product
    (RTT taken as twice this direction's delay) and never below 1000 packets."""
    if s.queue_pkts:
        return s.queue_pkts
    if s.rate_mbit is None:
        return 1000
    rtt_s = max(2 * (s.delay_ms + s.jitter_ms) / 1000.0, 0.001)
    return max(1000, math.ceil(s.rate_mbit * 1e6 * rtt_s / (MTU_BYTES * 8)))


def _netem_args(s: Shaping, limit: int) -> str:
    args = f"netem limit {limit}"
    if s.delay_ms or s.jitter_ms:
        args += f" delay {s.delay_ms:g}ms"
        if s.jitter_ms:
            args += f" {s.jitter_ms:g}ms"
    if s.loss_pct:
        args += f" loss {s.loss_pct:g}%"
    return args


def _htb_class(s: Shaping) -> str:
    rate_bps = s.rate_mbit * 1e6
    burst = max(2 * MTU_BYTES, int(rate_bps / 8 * 0.002))  # about 2 ms of traffic
    quantum = min(200000, max(MTU_BYTES, int(rate_bps / 8 / 1000)))
    return (f"htb rate {rate_bps:.0f}bit ceil {rate_bps:.0f}bit burst {burst} cburst {burst} "
            f"quantum {quantum}")


def lines(dev: str, s: Shaping, netem: bool, installed: str) -> tuple:
    """(tc batch lines, new layout) turning layout `installed` into what s needs.

    Layouts: 'none', 'htb' (root htb + leaf), 'leaf' (root netem/pfifo only).
    netem: emulate delay/loss here with netem (else delay is done elsewhere: the wire).
    """
    wants_netem = netem and s.needs_delay
    limit = default_limit(s)
    leaf = _netem_args(s, limit) if wants_netem else f"pfifo limit {limit}"
    out = []
    if s.rate_mbit is not None:
        if installed != "htb":
            if installed != "none":
                out.append(f"qdisc del dev {dev} root")
            out.append(f"qdisc add dev {dev} root handle 1: htb default 1")
            out.append(f"class add dev {dev} parent 1: classid 1:1 {_htb_class(s)}")
            out.append(f"qdisc add dev {dev} parent 1:1 handle 10: {leaf}")
        else:
            out.append(f"class change dev {dev} parent 1: classid 1:1 {_htb_class(s)}")
            out.append(f"qdisc replace dev {dev} parent 1:1 handle 10: {leaf}")
        return out, "htb"
    if wants_netem or s.queue_pkts is not None:
        if installed == "htb":
            out.append(f"qdisc del dev {dev} root")
        out.append(f"qdisc replace dev {dev} root handle 10: {leaf}")
        return out, "leaf"
    if installed != "none":
        out.append(f"qdisc del dev {dev} root")
    return out, "none"


def stats(ipr_ns: str, dev: str) -> list:
    """Per-qdisc counters of dev in namespace ipr_ns, from `tc -s -j`."""
    import json

    from testbed.run import run

    out = run(["tc", "-n", ipr_ns, "-s", "-j", "qdisc", "show", "dev", dev]).stdout
    return json.loads(out or "[]")
