"""Paper 004, delay distribution against loss (its Figures 3-6 and 11-14): on the five-link
chain (10 ms, 10 Mbit/s each), loss on C-D from 0 to 5 %, a stream of 1000-byte messages
A -> F at 500 and 1000 kbit/s, three ways: end to end over kernel TCP (cubic, SACK: the
paper's end-to-end connection, ns2's TCP-Fack in simulation and Linux TCP on Emulab), over
the overlay's reliable session with end-to-end recovery (best-effort links), and with
hop-by-hop recovery (reliable links): mean delay, jitter, and the share of messages above
60 and 100 ms (the paper's thresholds) and above the no-loss baseline +10 and +50 ms.
Alongside each stream a probe of best-effort overlay datagrams (same path, rate and size,
no recovery) measures the machine's own delay at each moment; "corrected" figures subtract
it message by message (see _overlay_common.machine_excess)."""

from __future__ import annotations

import numpy as np

from experiments._overlay_common import overlay_stream, summarize, tcp_stream
from testbed import Network
from testbed.overlay import start_overlay
from testbed.experiment import pyplot
from topologies import spines_chain

PAPER = "004"
TITLE = "Delay, jitter and late messages against loss: end to end vs hop by hop"
QUEUE = 100
MODES = ("tcp", "e2e", "hbh")  # kernel TCP; the overlay session end to end; hop by hop
LABEL = {"tcp": "kernel TCP", "e2e": "overlay e2e", "hbh": "hop by hop"}
STYLE = {"tcp": "^:", "e2e": "s--", "hbh": "o-"}
GATE_PCT = 10  # a run whose probe had more than this % above 60 ms ran on a disturbed machine
CORR_KEYS = ("mean_ms", "median_ms", "jitter_sd_ms", "pct_over_60", "pct_over_100",
             "pct_over_base10", "pct_over_base50")


def stream(net, ov, mode: str, rate: float, seconds: float) -> tuple:
    if mode == "tcp":
        return tcp_stream(net, "a", "f", rate, seconds, "cubic", True, probe=ov)
    return overlay_stream(net, ov, "a", "f", rate, seconds, mode, probe=True)


