"""Queue specs (testbed.queueing) and the tc lines that build them (testbed.kernel.qdisc):
validation, implementation choice, golden tc batches. Pure, no root."""

import pytest

from testbed.errors import CapabilityError, SpecError
from testbed.kernel import qdisc as kq
from testbed.queueing import Match, Queue, QueueClass
from testbed.spec import Shaping

MIRROR = {"protocol": "tcp", "port": 10566}
ALL = {"htb": True, "pfifo": True, "drr": True, "qfq": True, "prio": True, "netem": True}
MINIMAL = {"htb": True, "pfifo": True, "drr": False, "qfq": False, "prio": False,
           "netem": False}


def paper_cq() -> Queue:
    """Paper 000's IOS custom-queue-list 3: port 10566 -> queue 1 (5000 bytes), rest -> 2."""
    return Queue("custom", [QueueClass("mirror", bytes=5000, match=MIRROR),
                            QueueClass("other", bytes=95000, default=True)])


# specs that are fine -----------------------------------------------------------------------

def test_paper_custom_queue_shares():
    q = paper_cq()
    assert q.shares() == pytest.approx({"mirror": 0.05, "other": 0.95})
    assert q.default_class.name == "other"
    assert q.describe() == ("custom: mirror[bytes=5000; tcp port 10566], "
                            "other[bytes=95000; default]")


def test_classes_from_dicts_equal_typed_ones():
    typed = paper_cq()
    as_list = Queue("custom", [{"name": "mirror", "bytes": 5000, "match": MIRROR},
                               {"name": "other", "bytes": 95000, "default": True}])
    as_map = Queue("custom", {"mirror": {"bytes": 5000, "match": Match(**MIRROR)},
                              "other": {"bytes": 95000, "default": True}})
    assert typed == as_list == as_map


def test_wfq_htb_priority_shares():
    w = Queue("wfq", [QueueClass("a", weight=1, match={"protocol": "udp"}),
                      QueueClass("b", weight=3, default=True)])
    assert w.shares() == pytest.approx({"a": 0.25, "b": 0.75})
    h = Queue("htb", [QueueClass("a", rate_mbit="2mbit", match={"dscp": 46}),
                      QueueClass("b", rate_mbit=6, default=True)])
    assert h.shares() == pytest.approx({"a": 0.25, "b": 0.75})
    assert h.classes[0].rate_mbit == 2.0
    p = Queue("priority", [QueueClass("hi", prio=0, match={"protocol": "icmp"}),
                           QueueClass("lo", prio=1, default=True)])
    assert p.shares() == {}


def test_match_normalises_and_expands_port():
    m = Match(protocol="TCP", port=80, src="10.0.0.0/8")
    assert m.protocol == "tcp"
    assert m.atoms() == [{"protocol": "tcp", "src": "10.0.0.0/8", "sport": 80},
                         {"protocol": "tcp", "src": "10.0.0.0/8", "dport": 80}]
    assert Match(dst="10.1.2.3").dst == "10.1.2.3/32"
    assert str(m) == "tcp port 80 src 10.0.0.0/8"


@pytest.mark.parametrize("a, b", [
    ({"protocol": "tcp", "dport": 80}, {"protocol": "udp", "dport": 80}),
    ({"protocol": "tcp", "dport": 80}, {"protocol": "tcp", "dport": 81}),
    ({"src": "10.0.0.0/24"}, {"src": "10.0.1.0/24"}),
    ({"dscp": 46}, {"dscp": 0}),
    ({"protocol": "tcp", "sport": 5}, {"protocol": "tcp", "sport": 6, "dst": "10.0.0.0/8"}),
])
def test_disjoint_classifiers_are_accepted(a, b):
    Queue("wfq", [QueueClass("a", weight=1, match=a), QueueClass("b", weight=1, match=b),
                  QueueClass("c", weight=1, default=True)])


# bad input: one line, naming the problem ----------------------------------------------------

def cls2(kind, a: dict, b: dict):
    return lambda: Queue(kind, [QueueClass("a", **a), QueueClass("b", **b)])


