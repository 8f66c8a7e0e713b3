"""Queueing disciplines on real namespaces: src -> r1 ==(shaped)==> dst, the queue on r1's
egress toward dst. Measured class shares at saturation against the configured weights and
byte counts, strict priority, the FIFO baseline, per-class counters against iperf3, runtime
replacement under load, and bad input that changes nothing. Every implementation this
kernel offers is measured (only htb-emulated here; drr, qfq and prio too on a stock kernel).
The stock-kernel VM tier (qemu TCG: too slow and noisy to saturate a link reliably) runs
only the test marked fullkernel: every implementation built on a link whose delay netem
does, classifying and delaying packets. Needs root."""

from __future__ import annotations

import os
import threading
import time

import pytest

from testbed import Network, Topology, capabilities, measure
from testbed.errors import CapabilityError, CommandError, SpecError
from testbed.kernel import qdisc as kq
from testbed.measure.concurrent import iperf3_flows, rates_bps, shares
from testbed.process import TIMEOUT_SCALE
from testbed.queueing import Queue, QueueClass
from testbed.run import run

pytestmark = pytest.mark.kernel

# Mbit/s: the paper's link, where HTB emulation's rounds are short against the window; a
# slow VM (the stock-kernel tier runs under TCG, TESTBED_TIMEOUT_SCALE > 1) cannot saturate
# it with TCP, and shares are only defined on a saturated link
RATE = 100 if TIMEOUT_SCALE <= 1 else 20
SECONDS = 5.0
WARMUP = 1.0  # shares are taken over [WARMUP, SECONDS]: slow start and queue fill excluded
# Shares within 10 % (relative) of the configuration: a behaviour check that survives a
# busy CI machine (5 s flows gave 10.55 % for a 10 % class once). The issue's 5 % target is
# met and reported by the benchmark, results/qos_custom_queuing (5.04 % for 5 %).
TOL = 0.10
TCP_PAYLOAD = 1448 / 1514
CAPS = capabilities.probe() if os.geteuid() == 0 else None


def impls(kind: str) -> list:
    """The implementations of kind this kernel offers (the kernel's own disciplines first)."""
    if CAPS is None:
        return ["htb-emulated"]
    return [name for name, needs in kq.IMPLEMENTATIONS[kind] if CAPS.qdiscs.get(needs)]


def router_topology() -> Topology:
    """topologies/qos_router.py's setup (tests do not import the checkout's topologies/)."""
    t = Topology("qos_router")
    t.add_host("src"); t.add_router("r1"); t.add_host("dst")
    t.add_link("src", "r1")
    t.add_link("r1", "dst", rate=RATE)
    return t


@pytest.fixture
def net(root_state, run_id):
    with Network(router_topology(), run_id=run_id()) as n:
        yield n
    root_state.assert_unchanged()


def wan(net):
    return net.link("r1", "dst")


def flows(net, ports, seconds=SECONDS, **kw):
    return iperf3_flows(net["src"], net["dst"], ports, seconds=seconds, interval=0.5,
                        congestion="cubic", **kw)


def tc_state(net) -> str:
    """Everything tc shows on r1's WAN egress (qdiscs, classes, filters), without counters."""
    dev = wan(net).spec.intf_a
    shows = (["qdisc", "show", "dev", dev], ["class", "show", "dev", dev],
             ["filter", "show", "dev", dev, "parent", "10:"])
    return "\n".join(run(["tc", "-n", net["r1"].ns] + argv, check=False).stdout
                     for argv in shows)


def drained(net):
    """A probe: true once src has nothing left to send (every TCP socket's Send-Q is empty)
    and r1's queue toward dst is empty, so the class counters have seen every byte."""
    def probe() -> bool:
        out = net["src"].run(["ss", "-Htn"]).stdout
        if any(line.split()[2] != "0" for line in out.splitlines() if line.strip()):
            return False
        return int(wan(net).queue_stats("a_to_b").backlog_pkts.sum()) == 0
    return probe


