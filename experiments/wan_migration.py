"""Paper 003: live data-centre migration across a WAN (a position paper: it measures nothing
but says live migration downtime is "tens to hundreds of milliseconds").

On topologies.wan_migration (client behind an ingress PE, PE routers pe_a and pe_b joined by
a WAN core of 100 Mbit/s and 10 ms each way), testbed.migration.wan runs the paper's three
signals against a real VS process: (1) tunnel PE_a -> PE_b + pre-copy of the VS's memory
image over TCP (rounds of dirty pages at a configurable dirty rate), (2) quiesce, stop-and-
copy, resume at B, PE_a moves the VS /32 onto the tunnel, (3) the ingress PE routes the VS
straight to PE_b and the tunnel goes. A UDP probe every 1 ms from the client measures the
downtime the client sees and the RTT on each path (path stretch through the tunnel).

Measured as well: total migration time against dirty rate, WAN rate and RTT; write latency
of the storage replication agent (testbed.migration.replication: sync, async bounded by
bytes, async bounded by time) against RTT, and the async -> sync switch; RPO against the
checkpoint interval (async replication with periodic checkpoints, the primary killed at a
random moment: the writes the replica does not have are lost).

Dirty model: the VS writes dirty_mbps uniformly over a writable working set (wws) at the
start of its image. The downtime target run uses a 1 MB working set (a hot set, as real
VMs have); the dirty-rate sweep writes uniformly over the whole image, the worst case, where
pre-copy stops converging once the dirty rate nears the WAN rate.

Scale: the target run moves 100 MB (quick: 2 runs, full: 5); the sweeps move 16 MB in
quick mode (50 MB in full). Replicas fdatasync every block (the log directory's disk).
"""

from __future__ import annotations

import json
import os
import random
import sys

import pandas as pd

from testbed import Network
from testbed.measure.udpprobe import outages
from testbed.migration.wan import WanMigration
from testbed.process import listening, log_matches
from testbed.experiment import pyplot
from topologies import wan_migration
from topologies.wan_migration import VS_IP

PAPER = "003"
TITLE = ("Live data-centre migration across a WAN: downtime, migration time vs dirty rate, "
         "WAN rate and RTT, replication write latency, RPO, path stretch")

PAPER_DOWNTIME_MS = (10.0, 999.0)   # "tens to hundreds of milliseconds"
TARGET_DOWNTIME_MS = 200.0
WAN_MBIT, WAN_DELAY_MS = 100.0, 10.0
PROBE_PORT, REPL_PORT = 9999, 9500


def probe_start(net, seconds: float, interval_ms: float, tag: str):
    c = net["client"]
    out = os.path.join(net.log_dir, f"wanprobe-{tag}.csv")
    p = c.start([sys.executable, "-m", "testbed.measure.udpecho", "client", "--dst", VS_IP,
                 "--port", str(PROBE_PORT), "--interval-ms", str(interval_ms),
                 "--seconds", str(seconds), "--out", out], name=f"wanprobe-{tag}")
    p.wait_ready(log_matches(lambda: p, "probing"), timeout=15)
    return p, out


def one_migration(ctx, net, wm: WanMigration, tag: str, probe_ms=None, hold_s=1.0) -> dict:
    wm.setup()
    pr = None
    if probe_ms:
        est = wm.state_mb * 8.4 / net.link("pe_a", "pe_b").shaping["a_to_b"].rate_mbit
        seconds = est * 1.5 + 3.0 + hold_s + 2.0
        pr, out = probe_start(net, seconds, probe_ms, tag)
    try:
        res = wm.migrate(hold_s=hold_s)
        if pr is not None:
            pr.wait(120)  # the VS keeps serving at B until the probe ends
            res["probe"] = pd.read_csv(out)
    finally:
        wm.teardown_vm()
    return res