@pytest.mark.parametrize("make, pattern", [
    (lambda: Queue("cbq"), r"queue kind must be one of fifo, htb, wfq, custom, priority"),
    (cls2("custom", {"bytes": 0, "match": MIRROR}, {"bytes": 1, "default": True}),
     r"class a: bytes must be positive, got 0"),
    (cls2("custom", {"bytes": -5, "match": MIRROR}, {"bytes": 1, "default": True}),
     r"bytes must be positive, got -5"),
    (cls2("custom", {"bytes": 1.5, "match": MIRROR}, {"bytes": 1, "default": True}),
     r"bytes must be a whole number of bytes, got 1.5"),
    (cls2("wfq", {"weight": 0, "match": MIRROR}, {"weight": 1, "default": True}),
     r"class a: weight must be positive, got 0"),
    (cls2("wfq", {"weight": -1, "match": MIRROR}, {"weight": 1, "default": True}),
     r"weight must be positive"),
    (cls2("wfq", {"weight": float("nan"), "match": MIRROR}, {"weight": 1, "default": True}),
     r"weight must be a number"),
    (cls2("wfq", {"weight": True, "match": MIRROR}, {"weight": 1, "default": True}),
     r"weight must be a number"),
    (cls2("wfq", {"weight": 1, "match": MIRROR}, {"weight": 1}),
     r"class b: needs a match \(or default=True\)"),
    (cls2("wfq", {"weight": 1, "match": MIRROR}, {"weight": 1, "match": {"protocol": "udp"}}),
     r"wfq queue: no default class"),
    (cls2("wfq", {"weight": 1, "default": True}, {"weight": 1, "default": True}),
     r"wfq queue: 2 default classes \(a, b\); give exactly one"),
    (cls2("wfq", {"weight": 1, "default": True, "match": MIRROR}, {"weight": 1}),
     r"class a: the default class takes what no other class matches"),
    (cls2("wfq", {"bytes": 100, "match": MIRROR}, {"weight": 1, "default": True}),
     r"class a: bytes is not a field of a wfq queue \(its classes take weight, limit_pkts\)"),
    (cls2("custom", {"match": MIRROR}, {"bytes": 1, "default": True}),
     r"class a: a custom queue needs bytes on every class"),
    (cls2("priority", {"prio": 1, "match": MIRROR}, {"prio": 1, "default": True}),
     r"classes a and b share prio 1"),
    (cls2("priority", {"prio": 8, "match": MIRROR}, {"prio": 1, "default": True}),
     r"prio: must be between 0 and 7, got 8"),
    (cls2("htb", {"rate_mbit": 5, "ceil_mbit": 2, "match": MIRROR},
          {"rate_mbit": 1, "default": True}), r"ceil_mbit 2 is below rate_mbit 5"),
    (cls2("htb", {"rate_mbit": -5, "match": MIRROR}, {"rate_mbit": 1, "default": True}),
     r"rate_mbit: rate must be positive"),
    (lambda: QueueClass("a", wieght=1, default=True),
     r"class 'a': unknown field 'wieght'"),
    (lambda: Queue("wfq", [QueueClass("a", weight=1, default=True),
                           QueueClass("a", weight=1, match=MIRROR)]),
     r"two classes named 'a'"),
    (lambda: Queue("wfq", []), r"wfq queue: needs classes"),
    (lambda: Queue("fifo", [QueueClass("a", default=True)]), r"fifo queue: has no classes"),
    (lambda: Queue("wfq", [QueueClass(f"c{i}", weight=1, match={"dscp": i}) for i in range(16)]
                   + [QueueClass("d", weight=1, default=True)]), r"17 classes, at most 16"),
    (lambda: Queue("wfq", [QueueClass("a", weight=1e-5, match=MIRROR),
                           QueueClass("b", weight=1, default=True)]),
     r"weights span more than 10000:1"),
    (lambda: Queue("wfq", "a,b"), r"classes must be a list"),
    (lambda: QueueClass("9lives", default=True), r"class name '9lives'"),
    (lambda: QueueClass("a", match={"proto": "tcp"}), r"class a: match: unknown field 'proto'"),
    (lambda: QueueClass("a", match={}), r"give at least one field"),
    (lambda: QueueClass("a", match=42), r"match must be a Match or a dict"),
    (lambda: Match(protocol="sctp"), r"protocol must be one of tcp, udp, icmp"),
    (lambda: Match(dport=80), r"dport needs protocol tcp or udp, got None"),
    (lambda: Match(protocol="icmp", sport=1), r"sport needs protocol tcp or udp"),
    (lambda: Match(protocol="tcp", dport=0), r"dport: must be between 1 and 65535"),
    (lambda: Match(protocol="tcp", dport=70000), r"dport: must be between 1 and 65535"),
    (lambda: Match(protocol="tcp", dport="80"), r"dport: expected a whole number"),
    (lambda: Match(protocol="tcp", port=1, dport=2), r"give port .* or sport/dport, not both"),
    (lambda: Match(src="10.0.0.1/24"), r"has host bits set \(did you mean 10.0.0.0/24\?\)"),
    (lambda: Match(src="10.0.0.300/24"), r"bad prefix"),
    (lambda: Match(dst="fe80::/64"), r"only IPv4 prefixes"),
    (lambda: Match(dscp=64), r"dscp: must be between 0 and 63"),
    (lambda: Queue("fifo", limit_pkts=0), r"limit_pkts: must be between 1 and"),
])
def test_bad_queue_specs(make, pattern):
    with pytest.raises(SpecError, match=pattern) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("a, b, both", [
    ({"protocol": "tcp", "port": 80}, {"protocol": "tcp", "dport": 80}, "tcp dport 80"),
    ({"protocol": "tcp", "dport": 80}, {"dst": "10.0.0.0/8"}, "tcp dport 80 dst 10.0.0.0/8"),
    ({"src": "10.0.0.0/8"}, {"src": "10.1.0.0/16"}, "src 10.1.0.0/16"),
    ({"dscp": 46}, {"protocol": "udp", "dscp": 46}, "udp dscp 46"),
    ({"protocol": "udp"}, {"protocol": "udp", "sport": 53}, "udp sport 53"),
])
def test_overlapping_classifiers_are_refused(a, b, both):
    with pytest.raises(SpecError, match="can match the same packet") as e:
        Queue("wfq", [QueueClass("x", weight=1, match=a), QueueClass("y", weight=1, match=b),
                      QueueClass("z", weight=1, default=True)])
    msg = str(e.value)
    assert "classes x" in msg and "and y" in msg and f"({both})" in msg, msg


