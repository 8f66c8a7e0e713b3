"""Paper 004, overhead: goodput of each overlay link mode against kernel TCP on one link,
0.5 to 1000 Mbit/s (HTB rate, no delay), and one daemon's forwarding rate
(testbed.overlay.bench: a - b - c on plain veth, b's CPU time from /proc).
Modes: best-effort datagrams, datagrams over a reliable link, a reliable end-to-end session
over best-effort links, and a reliable session over reliable links (both layers). The
overlay sender offers 1.2x the link rate in 1400-byte messages; kernel TCP is one
iperf3 flow (cubic). Where the overlay falls below the link rate, Python is CPU-bound."""

from __future__ import annotations

import json

from experiments._overlay_common import overlay_recv, overlay_send
from testbed import Network, measure
from testbed.overlay import bench, start_overlay
from testbed.experiment import pyplot
from topologies import pair

PAPER = "004"
TITLE = "Overhead: overlay link modes vs kernel TCP goodput, and a daemon's forwarding rate"

MODES = {"best_effort": ("best_effort", True), "reliable_link": ("reliable", True),
         "e2e_session": ("best_effort", False), "both_layers": ("reliable", False)}
OFFER = 1.2  # the overlay sender offers 1.2x the link rate (payload): the link stays full
# without a backlog that takes a minute to drain through a reliable link
PAPER_OVERHEAD = {"best_effort": 2.3, "reliable_link": 3.5, "both_layers": 5.7}
PAPER_MAX_MBIT = 100  # the paper's overheads are for links of 0.5 to 100 Mbit/s


def overlay_goodput(net, ov, mode: str, seconds: float, port: int, size: int,
                    offered_mbit: float) -> dict:
    link, datagram = MODES[mode]
    rx, _ = overlay_recv(net, ov, "h2", port, seconds, per_message=False, idle=2)
    tx = overlay_send(net, ov, "h1", "h2", port, offered_mbit * 1000, seconds, size, link,
                       datagram, wait_acked=30)
    tx.wait(seconds + 90)
    rx.wait(90)
    try:
        got = json.loads(rx.log().strip().splitlines()[-1])
        sent = json.loads(tx.log().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"{mode}: no result; sender log: {tx.log()[-400:]!r}; receiver "
                           f"log: {rx.log()[-400:]!r}") from None
    return {"mbit_s": got["mbit_s"] or 0.0, "received": got["received"], "sent": sent["sent"]}


