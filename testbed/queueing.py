"""Queueing disciplines for one interface direction: a pure, validated specification.

A Queue is a kind plus a list of classes; each class but one has a classifier (Match),
the default class gets everything unmatched:

    Queue("custom", [QueueClass("mirror", bytes=5000, match={"protocol": "tcp", "port": 10566}),
                     QueueClass("other", bytes=95000, default=True)])

Kinds and the fields their classes take:
  fifo      no classes (one queue; limit_pkts)
  htb       rate_mbit (guaranteed), ceil_mbit (default: the link rate), prio 0-7 (lower first)
  wfq       weight: the share of a saturated link is weight / sum(weights)
  custom    bytes: Cisco custom queuing, a byte count per round-robin turn, whole packets;
            the share of a saturated link is bytes / sum(bytes)
  priority  prio 0-7, distinct: strict priority, lower first (a lower band only gets what
            the higher ones leave)
Every class may set limit_pkts (its queue's limit; default: the link's queue limit).

Everything is checked when the object is made (a one-line SpecError): unknown fields, fields
the kind does not take, weights or byte counts <= 0, not exactly one default class, and
classifiers that can match the same packet. No I/O here: the kernel side is
testbed/kernel/qdisc.py.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, fields
from typing import Optional, Union

from testbed.errors import SpecError
from testbed.spec import parse_rate_mbit

KINDS = ("fifo", "htb", "wfq", "custom", "priority")
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1}
MAX_CLASSES = 16  # Cisco custom queuing has 16 queues; the kernel's prio has 16 bands
MAX_BYTES = 10_000_000
MAX_WEIGHT_RATIO = 10_000
MAX_LIMIT_PKTS = 1_000_000
CLASS_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

# which class fields each kind requires and allows (name, match, default always allowed)
REQUIRED = {"fifo": (), "htb": ("rate_mbit",), "wfq": ("weight",), "custom": ("bytes",),
            "priority": ("prio",)}
ALLOWED = {"fifo": (), "htb": ("rate_mbit", "ceil_mbit", "prio", "limit_pkts"),
           "wfq": ("weight", "limit_pkts"), "custom": ("bytes", "limit_pkts"),
           "priority": ("prio", "limit_pkts")}


def _init_fields(obj, values: dict, what: str) -> None:
    """Set a frozen dataclass's fields from values; unknown names are a SpecError."""
    names = [f.name for f in fields(obj)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise SpecError(f"{what}: unknown field {unknown[0]!r} (known: {', '.join(names)})")
    for f in fields(obj):
        object.__setattr__(obj, f.name, values.get(f.name, f.default))


def _whole(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what}: expected a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{what}: must be between {lo} and {hi}, got {value!r}")
    return value


def _prefix(value, what: str) -> str:
    try:
        net = ipaddress.ip_network(value)
    except (ValueError, TypeError):
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except (ValueError, TypeError):
            raise SpecError(f"{what}: bad prefix {value!r} (want a.b.c.d/len)") from None
        raise SpecError(f"{what}: {value!r} has host bits set (did you mean {loose}?)") from None
    if net.version != 4:
        raise SpecError(f"{what}: only IPv4 prefixes are supported, got {value!r}")
    return str(net)


@dataclass(frozen=True, init=False)
class Match:
    """A classifier: every field given must hold (AND). protocol is tcp, udp or icmp; port
    matches either the source or the destination port (like IOS `tcp 10566`); src and dst
    are IPv4 prefixes; dscp is 0-63. Ports need protocol tcp or udp."""

    protocol: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    port: Optional[int] = None
    src: Optional[str] = None
    dst: Optional[str] = None
    dscp: Optional[int] = None

    def __init__(self, **values):
        _init_fields(self, values, "match")
        w = "match"
        if all(getattr(self, f.name) is None for f in fields(self)):
            raise SpecError("match: give at least one field (the default class takes the rest)")
        if self.protocol is not None:
            p = self.protocol.lower() if isinstance(self.protocol, str) else self.protocol
            if p not in PROTOCOLS:
                raise SpecError(f"{w}: protocol must be one of {', '.join(PROTOCOLS)}, "
                                f"got {self.protocol!r}")
            object.__setattr__(self, "protocol", p)
        for name in ("sport", "dport", "port"):
            v = getattr(self, name)
            if v is not None:
                _whole(v, f"{w}: {name}", 1, 65535)
                if self.protocol not in ("tcp", "udp"):
                    raise SpecError(f"{w}: {name} needs protocol tcp or udp, "
                                    f"got {self.protocol!r}")
        if self.port is not None and (self.sport is not None or self.dport is not None):
            raise SpecError(f"{w}: give port (either direction) or sport/dport, not both")
        for name in ("src", "dst"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _prefix(v, f"{w}: {name}"))
        if self.dscp is not None:
            _whole(self.dscp, f"{w}: dscp", 0, 63)

    def atoms(self) -> list:
        """The conjunctions this match is the OR of (port= is sport= OR dport=): each is a
        dict of field -> value and becomes one u32 filter."""
        base = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "port" and getattr(self, f.name) is not None}
        if self.port is None:
            return [base]
        return [{**base, "sport": self.port}, {**base, "dport": self.port}]

    def __str__(self) -> str:
        parts = [self.protocol] if self.protocol else []
        for name in ("port", "sport", "dport", "src", "dst", "dscp"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name} {v}")
        return " ".join(parts)