def test_check_rate():
    h = Queue("htb", [QueueClass("a", rate_mbit=6, match=MIRROR),
                      QueueClass("b", rate_mbit=6, ceil_mbit=8, default=True)])
    h.check_rate(12)
    with pytest.raises(SpecError, match="add up to 12 Mbit/s, above the link rate 10"):
        h.check_rate(10)
    with pytest.raises(SpecError, match="class b ceil_mbit 8 is above the link rate 7"):
        Queue("htb", [QueueClass("b", rate_mbit=6, ceil_mbit=8, default=True)]).check_rate(7)
    with pytest.raises(SpecError, match="needs a rate on this direction"):
        paper_cq().check_rate(None)
    paper_cq().check_rate(0.1)  # shares, not rates: any link rate works


# implementation choice ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, full, minimal", [
    ("custom", "drr", "htb-emulated"), ("wfq", "drr", "htb-emulated"),
    ("priority", "prio", "htb-emulated"), ("htb", "htb", "htb"), ("fifo", "pfifo", "pfifo"),
])
def test_choose_impl_follows_the_probe(kind, full, minimal):
    q = {"custom": paper_cq(), "fifo": Queue("fifo"),
         "wfq": Queue("wfq", [QueueClass("a", weight=1, default=True)]),
         "priority": Queue("priority", [QueueClass("a", prio=0, default=True)]),
         "htb": Queue("htb", [QueueClass("a", rate_mbit=1, default=True)])}[kind]
    assert kq.choose_impl(q, ALL) == full
    assert kq.choose_impl(q, MINIMAL) == minimal


def test_choose_impl_explicit_and_missing():
    q = paper_cq()
    assert kq.choose_impl(q, ALL, "htb-emulated") == "htb-emulated"
    with pytest.raises(CapabilityError, match="drr for a custom queue needs the drr qdisc"):
        kq.choose_impl(q, MINIMAL, "drr")
    with pytest.raises(SpecError, match="no implementation 'qfq'"):
        kq.choose_impl(q, ALL, "qfq")
    with pytest.raises(CapabilityError, match="needs one of the qdiscs drr, htb"):
        kq.choose_impl(q, {"htb": False, "drr": False})


# tc lines -----------------------------------------------------------------------------------

R100 = Shaping.make(rate=100)
CQ_FILTERS = [
    "filter add dev e0 parent 10: protocol ip prio 1 u32 match ip protocol 6 0xff "
    "match ip sport 10566 0xffff flowid 10:1",
    "filter add dev e0 parent 10: protocol ip prio 2 u32 match ip protocol 6 0xff "
    "match ip dport 10566 0xffff flowid 10:1",
    "filter add dev e0 parent 10: protocol all prio 100 u32 match u32 0 0 flowid 10:2",
]
ROOT = [
    "qdisc add dev e0 root handle 1: htb default 1",
    "class add dev e0 parent 1: classid 1:1 htb rate 100000000bit ceil 100000000bit "
    "burst 25000 cburst 25000 quantum 12500",
]