def analyse_probe(res: dict, probe_ms: float) -> dict:
    df, ev = res["probe"], res["events"]
    got = df[df["t_recv"].notna()]
    out = outages(df, probe_ms)
    mig = out[(out["from"] == "vs_a") & (out["to"] == "vs_b")]
    down = float(mig["gap_ms"].max()) if len(mig) else float("nan")
    other = out[~out.index.isin(mig.index)]

    def rtt(lo, hi, who):
        w = got[(got["t_send"] > lo) & (got["t_send"] < hi) & (got["responder"] == who)]
        return float(w["rtt_ms"].median()) if len(w) else float("nan")

    before = rtt(ev["signal1"] - 5, ev["signal1"], "vs_a")
    tunnel = rtt(ev["switchover"] + 0.05, ev["signal3"], "vs_b")
    direct = rtt(ev["tunnel_down"] + 0.05, ev["tunnel_down"] + 5, "vs_b")
    return {"downtime_ms": down, "lost_probes": int(mig["lost"].sum()) if len(mig) else -1,
            "other_outages": len(other),
            "other_max_gap_ms": float(other["gap_ms"].max()) if len(other) else 0.0,
            "rtt_before_ms": before, "rtt_tunnel_ms": tunnel, "rtt_direct_b_ms": direct,
            "stretch": tunnel / direct if direct else float("nan"),
            "last_vs_a": float(got[got["responder"] == "vs_a"]["t_recv"].max()),
            "first_vs_b": float(got[got["responder"] == "vs_b"]["t_recv"].min())}


def mig_row(ctx, kind: str, res: dict, **extra) -> dict:
    ev = res["events"]
    row = dict(kind=kind, **extra, state_mb=res["state_bytes"] / (1 << 20),
               total_s=round(res["total_s"], 4), precopy_s=round(res["precopy_s"], 4),
               stop_copy_ms=round(res["stop_copy_s"] * 1000, 2),
               vm_downtime_ms=round(res["vm_downtime_s"] * 1000, 2),
               rounds=len(res["rounds"]), final_mb=round(res["final_bytes"] / (1 << 20), 3),
               sent_mb=round(res["sent_bytes"] / (1 << 20), 3),
               state_equal=res["state_equal"],
               signal1_to_2_s=round(ev["signal2"] - ev["signal1"], 4),
               tunnel_setup_ms=round((ev["tunnel_up"] - ev["signal1"]) * 1000, 2),
               switchover_ms=round((ev["switchover"] - ev["resumed"]) * 1000, 2),
               signal3_ms=round((ev["tunnel_down"] - ev["signal3"]) * 1000, 2))
    ctx.add(**row)
    return row


def replication_run(net, mode: str, writes: int, rate: float, tag: str, **kw) -> dict:
    a, b = net["vs_a"], net["vs_b"]
    rep = b.start([sys.executable, "-m", "testbed.migration.replication", "replica", "--port",
                   str(REPL_PORT), "--out", os.path.join(net.log_dir, f"disk-{tag}.img")],
                  name=f"replica-{tag}", ready=listening(b.ns, REPL_PORT))
    out = os.path.join(net.log_dir, f"primary-{tag}.json")
    argv = [sys.executable, "-m", "testbed.migration.replication", "primary", "--dst",
            b.ip_toward(net["pe_b"]), "--port", str(REPL_PORT), "--mode", mode,
            "--writes", str(writes), "--rate", str(rate), "--out", out]
    for k, v in kw.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    try:
        a.run(argv, timeout=120)
        with open(out) as f:
            res = json.load(f)
        res["replica"] = json.loads(a.run(
            [sys.executable, "-m", "testbed.migration.replication", "stat", "--dst",
             b.ip_toward(net["pe_b"]), "--port", str(REPL_PORT)]).stdout)
    finally:
        rep.stop()
    return res