def run(ctx) -> None:
    losses = ctx.pick(smoke=[0, 1], quick=[0, 1, 2, 5], full=[0, 0.5, 1, 2, 3, 4, 5])
    rates = ctx.pick(smoke=[500], quick=[500, 1000], full=[500, 1000])
    seconds = ctx.pick(smoke=4, quick=8, full=30)
    repeats = ctx.pick(smoke=1, quick=1, full=3)
    # the claims' point (1 %, 500 kbit/s) gets longer runs and more of them: a run of 8 s
    # holds ~5 losses, and a burst of scheduling noise on a shared machine can spoil one
    # run. A run is quiet if its probe (which no recovery touches) had at most GATE_PCT %
    # above 60 ms; the point is repeated until each mode has ref_repeats quiet runs, at
    # most max_rounds times
    ref = 1 if 1 in losses else losses[-1]
    ref_seconds = ctx.pick(smoke=4, quick=16, full=30)
    ref_repeats = ctx.pick(smoke=1, quick=3, full=5)
    max_rounds = ctx.pick(smoke=1, quick=7, full=12)
    ctx.params.update(losses_pct=losses, rates_kbit=rates, seconds=seconds, repeats=repeats,
                      hops=5, delay_ms=10, rate_mbit=10, queue_pkts=QUEUE, message_bytes=1000,
                      overlay_hello_ms=500, jitter="standard deviation of one-way delay",
                      claims_point_seconds=ref_seconds, claims_point_runs=ref_repeats,
                      claims_point_max_attempts=max_rounds,
                      quiet_gate=f"probe above 60 ms <= {GATE_PCT} %",
                      modes={"tcp": "kernel TCP end to end, cubic, SACK on",
                             "e2e": "the overlay's reliable session over best-effort links",
                             "hbh": "the overlay's reliable session over reliable links"})
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
                claims_point = (rate, loss) == (500, ref)
                quiet = dict.fromkeys(MODES, 0)
                for rep in range(max_rounds if claims_point else repeats):
                    if rep >= ref_repeats and min(quiet.values()) >= ref_repeats:
                        break
                    for mode in MODES:
                        d, info = stream(net, ov, mode, rate,
                                         ref_seconds if claims_point else seconds)
                        runs.append((rate, loss, mode, rep, d, info))
                        s = summarize(d)
                        c = summarize(d - info["machine_ms"])
                        p = summarize(info["probe_delays"])
                        info["quiet"] = p.get("pct_over_60", 100) <= GATE_PCT
                        quiet[mode] += info["quiet"]
                        ctx.progress(f"{rate} kbit/s loss {loss} % {mode}: mean {s['mean_ms']}"
                                     f" sd {s['jitter_sd_ms']} >60 {s['pct_over_60']} % >100 "
                                     f"{s['pct_over_100']} % (corrected: >60 "
                                     f"{c['pct_over_60']} % >100 {c['pct_over_100']} %); "
                                     f"probe >60 {p.get('pct_over_60')} %"
                                     + ("" if info["quiet"] else
                                        " (machine disturbed)"))
    # the baseline for the relative thresholds: per rate, the lowest no-loss median of any
    # run (all modes share the path; a run disturbed by other load only raises a median)
    for rate, loss, _mode, _rep, d, _info in runs:
        if loss == 0:
            m = float(np.median(d))
            base[rate] = min(base.get(rate, m), m)
    for rate, loss, mode, rep, d, info in runs:
        corr = d - info["machine_ms"]
        agg.setdefault((rate, loss, mode), []).append(d)
        c = summarize(corr, base[rate])
        p = summarize(info["probe_delays"], base[rate])
        ctx.add(rate_kbit=rate, loss_pct=loss, mode=mode, repeat=rep,
                **summarize(d, base[rate]),
                **{f"corr_{k}": c[k] for k in CORR_KEYS},
                **{f"probe_{k}": p.get(k) for k in ("median_ms", "pct_over_60", "pct_over_100")},
                quiet=info["quiet"],
                sent=info["sent"], received=info["received"], in_order=info["in_order"],
                duplicates=info.get("duplicates"))  # None: msgstream does not count them
    tab = {k: summarize(np.concatenate(v), base[k[0]]) for k, v in agg.items()}
    ctx.params["aggregate"] = {f"{r}kbit/{lo}%/{m}": s for (r, lo, m), s in tab.items()}
    # the claims: the messages of the quiet runs at (500 kbit/s, ref) pooled, or of all its
    # runs if none was quiet. Each run holds only a few losses, so the shares rest on their
    # count: pooled, the runs add up to one long run
    every = {m: [r for r in ctx.rows if (r["rate_kbit"], r["loss_pct"], r["mode"])
                 == (500, ref, m)] for m in MODES}
    rows = {m: [r for r in v if r["quiet"]] or v for m, v in every.items()}
    t, e, h = (pooled([x for x in runs if x[:3] == (500, ref, m)]) for m in MODES)

    def each(k: str) -> str:
        return " / ".join("/".join(f"{x[k]:g}" for x in rows[m]) for m in MODES)

    def three(k: str) -> str:
        return f"TCP {t[k]:g}, overlay e2e {e[k]:g}, hbh {h[k]:g}"

    def used(m: str) -> str:
        n, tot = sum(r["quiet"] for r in every[m]), len(every[m])
        return (f"{m} {n} quiet run{'s' * (n != 1)} of {tot}" if n else
                f"{m} all {tot} runs, none of them quiet")

    at = (f"at {ref} % loss, 500 kbit/s, runs of {ref_seconds} s, pooled: "
          + ", ".join(used(m) for m in MODES) + f". End to end is kernel TCP (cubic, SACK; "
          f"the paper's end-to-end connection); the overlay's own end-to-end session is given "
          f"beside it. A run is quiet if its probe (best-effort overlay datagrams sent "
          f"alongside, no recovery) had at most {GATE_PCT} % above 60 ms; the probes of all "
          f"runs had (tcp / e2e / hbh) "
          + " / ".join("/".join(f"{x['probe_pct_over_60']:g}" for x in every[m]) for m in MODES)
          + " %")
    mach = (f"Corrected: each message's delay minus the machine's own delay at the time (the "
            f"probe datagram sent nearest to it, above the fastest probe). No-loss baseline "
            f"(lowest median of the 0 % runs at 500 kbit/s): {base[500]:.1f} ms, of which 50 ms "
            f"is propagation; the rest is serialization and Python (five NFQUEUE delay lines, "
            f"six overlay daemons) on {ctx.machine}.")
    ctx.claim("over60", "At 1 % loss, 500 kbit/s: above 60 ms, end to end more than 27 %, "
              "hop by hop about 3 %", 3.0, h["corr_pct_over_60"],
              "% of messages (hop by hop, corrected)",
              h["corr_pct_over_60"] <= 3.0 * 1.5 and t["corr_pct_over_60"] > h["corr_pct_over_60"],
              f"{at}. Corrected: {three('corr_pct_over_60')} % (per run used, tcp / e2e / hbh: "
              f"{each('corr_pct_over_60')} %); raw {three('pct_over_60')} %. Holds if corrected "
              f"hbh is within 1.5x the paper's 3 % and below TCP's. {mach}")
    ctx.claim("over100", "At 1 % loss, 500 kbit/s: above 100 ms, end to end about 18 %, hop "
              "by hop about 1 %", 1.0, h["corr_pct_over_100"],
              "% of messages (hop by hop, corrected)",
              h["corr_pct_over_100"] <= 1.5 and t["corr_pct_over_100"] > h["corr_pct_over_100"],
              f"{at}. Corrected: {three('corr_pct_over_100')} % (per run used: "
              f"{each('corr_pct_over_100')} %); raw {three('pct_over_100')} %. Holds if "
              f"corrected hbh <= 1.5 % and below TCP's. {mach}")
    rel = t["corr_pct_over_60"] / max(h["corr_pct_over_60"], 0.01)
    raw = t["pct_over_60"] / max(h["pct_over_60"], 0.01)
    ov_rel = e["corr_pct_over_60"] / max(h["corr_pct_over_60"], 0.01)
    ratios = (f"Raw (uncorrected) ratio {raw:.2f}x; the overlay's end-to-end session / hbh "
              f"{ov_rel:.2f}x corrected")
    ctx.claim("over60_ratio", "In simulation end to end leaves about 9x more messages late "
              "than hop by hop (27 % vs 3 % above 60 ms)", 9.0, round(rel, 2),
              "x (TCP / hbh share above 60 ms, corrected)", rel >= 9.0,
              f"{at}. {ratios}. {mach}")
    ctx.claim("over60_ratio_emulab", "On Emulab the number of packets delayed by Spines is "
              "more than three times lower than by the end-to-end TCP connection", 3.0,
              round(rel, 2), "x (TCP / hbh share above 60 ms, corrected)", rel > 3.0,
              f"{at}. {ratios}. {mach}")
    jr = t["corr_jitter_sd_ms"] / max(h["corr_jitter_sd_ms"], 0.01)
    ctx.claim("jitter", "Jitter up to 3-4x smaller hop by hop", 3.0, round(jr, 2),
              "x (TCP sd / hbh sd, corrected)", jr >= 3.0,
              f"standard deviation of one-way delay {at}. Corrected: "
              f"{three('corr_jitter_sd_ms')} ms (per run used: {each('corr_jitter_sd_ms')} ms); "
              f"raw {three('jitter_sd_ms')} ms (raw ratio "
              f"{t['jitter_sd_ms'] / max(h['jitter_sd_ms'], 0.01):.2f}x). {mach}")
    ctx.claim("overlay_e2e_vs_hbh", "The overlay's own session recovering end to end leaves "
              "more messages late than hop by hop (the paper's end to end is TCP)", None,
              round(ov_rel, 2), "x (overlay e2e / hbh share above 60 ms, corrected)",
              ov_rel > 1, f"{at}. Holds if above 1. {mach}")
    delivered = all(r["received"] == r["sent"] and r["in_order"] and r["duplicates"] in (0, None)
                    for r in ctx.rows)
    ctx.params["every_session_exactly_once_in_order"] = delivered
    plot(ctx, losses, rates)