def test_golden_custom_on_drr():
    lines, layout = kq.lines("e0", R100, True, "none", paper_cq(), "drr")
    assert layout == "htb:drr"
    assert lines == ROOT + [
        "qdisc add dev e0 parent 1:1 handle 10: drr",
        "class add dev e0 parent 10: classid 10:1 drr quantum 5000",
        "qdisc add dev e0 parent 10:1 handle 21: pfifo limit 1000",
        "class add dev e0 parent 10: classid 10:2 drr quantum 95000",
        "qdisc add dev e0 parent 10:2 handle 22: pfifo limit 1000",
    ] + CQ_FILTERS


def test_golden_custom_on_htb():
    lines, layout = kq.lines("e0", R100, True, "none", paper_cq(), "htb-emulated")
    assert layout == "htb:htb-emulated"
    # rates 5 % / 95 % of the link, ceil the link, quanta in the byte counts' ratio with the
    # smallest one a whole GSO packet
    assert lines == ROOT + [
        "qdisc add dev e0 parent 1:1 handle 10: htb default 2",
        "class add dev e0 parent 10: classid 10:100 htb rate 100000000bit ceil 100000000bit "
        "burst 70000 cburst 70000 quantum 70000 prio 0",
        "class add dev e0 parent 10:100 classid 10:1 htb rate 5000000bit ceil 100000000bit "
        "burst 70000 cburst 70000 quantum 70000 prio 0",
        "qdisc add dev e0 parent 10:1 handle 21: pfifo limit 1000",
        "class add dev e0 parent 10:100 classid 10:2 htb rate 95000000bit ceil 100000000bit "
        "burst 70000 cburst 70000 quantum 1330000 prio 0",
        "qdisc add dev e0 parent 10:2 handle 22: pfifo limit 1000",
    ] + CQ_FILTERS


def prio_queue(limit=None) -> Queue:
    return Queue("priority", [
        QueueClass("voice", prio=0, match={"protocol": "udp", "dscp": 46}),
        QueueClass("bulk", prio=5, default=True, limit_pkts=limit),
        QueueClass("ssh", prio=1, match={"protocol": "tcp", "dport": 22, "src": "10.0.0.0/24"}),
    ])


def test_golden_priority_on_prio_with_netem_leaves():
    s = Shaping.make(rate=10, delay=5, loss=1)
    lines = kq.queue_lines("e0", s, prio_queue(limit=30), "prio", netem=True)
    assert lines == [
        "qdisc add dev e0 parent 1:1 handle 10: prio bands 3 priomap "
        + " ".join(["2"] * 16),  # unclassified traffic: the default class's band
        "qdisc add dev e0 parent 10:1 handle 21: netem limit 1000 delay 5ms loss 1%",
        "qdisc add dev e0 parent 10:3 handle 23: netem limit 30 delay 5ms loss 1%",
        "qdisc add dev e0 parent 10:2 handle 22: netem limit 1000 delay 5ms loss 1%",
        "filter add dev e0 parent 10: protocol ip prio 1 u32 match ip protocol 17 0xff "
        "match ip dsfield 0xb8 0xfc flowid 10:1",
        "filter add dev e0 parent 10: protocol ip prio 2 u32 match ip protocol 6 0xff "
        "match ip dport 22 0xffff match ip src 10.0.0.0/24 flowid 10:2",
        "filter add dev e0 parent 10: protocol all prio 100 u32 match u32 0 0 flowid 10:3",
    ]


def test_priority_on_htb_uses_prio_over_tiny_rates():
    lines = kq.queue_lines("e0", Shaping.make(rate=10), prio_queue(), "htb-emulated",
                           netem=False)
    classes = [ln for ln in lines if ln.startswith("class add dev e0 parent 10:100")]
    assert [c.split("prio ")[-1] for c in classes] == ["0", "5", "1"]
    assert all("rate 10000bit ceil 10000000bit" in c for c in classes)


def test_wfq_quanta_and_weights():
    q = Queue("wfq", [QueueClass("a", weight=1, match={"protocol": "icmp"}),
                      QueueClass("b", weight=2.5, default=True)])
    drr = kq.queue_lines("e0", R100, q, "drr", False)
    assert "class add dev e0 parent 10: classid 10:1 drr quantum 1514" in drr
    assert "class add dev e0 parent 10: classid 10:2 drr quantum 3785" in drr
    qfq = kq.queue_lines("e0", R100, q, "qfq", False)
    assert "class add dev e0 parent 10: classid 10:1 qfq weight 410" in qfq
    assert "class add dev e0 parent 10: classid 10:2 qfq weight 1024" in qfq
    htb = kq.queue_lines("e0", R100, q, "htb-emulated", False)
    assert any("classid 10:1 htb rate 28571429bit ceil 100000000bit" in ln
               and "quantum 70000 " in ln for ln in htb)
    assert any("classid 10:2 htb rate 71428571bit" in ln and "quantum 175000 " in ln
               for ln in htb)


