"""Each link parameter measured end to end against its configuration, with tolerances, on
whatever backend this kernel offers; and runtime changes measured the same way."""

from __future__ import annotations

import os

import pytest

from testbed import Network, Topology, capabilities, measure
from testbed.measure.stats import wilson
from testbed.process import TIMEOUT_SCALE
from topologies import pair


BACKENDS = capabilities.probe().delay_backends if os.geteuid() == 0 else ["delayline"]


def median_rtt(net, count=20) -> float:
    measure.ping(net["h1"], net["h2"], count=2, interval=0.05)  # ARP first
    df = measure.ping(net["h1"], net["h2"], count=count, interval=0.05)
    assert df["rtt_ms"].notna().sum() >= count * 0.9, df
    return float(df["rtt_ms"].median())


@pytest.mark.parametrize("rate", [10, 100])
def test_rate_gives_goodput_near_configured(rate):
    with Network(pair.build(rate_mbit=rate)) as net:
        df = measure.iperf3(net["h1"], net["h2"], seconds=3, omit=1)
    ratio = df.attrs["receiver_bps"] / 1e6 / rate
    assert 0.90 <= ratio <= 1.02, f"goodput {100 * ratio:.1f} % of {rate} Mbit/s"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delay", [5, 25])
def test_delay_gives_rtt_near_twice_delay(backend, delay):
    with Network(pair.build(delay_ms=delay), backend=backend) as net:
        rtt = median_rtt(net)
    assert abs(rtt - 2 * delay) <= max(0.5, 0.02 * 2 * delay) + 0.5, rtt


@pytest.mark.parametrize("backend", BACKENDS)
def test_asymmetric_delay_adds_up(backend):
    t = Topology("asym")
    t.add_host("h1"); t.add_host("h2")
    t.add_link("h1", "h2", a_to_b={"delay": 5}, b_to_a={"delay": 15})
    with Network(t, backend=backend) as net:
        rtt = median_rtt(net)
    assert 19.5 <= rtt <= 21.5, rtt


@pytest.mark.parametrize("backend", BACKENDS)
def test_jitter_spreads_rtt_within_bounds(backend):
    with Network(pair.build(delay_ms=10, jitter_ms=4), backend=backend) as net:
        measure.ping(net["h1"], net["h2"], count=2, interval=0.05)
        df = measure.ping(net["h1"], net["h2"], count=60, interval=0.05)
    rtt = df["rtt_ms"].dropna()
    assert rtt.std() > 1.0, f"no spread: sd {rtt.std():.2f} ms"
    # never early; late only by the host's scheduling, so the bound holds for 90 % of them
    # (a ping delayed by a busy CPU is not the emulator's jitter: in one CI run on a busy host
    # 3 of 60 came 0.2-9.6 ms above the bound, the 95th percentile 0.16 ms over it)
    assert rtt.min() >= 2 * (10 - 4) - 0.5, rtt.describe()
    assert rtt.quantile(0.9) <= 2 * (10 + 4) + 2, rtt.describe()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_inside_binomial_interval(backend):
    """20 % loss on h1->h2 only: UDP requests lost at 20 %, replies never."""
    with Network(pair.build(delay_ms=1, loss_pct=20, lossy_direction="a_to_b"),
                 backend=backend, seed=3) as net:
        df = measure.udp_probe(net["h1"], net["h2"], seconds=2, interval_ms=1)
    n, k = len(df), int(df["t_recv"].isna().sum())
    lo, hi = wilson(k, n)
    assert n > 1500
    assert lo <= 20 <= hi, f"{k}/{n} lost = {100 * k / n:.2f} %, CI {lo:.2f}-{hi:.2f}"


def test_queue_limit_bounds_queueing_delay():
    """1 Mbit/s flooded at 5 Mbit/s: a 10-packet queue keeps the RTT near 10 x 12 ms."""
    t = Topology("q")
    t.add_host("h1"); t.add_host("h2")
    t.add_link("h1", "h2", a_to_b={"rate": 1, "queue_pkts": 10}, b_to_a={})
    with Network(t) as net:
        srv = net["h2"].start(["iperf3", "-s", "-1"], ready=_listening(net["h2"], 5201))
        flood = net["h1"].start(["iperf3", "-c", net["h2"].ip, "-u", "-b", "5M", "-t", "4"])
        df = measure.ping(net["h1"], net["h2"], count=15, interval=0.1)
        rc = flood.wait(15)
        flood_log = flood.log(tail=15)
        srv.stop()
    rtt = df["rtt_ms"].dropna()
    assert len(rtt) >= 3, "no ping got through at all"
    # 10 full-size packets at 1 Mbit/s drain in ~121 ms; Linux's default 1000 would be ~12 s
    assert rtt.max() < 250, rtt.describe()
    # (once in CI the flood stopped after ~0.3 s: two pings saw the full queue, the rest an
    # idle link; the flood's exit status and output say why next time)
    assert (rtt > 50).sum() >= 3, (f"the queue never filled: was the link flooded? RTTs "
                                   f"{rtt.round(1).tolist()}; iperf3 exit {rc}: {flood_log}")