def run(ctx) -> None:
    target_mb = ctx.pick(smoke=8, quick=100, full=100)
    sweep_mb = ctx.pick(smoke=4, quick=16, full=50)
    reps = ctx.pick(smoke=1, quick=2, full=5)
    probe_ms = 1.0
    dirty_rates = ctx.pick(smoke=[10], quick=[0, 2, 5, 10], full=[0, 2, 5, 8, 10, 15])
    wan_rates = ctx.pick(smoke=[100], quick=[50, 100, 200], full=[25, 50, 100, 200])
    rtts = ctx.pick(smoke=[20], quick=[10, 20, 40], full=[5, 10, 20, 40, 80])
    repl_rtts = ctx.pick(smoke=[20], quick=[10, 20, 40], full=[5, 10, 20, 40, 80])
    repl_writes = ctx.pick(smoke=30, quick=100, full=300)
    cps = ctx.pick(smoke=[0.25], quick=[0.1, 0.25, 0.5, 1.0], full=[0.05, 0.1, 0.25, 0.5, 1.0, 2.0])
    cp_reps = ctx.pick(smoke=1, quick=2, full=5)
    ctx.params.update(wan_mbit=WAN_MBIT, wan_delay_ms=WAN_DELAY_MS, target_state_mb=target_mb,
                      target_wws_mb=1, target_dirty_mbps=10, sweep_state_mb=sweep_mb,
                      probe_interval_ms=probe_ms, repeats=reps, dirty_rates=dirty_rates,
                      wan_rates=wan_rates, rtts_ms=rtts, repl_rtts_ms=repl_rtts,
                      repl_writes=repl_writes, checkpoint_intervals_s=cps,
                      checkpoint_repeats=cp_reps, stop_mb=1, max_rounds=30)
    rnd = random.Random(3)
    with Network(wan_migration.build(wan_mbit=WAN_MBIT, wan_delay_ms=WAN_DELAY_MS)) as net:
        ctx.note_network(net)
        core = net.link("pe_a", "pe_b")
        # 1. the target: downtime, signals, path stretch
        targets = []
        for i in range(reps):
            ctx.progress(f"target run {i + 1}/{reps}: {target_mb} MB, wws 1 MB, 10 MB/s")
            wm = WanMigration(net, VS_IP, state_mb=target_mb, wws_mb=1, dirty_mbps=10,
                              tag=f"target{i}-")
            res = one_migration(ctx, net, wm, f"target{i}", probe_ms=probe_ms)
            pr = analyse_probe(res, probe_ms)
            row = mig_row(ctx, "target", res, run=i + 1, wan_mbit=WAN_MBIT,
                          rtt_ms=2 * WAN_DELAY_MS, dirty_mbps=10, wws_mb=1,
                          **{k: (round(v, 3) if isinstance(v, float) else v)
                             for k, v in pr.items() if k not in ("last_vs_a", "first_vs_b")})
            ev = res["events"]
            for name, t in sorted(ev.items(), key=lambda x: x[1]):
                ctx.add(kind="event", run=i + 1, event=name,
                        t_s=round(t - ev["signal1"], 4))
            targets.append((row, res))
            ctx.progress(f"  downtime {pr['downtime_ms']:.1f} ms (VM {row['vm_downtime_ms']} ms),"
                         f" total {row['total_s']} s, stretch {pr['stretch']:.2f}")
        # 2. total migration time vs dirty rate (uniform over the image), WAN rate, RTT
        for d in dirty_rates:
            ctx.progress(f"dirty-rate sweep: {d} MB/s over {sweep_mb} MB")
            wm = WanMigration(net, VS_IP, state_mb=sweep_mb, wws_mb=sweep_mb,
                              dirty_mbps=d, tag=f"d{d}-")
            mig_row(ctx, "sweep_dirty", one_migration(ctx, net, wm, f"d{d}", hold_s=0.1),
                    wan_mbit=WAN_MBIT, rtt_ms=2 * WAN_DELAY_MS, dirty_mbps=d, wws_mb=sweep_mb)
        for r in wan_rates:
            ctx.progress(f"WAN-rate sweep: {r} Mbit/s")
            core.set(rate_mbit=r)
            wm = WanMigration(net, VS_IP, state_mb=sweep_mb, wws_mb=1,
                              dirty_mbps=10, tag=f"r{r}-")
            mig_row(ctx, "sweep_rate", one_migration(ctx, net, wm, f"r{r}", hold_s=0.1),
                    wan_mbit=r, rtt_ms=2 * WAN_DELAY_MS, dirty_mbps=10, wws_mb=1)
        core.set(rate_mbit=WAN_MBIT)
        for rtt in rtts:
            ctx.progress(f"RTT sweep: {rtt} ms")
            core.set(delay_ms=rtt / 2)
            wm = WanMigration(net, VS_IP, state_mb=sweep_mb, wws_mb=1, dirty_mbps=10,
                              tag=f"t{rtt}-")
            mig_row(ctx, "sweep_rtt", one_migration(ctx, net, wm, f"t{rtt}", hold_s=0.1),
                    wan_mbit=WAN_MBIT, rtt_ms=rtt, dirty_mbps=10, wws_mb=1)
        # 3. replication write latency per mode vs RTT, and the async -> sync switch
        modes = {"sync": {}, "async_bytes": {"max_bytes": 256 * 1024},
                 "async_time": {"max_lag_s": 0.05}}
        for rtt in repl_rtts:
            core.set(delay_ms=rtt / 2)
            for label, kw in modes.items():
                ctx.progress(f"replication {label} at RTT {rtt} ms")
                res = replication_run(net, "sync" if label == "sync" else "async",
                                      repl_writes, 200, f"{label}{rtt}", **kw)
                lat = pd.Series([r["latency_s"] for r in res["rows"]]) * 1000
                ctx.add(kind="replication", mode=label, rtt_ms=rtt, writes=len(lat),
                        lat_mean_ms=round(lat.mean(), 3), lat_p50_ms=round(lat.median(), 3),
                        lat_p99_ms=round(lat.quantile(0.99), 3), lat_max_ms=round(lat.max(), 3),
                        replica_writes=res["replica"]["writes"])
            ctx.progress(f"async -> sync switch at RTT {rtt} ms")
            res = replication_run(net, "async", repl_writes, 400, f"switch{rtt}",
                                  checkpoint_s=0.2, switch_at=repl_writes // 2)
            sw = res["switch"]
            after = [r["latency_s"] * 1000 for r in res["rows"] if r["mode"] == "sync"]
            before = [r["latency_s"] * 1000 for r in res["rows"] if r["mode"] == "async"]
            ctx.add(kind="switch", rtt_ms=rtt, pending_writes=sw["pending_writes"],
                    pending_bytes=sw["pending_bytes"], drain_ms=round(sw["drain_s"] * 1000, 2),
                    pending_after=sw["pending_after"],
                    async_p50_ms=round(pd.Series(before).median(), 3),
                    sync_p50_ms=round(pd.Series(after).median(), 3),
                    replica_writes=res["replica"]["writes"], issued=len(res["rows"]))
        core.set(delay_ms=WAN_DELAY_MS)
        # 4. RPO vs checkpoint interval
        for cp in cps:
            for i in range(cp_reps):
                crash_at = round(1.0 + rnd.uniform(0, 1.5), 3)
                ctx.progress(f"RPO: checkpoint {cp} s, crash at {crash_at} s")
                res = replication_run(net, "async", 100000, 200, f"cp{cp}-{i}",
                                      checkpoint_s=cp, crash_at_s=crash_at)
                c = res["crash"]
                lost = c["issued"] - res["replica"]["last_seq"]
                ctx.add(kind="rpo", checkpoint_s=cp, run=i + 1, crash_at_s=crash_at,
                        issued=c["issued"], replica_last_seq=res["replica"]["last_seq"],
                        acked=c["acked"], lost_writes=lost, rpo_s=round(c["rpo_s"], 4))
    report(ctx, targets, target_mb)


def report(ctx, targets, target_mb) -> None:
    plt = pyplot()

    df = pd.DataFrame(ctx.rows)
    t = df[df["kind"] == "target"]
    down = t["downtime_ms"]
    scale = "" if target_mb == 100 else f" (scaled: {target_mb:g} MB of state, not 100 MB)"
    ctx.claim("downtime", "live migration downtime: \"tens to hundreds of milliseconds\"; "
              "target: pre-copy downtime at most 200 ms at 100 Mbit/s, 20 ms RTT, 100 MB of "
              "state dirtied at 10 MB/s", TARGET_DOWNTIME_MS, down.max(), "ms",
              bool(down.max() <= TARGET_DOWNTIME_MS and down.min() >= PAPER_DOWNTIME_MS[0]),
              f"client-visible gap (1 ms UDP probe, last reply from A to first from B), max of "
              f"{len(t)} runs{scale}, dirty 10 MB/s over a 1 MB writable working set; median "
              f"{down.median():.1f} ms; VM-side stop-and-copy median "
              f"{t['stop_copy_ms'].median():.1f} ms for {t['final_mb'].median():.2f} MB; "
              f"state identical (sha256) in {int(t['state_equal'].sum())}/{len(t)}")
    ctx.claim("total_time", "bulk copy then mirror changes: total migration time of about "
              "state / WAN rate", None, t["total_s"].median(), "s",
              bool(t["total_s"].median() <= 2.0 * target_mb * 8.4 / WAN_MBIT + 1.0),
              f"median signal 1 -> resumed at B for {target_mb:g} MB at {WAN_MBIT:g} Mbit/s "
              f"(state/rate = {target_mb * 8.4 / WAN_MBIT:.2f} s); holds if within 2x + 1 s")
    st = t["stretch"]
    ctx.claim("stretch", "until PE_b advertises (signal 3) traffic to the VS goes via PE_a and "
              "the tunnel (a longer path)", None, st.median(), "x",
              bool((st > 1.2).all()),
              f"median RTT client->VS via the tunnel {t['rtt_tunnel_ms'].median():.1f} ms vs "
              f"direct to B after signal 3 {t['rtt_direct_b_ms'].median():.1f} ms (before, at A: "
              f"{t['rtt_before_ms'].median():.1f} ms); requests cross the WAN core (10 ms one "
              f"way) through the tunnel, replies go from PE_b straight to the ingress PE")
    sd = df[df["kind"] == "sweep_dirty"].sort_values("dirty_mbps")
    if len(sd) > 1:
        ctx.claim("dirty_rate", "pre-copy: the more the server dirties its memory, the longer "
                  "the migration and the larger the final copy", None,
                  sd["total_s"].iloc[-1] / sd["total_s"].iloc[0], "x",
                  bool(sd["total_s"].iloc[-1] > sd["total_s"].iloc[0]
                       and sd["final_mb"].iloc[-1] > sd["final_mb"].iloc[0]),
                  "total time at the highest over the lowest dirty rate (uniform over the "
                  "image): " + ", ".join(f"{r.dirty_mbps:g} MB/s: {r.total_s:.2f} s, "
                                         f"{r.rounds} rounds, final {r.final_mb:.2f} MB, "
                                         f"stop-copy {r.stop_copy_ms:.0f} ms"
                                         for r in sd.itertuples()))
    sr = df[df["kind"] == "sweep_rate"].sort_values("wan_mbit")
    if len(sr) > 1:
        ctx.claim("wan_rate", "migration time falls as the WAN rate rises", None,
                  sr["total_s"].iloc[0] / sr["total_s"].iloc[-1], "x",
                  bool(sr["total_s"].iloc[0] > sr["total_s"].iloc[-1]),
                  "total time at the lowest over the highest rate: " + ", ".join(
                      f"{r.wan_mbit:g} Mbit/s: {r.total_s:.2f} s" for r in sr.itertuples()))
    rep = df[df["kind"] == "replication"]
    if len(rep):
        sy = rep[rep["mode"] == "sync"]
        ok = bool((sy["lat_p50_ms"] >= 0.9 * sy["rtt_ms"]).all())
        asy = rep[rep["mode"] != "sync"]
        ctx.claim("sync_latency", "synchronous replication: every write waits for the remote "
                  "site (at least one RTT); asynchronous does not",
                  None, float((sy["lat_p50_ms"] / sy["rtt_ms"]).median()), "RTT", ok
                  and bool((asy["lat_p50_ms"] < 0.5 * asy["rtt_ms"]).all()),
                  "median write latency / RTT, sync: " + ", ".join(
                      f"{r.rtt_ms:g} ms: {r.lat_p50_ms:.1f} ms" for r in sy.itertuples())
                  + "; async p50: " + ", ".join(f"{r.mode} {r.rtt_ms:g} ms: "
                                                f"{r.lat_p50_ms:.2f} ms"
                                                for r in asy.itertuples()))
    sw = df[df["kind"] == "switch"]
    if len(sw):
        ctx.claim("switch", "before the switch go synchronous: drain the pending writes, then "
                  "replicate every write synchronously", 0, sw["pending_after"].max(),
                  "writes pending", bool((sw["pending_after"] == 0).all()
                                         and (sw["replica_writes"] == sw["issued"]).all()),
                  "pending after the switch (max); drained " + ", ".join(
                      f"{r.pending_writes} writes in {r.drain_ms:.0f} ms at {r.rtt_ms:g} ms RTT"
                      for r in sw.itertuples()))
    rp = df[df["kind"] == "rpo"]
    if len(rp):
        g = rp.groupby("checkpoint_s")["rpo_s"].mean()
        ctx.claim("rpo", "periodic checkpoints + async replication: the RPO is a function of "
                  "the checkpoint interval", None, float(g.iloc[-1] / g.iloc[0]) if g.iloc[0]
                  else None, "x", bool(g.is_monotonic_increasing and len(g) > 1
                                       and (rp["rpo_s"] <= rp["checkpoint_s"] + 0.3).all()),
                  "mean RPO (crash time - issue time of the newest write the replica has) "
                  "per interval: " + ", ".join(f"{k:g} s: {v:.3f} s" for k, v in g.items())
                  + f"; lost writes per crash: {rp['lost_writes'].min()}-"
                  f"{rp['lost_writes'].max()} at 200 writes/s")

    # figures
    row, res = targets[0]
    pr = res["probe"]
    t0 = res["events"]["signal1"]
    fig, ax = plt.subplots(figsize=(11, 4))
    for who, c in (("vs_a", "tab:blue"), ("vs_b", "tab:green")):
        w = pr[pr["responder"] == who]
        ax.plot(w["t_send"] - t0, w["rtt_ms"], ".", ms=2, color=c, label=f"reply from {who}")
    lost = pr[pr["t_recv"].isna()]
    ax.plot(lost["t_send"] - t0, [0] * len(lost), "|", color="red", label="lost")
    for k in ("signal1", "signal2", "switchover", "signal3"):
        ax.axvline(res["events"][k] - t0, color="gray", ls="--")
        ax.text(res["events"][k] - t0, ax.get_ylim()[1] * 0.9, k, rotation=90, fontsize=8)
    ax.set(xlabel="s since signal 1", ylabel="client RTT to VS (ms)",
           title=f"Migration of a {row['state_mb']:g} MB VS across the WAN: downtime "
                 f"{row['downtime_ms']:.0f} ms")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure("timeline"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (kind, x, lab) in zip(axes, (("sweep_dirty", "dirty_mbps", "dirty rate (MB/s)"),
                                         ("sweep_rate", "wan_mbit", "WAN rate (Mbit/s)"),
                                         ("sweep_rtt", "rtt_ms", "WAN RTT (ms)"))):
        s = df[df["kind"] == kind].sort_values(x)
        ax.plot(s[x], s["total_s"], "o-", label="total (s)")
        ax2 = ax.twinx()
        ax2.plot(s[x], s["stop_copy_ms"], "s--", color="tab:red", label="stop-and-copy (ms)")
        ax.set(xlabel=lab, ylabel="total migration time (s)")
        ax2.set_ylabel("stop-and-copy (ms)")
    axes[0].set_title("uniform dirtying")
    fig.tight_layout()
    fig.savefig(ctx.figure("migration_time"), dpi=110)
    plt.close(fig)

    if len(rep):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m, s in rep.groupby("mode"):
            axes[0].plot(s["rtt_ms"], s["lat_p50_ms"], "o-", label=m)
        axes[0].plot(rep["rtt_ms"].unique(), rep["rtt_ms"].unique(), ":", color="gray",
                     label="1 RTT")
        axes[0].set(xlabel="RTT (ms)", ylabel="median write latency (ms)", yscale="symlog")
        axes[0].legend()
        if len(rp):
            axes[1].plot(rp["checkpoint_s"], rp["rpo_s"], "o", label="RPO per crash")
            axes[1].plot(rp["checkpoint_s"].unique(), rp["checkpoint_s"].unique(), ":",
                         color="gray", label="interval")
            axes[1].set(xlabel="checkpoint interval (s)", ylabel="RPO (s)")
            axes[1].legend()
        fig.tight_layout()
        fig.savefig(ctx.figure("replication"), dpi=110)
        plt.close(fig)
