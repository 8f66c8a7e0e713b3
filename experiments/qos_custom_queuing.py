"""Paper 000's missing experiment: does custom queuing guarantee the mirror 5 % of the link?

The paper configured Cisco custom queuing on the filer's router interface (IOS excerpt:
queue 1, byte-count 5000, for TCP port 10566, the SnapMirror traffic; queue 2, byte-count
95000, for everything else) "to guarantee 5% of the 100 Mbps link to the mirror process",
but its LAN was never congested, so it never saw the guarantee at work. Here a 100 Mbit/s
router interface is saturated by background TCP flows (the nightly backups) while the mirror
flow (TCP to port 10566) runs, under three disciplines on that interface: FIFO (no QoS),
custom queuing 5000/95000 bytes, and WFQ with weights mirror 1 : rest 9. The mirror keeps
running for a few seconds after the background stops, to show the guarantee is a floor,
not a cap. The source sends MTU-sized frames (TSO/GSO off) so the router's queues hold
packets as a real router's do.
"""

from __future__ import annotations

from testbed import Network
from testbed.measure.concurrent import iperf3_flows, rates_bps, shares, window
from testbed.queueing import Queue, QueueClass
from testbed.experiment import pyplot
from topologies import qos_router

PAPER = "000"
TITLE = ("QoS: the mirror's share of a saturated 100 Mbit/s link under FIFO, custom queuing "
         "(5000/95000 bytes) and WFQ")

RATE_MBIT = 100
MIRROR_PORT = 10566  # SnapMirror
CQ_BYTES = (5000, 95000)  # IOS queue-list 3: queue 1 (mirror), queue 2 (default)
WFQ_WEIGHTS = (1, 9)  # mirror : rest
TCP_PAYLOAD = 1448 / 1514  # goodput per Ethernet-level bit (the rate is an Ethernet rate)
TOL = 0.05  # the target: a class's share within 5 % (relative) of its configuration
DISCIPLINES = ("fifo", "custom", "wfq")


def queues() -> dict:
    mirror = {"protocol": "tcp", "port": MIRROR_PORT}  # IOS `tcp 10566`: either port
    return {
        "fifo": Queue("fifo"),
        "custom": Queue("custom", [
            QueueClass("mirror", bytes=CQ_BYTES[0], match=mirror),
            QueueClass("default", bytes=CQ_BYTES[1], default=True)]),
        "wfq": Queue("wfq", [
            QueueClass("mirror", weight=WFQ_WEIGHTS[0], match=mirror),
            QueueClass("default", weight=WFQ_WEIGHTS[1], default=True)]),
    }


def configured_pct(name: str, n_background: int) -> float:
    """The mirror's configured share in %; for FIFO, the equal TCP share 1/(N+1)."""
    if name == "fifo":
        return 100.0 / (n_background + 1)
    return 100.0 * queues()[name].shares()["mirror"]


def one_run(ctx, net, name: str, rep: int, background: list, seconds: float, tail: float,
            warmup: float) -> dict:
    link = net.link("r1", "dst")
    link.set_queue("a_to_b", queues()[name])
    impl = link.queue_impl["a_to_b"]
    ctx.backends.setdefault("queue", set()).add(f"{name}:{impl}")
    before = link.queue_stats("a_to_b").set_index("class")
    df = iperf3_flows(net["src"], net["dst"], [MIRROR_PORT] + background, seconds=seconds,
                      durations={MIRROR_PORT: seconds + tail}, interval=0.5,
                      congestion="cubic")
    after = link.queue_stats("a_to_b").set_index("class")
    for r in df.itertuples():
        role = "mirror" if r.port == MIRROR_PORT else "background"
        ctx.add(kind="interval", discipline=name, impl=impl, rep=rep, port=r.port, role=role,
                t_start=round(r.t_start, 3), t_end=round(r.t_end, 3),
                goodput_mbit=round(r.bits_per_second / 1e6, 3), bytes=r.bytes)
    sh = shares(df, warmup, seconds)
    rates = rates_bps(df, warmup, seconds)
    mirror_share = 100 * sh[MIRROR_PORT]
    mirror_mbit = rates[MIRROR_PORT] / 1e6
    total_mbit = sum(rates.values()) / 1e6
    alone = window(df[df.port == MIRROR_PORT], seconds + 0.5, seconds + tail)
    alone_mbit = 8 * alone.bytes.sum() / (alone.t_end - alone.t_start).sum() / 1e6 \
        if len(alone) else float("nan")
    want = configured_pct(name, len(background))
    ctx.add(kind="share", discipline=name, impl=impl, rep=rep, port=MIRROR_PORT, role="mirror",
            configured_pct=round(want, 3), share_pct=round(mirror_share, 3),
            goodput_mbit=round(mirror_mbit, 3),
            total_goodput_mbit=round(total_mbit, 3), alone_goodput_mbit=round(alone_mbit, 3),
            background_flows=len(background), window_s=f"{warmup:g}-{seconds:g}",
            drops=int(after.drops.sum() - before.drops.sum()))
    ctx.progress(f"{name:6} ({impl}) rep {rep}: mirror {mirror_share:5.2f} % of "
                 f"{total_mbit:5.1f} Mbit/s goodput ({mirror_mbit:5.2f} Mbit/s; configured "
                 f"{want:.1f} %), alone afterwards {alone_mbit:5.1f} Mbit/s")
    return {"share": mirror_share, "mbit": mirror_mbit, "alone": alone_mbit,
            "total": total_mbit, "impl": impl}


