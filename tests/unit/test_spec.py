"""Unit parsing and validation of specs (testbed.spec): pure, no root."""

import pytest

from testbed.errors import SpecError
from testbed.spec import (
    LinkSpec,
    NodeSpec,
    RouteSpec,
    Shaping,
    check_ifname,
    check_name,
    parse_delay_ms,
    parse_interface_address,
    parse_loss_pct,
    parse_rate_mbit,
)

# units ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, mbit", [
    ("10Mbit", 10.0), ("1gbit", 1000.0), ("500kbit", 0.5), ("10mbit", 10.0),
    ("1Gbit", 1000.0), ("2.5mbit", 2.5), ("64000bit", 0.064), ("1mbps", 8.0),
    (10, 10.0), (0.5, 0.5), ("10", 10.0), (" 10 Mbit ", 10.0),
])
def test_rate_units(text, mbit):
    assert parse_rate_mbit(text) == pytest.approx(mbit)


@pytest.mark.parametrize("text, ms", [
    ("10ms", 10.0), ("1s", 1000.0), ("500us", 0.5), ("2sec", 2000.0), ("1.5ms", 1.5),
    (0, 0.0), (25, 25.0), ("25", 25.0), ("0ms", 0.0),
])
def test_delay_units(text, ms):
    assert parse_delay_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text, pct", [("1%", 1.0), (1, 1.0), ("0.5%", 0.5), ("100%", 100.0),
                                       ("0", 0.0), ("2pct", 2.0)])
def test_loss_units(text, pct):
    assert parse_loss_pct(text) == pytest.approx(pct)


# bad values: a SpecError whose message names the problem ---------------------------------------

@pytest.mark.parametrize("fn, value, pattern", [
    (parse_rate_mbit, "fast", r"rate.*cannot parse 'fast'"),
    (parse_rate_mbit, "10 furlongs", r"unknown unit 'furlongs'"),
    (parse_rate_mbit, -5, r"rate must be positive, got -5"),
    (parse_rate_mbit, "-5Mbit", r"rate must be positive"),
    (parse_rate_mbit, 0, r"rate must be positive"),
    (parse_rate_mbit, "1bit", r"below 8 kbit/s"),
    (parse_rate_mbit, 1e9, r"above 100000 Mbit/s"),
    (parse_rate_mbit, "1e9Mbit", r"above 100000 Mbit/s"),
    (parse_rate_mbit, float("nan"), r"not a finite number"),
    (parse_rate_mbit, float("inf"), r"not a finite number"),
    (parse_rate_mbit, True, r"expected a number"),
    (parse_rate_mbit, [10], r"expected a number or a string"),
    (parse_delay_ms, "-1ms", r"delay.*must not be negative"),
    (parse_delay_ms, -3, r"must not be negative"),
    (parse_delay_ms, 1e7, r"above 60000 ms"),
    (parse_delay_ms, "1e7ms", r"above 60000 ms"),
    (parse_delay_ms, "soon", r"cannot parse 'soon'"),
    (parse_delay_ms, "10mbit", r"unknown unit 'mbit'"),
    (parse_loss_pct, 101, r"loss.*between 0 and 100"),
    (parse_loss_pct, "101%", r"between 0 and 100"),
    (parse_loss_pct, -1, r"between 0 and 100"),
    (parse_loss_pct, "lots", r"cannot parse 'lots'"),
])
def test_bad_values(fn, value, pattern):
    with pytest.raises(SpecError, match=pattern):
        fn(value)


def test_spec_error_is_a_value_error():
    # callers that catch ValueError for bad input keep working
    with pytest.raises(ValueError):
        parse_rate_mbit("fast")


def test_error_names_the_place():
    with pytest.raises(SpecError, match=r"^link h1-h2: rate: .*'fast'"):
        Shaping.make(rate="fast", where="link h1-h2")


# Shaping -------------------------------------------------------------------------------------

def test_shaping_make_parses_everything():
    s = Shaping.make(rate="10Mbit", delay="5ms", jitter="1ms", loss="1%", queue_pkts=100)
    assert s == Shaping(rate_mbit=10.0, delay_ms=5.0, jitter_ms=1.0, loss_pct=1.0, queue_pkts=100)
    assert s.needs_delay and not s.is_plain


def test_shaping_defaults_are_plain():
    s = Shaping.make()
    assert s.is_plain and not s.needs_delay
    assert Shaping.make(rate=10).needs_delay is False
    assert Shaping.make(loss=1).needs_delay is True


