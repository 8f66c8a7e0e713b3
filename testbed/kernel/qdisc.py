"""Per-direction shaping on one interface: HTB for rate, netem (where the kernel has it)
for delay/jitter/loss, pfifo for the queue limit, and an optional queueing discipline.

The tree is  root 1: htb -> class 1:1 (rate) -> leaf 10: (netem or pfifo),  or just a root
netem/pfifo when no rate is set. `lines()` gives `tc -batch` lines that replace the tree
in place, so a runtime change never leaves the interface unshaped.

With a queue (testbed.queueing.Queue) the leaf 10: is the scheduler, under the rate class
so the link rate stays the bottleneck:

    1: htb -> 1:1 (link rate) -> 10: drr | qfq | prio | htb -> classes 10:<m> -> leaves <20+m>:

each class's leaf is a pfifo (or netem, where this link's delay is done by netem, so delay
and loss still apply), u32 filters on 10: steer packets to the classes and a catch-all
filter sends everything else (ARP too) to the default class. The kernel's own discipline
is used where it has one (drr for custom queuing, quantum = byte count; drr for WFQ, quanta
proportional to the weights; prio for strict priority); where it lacks one the same
behaviour is built from HTB classes ('htb-emulated': rates and quanta proportional to the
weights or byte counts, ceil = link rate, so a saturated link is shared by weight and
spare capacity is lent out; strict priority as HTB prio values over tiny guaranteed rates).
`choose_impl()` decides from the capability probe's list of qdiscs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from testbed.errors import CapabilityError, SpecError, TestbedError
from testbed.queueing import PROTOCOLS, Queue
from testbed.spec import Shaping

MTU_BYTES = 1514
LEAF_BASE = 0x20  # the leaf qdisc of class 10:<m> is <20+m>: (tc reads these in hex)
HTB_PARENT = 0x100  # htb schedulers: the parent class 10:100 the classes borrow from
CATCH_ALL_PRIO = 100  # filter priority of the catch-all (after every class's filters)
# The largest packet a qdisc sees: a GSO super-packet (64 KB of payload plus the headers of
# its ~45 segments), which is what TCP over veth and forwarding put into queues. HTB's round
# robin only follows its quanta when each quantum is at least one packet (a class whose
# packet exceeds its deficit still sends it, then gets one quantum more), and a class's
# guaranteed rate only holds if its bucket can hold a packet: emulated classes get quanta
# and bursts of at least this much.
GSO_BYTES = 70_000
TINY_RATE_SHARE = 0.001  # emulated strict priority: each band's guaranteed rate, of the link
# queue kind -> its implementations, best first: (name, the qdisc kind it needs)
IMPLEMENTATIONS = {
    "fifo": (("pfifo", "pfifo"),),
    "htb": (("htb", "htb"),),
    "wfq": (("drr", "drr"), ("qfq", "qfq"), ("htb-emulated", "htb")),
    "custom": (("drr", "drr"), ("htb-emulated", "htb")),
    "priority": (("prio", "prio"), ("htb-emulated", "htb")),
}


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


def _burst(rate_bps: float) -> int:
    return max(2 * MTU_BYTES, int(rate_bps / 8 * 0.002))  # about 2 ms of traffic


def _htb_class(s: Shaping) -> str:
    rate_bps = s.rate_mbit * 1e6
    burst = _burst(rate_bps)
    quantum = min(200000, max(MTU_BYTES, int(rate_bps / 8 / 1000)))
    return (f"htb rate {rate_bps:.0f}bit ceil {rate_bps:.0f}bit burst {burst} cburst {burst} "
            f"quantum {quantum}")


def _leaf_args(s: Shaping, limit: int, netem: bool) -> str:
    return _netem_args(s, limit) if netem and s.needs_delay else f"pfifo limit {limit}"


def lines(dev: str, s: Shaping, netem: bool, installed: str, queue: Optional[Queue] = None,
          impl: Optional[str] = None) -> tuple:
    """(tc batch lines, new layout) turning layout `installed` into what s (and queue) need.

    Layouts: 'none'; 'htb:<leaf>' (root htb, class 1:1, leaf 10: of kind pfifo or netem,
    or a queue's implementation: drr, qfq, prio, htb, htb-emulated); 'leaf:<kind>' (root
    netem/pfifo only). netem: emulate delay/loss here with netem (else delay is done
    elsewhere: the wire). queue (a fifo queue is the plain leaf) needs s.rate_mbit and the
    implementation `impl` (see choose_impl). The rate class 1:1 stays in place whenever the
    old and new layouts both have a rate: replacing a queue never leaves the link unshaped.
    """
    wants_netem = netem and s.needs_delay
    kind = "netem" if wants_netem else "pfifo"
    plain = queue is None or queue.kind == "fifo"
    limit = queue.limit_pkts if queue is not None and queue.limit_pkts else default_limit(s)
    leaf = _leaf_args(s, limit, netem)
    where, _, was = installed.partition(":")
    was = was or "pfifo"  # plain 'htb' / 'leaf' layouts had a pfifo leaf (or the same kind)
    out = []
    if s.rate_mbit is not None:
        if plain:
            new = [f"qdisc add dev {dev} parent 1:1 handle 10: {leaf}"]
        else:
            new = queue_lines(dev, s, queue, impl, netem)
        if where != "htb":
            if installed != "none":
                out.append(f"qdisc del dev {dev} root")
            out.append(f"qdisc add dev {dev} root handle 1: htb default 1")
            out.append(f"class add dev {dev} parent 1: classid 1:1 {_htb_class(s)}")
            out += new
        else:
            out.append(f"class change dev {dev} parent 1: classid 1:1 {_htb_class(s)}")
            if plain and was == kind:
                out.append(f"qdisc replace dev {dev} parent 1:1 handle 10: {leaf}")
            else:  # another kind of leaf: while it is swapped, 1:1 still shapes (HTB
                # gives a class without a qdisc a default pfifo)
                out.append(f"qdisc del dev {dev} parent 1:1")
                out += new
        return out, f"htb:{kind if plain else impl}"
    if not plain:
        raise SpecError(f"{dev}: a {queue.kind} queue needs a rate on this direction")
    if wants_netem or (queue is not None and queue.limit_pkts) or s.queue_pkts is not None:
        if where == "htb" or (where == "leaf" and was != kind):
            out.append(f"qdisc del dev {dev} root")
        out.append(f"qdisc replace dev {dev} root handle 10: {leaf}")
        return out, f"leaf:{kind}"
    if installed != "none":
        out.append(f"qdisc del dev {dev} root")
    return out, "none"


# queues ---------------------------------------------------------------------------------

def choose_impl(queue: Queue, qdiscs: dict, want: str = "auto") -> str:
    """The implementation of queue on a kernel with these qdiscs (capabilities.probe().qdiscs):
    the best one the kernel has, or `want` if given (CapabilityError if it cannot)."""
    options = IMPLEMENTATIONS[queue.kind]
    names = [n for n, _ in options]
    if want != "auto":
        if want not in names:
            raise SpecError(f"a {queue.kind} queue has no implementation {want!r} "
                            f"(one of {', '.join(names)}, or auto)")
        needs = dict(options)[want]
        if not qdiscs.get(needs):
            raise CapabilityError(f"{want} for a {queue.kind} queue needs the {needs} qdisc, "
                                  f"which this kernel lacks (see `testbed doctor`)")
        return want
    for name, needs in options:
        if qdiscs.get(needs):
            return name
    raise CapabilityError(f"a {queue.kind} queue needs one of the qdiscs "
                          f"{', '.join(sorted({n for _, n in options}))}; this kernel has none")


@dataclass(frozen=True)
class ClassPlan:
    """How one class of a queue is built: its class id 10:<minor>, its leaf <leaf>:, the
    tc arguments of the class ('' where the qdisc makes the class itself, as prio does)."""

    name: str
    minor: int
    leaf: int
    default: bool
    args: str
    parent: str = "10:"

    @property
    def classid(self) -> str:
        return f"10:{self.minor:x}"


def _quanta(values: list, smallest: float) -> list:
    """Whole numbers proportional to values, the smallest of them `smallest`."""
    lo = min(values)
    return [max(1, round(smallest * v / lo)) for v in values]


def _htb_args(rate_bps: float, ceil_bps: float, quantum: int, prio: int) -> str:
    burst, cburst = max(_burst(rate_bps), GSO_BYTES), max(_burst(ceil_bps), GSO_BYTES)
    return (f"htb rate {rate_bps:.0f}bit ceil {ceil_bps:.0f}bit burst {burst} "
            f"cburst {cburst} quantum {quantum} prio {prio}")


def plan(queue: Queue, rate_mbit: float, impl: str) -> list:
    """The classes of queue on a link of rate_mbit with implementation impl (pure)."""
    cls = queue.classes
    link_bps = rate_mbit * 1e6
    if impl == "prio":  # bands in priority order: band 1 (10:1) first
        order = sorted(range(len(cls)), key=lambda i: cls[i].prio)
        minors = {i: order.index(i) + 1 for i in range(len(cls))}
    else:
        minors = {i: i + 1 for i in range(len(cls))}
    args = [""] * len(cls)
    parent = "10:"
    if impl == "drr":
        vals = [c.bytes if queue.kind == "custom" else c.weight for c in cls]
        qs = [int(v) for v in vals] if queue.kind == "custom" else _quanta(vals, MTU_BYTES)
        args = [f"drr quantum {q}" for q in qs]
    elif impl == "qfq":
        top = max(c.weight for c in cls)
        args = [f"qfq weight {max(1, round(1024 * c.weight / top))}" for c in cls]
    elif impl in ("htb", "htb-emulated"):
        parent = f"10:{HTB_PARENT:x}"
        if queue.kind == "htb":
            rates = [c.rate_mbit * 1e6 for c in cls]
            ceils = [(c.ceil_mbit or rate_mbit) * 1e6 for c in cls]
            prios = [c.prio or 0 for c in cls]
            qs = _quanta(rates, GSO_BYTES)
        elif queue.kind == "priority":
            tiny = max(8000.0, link_bps * TINY_RATE_SHARE)
            rates = [tiny] * len(cls)
            ceils = [link_bps] * len(cls)
            prios = [c.prio for c in cls]
            qs = [GSO_BYTES] * len(cls)
        else:  # wfq, custom: guaranteed rates and quanta in proportion
            shares = queue.shares()
            rates = [link_bps * shares[c.name] for c in cls]
            ceils = [link_bps] * len(cls)
            prios = [0] * len(cls)
            vals = [c.bytes if queue.kind == "custom" else c.weight for c in cls]
            qs = _quanta(vals, GSO_BYTES)
        args = [_htb_args(r, c, q, p) for r, c, q, p in zip(rates, ceils, qs, prios)]
    elif impl != "prio":
        raise SpecError(f"unknown queue implementation {impl!r}")
    return [ClassPlan(c.name, minors[i], LEAF_BASE + minors[i], c.default, args[i], parent)
            for i, c in enumerate(cls)]


def u32_match(atom: dict) -> str:
    """u32 selectors for one conjunction of Match fields (ports assume a 20-byte IP header,
    as tc's `match ip sport` does)."""
    out = []
    if "protocol" in atom:
        out.append(f"match ip protocol {PROTOCOLS[atom['protocol']]} 0xff")
    if "sport" in atom:
        out.append(f"match ip sport {atom['sport']} 0xffff")
    if "dport" in atom:
        out.append(f"match ip dport {atom['dport']} 0xffff")
    if "src" in atom:
        out.append(f"match ip src {atom['src']}")
    if "dst" in atom:
        out.append(f"match ip dst {atom['dst']}")
    if "dscp" in atom:
        out.append(f"match ip dsfield {atom['dscp'] << 2:#04x} 0xfc")
    return " ".join(out)


def queue_lines(dev: str, s: Shaping, queue: Queue, impl: str, netem: bool) -> list:
    """tc lines that build queue as the leaf 10: under the rate class 1:1."""
    cps = plan(queue, s.rate_mbit, impl)
    default = next(cp for cp in cps if cp.default)
    link_bps = s.rate_mbit * 1e6
    at = f"dev {dev} parent 1:1 handle 10:"
    if impl == "drr":
        out = [f"qdisc add {at} drr"]
    elif impl == "qfq":
        out = [f"qdisc add {at} qfq"]
    elif impl == "prio":
        bands = max(2, len(cps))
        priomap = " ".join([str(default.minor - 1)] * 16)
        out = [f"qdisc add {at} prio bands {bands} priomap {priomap}"]
    else:
        out = [f"qdisc add {at} htb default {default.minor:x}",
               f"class add dev {dev} parent 10: classid 10:{HTB_PARENT:x} "
               f"{_htb_args(link_bps, link_bps, GSO_BYTES, 0)}"]
    for cp, c in zip(cps, queue.classes):
        if cp.args:
            out.append(f"class add dev {dev} parent {cp.parent} classid {cp.classid} {cp.args}")
        limit = c.limit_pkts or queue.limit_pkts or default_limit(s)
        out.append(f"qdisc add dev {dev} parent {cp.classid} handle {cp.leaf:x}: "
                   f"{_leaf_args(s, limit, netem)}")
    prio = 1
    for cp, c in zip(cps, queue.classes):
        if c.match is None:
            continue
        for atom in c.match.atoms():
            out.append(f"filter add dev {dev} parent 10: protocol ip prio {prio} u32 "
                       f"{u32_match(atom)} flowid {cp.classid}")
            prio += 1
    out.append(f"filter add dev {dev} parent 10: protocol all prio {CATCH_ALL_PRIO} u32 "
               f"match u32 0 0 flowid {default.classid}")
    return out


def stats(ipr_ns: str, dev: str) -> list:
    """Per-qdisc counters of dev in namespace ipr_ns, from `tc -s -j`."""
    import json

    from testbed.run import run

    out = run(["tc", "-n", ipr_ns, "-s", "-j", "qdisc", "show", "dev", dev]).stdout
    return json.loads(out or "[]")


def queue_stats(ipr_ns: str, dev: str, queue: Optional[Queue], impl: Optional[str],
                rate_mbit: Optional[float]):
    """Per-class counters of the queue on dev as a DataFrame, one row per class: bytes and
    packets sent (as the class's leaf qdisc counted them at dequeue: Ethernet frames, GSO
    segments counted one by one), drops, backlog_bytes, backlog_pkts. Without a queue (or
    with a fifo) one row, 'fifo', for the single leaf 10:."""
    import pandas as pd

    qdiscs = stats(ipr_ns, dev)
    by_handle = {q.get("handle"): q for q in qdiscs}
    by_parent = {q.get("parent"): q for q in qdiscs if q.get("parent")}
    if queue is None or queue.kind == "fifo":
        rows = [("fifo", "1:1", True, "", by_handle.get("10:"), None)]
        kind = "fifo"
    else:
        shares = queue.shares()
        rows = [(cp.name, cp.classid, cp.default, "" if c.match is None else str(c.match),
                 by_parent.get(cp.classid), shares.get(cp.name))
                for cp, c in zip(plan(queue, rate_mbit, impl), queue.classes)]
        kind = queue.kind
    out = []
    for name, classid, default, match, q, share in rows:
        if q is None:
            raise TestbedError(f"{dev} in {ipr_ns}: no leaf qdisc for class {name} ({classid})")
        out.append({"class": name, "classid": classid, "default": default, "match": match,
                    "configured_share": share, "leaf": q.get("kind"),
                    "bytes": int(q.get("bytes", 0)), "packets": int(q.get("packets", 0)),
                    "drops": int(q.get("drops", 0)), "backlog_bytes": int(q.get("backlog", 0)),
                    "backlog_pkts": int(q.get("qlen", 0))})
    df = pd.DataFrame(out)
    df.attrs.update(kind=kind, impl=impl or "pfifo", dev=dev, netns=ipr_ns)
    return df