def pooled(runs: list) -> dict:
    """summarize() of the messages of the quiet runs among runs (all of them if none is
    quiet), raw and corrected (keys corr_*)."""
    use = [(d, info) for *_, d, info in runs if info["quiet"]] or [r[-2:] for r in runs]
    raw = summarize(np.concatenate([d for d, _ in use]))
    corr = summarize(np.concatenate([d - info["machine_ms"] for d, info in use]))
    return {**raw, **{f"corr_{k}": v for k, v in corr.items()}}


def plot(ctx, losses, rates) -> None:
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(ctx.rows).groupby(["rate_kbit", "loss_pct", "mode"]).mean(
        numeric_only=True).reset_index()
    cols = [("mean_ms", "mean delay (ms)"), ("corr_jitter_sd_ms", "jitter: sd (ms), corrected"),
            ("pct_over_60", "% above 60 ms"), ("pct_over_100", "% above 100 ms"),
            ("corr_pct_over_60", "% above 60 ms, corrected"),
            ("corr_pct_over_100", "% above 100 ms, corrected")]
    fig, axs = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (c, label) in zip(axs.flat, cols):
        for (rate, mode), g in df.groupby(["rate_kbit", "mode"]):
            ax.plot(g.loss_pct, g[c], STYLE[mode], color=f"C{rates.index(rate)}",
                    label=f"{LABEL[mode]} {rate} kbit/s")
        ax.set(xlabel="loss on C-D (%)", ylabel=label)
        if c in ("mean_ms", "corr_jitter_sd_ms"):  # end to end reaches seconds
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax, lines in ((axs[0, 2], (27, 3)), (axs[1, 1], (27, 3)), (axs[1, 0], (18, 1)),
                      (axs[1, 2], (18, 1))):
        for v in lines:
            ax.axhline(v, ls=":", color="gray")
    fig.suptitle("A -> F over five 10 ms links; dotted: the paper's end to end (TCP) / hop "
                 "by hop at 1 %; "
                 "corrected: minus the machine's own delay (a datagram probe alongside)")
    fig.tight_layout()
    fig.savefig(ctx.figure("loss_sweep"), dpi=110)
    plt.close(fig)