def test_user_htb_tree():
    q = Queue("htb", [QueueClass("a", rate_mbit=2, ceil_mbit=5, prio=1,
                                 match={"dst": "10.1.0.0/16"}),
                      QueueClass("b", rate_mbit=3, default=True, limit_pkts=50)])
    lines = kq.queue_lines("e0", Shaping.make(rate=10), q, "htb", False)
    assert ("class add dev e0 parent 10:100 classid 10:1 htb rate 2000000bit ceil 5000000bit "
            "burst 70000 cburst 70000 quantum 70000 prio 1") in lines
    assert ("class add dev e0 parent 10:100 classid 10:2 htb rate 3000000bit "
            "ceil 10000000bit burst 70000 cburst 70000 quantum 105000 prio 0") in lines
    assert "qdisc add dev e0 parent 10:2 handle 22: pfifo limit 50" in lines
    assert ("filter add dev e0 parent 10: protocol ip prio 1 u32 match ip dst 10.1.0.0/16 "
            "flowid 10:1") in lines


def test_replacing_a_queue_keeps_the_rate_class():
    """From a plain leaf to a queue, between queues, and back: the root HTB and its rate
    class 1:1 are never deleted (the link stays shaped); only the leaf under 1:1 is."""
    wfq = Queue("wfq", [QueueClass("a", weight=1, match=MIRROR),
                        QueueClass("b", weight=3, default=True)])
    steps = [(paper_cq(), "drr"), (wfq, "drr"), (None, None), (Queue("fifo"), None)]
    layout = "htb:pfifo"
    for q, impl in steps:
        lines, layout = kq.lines("e0", R100, True, layout, q, impl)
        assert not any("root" in ln for ln in lines), lines
        assert lines[0].startswith("class change dev e0 parent 1: classid 1:1 htb rate 1000")
        if q is not None and q.kind != "fifo":
            assert lines[1] == "qdisc del dev e0 parent 1:1"
    assert layout == "htb:pfifo"
    # the same plain leaf again: changed in place, as before queues existed
    lines, layout = kq.lines("e0", R100, True, layout)
    assert lines[1] == "qdisc replace dev e0 parent 1:1 handle 10: pfifo limit 1000"


def test_plain_links_are_unchanged():
    """Links without a queue get the lines they always got."""
    s = Shaping.make(rate=10, delay=20)
    lines, layout = kq.lines("e0", s, True, "none")
    assert lines == [
        "qdisc add dev e0 root handle 1: htb default 1",
        "class add dev e0 parent 1: classid 1:1 htb rate 10000000bit ceil 10000000bit "
        "burst 3028 cburst 3028 quantum 1514",
        "qdisc add dev e0 parent 1:1 handle 10: netem limit 1000 delay 20ms",
    ]
    assert layout == "htb:netem"
    lines, layout = kq.lines("e0", Shaping.make(delay=20), True, "none")
    assert lines == ["qdisc replace dev e0 root handle 10: netem limit 1000 delay 20ms"]
    assert kq.lines("e0", Shaping.make(), True, layout) == (["qdisc del dev e0 root"], "none")
    # the delay line does delay elsewhere: a pfifo leaf
    lines, layout = kq.lines("wb", s, False, "none")
    assert lines[-1] == "qdisc add dev wb parent 1:1 handle 10: pfifo limit 1000"
    assert layout == "htb:pfifo"


def test_leaf_kind_change_deletes_then_adds():
    """pfifo -> netem cannot be a `replace` (the kernel refuses another kind under the same
    handle): delete the leaf (HTB keeps shaping with a default pfifo), then add."""
    lines, layout = kq.lines("e0", Shaping.make(rate=10, delay=5), True, "htb:pfifo")
    assert lines[1:] == ["qdisc del dev e0 parent 1:1",
                         "qdisc add dev e0 parent 1:1 handle 10: netem limit 1000 delay 5ms"]
    assert layout == "htb:netem"


def test_queue_without_rate_is_refused_by_lines():
    with pytest.raises(SpecError, match="needs a rate"):
        kq.lines("e0", Shaping.make(delay=5), True, "none", paper_cq(), "drr")