def run(ctx) -> None:
    rates = ctx.pick(smoke=[1], quick=[0.5, 2, 10, 100, 1000],
                     full=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
    seconds = ctx.pick(smoke=3, quick=5, full=10)
    size = 1400
    ctx.params.update(rates_mbit=rates, seconds=seconds, message_bytes=size, tcp="iperf3, cubic",
                      overlay_offered_x_rate=OFFER,
                      modes={m: {"link": v[0], "session": "datagram" if v[1] else "reliable"}
                             for m, v in MODES.items()})
    port = 40
    for rate in rates:
        with Network(pair.build(rate_mbit=rate, queue_pkts=100)) as net:
            ctx.note_network(net)
            df = measure.iperf3(net["h1"], net["h2"], seconds=seconds + 1, omit=1,
                                congestion="cubic")
            tcp = df.attrs["receiver_bps"] / 1e6
            ctx.add(rate_mbit=rate, mode="kernel_tcp", mbit_s=round(tcp, 3),
                    pct_of_tcp=100.0, pct_of_rate=round(100 * tcp / rate, 2))
            ctx.progress(f"{rate} Mbit/s: kernel TCP {tcp:.3f} Mbit/s")
            ov = start_overlay(net, ["h1", "h2"], hello_ms=500, cost="hops")
            ov.wait_converged(20)
            for mode in MODES:
                port += 1
                try:
                    r = overlay_goodput(net, ov, mode, seconds, port, size, OFFER * rate)
                except RuntimeError as e:  # record why, then measure once more
                    ctx.progress(f"retrying: {e}")
                    ctx.params.setdefault("retried", []).append(str(e))
                    port += 1
                    r = overlay_goodput(net, ov, mode, seconds, port, size, OFFER * rate)
                ctx.add(rate_mbit=rate, mode=mode, mbit_s=r["mbit_s"],
                        pct_of_tcp=round(100 * r["mbit_s"] / tcp, 2),
                        pct_of_rate=round(100 * r["mbit_s"] / rate, 2),
                        sent=r["sent"], received=r["received"])
                ctx.progress(f"{rate} Mbit/s: {mode} {r['mbit_s']} Mbit/s "
                             f"({100 * r['mbit_s'] / tcp:.1f} % of TCP)")
            ov.close()
    ctx.progress("forwarding bench (a - b - c, best effort, 1400-byte datagrams)")
    fw = bench.run(seconds=ctx.pick(smoke=3, quick=5, full=10), size=1400, link="best_effort",
                   datagram=True)
    ctx.params["forwarding_bench"] = fw
    ctx.add(rate_mbit=None, mode="forwarding_bench", mbit_s=fw["mbit_s"],
            b_cpu_fraction=fw["b_cpu_fraction"], b_mbit_s_per_core=fw["b_mbit_s_per_core"])
    import pandas as pd

    d = pd.DataFrame([r for r in ctx.rows if r["mode"] != "forwarding_bench"])
    # the overhead is measured where the overlay keeps up, within the paper's range: the
    # highest rate up to PAPER_MAX_MBIT at which every mode delivered at least 90 % of
    # kernel TCP's goodput
    ok_rates = [r for r in rates if r <= PAPER_MAX_MBIT
                and (d[(d.rate_mbit == r)].pct_of_tcp >= 90).all()]
    cpu_bound = {m: [r for r in rates if float(d[(d.rate_mbit == r) & (d["mode"] == m)]
                                                .pct_of_tcp.iloc[0]) < 90] for m in MODES}
    ctx.params["cpu_bound_rates_mbit"] = cpu_bound
    ref = max(ok_rates) if ok_rates else min(rates)
    at = d[d.rate_mbit == ref].set_index("mode")
    for mode, paper in PAPER_OVERHEAD.items():
        ov = 100 - float(at.loc[mode, "pct_of_tcp"])
        ctx.claim(f"overhead_{mode}", {"best_effort": "Best-effort links: goodput about 2.3 % "
                                       "below TCP", "reliable_link": "Reliable links: about "
                                       "3.5 % below TCP", "both_layers": "End to end over both "
                                       "layers (reliable links + end-to-end session): at most "
                                       "5.7 % below TCP"}[mode],
                  paper, round(ov, 2), f"% below kernel TCP at {ref:g} Mbit/s",
                  ov <= paper + 2.0,
                  f"goodput at {ref:g} Mbit/s (the highest rate up to the paper's "
                  f"{PAPER_MAX_MBIT} Mbit/s where every mode reached 90 % of TCP): "
                  f"{at.loc[mode, 'mbit_s']} vs TCP {at.loc['kernel_tcp', 'mbit_s']} Mbit/s; "
                  f"holds within 2 points of the paper. The overhead is mostly headers: "
                  f"{size}-byte messages in overlay + UDP + IP headers vs TCP's 1448-byte "
                  f"segments, plus acks sharing the link. Rates where this mode fell below "
                  f"90 % of TCP (CPU-bound Python client/daemon): "
                  f"{cpu_bound[mode] or 'none'} (of {rates} Mbit/s).")
    ctx.claim("forwarding", "One daemon forwards at least 50 Mbit/s on these machines", 50.0,
              fw["b_mbit_s_per_core"], "Mbit/s per core (b)",
              (fw["b_mbit_s_per_core"] or 0) >= 50,
              f"bench.run: c received {fw['mbit_s']} Mbit/s while b used "
              f"{100 * fw['b_cpu_fraction']:.0f} % of a core (all CPU fractions: "
              f"{fw['cpu_fractions']}); per core = received rate / b's CPU fraction. Sender, "
              f"three daemons and receiver share {ctx.machine}, so the raw rate is lower.")
    plot(ctx, d)


def plot(ctx, d) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for mode, g in d.groupby("mode"):
        ax[0].plot(g.rate_mbit, g.mbit_s, "o-", label=mode)
        if mode != "kernel_tcp":
            ax[1].plot(g.rate_mbit, g.pct_of_tcp, "o-", label=mode)
    ax[0].set(xscale="log", yscale="log", xlabel="link rate (Mbit/s)", ylabel="goodput (Mbit/s)")
    ax[1].set(xscale="log", xlabel="link rate (Mbit/s)", ylabel="% of kernel TCP goodput")
    for v in (100 - 2.3, 100 - 3.5, 100 - 5.7):
        ax[1].axhline(v, ls=":", color="gray")
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure("overhead"), dpi=110)
    plt.close(fig)
