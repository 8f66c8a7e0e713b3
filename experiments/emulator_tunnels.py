"""Tunnels: TCP goodput through each tunnel kind this kernel has, against the goodput of the
underlying link itself.

Topology: pe_a - r - pe_b (routers), the pe_a - r link HTB-shaped (100 Mbit/s, 1 Gbit/s)
or unshaped. For each link setting, iperf3 (one TCP flow, pe_a -> pe_b) runs over the
underlay addresses, then through each tunnel (testbed.tunnel.add_tunnel) to pe_b's inner
address, interleaved, repeated. Kernel tunnels (vxlan, gre, ipip where present) should give
at least 90 % of the underlay's goodput; the user-space TUN tunnel (`udp`) reports what it
reaches, with and without offload, and the CPU time its two daemons used.
"""

from __future__ import annotations

import os
import statistics

from testbed import Network, Topology, measure
from testbed.tunnel import availability, overhead
from testbed.tunnel import add_tunnel as make_tunnel
from testbed.tunnel.daemon import DEFAULT_GSO_MAX
from testbed.experiment import pyplot

PAPER = "emulator"
TITLE = "Tunnels: goodput through each tunnel kind against the underlying link's"

TARGET = 0.90
KERNEL_KINDS = ("vxlan", "gre", "ipip")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def topology(rate_mbit) -> Topology:
    t = Topology("pe-tunnel")
    t.add_router("pe_a")
    t.add_router("r")
    t.add_router("pe_b")
    t.add_link("pe_a", "r", rate=rate_mbit)
    t.add_link("r", "pe_b")
    return t


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def label(rate) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def measure_one(ctx, net, rate, variant, seconds, omit, repeat, tunnel=None) -> float:
    a, b = net["pe_a"], net["pe_b"]
    daemons = list(tunnel.procs.values()) if tunnel else []
    cpu0 = [cpu_s(p.pid) for p in daemons]
    df = measure.iperf3(a, b, seconds=seconds, omit=omit,
                        dst=tunnel.ip("pe_b") if tunnel else None)
    got = df.attrs["receiver_bps"] / 1e6
    row = dict(link=label(rate), rate_mbit=rate, variant=variant,
               kind=tunnel.kind if tunnel else "underlay", repeat=repeat,
               goodput_mbit=round(got, 2), retransmits=df.attrs["retransmits"],
               seconds=seconds, mtu=tunnel.mtu if tunnel else 1500,
               overhead_bytes=tunnel.overhead if tunnel else 0,
               offload=tunnel.offload if tunnel else None)
    if daemons:
        busy = [(cpu_s(p.pid) - c) / (seconds + omit) for p, c in zip(daemons, cpu0)]
        row.update(cpu_pct_sender=round(100 * busy[0], 1), cpu_pct_receiver=round(100 * busy[1], 1))
        st = tunnel.stats()
        row.update(dropped=sum(st[n]["dropped_foreign"] + st[n]["dropped_malformed"] +
                               st[n]["send_drops"] + st[n]["tun_write_errors"] for n in st))
    ctx.add(**row)
    extra = (f", daemons {row['cpu_pct_sender']:.0f} % / {row['cpu_pct_receiver']:.0f} % CPU"
             if daemons else "")
    ctx.progress(f"{label(rate):>13} {variant:15} {got:9.1f} Mbit/s{extra}")
    return got


def run(ctx) -> None:
    # smoke is also run under Debian's kernel in qemu (TCG), where Python is ~100x slower:
    # one rate, and the TUN tunnel only with offload
    rates = ctx.pick(smoke=[100], quick=[100, 1000, None], full=[10, 100, 1000, None])
    seconds = ctx.pick(smoke=2, quick=2, full=10)
    omit = ctx.pick(smoke=0, quick=1, full=2)
    repeats = ctx.pick(smoke=1, quick=2, full=3)
    why_not = availability()
    kinds = [k for k in KERNEL_KINDS if why_not[k] is None]
    variants = [(k, k, {}) for k in kinds]
    if why_not["udp"] is None:
        variants.append(("udp", "udp", {"offload": True}))
        if not ctx.smoke:
            variants.append(("udp-no-offload", "udp", {"offload": False}))
    ctx.params.update(rates_mbit=rates, iperf_seconds=seconds, omit_s=omit, repeats=repeats,
                      variants=[v for v, _, _ in variants], target=TARGET,
                      missing={k: r for k, r in why_not.items() if r})
    for rate in rates:
        with Network(topology(rate)) as net:
            ctx.note_network(net)
            for rep in range(repeats):
                measure_one(ctx, net, rate, "underlay", seconds, omit, rep)
                for variant, kind, kw in variants:
                    with make_tunnel(net, "pe_a", "pe_b", kind=kind, **kw) as tn:
                        measure_one(ctx, net, rate, variant, seconds, omit, rep, tn)
    claims(ctx, rates, kinds, why_not)
    plot(ctx)


def _best(rows, rate, variant) -> float:
    """The best of the repeats: other jobs on the machine can only lower a run's goodput,
    so the best run is the closest to what the path carries (the same rule for the
    underlay and the tunnels; every run is in data.csv)."""
    return max(r["goodput_mbit"] for r in rows
               if r["rate_mbit"] == rate and r["variant"] == variant)