def assert_counted(counted_bytes: int, counted_pkts: int, flows: list, what: str) -> None:
    """A class's counters against iperf3: every byte received crossed the class as part of
    an Ethernet frame (1514 bytes per 1448 of payload); the class saw no more than was sent
    (iperf3's client count includes what was still buffered when the server closed)."""
    received = sum(f["bytes"] for f in flows)
    sent = sum(f["bytes_sent"] for f in flows) + 1448 * sum(f["retransmits"] or 0 for f in flows)
    lo, hi = 0.99 * received / TCP_PAYLOAD, 1.02 * sent / TCP_PAYLOAD + 100_000
    assert lo <= counted_bytes <= hi, f"{what}: counted {counted_bytes} B, want {lo:.0f}-{hi:.0f}"
    assert counted_pkts >= 0.99 * received / 1448, f"{what}: {counted_pkts} packets"


def assert_saturated(df, rate: float, what: str) -> None:
    total = sum(rates_bps(df, WARMUP, SECONDS).values()) / 1e6
    assert total >= 0.90 * rate * TCP_PAYLOAD, (
        f"{what}: the flows did not saturate the link ({total:.1f} Mbit/s of goodput at "
        f"{rate:g} Mbit/s), so shares say nothing about the scheduler")


def assert_shares(df, want: dict, what: str) -> None:
    """want: {(port, ...): share}; a class's share is its flows' together. Classes get two
    flows where one flow alone might not keep them backlogged on a slow machine."""
    by_port = shares(df, WARMUP, SECONDS)
    shown = {p: round(100 * v, 2) for p, v in by_port.items()}
    for ports, share in want.items():
        got = sum(by_port[p] for p in ports)
        assert abs(got - share) <= TOL * share, (
            f"{what}: ports {ports} got {100 * got:.2f} % of the link, configured "
            f"{100 * share:.2f} % (per port: {shown})")


# the FIFO baseline ------------------------------------------------------------------------

def test_fifo_baseline_fills_the_link_and_counts_what_iperf3_sent(net, wait_until):
    link = wan(net)
    link.set_queue("a_to_b", Queue("fifo"))
    assert link.queue_impl["a_to_b"] == "pfifo"
    before = link.queue_stats("a_to_b")
    df = flows(net, [5201, 5202])
    wait_until(drained(net), timeout=10, what="the queue to drain")
    after = link.queue_stats("a_to_b")
    assert list(after["class"]) == ["fifo"] and after.attrs["impl"] == "pfifo"
    goodput = sum(rates_bps(df, WARMUP, SECONDS).values()) / 1e6
    # the flows' goodput fills the link, as the rate allows (Ethernet frames of 1514 bytes)
    assert 0.90 * RATE * TCP_PAYLOAD <= goodput <= 1.03 * RATE, goodput
    assert_counted(int(after.bytes[0] - before.bytes[0]),
                   int(after.packets[0] - before.packets[0]),
                   list(df.attrs["flows"].values()), "fifo")


# shares by weight and byte count -----------------------------------------------------------

@pytest.mark.parametrize("impl", impls("wfq"))
def test_wfq_shares_match_the_weights_and_survive_a_rate_change(net, impl, wait_until):
    q = Queue("wfq", [QueueClass("small", weight=1, match={"protocol": "tcp", "port": 5201}),
                      QueueClass("big", weight=3, default=True)])
    link = wan(net)
    link.set_queue("a_to_b", q, impl=impl)
    assert link.queue_impl["a_to_b"] == impl
    df = flows(net, [5201, 5202, 5203])
    assert_saturated(df, RATE, f"wfq on {impl}")
    assert_shares(df, {(5201,): 0.25, (5202, 5203): 0.75}, f"wfq on {impl}")
    wait_until(drained(net), timeout=10, what="the queue to drain")
    stats = link.queue_stats("a_to_b").set_index("class")
    assert stats.loc["small", "configured_share"] == pytest.approx(0.25)
    # per-class counters agree with what each flow sent and received
    for cls, ports in (("small", (5201,)), ("big", (5202, 5203))):
        assert_counted(int(stats.loc[cls, "bytes"]), int(stats.loc[cls, "packets"]),
                       [df.attrs["flows"][p] for p in ports], cls)
    # a runtime rate change keeps the queue, and the shares
    link.set(direction="a_to_b", rate_mbit=RATE / 2)
    assert link.queues["a_to_b"] is q
    df = flows(net, [5201, 5202, 5203])
    assert_saturated(df, RATE / 2, f"wfq on {impl}")
    assert_shares(df, {(5201,): 0.25, (5202, 5203): 0.75}, f"wfq on {impl} at {RATE / 2:g} Mbit/s")
    goodput = sum(rates_bps(df, WARMUP, SECONDS).values()) / 1e6
    assert goodput <= 1.03 * RATE / 2, goodput


