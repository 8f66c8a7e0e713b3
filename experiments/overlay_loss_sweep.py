"""Paper 004, delay distribution against loss: on the five-link chain (10 ms, 10 Mbit/s
each), loss on C-D from 0 to 5 %, a stream of 1000-byte messages A -> F at 500 and 1000
kbit/s, over the overlay's reliable session with end-to-end recovery (best-effort links)
and with hop-by-hop recovery (reliable links): mean delay, jitter, and the share of
messages above 60 and 100 ms (the paper's thresholds) and above the no-loss baseline
+10 and +50 ms (this machine's own delay removed)."""

from __future__ import annotations

import numpy as np

from experiments._overlay_common import overlay_stream, summarize
from testbed import Network
from testbed.overlay import start_overlay
from topologies import spines_chain

PAPER = "004"
TITLE = "Delay, jitter and late messages against loss: end to end vs hop by hop"
QUEUE = 100


def run(ctx) -> None:
    losses = ctx.pick(smoke=[0, 1], quick=[0, 1, 2, 5], full=[0, 0.5, 1, 2, 3, 4, 5])
    rates = ctx.pick(smoke=[500], quick=[500, 1000], full=[500, 1000])
    seconds = ctx.pick(smoke=4, quick=8, full=30)
    repeats = ctx.pick(smoke=1, quick=1, full=3)
    # the claims' point (1 %, 500 kbit/s) gets more repeats: a run of 8 s holds ~5 losses,
    # and a burst of scheduling noise on a shared machine can spoil one run
    ref = 1 if 1 in losses else losses[-1]
    ref_repeats = ctx.pick(smoke=1, quick=3, full=5)
    ctx.params.update(losses_pct=losses, rates_kbit=rates, seconds=seconds, repeats=repeats,
                      hops=5, delay_ms=10, rate_mbit=10, queue_pkts=QUEUE, message_bytes=1000,
                      overlay_hello_ms=500, jitter="standard deviation of one-way delay")
    base: dict = {}
    agg: dict = {}
    runs: list = []
    with Network(spines_chain.build(loss_pct=0, queue_pkts=QUEUE)) as net:
        ctx.note_network(net)
        ov = start_overlay(net, list("abcdef"), hello_ms=500, cost="hops")
        ov.wait_converged(20)
        cd = net.link("c", "d")
        for rate in rates:
            for loss in losses:
                cd.set(loss_pct=loss)
                for rep in range(ref_repeats if (rate, loss) == (500, ref) else repeats):
                    for mode in ("e2e", "hbh"):
                        d, info = overlay_stream(net, ov, "a", "f", rate, seconds, mode)
                        runs.append((rate, loss, mode, rep, d, info))
                        s = summarize(d)
                        ctx.progress(f"{rate} kbit/s loss {loss} % {mode}: mean {s['mean_ms']}"
                                     f" sd {s['jitter_sd_ms']} >60 {s['pct_over_60']} % >100 "
                                     f"{s['pct_over_100']} %")
    # the baseline for the relative thresholds: per rate, the lowest no-loss median of any
    # run (both modes share the path; a run disturbed by other load only raises a median)
    for rate, loss, _mode, _rep, d, _info in runs:
        if loss == 0:
            m = float(np.median(d))
            base[rate] = min(base.get(rate, m), m)
    for rate, loss, mode, rep, d, info in runs:
        agg.setdefault((rate, loss, mode), []).append(d)
        ctx.add(rate_kbit=rate, loss_pct=loss, mode=mode, repeat=rep,
                **summarize(d, base[rate]),
                sent=info["sent"], received=info["received"], in_order=info["in_order"],
                duplicates=info["duplicates"])
    tab = {k: summarize(np.concatenate(v), base[k[0]]) for k, v in agg.items()}
    ctx.params["aggregate"] = {f"{r}kbit/{lo}%/{m}": s for (r, lo, m), s in tab.items()}
    # the claims: per metric, the median over the repeats at (500 kbit/s, ref)
    per_rep = {m: [summarize(d, base[500]) for r, lo, mm, _rep, d, _i in runs
                   if (r, lo, mm) == (500, ref, m)] for m in ("e2e", "hbh")}
    e, h = ({k: float(np.median([x[k] for x in per_rep[m]])) for k in per_rep[m][0]}
            for m in ("e2e", "hbh"))

    def each(m: str, k: str) -> str:
        return "/".join(f"{x[k]:g}" for x in per_rep[m])

    nrep = len(per_rep["hbh"])
    mach = (f"No-loss baseline here (lowest median of the 0 % runs at 500 kbit/s): "
            f"{base[500]:.1f} ms, of which "
            "50 ms is propagation; the rest is serialization and Python (five NFQUEUE delay "
            f"lines, six overlay daemons) on {ctx.machine}, whose scheduling jitter "
            f"alone puts {tab[(500, losses[0], 'hbh')]['pct_over_60']} % of hop-by-hop "
            f"messages above 60 ms at {losses[0]} % loss. The relative thresholds "
            "(baseline +10 / +50 ms) remove the machine's base delay but not its jitter.")
    at = (f"at {ref} % loss, 500 kbit/s, median of {nrep} runs of {seconds} s (per run: "
          "e2e / hbh")
    ctx.claim("over60", "At 1 % loss, 500 kbit/s: above 60 ms, end to end more than 27 %, "
              "hop by hop about 3 %", 3.0, h["pct_over_60"], "% of messages (hop by hop)",
              h["pct_over_60"] <= 3.0 * 1.5 and e["pct_over_60"] > h["pct_over_60"],
              f"{at} {each('e2e', 'pct_over_60')} / {each('hbh', 'pct_over_60')} %): e2e "
              f"{e['pct_over_60']:g} % vs hbh {h['pct_over_60']:g} % above 60 ms; above "
              f"baseline+10 ms e2e {e['pct_over_base10']:g} % vs hbh "
              f"{h['pct_over_base10']:g} %. Holds if hbh is within 1.5x the paper's 3 % and "
              f"below e2e. {mach}")
    ctx.claim("over100", "At 1 % loss, 500 kbit/s: above 100 ms, end to end about 18 %, hop "
              "by hop about 1 %", 1.0, h["pct_over_100"], "% of messages (hop by hop)",
              h["pct_over_100"] <= 1.5 and e["pct_over_100"] > h["pct_over_100"],
              f"{at} {each('e2e', 'pct_over_100')} / {each('hbh', 'pct_over_100')} %): e2e "
              f"{e['pct_over_100']:g} % vs hbh {h['pct_over_100']:g} % above 100 ms; above "
              f"baseline+50 ms e2e {e['pct_over_base50']:g} % vs hbh "
              f"{h['pct_over_base50']:g} %. Holds if hbh <= 1.5 % and below e2e. {mach}")
    rel = e["pct_over_base10"] / max(h["pct_over_base10"], 0.01)
    ctx.claim("over_base10_ratio", "End to end leaves about 9x more messages late than hop by "
              "hop (27 % vs 3 % above 60 ms)", 9.0, round(rel, 2),
              "x (e2e / hbh share above baseline+10 ms)", rel >= 9.0,
              f"{at} {each('e2e', 'pct_over_base10')} / {each('hbh', 'pct_over_base10')} % "
              f"above baseline+10 ms), thresholds relative to the no-loss baseline. {mach}")
    jr = e["jitter_sd_ms"] / max(h["jitter_sd_ms"], 0.01)
    ctx.claim("jitter", "Jitter up to 3-4x smaller hop by hop", 3.0, round(jr, 2),
              "x (e2e sd / hbh sd)", jr >= 3.0,
              f"standard deviation of one-way delay {at} {each('e2e', 'jitter_sd_ms')} / "
              f"{each('hbh', 'jitter_sd_ms')} ms): e2e {e['jitter_sd_ms']:g} ms, hbh "
              f"{h['jitter_sd_ms']:g} ms (mean |consecutive difference|: "
              f"{e['jitter_ipdv_ms']:g} vs {h['jitter_ipdv_ms']:g} ms). The delay lines' and "
              f"daemons' scheduling jitter adds to both. {mach}")
    delivered = all(r["received"] == r["sent"] and r["in_order"] and r["duplicates"] == 0
                    for r in ctx.rows)
    ctx.params["every_session_exactly_once_in_order"] = delivered
    plot(ctx, losses, rates)