def _atoms_overlap(a: dict, b: dict) -> bool:
    """True if some packet satisfies both conjunctions: no field has disjoint constraints."""
    for k in set(a) & set(b):
        if k in ("src", "dst"):
            if not ipaddress.ip_network(a[k]).overlaps(ipaddress.ip_network(b[k])):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _intersection(a: dict, b: dict) -> str:
    """The packets two overlapping conjunctions both match, as text (protocol first)."""
    both = dict(a)
    for k, v in b.items():
        if k in ("src", "dst") and k in both:
            x, y = ipaddress.ip_network(both[k]), ipaddress.ip_network(v)
            both[k] = str(x if x.prefixlen >= y.prefixlen else y)
        else:
            both[k] = v
    order = ("protocol", "sport", "dport", "src", "dst", "dscp")
    return " ".join(str(both[k]) if k == "protocol" else f"{k} {both[k]}"
                    for k in order if k in both)


@dataclass(frozen=True, init=False)
class QueueClass:
    """One class of a queue: a name, a classifier (or default=True), and the kind's fields."""

    name: str = ""
    match: Optional[Match] = None
    default: bool = False
    rate_mbit: Optional[float] = None
    ceil_mbit: Optional[float] = None
    prio: Optional[int] = None
    weight: Optional[float] = None
    bytes: Optional[int] = None
    limit_pkts: Optional[int] = None

    def __init__(self, name: str, **values):
        _init_fields(self, {"name": name, **values}, f"class {name!r}")
        if not isinstance(name, str) or not CLASS_NAME_RE.match(name):
            raise SpecError(f"class name {name!r}: use letters, digits, _ and -, starting with "
                            f"a letter, at most 32 characters")
        w = f"class {name}"
        if not isinstance(self.default, bool):
            raise SpecError(f"{w}: default must be True or False, got {self.default!r}")
        m = self.match
        if isinstance(m, dict):
            try:
                m = Match(**m)
            except SpecError as e:
                raise SpecError(f"{w}: {e}") from None
        elif m is not None and not isinstance(m, Match):
            raise SpecError(f"{w}: match must be a Match or a dict, got {m!r}")
        object.__setattr__(self, "match", m)
        if self.default and m is not None:
            raise SpecError(f"{w}: the default class takes what no other class matches; "
                            f"it has no match of its own")
        if not self.default and m is None:
            raise SpecError(f"{w}: needs a match (or default=True)")
        for name_ in ("rate_mbit", "ceil_mbit"):
            v = getattr(self, name_)
            if v is not None:
                object.__setattr__(self, name_, parse_rate_mbit(v, f"{w}: {name_}"))
        if self.prio is not None:
            _whole(self.prio, f"{w}: prio", 0, 7)
        if self.weight is not None:
            v = self.weight
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SpecError(f"{w}: weight must be a number, got {v!r}")
            if v <= 0:
                raise SpecError(f"{w}: weight must be positive, got {v!r}")
        if self.bytes is not None:
            v = self.bytes
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"{w}: bytes must be a whole number of bytes, got {v!r}")
            if v <= 0:
                raise SpecError(f"{w}: bytes must be positive, got {v!r}")
            if v > MAX_BYTES:
                raise SpecError(f"{w}: bytes {v} is above {MAX_BYTES}")
        if self.limit_pkts is not None:
            _whole(self.limit_pkts, f"{w}: limit_pkts", 1, MAX_LIMIT_PKTS)

    def set_fields(self) -> list:
        """Names of the kind-specific fields this class sets."""
        return [n for n in ("rate_mbit", "ceil_mbit", "prio", "weight", "bytes", "limit_pkts")
                if getattr(self, n) is not None]