def test_jitter_above_delay_rejected():
    with pytest.raises(SpecError, match=r"jitter 6 ms exceeds delay 5 ms"):
        Shaping.make(delay="5ms", jitter="6ms")
    with pytest.raises(SpecError, match=r"jitter 1 ms exceeds delay 0 ms"):
        Shaping.make(jitter=1)
    assert Shaping.make(delay=5, jitter=5).jitter_ms == 5


@pytest.mark.parametrize("q, pattern", [
    (0, r"queue limit must be a positive whole number"),
    (-1, r"queue limit must be a positive whole number"),
    (1.5, r"queue limit must be a positive whole number"),
    (True, r"queue limit must be a positive whole number"),
    (10_000_000, r"queue limit 10000000 is absurd"),
])
def test_bad_queue(q, pattern):
    with pytest.raises(SpecError, match=pattern):
        Shaping.make(queue_pkts=q)


def test_replace_validates_and_accepts_aliases():
    s = Shaping.make(rate=10, delay=5)
    t = s.replace(delay_ms=20, loss="2%")
    assert (t.rate_mbit, t.delay_ms, t.loss_pct) == (10.0, 20.0, 2.0)
    assert s.delay_ms == 5.0  # frozen: the original is unchanged
    with pytest.raises(SpecError, match=r"unknown link parameter 'colour'"):
        s.replace(colour="red")
    with pytest.raises(SpecError, match=r"must not be negative"):
        s.replace(delay=-1)


# names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, pattern", [
    ("abcdefghijk", r"'abcdefghijk' is longer than 10 characters"),
    ("1h", r"use letters, digits and _"),
    ("h-1", r"use letters, digits and _"),
    ("", r"use letters, digits and _"),
    (None, r"use letters, digits and _"),
])
def test_bad_node_names(name, pattern):
    with pytest.raises(SpecError, match=pattern):
        check_name(name)


def test_ten_char_name_is_fine():
    assert check_name("abcdefghij") == "abcdefghij"


def test_ifname_limit():
    assert check_ifname("a" * 15) == "a" * 15
    with pytest.raises(SpecError, match=r"'aaaaaaaaaaaaaaaa' is longer than 15 characters"):
        check_ifname("a" * 16)
    with pytest.raises(SpecError, match=r"interface name 'h1 eth0'"):
        check_ifname("h1 eth0")
    with pytest.raises(SpecError, match=r"bad interface name ''"):
        check_ifname("")


def test_node_kind():
    assert NodeSpec("r1", "router").kind == "router"
    with pytest.raises(SpecError, match=r"node x: unknown kind 'bridge'"):
        NodeSpec("x", "bridge")


# routes and addresses --------------------------------------------------------------------------

def test_route_spec_validation():
    assert RouteSpec("h1", "default", "10.0.0.1").dst == "default"
    with pytest.raises(SpecError, match=r"route on h1: bad destination '10.0.0.0/33'"):
        RouteSpec("h1", "10.0.0.0/33", "10.0.0.1")
    with pytest.raises(SpecError, match=r"route on h1: bad next hop 'gateway'"):
        RouteSpec("h1", "10.0.0.0/24", "gateway")


def test_interface_address():
    iface = parse_interface_address("10.1.2.3/24", "h1 h1-eth0")
    assert str(iface) == "10.1.2.3/24"
    with pytest.raises(SpecError, match=r"h1 h1-eth0: address '10.1.2.3' needs a prefix length"):
        parse_interface_address("10.1.2.3", "h1 h1-eth0")
    with pytest.raises(SpecError, match=r"bad address 'ten'"):
        parse_interface_address("ten", "h1 h1-eth0")
    with pytest.raises(SpecError, match=r"only IPv4"):
        parse_interface_address("fd00::1/64", "h1 h1-eth0")
    with pytest.raises(SpecError, match=r"network or broadcast address"):
        parse_interface_address("10.1.2.0/24", "h1 h1-eth0")
    with pytest.raises(SpecError, match=r"network or broadcast address"):
        parse_interface_address("10.1.2.255/24", "h1 h1-eth0")
    assert str(parse_interface_address("10.1.2.0/31", "p2p")) == "10.1.2.0/31"


def test_linkspec_helpers():
    ln = LinkSpec("a", "b", "a-eth0", "b-eth0")
    assert ln.other("a") == "b" and ln.other("b") == "a"
    assert ln.key == frozenset(("a", "b"))
    assert ln.ends == (("a", "a-eth0"), ("b", "b-eth0"))
    parallel = LinkSpec("a", "b", "a-eth1", "b-eth1")
    assert parallel.key == ln.key and parallel.ends != ln.ends  # same nodes, own interfaces
    assert not ln.needs_delay
    assert LinkSpec("a", "b", "x", "y", emulate=True).needs_delay