def claims(ctx, rates, kinds, why_not) -> None:
    rows = ctx.rows
    under = {rate: _best(rows, rate, "underlay") for rate in rates}
    for r in rows:
        r["underlay_mbit"] = round(under[r["rate_mbit"]], 2)
        r["ratio"] = round(r["goodput_mbit"] / under[r["rate_mbit"]], 4)  # this run / best
    shaped = [rate for rate in rates if rate is not None]
    for kind in kinds:
        ratios = {rate: _best(rows, rate, kind) / under[rate] for rate in rates}
        worst = min(ratios[r] for r in shaped)
        detail = ", ".join(f"{label(r)} {100 * ratios[r]:.1f} %" for r in rates)
        ctx.claim(f"{kind}_goodput", f"A {kind} tunnel gives at least 90 % of the underlying "
                  f"link's goodput", 90, 100 * worst, "% of underlay goodput (worst shaped)",
                  worst >= TARGET,
                  f"iperf3, one TCP flow pe_a -> pe_b through the tunnel against the same flow "
                  f"over the underlay (best of {ctx.params['repeats']} runs each), on an "
                  f"HTB-shaped pe_a - r link; {detail}. Inner MTU "
                  f"1500 - {overhead(kind)}: {1500 - overhead(kind) - 52} bytes of TCP payload "
                  f"per 1514-byte frame where the underlay carries 1448, so "
                  f"{100 * (1500 - overhead(kind) - 52) / 1448:.1f} % is expected. Unshaped, "
                  f"both are CPU-bound on a 2-core VM and the ratio is informative only.")
    for kind in KERNEL_KINDS:
        if why_not[kind]:
            ctx.params.setdefault("skipped", {})[kind] = why_not[kind]
    if why_not["udp"] is None:
        got = {rate: _best(rows, rate, "udp") for rate in rates}
        plain = {rate: _best(rows, rate, "udp-no-offload") for rate in rates
                 if any(r["variant"] == "udp-no-offload" for r in rows)}
        top = got[None] if None in got else max(got.values())
        udp_rows = [r for r in rows if r["kind"] == "udp"]
        dropped = sum(r.get("dropped", 0) for r in udp_rows)
        ok = all(g > 0 for g in got.values()) and dropped == 0
        cpu = [r for r in udp_rows if r["rate_mbit"] is None and r["variant"] == "udp"]
        cpu_txt = (f"; unshaped, its daemons used "
                   f"{statistics.mean(r['cpu_pct_sender'] for r in cpu):.0f} % (sender) and "
                   f"{statistics.mean(r['cpu_pct_receiver'] for r in cpu):.0f} % (receiver) of "
                   f"a core" if cpu else "")
        detail = ", ".join(f"{label(r)}: {got[r]:.0f} Mbit/s ({100 * got[r] / under[r]:.0f} %)"
                           + (f", without offload {plain[r]:.0f}" if r in plain else "")
                           for r in rates)
        ctx.claim("udp_reports", "The user-space TUN tunnel reports what it reaches", None, top,
                  "Mbit/s (unshaped: the CPU-bound rate)", ok,
                  f"python -m testbed.tunnel, TSO through the tunnel (one UDP datagram per "
                  f"offloaded packet of up to {DEFAULT_GSO_MAX // 1000} KB, IP-fragmented on the "
                  f"underlay); {detail}"
                  f"{cpu_txt}. Above 100 % on a shaped link because the IP fragments of an "
                  f"offloaded packet carry one TCP header per datagram, not one per 1448 bytes. "
                  f"Holds if it carried TCP at every rate and its daemons dropped nothing "
                  f"({dropped} dropped).")


def plot(ctx) -> None:
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(ctx.rows)
    links = list(dict.fromkeys(df["link"]))
    variants = list(dict.fromkeys(df["variant"]))
    best = df.groupby(["link", "variant"])["goodput_mbit"].max()
    med = pd.DataFrame({"goodput_mbit": best,
                        "ratio": best / best.xs("underlay", level="variant").reindex(
                            best.index.get_level_values("link")).to_numpy()})
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(links))]
        gp = [med.loc[(lk, v), "goodput_mbit"] if (lk, v) in med.index else 0 for lk in links]
        rt = [100 * med.loc[(lk, v), "ratio"] if (lk, v) in med.index else 0 for lk in links]
        bars = ax[0].bar(xs, gp, width, label=v)
        ax[1].bar(xs, rt, width, label=v, color=bars.patches[0].get_facecolor())
        for x, g in zip(xs, gp):
            ax[0].text(x, g, f"{g:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
    for a in ax:
        a.set_xticks(range(len(links)))
        a.set_xticklabels([f"link {lk}" for lk in links])
    ax[0].set(yscale="log", ylabel="TCP goodput (Mbit/s)",
              title="Goodput, pe_a -> pe_b (best of the runs)")
    ax[0].set_ylim(top=3 * float(med["goodput_mbit"].max()))
    ax[1].axhline(100 * TARGET, ls="--", color="red", label="target for kernel tunnels: 90 %")
    ax[1].set(ylabel="% of the underlay's goodput", title="Through the tunnel / over the link")
    handles, names = ax[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(ctx.figure("tunnels"), dpi=110)
    plt.close(fig)