@pytest.mark.parametrize("impl", impls("custom"))
def test_custom_queuing_shares_match_the_byte_counts(net, impl):
    """Three queues of 2000, 6000 and 12000 bytes per round (smaller than a GSO packet:
    whole packets are sent, the deficit carries over): 10, 30 and 60 % of the link (the
    default queue gets two flows)."""
    q = Queue("custom", [
        QueueClass("q1", bytes=2000, match={"protocol": "tcp", "dport": 5201}),
        QueueClass("q2", bytes=6000, match={"protocol": "tcp", "dport": 5202}),
        QueueClass("q3", bytes=12000, default=True)])
    link = wan(net)
    link.set_queue("a_to_b", q, impl=impl)
    df = flows(net, [5201, 5202, 5203, 5204])
    assert_saturated(df, RATE, f"custom on {impl}")
    assert_shares(df, {(5201,): 0.10, (5202,): 0.30, (5203, 5204): 0.60}, f"custom on {impl}")
    stats = link.queue_stats("a_to_b")
    assert list(stats["class"]) == ["q1", "q2", "q3"]
    assert (stats.bytes > 0).all() and (stats.packets > 0).all()
    assert stats.attrs == {**stats.attrs, "kind": "custom", "impl": impl}


@pytest.mark.parametrize("impl", impls("priority"))
def test_strict_priority_starves_the_low_band(net, impl):
    """Three bands, one flow each. The high band takes all it can; the middle one gets only
    what that leaves (nothing where one flow fills the link, the rest where the machine
    cannot push one flow that fast); the low band starves."""
    q = Queue("priority", [QueueClass("high", prio=0, match={"protocol": "tcp", "dport": 5201}),
                           QueueClass("mid", prio=1, match={"protocol": "tcp", "dport": 5202}),
                           QueueClass("low", prio=2, default=True)])
    link = wan(net)
    link.set_queue("a_to_b", q, impl=impl)
    df = flows(net, [5201, 5202, 5203])
    assert_saturated(df, RATE, f"priority on {impl}")
    got = shares(df, WARMUP, SECONDS)
    shown = {p: round(100 * v, 2) for p, v in got.items()}
    assert got[5203] < 0.02, f"low band got {100 * got[5203]:.2f} % of the link on {impl}"
    assert got[5201] > 0.5 and got[5201] > 2 * got[5202], f"high band not first: {shown}"


# classifiers ---------------------------------------------------------------------------------

def test_each_classifier_field_steers_its_packets(net):
    src_ip = net["src"].ip
    q = Queue("wfq", [
        QueueClass("icmp", weight=1, match={"protocol": "icmp"}),
        QueueClass("udp", weight=1, match={"protocol": "udp", "dport": 5300}),
        QueueClass("ef", weight=1, match={"protocol": "tcp", "dscp": 46}),
        QueueClass("fromsrc", weight=1, match={"protocol": "tcp", "src": f"{src_ip}/32",
                                               "dscp": 0}),
        QueueClass("rest", weight=1, default=True)])
    link = wan(net)
    link.set_queue("a_to_b", q)
    before = link.queue_stats("a_to_b").set_index("class")
    measure.ping(net["src"], net["dst"], count=5, interval=0.05)
    udp = measure.iperf3(net["src"], net["dst"], seconds=1, udp=True, rate_mbit=2, port=5300)
    ef = measure.iperf3(net["src"], net["dst"], seconds=1, port=5301, extra=("-S", "0xb8"))
    plain = measure.iperf3(net["src"], net["dst"], seconds=1, port=5302)
    d = link.queue_stats("a_to_b").set_index("class")
    d[["bytes", "packets"]] -= before[["bytes", "packets"]]
    assert d.loc["icmp", "packets"] == 5  # the echo requests, exactly
    assert d.loc["udp", "packets"] >= udp.attrs["packets"] * 0.99
    assert d.loc["ef", "bytes"] >= ef.attrs["receiver_bps"] / 8 * 0.9
    # plain TCP from src (and every iperf3 control connection, which is not marked)
    assert d.loc["fromsrc", "bytes"] >= plain.attrs["receiver_bps"] / 8 * 0.9
    assert d.loc["fromsrc", "bytes"] < 2 * plain.attrs["receiver_bps"] / 8 + 1e6
    assert d.loc["rest", "packets"] <= 10  # ARP at most