def plot(ctx, losses, rates) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(ctx.rows).groupby(["rate_kbit", "loss_pct", "mode"]).mean(
        numeric_only=True).reset_index()
    cols = [("mean_ms", "mean delay (ms)"), ("jitter_sd_ms", "jitter: sd (ms)"),
            ("pct_over_60", "% above 60 ms"), ("pct_over_100", "% above 100 ms"),
            ("pct_over_base10", "% above baseline+10 ms"),
            ("pct_over_base50", "% above baseline+50 ms")]
    fig, axs = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (c, label) in zip(axs.flat, cols):
        for (rate, mode), g in df.groupby(["rate_kbit", "mode"]):
            ax.plot(g.loss_pct, g[c], "o-" if mode == "hbh" else "s--",
                    label=f"{mode} {rate} kbit/s")
        ax.set(xlabel="loss on C-D (%)", ylabel=label)
        ax.legend(fontsize=7)
    axs[0, 2].axhline(27, ls=":", color="gray")
    axs[0, 2].axhline(3, ls=":", color="gray")
    axs[1, 0].axhline(18, ls=":", color="gray")
    axs[1, 0].axhline(1, ls=":", color="gray")
    fig.suptitle("A -> F over five 10 ms links; dotted: the paper's e2e / hbh at 1 %")
    fig.tight_layout()
    fig.savefig(ctx.figure("loss_sweep"), dpi=110)
    plt.close(fig)
