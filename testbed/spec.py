"""Frozen, validated specifications of nodes, links and routes. Pure: no I/O, no kernel code.

Units are part of every name (rate_mbit, delay_ms, loss_pct) and every value is checked
when the object is made, so bad input fails before anything touches the kernel.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from testbed.errors import SpecError

NODE_KINDS = ("host", "router", "switch")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
IFNAMSIZ = 15  # the kernel's limit on interface names (16 bytes with the NUL)
MAX_RATE_MBIT = 100_000.0  # 100 Gbit/s: above that a veth cannot be shaped meaningfully
MAX_DELAY_MS = 60_000.0  # one minute one way
DEFAULT_VLAN = 1  # a switch port's VLAN unless the link says otherwise (like a PVID of 1)

Number = Union[int, float, str]

_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "tbit": 1e6,
               "bps": 8e-6, "kbps": 8e-3, "mbps": 8.0, "gbps": 8e3}
_TIME_UNITS = {"us": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3}
_NUM_RE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z%]*)\s*$")


def _parse(value: Number, what: str, units: dict, default_unit: str) -> float:
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _NUM_RE.match(value)
        if not m:
            raise SpecError(f"{what}: cannot parse {value!r}")
        unit = (m.group(2) or default_unit).lower()
        if unit not in units:
            raise SpecError(f"{what}: unknown unit {m.group(2)!r} in {value!r} "
                            f"(use one of {', '.join(units)})")
        x = float(m.group(1)) * units[unit]
    else:
        raise SpecError(f"{what}: expected a number or a string, got {value!r}")
    if math.isnan(x) or math.isinf(x):
        raise SpecError(f"{what}: {value!r} is not a finite number")
    return x


def parse_rate_mbit(value: Number, what: str = "rate") -> float:
    """'10Mbit', '1gbit', '500kbit' or a number of Mbit/s -> Mbit/s."""
    x = _parse(value, what, _RATE_UNITS, "mbit")
    if x <= 0:
        raise SpecError(f"{what}: rate must be positive, got {value!r}")
    if x < 0.008:
        raise SpecError(f"{what}: rate {value!r} is below 8 kbit/s, too low to shape")
    if x > MAX_RATE_MBIT:
        raise SpecError(f"{what}: rate {value!r} is above {MAX_RATE_MBIT:g} Mbit/s")
    return x


def parse_delay_ms(value: Number, what: str = "delay") -> float:
    """'10ms', '1s', '500us' or a number of ms -> ms."""
    x = _parse(value, what, _TIME_UNITS, "ms")
    if x < 0:
        raise SpecError(f"{what}: must not be negative, got {value!r}")
    if x > MAX_DELAY_MS:
        raise SpecError(f"{what}: {value!r} is above {MAX_DELAY_MS:g} ms")
    return x


def parse_loss_pct(value: Number, what: str = "loss") -> float:
    """'1%', 1 or '1' -> percent in [0, 100]."""
    x = _parse(value, what, {"%": 1.0, "pct": 1.0}, "%")
    if not 0 <= x <= 100:
        raise SpecError(f"{what}: must be between 0 and 100 %, got {value!r}")
    return x


def check_name(name: str, what: str = "node") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{what} name {name!r}: use letters, digits and _, starting with a letter")
    if len(name) > 10:
        raise SpecError(f"{what} name {name!r} is longer than 10 characters")
    return name


def check_ifname(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > IFNAMSIZ:
        raise SpecError(f"interface name {name!r} is longer than {IFNAMSIZ} characters"
                        if isinstance(name, str) and name else f"bad interface name {name!r}")
    if not re.match(r"^[A-Za-z0-9_.-]+$", name) or name in (".", ".."):
        raise SpecError(f"interface name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


@dataclass(frozen=True)
class Shaping:
    """What one direction of a link does to packets. None/0 means 'not emulated'."""

    rate_mbit: Optional[float] = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    queue_pkts: Optional[int] = None

    @classmethod
    def make(cls, rate=None, delay=0, jitter=0, loss=0, queue_pkts=None, where="link") -> "Shaping":
        """Parse user values (numbers or strings with units) into a validated Shaping."""
        r = None if rate is None else parse_rate_mbit(rate, f"{where}: rate")
        d = parse_delay_ms(delay or 0, f"{where}: delay")
        j = parse_delay_ms(jitter or 0, f"{where}: jitter")
        lo = parse_loss_pct(loss or 0, f"{where}: loss")
        q = None
        if queue_pkts is not None:
            if isinstance(queue_pkts, bool) or not isinstance(queue_pkts, int) or queue_pkts < 1:
                raise SpecError(f"{where}: queue limit must be a positive whole number of "
                                f"packets, got {queue_pkts!r}")
            if queue_pkts > 1_000_000:
                raise SpecError(f"{where}: queue limit {queue_pkts} is absurd (> 1e6 packets)")
            q = queue_pkts
        if j > d and j > 0:
            raise SpecError(f"{where}: jitter {j:g} ms exceeds delay {d:g} ms")
        return cls(r, d, j, lo, q)

    def replace(self, **changes) -> "Shaping":
        vals = dict(rate=self.rate_mbit, delay=self.delay_ms, jitter=self.jitter_ms,
                    loss=self.loss_pct, queue_pkts=self.queue_pkts)
        aliases = {"rate_mbit": "rate", "delay_ms": "delay", "jitter_ms": "jitter",
                   "loss_pct": "loss"}
        for k, v in changes.items():
            k = aliases.get(k, k)
            if k not in vals:
                raise SpecError(f"unknown link parameter {k!r}")
            vals[k] = v
        return Shaping.make(**vals)

    @property
    def needs_delay(self) -> bool:
        """True if this direction needs a delay/loss emulator (netem or the delay line)."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0

    @property
    def is_plain(self) -> bool:
        return self.rate_mbit is None and not self.needs_delay and self.queue_pkts is None


