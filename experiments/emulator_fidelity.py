"""Emulator fidelity: what a link does against what it was configured to do.

For each backend this kernel offers (netem and/or the NFQUEUE delay line): goodput against
the configured rate (1 Mbit/s to 1 Gbit/s), RTT against the configured one-way delay (1 to
200 ms), measured loss against the configured loss (0, 1, 5 %), and the delay line's own
TCP throughput at 20 ms one way.
"""

from __future__ import annotations

from testbed import Network, capabilities, measure
from testbed.measure.stats import wilson
from testbed.experiment import pyplot
from topologies import pair

PAPER = "emulator"
TITLE = "Emulator fidelity: goodput, RTT and loss against the configuration"

RATES = [1, 10, 100, 1000]
DELAYS = [1, 10, 50, 200]
LOSSES = [0, 1, 5]
TCP_OVERHEAD = 1448 / 1514  # TCP payload per Ethernet frame (with timestamps): goodput ceiling


def goodput(ctx, backend, rate, delay, seconds):
    topo = pair.build(rate_mbit=rate, delay_ms=delay)
    with Network(topo, backend=backend) as net:
        ctx.note_network(net)
        df = measure.iperf3(net["h1"], net["h2"], seconds=seconds)
        link_backend = net.link("h1", "h2").backend
    got = df.attrs["receiver_bps"] / 1e6
    ratio = got / rate
    wire = ratio / TCP_OVERHEAD  # the Ethernet-level rate the link delivered
    ok = 0.95 <= wire <= 1.02
    ctx.add(kind="goodput", backend=backend, link_backend=link_backend, rate_mbit=rate,
            delay_ms=delay, loss_pct=0, expected=rate, measured=round(got, 3),
            ratio=round(ratio, 4), wire_ratio=round(wire, 4), within=ok, n=len(df),
            retransmits=df.attrs["retransmits"])
    ctx.progress(f"{backend:9} rate {rate:5} Mbit/s delay {delay:3} ms: goodput "
                 f"{got:8.2f} Mbit/s ({100 * ratio:.1f} % of the rate, "
                 f"{100 * wire:.1f} % at the Ethernet level)")
    return ratio


def rtt(ctx, backend, delay, count):
    with Network(pair.build(delay_ms=delay), backend=backend) as net:
        ctx.note_network(net)
        measure.ping(net["h1"], net["h2"], count=2, interval=0.05)  # resolve ARP first
        df = measure.ping(net["h1"], net["h2"], count=count, interval=0.05)
    want = 2 * delay
    med = float(df["rtt_ms"].median())
    tol = max(0.5, 0.02 * want)
    ok = abs(med - want) <= tol
    ctx.add(kind="rtt", backend=backend, link_backend=backend, rate_mbit=None, delay_ms=delay,
            loss_pct=0, expected=want, measured=round(med, 3),
            ratio=round(med / want, 4), within=ok, n=int(df["rtt_ms"].notna().sum()),
            tolerance=tol, rtt_mean=round(float(df["rtt_ms"].mean()), 3),
            rtt_sd=round(float(df["rtt_ms"].std()), 3))
    ctx.progress(f"{backend:9} delay {delay:3} ms: RTT median {med:.3f} ms "
                 f"(want {want} +- {tol:.2f})")
    return med - want, tol


def loss(ctx, backend, pct, seconds):
    """Loss on h1->h2 only; UDP requests every 1 ms from h1, each answered by h2."""
    topo = pair.build(delay_ms=1, loss_pct=pct, lossy_direction="a_to_b")
    with Network(topo, backend=backend, seed=7) as net:
        ctx.note_network(net)
        df = measure.udp_probe(net["h1"], net["h2"], seconds=seconds, interval_ms=1)
    n, k = len(df), int(df["t_recv"].isna().sum())
    lo, hi = wilson(k, n)
    ok = lo <= pct <= hi
    ctx.add(kind="loss", backend=backend, link_backend=backend, rate_mbit=None, delay_ms=1,
            loss_pct=pct, expected=pct, measured=round(100 * k / n, 3), within=ok, n=n,
            ci_low=round(lo, 3), ci_high=round(hi, 3))
    ctx.progress(f"{backend:9} loss {pct} %: {k}/{n} lost = {100 * k / n:.2f} % "
                 f"(95 % CI {lo:.2f}-{hi:.2f})")
    return ok


def delayline_tcp(ctx, seconds):
    with Network(pair.build(delay_ms=20), backend="delayline") as net:
        ctx.note_network(net)
        df = measure.iperf3(net["h1"], net["h2"], seconds=seconds, omit=2)
    got = df.attrs["receiver_bps"] / 1e6
    ctx.add(kind="delayline_tcp", backend="delayline", link_backend="delayline",
            rate_mbit=None, delay_ms=20, loss_pct=0, expected=1000, measured=round(got, 1),
            within=got >= 1000, n=len(df), retransmits=df.attrs["retransmits"])
    ctx.progress(f"delayline TCP at 20 ms one way: {got:.0f} Mbit/s")
    return got