def run(ctx) -> None:
    seconds = ctx.pick(smoke=3, quick=8, full=30)
    tail = ctx.pick(smoke=1.5, quick=2, full=5)
    warmup = ctx.pick(smoke=1, quick=2, full=3)
    n_background = ctx.pick(smoke=3, quick=4, full=4)
    repeats = ctx.pick(smoke=1, quick=2, full=3)
    background = [5201 + i for i in range(n_background)]
    ctx.params.update(rate_mbit=RATE_MBIT, mirror_port=MIRROR_PORT, cq_bytes=CQ_BYTES,
                      wfq_weights=WFQ_WEIGHTS, background_ports=background, seconds=seconds,
                      mirror_tail_s=tail, share_window_s=[warmup, seconds], repeats=repeats,
                      congestion="cubic", source_offloads="tso off, gso off",
                      topology="src -- r1 ==(100 Mbit/s, queue on r1's egress)==> dst")
    res = {d: [] for d in DISCIPLINES}
    with Network(qos_router.build(rate_mbit=RATE_MBIT)) as net:
        ctx.note_network(net)
        intf = net["src"].intfs[0]
        net["src"].run(["ethtool", "-K", intf, "tso", "off", "gso", "off"])
        for rep in range(repeats):
            for name in DISCIPLINES:
                res[name].append(one_run(ctx, net, name, rep, background, seconds, tail,
                                         warmup))
    claims(ctx, res, n_background, seconds, warmup)
    plot(ctx, n_background, seconds)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def claims(ctx, res: dict, n: int, seconds: float, warmup: float) -> None:
    impl = res["custom"][0]["impl"]
    how = (f"{n} background TCP flows (CUBIC) saturate the 100 Mbit/s link from src through "
           f"r1; share of the bytes dst received over {warmup:g}-{seconds:g} s of each run, "
           f"mean of {len(res['custom'])} run(s)")
    cq = _mean([r["share"] for r in res["custom"]])
    want_cq = configured_pct("custom", n)
    ctx.claim("cq_share", "Custom queuing (queue 1: 5000 bytes for TCP port 10566, queue 2: "
              "95000 bytes, round robin) provides a minimum of 5% of the 100 Mbps link to the "
              "SnapMirror traffic", want_cq, cq, "% of link",
              abs(cq - want_cq) <= TOL * want_cq,
              f"{how}; holds within 5 % (relative) of the configured share; queue "
              f"implementation {impl}")
    cq_rate = _mean([r["mbit"] for r in res["custom"]]) / TCP_PAYLOAD
    ctx.claim("cq_rate", "...configured to guarantee 5% of the 100 Mbps link to the mirror "
              "process (5 Mbit/s)", 5.0, cq_rate, "Mbit/s (Ethernet level)",
              cq_rate >= (1 - TOL) * 5.0,
              f"the mirror's goodput under custom queuing x 1514/1448 (the link rate counts "
              f"Ethernet frames); {how}")
    alone = _mean([r["alone"] for r in res["custom"]]) / TCP_PAYLOAD
    ctx.claim("cq_floor_not_cap", "CQ ... provides a lower bound guarantee on bandwidth "
              "allocated to a queue", None, alone, "Mbit/s (Ethernet level)",
              alone >= 0.9 * RATE_MBIT,
              "the mirror's rate once the background flows have stopped (it runs on alone "
              "for the last seconds): custom queuing is work-conserving, so the 5 % is a "
              "floor; holds if the mirror then gets at least 90 % of the link")
    wfq = _mean([r["share"] for r in res["wfq"]])
    want_wfq = configured_pct("wfq", n)
    ctx.claim("wfq_share", "WFQ (weights mirror 1 : rest 9) shares the link by weight: the "
              "mirror gets 10 %", None, wfq, "% of link",
              abs(wfq - want_wfq) <= TOL * want_wfq,
              f"{how}; configured share {want_wfq:.1f} %, holds within 5 % (relative); queue "
              f"implementation {res['wfq'][0]['impl']}. The paper describes WFQ but measures "
              f"nothing with it")
    fifo = [r["share"] for r in res["fifo"]]
    fair = configured_pct("fifo", n)
    ctx.claim("fifo_share", f"Without QoS (FIFO) the mirror, one TCP flow among {n + 1}, still "
              "got at least 5 % of the link in every run", None, min(fifo),
              "% of link (worst run)", min(fifo) >= 5.0,
              f"{how}; FIFO shares {', '.join(f'{x:.1f}' for x in fifo)} % (the equal TCP "
              f"share would be {fair:.1f} %): set by TCP competition, not configured, so it "
              f"moves from run to run and shrinks with every further backup stream; custom "
              f"queuing's 5 % does not depend on them")