def _listening(node, port):
    from testbed.process import listening

    return listening(node.ns, port)


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_changes_take_effect(backend):
    with Network(pair.build(rate_mbit=20, delay_ms=5), backend=backend) as net:
        link = net.link("h1", "h2")
        assert abs(median_rtt(net) - 10) < 1.5
        link.set(delay_ms=20)
        assert abs(median_rtt(net) - 40) < 1.5
        link.set(rate_mbit=5)
        df = measure.iperf3(net["h1"], net["h2"], seconds=3, omit=1)
        assert 0.85 <= df.attrs["receiver_bps"] / 5e6 <= 1.02
        link.set(direction="a_to_b", loss_pct=100)
        lost = measure.ping(net["h1"], net["h2"], count=5, interval=0.05, wait_s=0.5)
        assert lost.attrs["received"] == 0
        link.set(loss_pct=0)
        link.set(up=False)
        down = measure.ping(net["h1"], net["h2"], count=3, interval=0.05, wait_s=0.3)
        assert down.attrs["received"] == 0
        link.set(up=True)
        assert abs(median_rtt(net) - 40) < 1.5


def test_runtime_change_validated_before_applied():
    with Network(pair.build(rate_mbit=20, delay_ms=5)) as net:
        link = net.link("h1", "h2")
        with pytest.raises(ValueError, match="loss"):
            link.set(loss_pct=150)
        with pytest.raises(ValueError, match="direction"):
            link.set(direction="sideways", delay_ms=1)
        assert link.shaping["a_to_b"].delay_ms == 5
        assert abs(median_rtt(net) - 10) < 1.5


def test_delay_on_unprepared_link_is_a_clear_error():
    caps = capabilities.probe()
    if caps.qdiscs.get("netem"):
        pytest.skip("netem can add delay to any link at runtime")
    with Network(pair.build(rate_mbit=20)) as net:
        with pytest.raises(Exception, match="emulate=True"):
            net.link("h1", "h2").set(delay_ms=10)


def test_backend_recorded():
    with Network(pair.build(delay_ms=2)) as net:
        b = net.backends
    assert b["delay"] in ("netem", "delayline")
    assert b["links"]["h1-h2"] == b["delay"]


@pytest.mark.fullkernel
@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs netem and the delay line side by side: "
                    "runs on the full kernel (make test-fullkernel)")
def test_backends_agree_on_delay_and_loss():
    """The same link on netem and on the delay line: the same delay and the same loss,
    within tolerance. Delay: the RTTs for a 25 ms one-way delay agree within max(1 ms, 5 %)
    of the 50 ms once each backend's fixed cost is allowed for: its RTT at 0 ms (same
    network, changed at runtime), which is the delay line's trip through NFQUEUE and
    Python. That cost is bounded separately, scaled by TESTBED_TIMEOUT_SCALE: it is ~0.3 ms
    on a real machine, but the full-kernel VM runs under qemu's TCG, where it was 6.0 ms
    (netem 0.5 ms; at 25 ms: netem 51.3, delay line 54.5 ms). No backend may deliver early.
    Loss: each measured loss inside the other's 95 % interval."""
    rtts, base, losses = {}, {}, {}
    for backend in ("netem", "delayline"):
        with Network(pair.build(delay_ms=25), backend=backend, seed=5) as net:
            link = net.link("h1", "h2")
            rtts[backend] = median_rtt(net, count=20)
            link.set(delay_ms=0)
            base[backend] = median_rtt(net, count=20)
            link.set(direction="a_to_b", delay_ms=1, loss_pct=10)
            # 250 requests/s: under TCG the delay line cannot keep up with 1000/s each way
            # (56 % of replies missing there at 1 ms, against 9.7 % with netem)
            df = measure.udp_probe(net["h1"], net["h2"], seconds=4, interval_ms=4)
        losses[backend] = (int(df["t_recv"].isna().sum()), len(df))
    info = {"rtt_at_25ms": rtts, "rtt_at_0ms": base}
    tol = max(1.0, 0.05 * 50)
    fixed = abs(base["netem"] - base["delayline"])
    assert abs(rtts["netem"] - rtts["delayline"]) <= tol + fixed, info
    assert all(49.5 <= rtts[b] <= 50 + base[b] + tol for b in rtts), info
    assert all(base[b] <= 1.0 * TIMEOUT_SCALE for b in base), info
    for a, b in (("netem", "delayline"), ("delayline", "netem")):
        lo, hi = wilson(*losses[a])
        k, n = losses[b]
        assert lo <= 100 * k / n <= hi, losses