def run(ctx) -> None:
    rates = ctx.pick(smoke=[10], quick=RATES, full=RATES)
    delays = ctx.pick(smoke=[10], quick=DELAYS, full=DELAYS)
    losses = ctx.pick(smoke=[0, 5], quick=LOSSES, full=LOSSES)
    seconds = ctx.pick(smoke=2, quick=5, full=10)
    pings = ctx.pick(smoke=10, quick=40, full=200)
    goodput_grid = [(r, 0) for r in rates] if ctx.quick else \
        [(r, d) for r in rates for d in [0] + delays]
    ctx.params.update(rates_mbit=rates, delays_ms=delays, losses_pct=losses,
                      iperf_seconds=seconds, goodput_grid=goodput_grid, ping_count=pings)
    bks = capabilities.probe().delay_backends
    ctx.params["backends"] = bks
    for backend in bks:
        ratios = [goodput(ctx, backend, r, d, seconds) for r, d in goodput_grid]
        worst = min(ratios)
        ctx.claim(f"goodput_{backend}", "Goodput within 5 % of the configured rate from "
                  "1 Mbit/s to 1 Gbit/s", None, 100 * worst, "% of rate (worst)",
                  worst / TCP_OVERHEAD >= 0.95,
                  f"worst of {len(ratios)} iperf3 runs, one TCP flow, {seconds} s. The rate is "
                  f"an Ethernet rate (HTB counts 1514-byte frames), so TCP goodput tops out at "
                  f"{100 * TCP_OVERHEAD:.1f} % of it; holds if goodput x 1514/1448 is within "
                  f"5 % ({100 * worst / TCP_OVERHEAD:.1f} %)")
        errs = [rtt(ctx, backend, d, pings) for d in delays]
        worst_rtt = max(abs(e) - t for e, t in errs)
        ctx.claim(f"rtt_{backend}", "RTT within max(0.5 ms, 2 %) of the configured value",
                  None, max(abs(e) for e, _ in errs), "ms (worst |error|)", worst_rtt <= 0,
                  f"one-way delays {delays} ms, median of {pings} pings each")
        oks = [loss(ctx, backend, p, seconds) for p in losses]
        ctx.claim(f"loss_{backend}", "Measured loss inside the 95 % binomial interval",
                  None, sum(oks), f"of {len(oks)} losses inside", all(oks),
                  f"configured {losses} % on h1->h2 only; a UDP request every 1 ms for "
                  f"{seconds} s, each answered by h2 (testbed.measure.udp_probe)")
    if "delayline" in bks:
        got = delayline_tcp(ctx, seconds + 2)
        ctx.claim("delayline_1g", "The NFQUEUE delay line carries at least 1 Gbit/s of TCP "
                  "at 20 ms one-way delay", None, got, "Mbit/s", got >= 1000,
                  "iperf3 TCP, one flow, no rate limit, 20 ms each way")
    plot(ctx)


def plot(ctx) -> None:
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(ctx.rows)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    gp = df[df.kind == "goodput"]
    for (lb, d), g in gp.groupby(["link_backend", "delay_ms"]):
        name = "htb only" if lb == "none" else f"htb + {lb}"
        line = ax[0].plot(g.rate_mbit, 100 * g.wire_ratio, "o-",
                          label=f"{name}, delay {d:g} ms: Ethernet-level rate")[0]
        ax[0].plot(g.rate_mbit, 100 * g.ratio, "x--", color=line.get_color(),
                   label=f"{name}, delay {d:g} ms: TCP goodput")
    ax[0].axhspan(95, 102, color="green", alpha=0.1, label="target: within 5 %")
    ax[0].axhline(100 * TCP_OVERHEAD, ls=":", color="gray", label="TCP payload ceiling")
    ax[0].set(xscale="log", xlabel="configured rate (Mbit/s)", ylabel="% of configured rate",
              title="Rate")
    ax[0].legend(fontsize=7)
    r = df[df.kind == "rtt"]
    for backend, g in r.groupby("backend"):
        ax[1].plot(g.expected, g.measured - g.expected, "o-", label=backend)
    xs = sorted(r.expected.unique()) if len(r) else []
    ax[1].fill_between(xs, [-max(0.5, 0.02 * x) for x in xs], [max(0.5, 0.02 * x) for x in xs],
                       color="green", alpha=0.1, label="tolerance")
    ax[1].set(xscale="log", xlabel="configured RTT (ms)", ylabel="measured - configured (ms)",
              title="RTT error (median ping)")
    ax[1].legend(fontsize=7)
    lo = df[df.kind == "loss"]
    for backend, g in lo.groupby("backend"):
        ax[2].errorbar(g.expected, g.measured, yerr=[g.measured - g.ci_low, g.ci_high - g.measured],
                       fmt="o", capsize=4, label=f"{backend} (95 % CI)")
    ax[2].plot([0, 6], [0, 6], ":", color="gray", label="ideal")
    ax[2].set(xlabel="configured loss (%)", ylabel="measured loss (%)", title="Loss")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.figure("fidelity"), dpi=110)
    plt.close(fig)