def plot(ctx, n_background: int, seconds: float) -> None:
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(ctx.rows)
    iv = df[(df.kind == "interval") & (df.rep == 0)].copy()
    iv["t_mid"] = (iv.t_start + iv.t_end) / 2
    iv = iv[iv.t_end - iv.t_start > 0.25]  # drop iperf3's final partial interval
    colors = {"fifo": "tab:gray", "custom": "tab:blue", "wfq": "tab:orange"}
    labels = {"fifo": "FIFO", "custom": "custom queuing 5000/95000 B", "wfq": "WFQ 1:9"}
    fig, ax = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    for name in DISCIPLINES:
        m = iv[(iv.discipline == name) & (iv.role == "mirror")].sort_values("t_mid")
        ax[0].plot(m.t_mid, m.goodput_mbit, "o-", ms=3, color=colors[name],
                   label=f"mirror, {labels[name]}")
        bg = iv[(iv.discipline == name) & (iv.role == "background")]
        bg = bg.assign(k=(bg.t_start * 2).round()).groupby("k").agg(
            t_mid=("t_mid", "mean"), goodput_mbit=("goodput_mbit", "sum"))
        ax[0].plot(bg.t_mid, bg.goodput_mbit, ":", color=colors[name],
                   label=f"{n_background} background flows, {labels[name]}")
    ax[0].axhline(5 * TCP_PAYLOAD, ls="--", color="tab:blue", lw=0.8,
                  label="5 % of 100 Mbit/s (as TCP goodput)")
    ax[0].axvline(seconds, color="black", lw=0.8)
    ax[0].text(seconds, ax[0].get_ylim()[1] * 0.5, " background stops", fontsize=8)
    ax[0].set(yscale="log", xlabel="time (s)", ylabel="goodput (Mbit/s, 0.5 s intervals)",
              title="Mirror (TCP port 10566) through a saturated 100 Mbit/s router port")
    ax[0].legend(fontsize=7, loc="lower left")
    sh = df[df.kind == "share"].groupby("discipline")[["share_pct", "configured_pct"]].mean()
    sh = sh.reindex([d for d in DISCIPLINES if d in sh.index])
    xs = range(len(sh))
    ax[1].bar([x - 0.2 for x in xs], sh.share_pct, 0.4, label="measured",
              color=[colors[d] for d in sh.index])
    ax[1].bar([x + 0.2 for x in xs], sh.configured_pct, 0.4, label="configured (FIFO: equal "
              "TCP share)", color="white", edgecolor="black", hatch="//")
    for x, r in zip(xs, sh.itertuples()):
        ax[1].text(x - 0.2, r.share_pct, f"{r.share_pct:.2f}", ha="center", va="bottom",
                   fontsize=8)
    ax[1].set_xticks(list(xs), [labels[d].split(" 5000")[0] for d in sh.index], fontsize=8)
    ax[1].set(ylabel="mirror's share of the link (%)", title="Mirror's share at saturation")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.figure("qos_custom_queuing"), dpi=110)
    plt.close(fig)