# runtime replacement, bad input -------------------------------------------------------------------

def test_replacing_queues_under_load_never_unshapes_the_link(net):
    link = wan(net)
    m = {"protocol": "tcp", "port": 5201}
    queues = [Queue("wfq", [QueueClass("a", weight=1, match=m),
                            QueueClass("b", weight=1, default=True)]),
              Queue("custom", [QueueClass("a", bytes=3000, match=m),
                               QueueClass("b", bytes=1500, default=True)]),
              Queue("priority", [QueueClass("a", prio=1, match=m),
                                 QueueClass("b", prio=0, default=True)]),
              Queue("fifo"), None]
    result = {}
    worker = threading.Thread(target=lambda: result.update(df=flows(net, [5201], seconds=3)))
    worker.start()
    swaps = 0
    while worker.is_alive():
        link.set_queue("a_to_b", queues[swaps % len(queues)])
        swaps += 1
        time.sleep(0.1)  # pacing the swaps over the flow, not waiting for readiness
    worker.join()
    df = result["df"]
    assert swaps >= 10
    # every half second the link carried traffic, and never more than its rate
    assert (df.bits_per_second <= 1.05 * RATE * 1e6).all(), df.bits_per_second.max()
    assert (df[df.t_end - df.t_start > 0.25].bits_per_second > 0.2 * RATE * 1e6).all(), df
    dev = link.spec.intf_a
    shown = run(["tc", "-n", net["r1"].ns, "class", "show", "dev", dev]).stdout
    assert "class htb 1:1 root" in shown and f"rate {RATE}Mbit" in shown, shown


def test_bad_input_changes_nothing(net):
    link = wan(net)
    good = Queue("htb", [QueueClass("a", rate_mbit=10, match={"protocol": "udp"}),
                         QueueClass("b", rate_mbit=10, default=True)])
    link.set_queue("a_to_b", good)
    state = tc_state(net)
    stats = link.queue_stats("a_to_b")
    assert list(stats["class"]) == ["a", "b"]
    too_big = Queue("htb", [QueueClass("a", rate_mbit=RATE, default=True),
                            QueueClass("b", rate_mbit=1, match={"protocol": "udp"})])
    bad = [
        (lambda: link.set_queue("a_to_b", too_big), SpecError, f"add up to {RATE + 1} Mbit/s"),
        (lambda: link.set_queue("sideways", good), SpecError, "direction must be"),
        (lambda: link.set_queue("a_to_b", "wfq"), SpecError, "must be a testbed.queueing"),
        (lambda: link.set_queue("a_to_b", good, impl="drr"), SpecError, "no implementation"),
        (lambda: net.link("src", "r1").set_queue("a_to_b", good), SpecError,
         "needs a rate on this direction"),
        (lambda: link.set(direction="a_to_b", rate_mbit=15), SpecError,
         "add up to 20 Mbit/s, above the link rate 15"),
        (lambda: link.queue_stats("both"), SpecError, "direction must be a_to_b or b_to_a"),
    ]
    missing = [n for n, needs in kq.IMPLEMENTATIONS["custom"] if not CAPS.qdiscs.get(needs)]
    cq = Queue("custom", [QueueClass("a", bytes=1, default=True)])
    if missing:  # a discipline this kernel lacks, asked for by name
        bad.append((lambda: link.set_queue("a_to_b", cq, impl=missing[0]), CapabilityError,
                    f"needs the {missing[0]} qdisc"))
    for call, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            call()
        assert tc_state(net) == state, f"{pattern}: tc state changed"
    assert link.queues["a_to_b"] is good and link.shaping["a_to_b"].rate_mbit == RATE
    with pytest.raises(SpecError, match="no rate, queue or queue limit"):
        net.link("src", "r1").queue_stats("a_to_b")