def check_vlan(vid, where: str) -> int:
    """A VLAN id: a whole number from 1 to 4094 (0 and 4095 are reserved by 802.1Q)."""
    if isinstance(vid, bool) or not isinstance(vid, int) or not 1 <= vid <= 4094:
        raise SpecError(f"{where}: VLAN id must be a whole number from 1 to 4094, got {vid!r}")
    return vid


def check_vlans(vids, where: str) -> tuple:
    """A sorted tuple of distinct VLAN ids."""
    if isinstance(vids, (int, str)) or not hasattr(vids, "__iter__"):
        raise SpecError(f"{where}: want a list of VLAN ids, got {vids!r}")
    out = [check_vlan(v, where) for v in vids]
    if len(set(out)) != len(out):
        raise SpecError(f"{where}: VLAN ids repeat in {list(vids)!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    kind: str = "host"
    sysctls: tuple = ()  # ((key, value), ...) set in the node's namespace
    vlans: tuple = ()  # switches: VLANs declared up front (ports may move into them later)

    def __post_init__(self):
        check_name(self.name)
        if self.kind not in NODE_KINDS:
            raise SpecError(f"node {self.name}: unknown kind {self.kind!r} "
                            f"(one of {', '.join(NODE_KINDS)})")
        if self.vlans and self.kind != "switch":
            raise SpecError(f"node {self.name}: only switches have VLANs")


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link a <-> b. a_to_b shapes what a sends; b_to_a what b sends."""

    a: str
    b: str
    intf_a: str
    intf_b: str
    a_to_b: Shaping = field(default_factory=Shaping)
    b_to_a: Shaping = field(default_factory=Shaping)
    ip_a: Optional[str] = None  # "10.0.0.1/24", or None for automatic addressing
    ip_b: Optional[str] = None
    emulate: bool = False  # build a delay line even with no delay, for runtime changes
    vlan: Optional[int] = None  # access VLAN of the switch end(s); None: DEFAULT_VLAN
    trunk: tuple = ()  # between two switches: the VLANs this trunk carries

    @property
    def key(self) -> frozenset:
        """The pair of nodes (parallel links between them share it)."""
        return frozenset((self.a, self.b))

    @property
    def ends(self) -> tuple:
        """((a, intf_a), (b, intf_b)): unique to this link, parallel links included."""
        return ((self.a, self.intf_a), (self.b, self.intf_b))

    @property
    def needs_delay(self) -> bool:
        return self.a_to_b.needs_delay or self.b_to_a.needs_delay or self.emulate

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass(frozen=True)
class RouteSpec:
    node: str
    dst: str  # a prefix, "10.0.2.0/24", or "default"
    via: str  # a next-hop address

    def __post_init__(self):
        if self.dst != "default":
            try:
                ipaddress.ip_network(self.dst, strict=False)
            except ValueError:
                raise SpecError(f"route on {self.node}: bad destination {self.dst!r}") from None
        try:
            ipaddress.ip_address(self.via)
        except ValueError:
            raise SpecError(f"route on {self.node}: bad next hop {self.via!r}") from None


def parse_interface_address(value: str, where: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise SpecError(f"{where}: bad address {value!r} (want a.b.c.d/len)") from None
    if "/" not in str(value):
        raise SpecError(f"{where}: address {value!r} needs a prefix length, like /24")
    if iface.version != 4:
        raise SpecError(f"{where}: only IPv4 addresses are supported, got {value!r}")
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise SpecError(f"{where}: {value} is the network or broadcast address")
    return iface