ClassLike = Union[QueueClass, dict]


def _as_class(c, i: int) -> QueueClass:
    if isinstance(c, QueueClass):
        return c
    if isinstance(c, dict):
        c = dict(c)
        if "name" not in c:
            raise SpecError(f"class #{i + 1}: needs a name")
        return QueueClass(c.pop("name"), **c)
    raise SpecError(f"class #{i + 1}: expected a QueueClass or a dict, got {c!r}")


@dataclass(frozen=True, init=False)
class Queue:
    """A queueing discipline for one direction of a link (see the module docstring)."""

    kind: str = "fifo"
    classes: tuple = ()
    limit_pkts: Optional[int] = None  # every class's queue limit unless the class sets one

    def __init__(self, kind: str, classes: Union[tuple, list, dict] = (),
                 limit_pkts: Optional[int] = None):
        if kind not in KINDS:
            raise SpecError(f"queue kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if isinstance(classes, dict):  # {"name": {fields}, ...}
            items = []
            for name, body in classes.items():
                if isinstance(body, QueueClass):
                    items.append(body)
                elif isinstance(body, dict):
                    items.append(QueueClass(name, **body))
                else:
                    raise SpecError(f"class {name!r}: expected a dict of fields, got {body!r}")
            classes = items
        if isinstance(classes, (str, bytes)) or not isinstance(classes, (tuple, list)):
            raise SpecError(f"{kind} queue: classes must be a list, got {classes!r}")
        cls = tuple(_as_class(c, i) for i, c in enumerate(classes))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "classes", cls)
        object.__setattr__(self, "limit_pkts", limit_pkts)
        if limit_pkts is not None:
            _whole(limit_pkts, f"{kind} queue: limit_pkts", 1, MAX_LIMIT_PKTS)
        self._validate()

    def _validate(self) -> None:
        k, cls = self.kind, self.classes
        if k == "fifo":
            if cls:
                raise SpecError("fifo queue: has no classes (use limit_pkts for its size)")
            return
        if not cls:
            raise SpecError(f"{k} queue: needs classes, one of them default=True")
        if len(cls) > MAX_CLASSES:
            raise SpecError(f"{k} queue: {len(cls)} classes, at most {MAX_CLASSES}")
        names = [c.name for c in cls]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"{k} queue: two classes named {dup[0]!r}")
        defaults = [c.name for c in cls if c.default]
        if not defaults:
            raise SpecError(f"{k} queue: no default class (give exactly one default=True)")
        if len(defaults) > 1:
            raise SpecError(f"{k} queue: {len(defaults)} default classes "
                            f"({', '.join(defaults)}); give exactly one")
        for c in cls:
            for f in c.set_fields():
                if f not in ALLOWED[k]:
                    raise SpecError(f"class {c.name}: {f} is not a field of a {k} queue "
                                    f"(its classes take {', '.join(ALLOWED[k])})")
            for f in REQUIRED[k]:
                if getattr(c, f) is None:
                    raise SpecError(f"class {c.name}: a {k} queue needs {f} on every class")
            if c.ceil_mbit is not None and c.rate_mbit is not None and c.ceil_mbit < c.rate_mbit:
                raise SpecError(f"class {c.name}: ceil_mbit {c.ceil_mbit:g} is below "
                                f"rate_mbit {c.rate_mbit:g}")
        if k == "priority":
            prios = [c.prio for c in cls]
            dup_p = sorted({p for p in prios if prios.count(p) > 1})
            if dup_p:
                same = [c.name for c in cls if c.prio == dup_p[0]]
                raise SpecError(f"priority queue: classes {' and '.join(same)} share prio "
                                f"{dup_p[0]}; strict priority needs distinct values")
        if k == "wfq":
            ws = [c.weight for c in cls]
            if max(ws) / min(ws) > MAX_WEIGHT_RATIO:
                raise SpecError(f"wfq queue: weights span more than {MAX_WEIGHT_RATIO}:1")
        matched = [c for c in cls if not c.default]
        for i, a in enumerate(matched):
            for b in matched[i + 1:]:
                for x in a.match.atoms():
                    for y in b.match.atoms():
                        if _atoms_overlap(x, y):
                            both = _intersection(x, y)
                            raise SpecError(f"{k} queue: classes {a.name} ({a.match}) and "
                                            f"{b.name} ({b.match}) can match the same packet "
                                            f"({both}); make them disjoint")

    # -- derived values ------------------------------------------------------------------
    @property
    def default_class(self) -> Optional[QueueClass]:
        return next((c for c in self.classes if c.default), None)

    def shares(self) -> dict:
        """Class name -> the share of a saturated link it is configured to get (wfq: weight
        / sum, custom: bytes / sum, htb: rate / sum of rates). Strict priority and fifo
        configure no shares: empty dict."""
        if self.kind == "wfq":
            vals = {c.name: float(c.weight) for c in self.classes}
        elif self.kind == "custom":
            vals = {c.name: float(c.bytes) for c in self.classes}
        elif self.kind == "htb":
            vals = {c.name: c.rate_mbit for c in self.classes}
        else:
            return {}
        total = sum(vals.values())
        return {n: v / total for n, v in vals.items()}

    def check_rate(self, rate_mbit: Optional[float], where: str = "queue") -> None:
        """Raise SpecError unless this queue fits a direction shaped at rate_mbit."""
        if rate_mbit is None:
            raise SpecError(f"{where}: a {self.kind} queue needs a rate on this direction "
                            f"(the link rate must be the bottleneck for the queue to fill); "
                            f"set rate_mbit first")
        if self.kind != "htb":
            return
        total = sum(c.rate_mbit for c in self.classes)
        if total > rate_mbit * (1 + 1e-9):
            raise SpecError(f"{where}: htb class rates add up to {total:g} Mbit/s, above the "
                            f"link rate {rate_mbit:g} Mbit/s")
        for c in self.classes:
            if c.ceil_mbit is not None and c.ceil_mbit > rate_mbit * (1 + 1e-9):
                raise SpecError(f"{where}: class {c.name} ceil_mbit {c.ceil_mbit:g} is above "
                                f"the link rate {rate_mbit:g} Mbit/s")

    def describe(self) -> str:
        """One line: the kind and each class with its parameter and classifier."""
        if self.kind == "fifo":
            return "fifo" + (f" limit {self.limit_pkts} pkts" if self.limit_pkts else "")
        parts = []
        for c in self.classes:
            p = " ".join(f"{f}={getattr(c, f):g}" for f in c.set_fields())
            parts.append(f"{c.name}[{p}; {'default' if c.default else c.match}]")
        return f"{self.kind}: " + ", ".join(parts)


__all__ = ["Queue", "QueueClass", "Match", "KINDS", "PROTOCOLS"]