def test_a_queue_the_kernel_refuses_is_rolled_back(net, monkeypatch):
    link = wan(net)
    good = Queue("wfq", [QueueClass("a", weight=1, match={"protocol": "udp"}),
                         QueueClass("b", weight=2, default=True)])
    link.set_queue("a_to_b", good)
    state = tc_state(net)
    real = kq.queue_lines

    def refused(*args, **kw):  # what a kernel without some option would answer
        return real(*args, **kw) + [f"class add dev {args[0]} parent 10: classid 10:99 bogus"]

    monkeypatch.setattr(kq, "queue_lines", refused)
    other = Queue("custom", [QueueClass("a", bytes=1000, match={"protocol": "udp"}),
                             QueueClass("b", bytes=3000, default=True)])
    with pytest.raises(CommandError, match="Command failed"):
        link.set_queue("a_to_b", other)
    monkeypatch.undo()
    assert link.queues["a_to_b"] is good
    assert tc_state(net) == state
    # and it still works: the restored queue classifies and shapes
    df = flows(net, [5201], seconds=2)
    assert rates_bps(df, 1, 2)[5201] <= 1.03 * RATE * 1e6


# every implementation, on a link whose delay is emulated (netem leaves where netem does it) -

@pytest.mark.fullkernel
def test_every_implementation_builds_classifies_and_keeps_the_delay(root_state, run_id):
    """No saturation needed (this also runs in the slow stock-kernel VM): each queue kind on
    each implementation this kernel offers is built, pings land in their class, exactly,
    and still see the link's delay (per-class netem leaves where netem does the delay)."""
    icmp = {"protocol": "icmp"}
    kinds = {
        "custom": Queue("custom", [QueueClass("icmp", bytes=3000, match=icmp),
                                   QueueClass("rest", bytes=9000, default=True)]),
        "wfq": Queue("wfq", [QueueClass("icmp", weight=1, match=icmp),
                             QueueClass("rest", weight=3, default=True)]),
        "priority": Queue("priority", [QueueClass("rest", prio=3, default=True),
                                       QueueClass("icmp", prio=0, match=icmp)]),
        "htb": Queue("htb", [QueueClass("icmp", rate_mbit=5, match=icmp),
                             QueueClass("rest", rate_mbit=40, default=True)]),
    }
    t = Topology("pair")
    t.add_host("h1"); t.add_host("h2")
    t.add_link("h1", "h2", rate=50, delay=5)
    built = []
    with Network(t, run_id=run_id()) as net:
        link = net.link("h1", "h2")
        measure.ping(net["h1"], net["h2"], count=2, interval=0.05)  # ARP first
        for kind, q in kinds.items():
            for impl in impls(kind):
                link.set_queue("a_to_b", q, impl=impl)
                assert link.layout["a_to_b"] == f"htb:{impl}"
                before = link.queue_stats("a_to_b").set_index("class")
                df = measure.ping(net["h1"], net["h2"], count=5, interval=0.05)
                after = link.queue_stats("a_to_b").set_index("class")
                assert df.attrs["received"] == 5, (kind, impl)
                got = int(after.loc["icmp", "packets"] - before.loc["icmp", "packets"])
                assert got == 5, f"{kind} on {impl}: {got} echo requests in the icmp class"
                assert after.attrs["impl"] == impl
                rtt = float(df.rtt_ms.median())
                assert 9.5 <= rtt <= 10 + 5 * TIMEOUT_SCALE, f"{kind} on {impl}: RTT {rtt}"
                if link.backend == "netem":
                    assert set(after.leaf) == {"netem"}, after
                built.append(f"{kind}:{impl}")
        link.set_queue("a_to_b", None)
        assert link.layout["a_to_b"] in ("htb:netem", "htb:pfifo")
    root_state.assert_unchanged()
    assert len(built) >= len(kinds)
