"""Paper 004, Wackamole (section 6, Table 1, Figure 5): the interruption a client sees when
the server holding its virtual IP fails, against the cluster size, with Spread's default and
tuned timeouts; a voluntary leave; keepalived (VRRPv3) beside it on the same network.

Setup as the paper's: 2 to 12 servers and a router on a 100 Mbit/s switch, 10 VIPs, a UDP
echo server on every server answering with its own name, and a client behind the router
sending a request to one VIP every 10 ms (testbed.measure.udpecho). The fault is the
owning server's interface going down (`ip link set down` inside the server: the paper
unplugged it). Interruption = last reply from the old server to the first from the new one
(testbed.measure.udpprobe.outages). After each fault the interface comes back, the cluster
merges and rebalances, and the next fault hits whichever server then holds the VIP.

Configurations: the paper's default and tuned timeouts (fault detection / heartbeat /
discovery 5 / 2 / 7 s and 1 / 0.4 / 1.4 s); "VRRP-like" timeouts (heartbeat = advert_int,
fault = 3 x advert_int) beside keepalived at advert_int 1 s and 0.1 s; voluntary leaves
(SIGTERM: the daemon has its VIPs moved to the others, one hand-over message each, then
announces LEAVE).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pandas as pd

from testbed import Network
from testbed.failover import (DEFAULT, TUNED, comparable, keepalived, set_interface,
                              start_wackamole)
from testbed.process import listening, log_matches
from testbed.experiment import pyplot
from topologies import wackamole_lan

PAPER = "004"
TITLE = ("Wackamole N-way VIP failover: interruption vs cluster size (default and tuned "
         "timeouts), voluntary leave, keepalived beside it")

PORT = 9999
INTERVAL_MS = 10
PRE_S = 0.3  # probing before the fault
POST_S = 0.7  # probing after the fault is expected to be repaired
N_VIPS = 10
RETRIES = 2  # repeats of a sample whose probing client stalled
STALL_MS = 30  # a pause of the client this much beyond its interval spoils a sample
BALANCE_S = 0.5
MATURE_S = 0.3  # a booting cluster allocates after 0.3 s (only affects start-up)

PAPER_DEFAULT = (10.0, 12.0)
PAPER_TUNED = (2.0, 2.4)
PAPER_LEAVE_MAX_MS = 250
PAPER_LEAVE_TYPICAL_MS = 10
REFERENCE_KA = {1.0: "3.55 s", 0.1: "0.33-0.37 s"}  # issue 6, measured earlier here


ECHO: dict = {}  # (network run id, server) -> its echo server process


def echo_servers(ctx, net, servers: list) -> None:
    """Start (or restart) the echo server of every server. They are restarted when dead:
    an echo server whose reply meets the interface going down gets ENETUNREACH from
    sendto and exits (testbed.measure.udpecho does not catch it)."""
    started = []
    for s in servers:
        p = ECHO.get((net.run_id, s))
        if p is None or not p.alive:
            if p is not None:
                ctx.params["echo_restarts"] = ctx.params.get("echo_restarts", 0) + 1
            p = net[s].start([sys.executable, "-m", "testbed.measure.udpecho", "server",
                              "--port", str(PORT), "--name", s], name=f"udpecho{PORT}")
            ECHO[(net.run_id, s)] = p
            started.append((s, p))
    for s, p in started:
        p.wait_ready(listening(net[s].ns, PORT, "udp"), timeout=15)


def probe(net, client: str, vip: str, seconds: float, during, tag: str) -> pd.DataFrame:
    """Requests to vip every INTERVAL_MS for `seconds`; during() runs once they flow."""
    node = net[client]
    tag = "".join(c if c.isalnum() or c in ".-" else "_" for c in tag)
    out = os.path.join(net.log_dir, f"probe-{tag}.csv")
    p = node.start([sys.executable, "-m", "testbed.measure.udpecho", "client", "--dst", vip,
                    "--port", str(PORT), "--interval-ms", str(INTERVAL_MS), "--seconds",
                    f"{seconds:.2f}", "--out", out], name=f"probe-{tag}")
    p.wait_ready(log_matches(lambda: p, "probing"), timeout=15)
    during()
    p.wait(seconds + 30)
    return pd.read_csv(out)


def interruption(df: pd.DataFrame, old: str, t_fault: float) -> dict:
    """The switch-over: from the last reply of old to the first reply of another server
    (the paper's interruption; one probe interval, 10 ms, if no request was lost).

    stall_ms: how much the probing client itself lengthened that gap, by not sending: its
    last reply from old came more than an interval before the fault, or it paused just
    before the request that the new server answered first. The machine's other jobs can
    stall the client; such samples are flagged (and repeated)."""
    got = df[df["t_recv"].notna()].sort_values("seq").reset_index(drop=True)
    for i in range(1, len(got)):
        a, b = got.loc[i - 1], got.loc[i]
        if a["responder"] == old and b["responder"] != old:
            before = (t_fault - a["t_recv"]) * 1000 - INTERVAL_MS
            prev = df[df["seq"] == b["seq"] - 1]["t_send"]
            after = ((b["t_send"] - float(prev.iloc[0])) * 1000 - INTERVAL_MS
                     if len(prev) else 0.0)
            return {"gap_ms": round((b["t_recv"] - a["t_recv"]) * 1000, 1),
                    "new": b["responder"], "lost": int(b["seq"] - a["seq"] - 1),
                    "fault_after_last_ms": round((t_fault - a["t_recv"]) * 1000, 1),
                    "from_fault_ms": round((b["t_recv"] - t_fault) * 1000, 1),
                    "stall_ms": round(max(0.0, before, after), 1)}
    return {"gap_ms": None, "new": None, "lost": None, "fault_after_last_ms": None,
            "from_fault_ms": None, "stall_ms": None}


def failure(ctx, net, cluster, vip: str, expect_s: float, tag: str) -> dict:
    """Take the VIP's owner's interface down while probing; bring it back afterwards."""
    echo_servers(ctx, net, cluster.servers)
    old = cluster.owner(vip)
    t = {}

    def cut():
        time.sleep(PRE_S)
        set_interface(net, old, False)
        t["fault"] = time.time()  # from here on old cannot answer

    try:
        df = probe(net, "c1", vip, PRE_S + expect_s + POST_S, cut, tag)
    finally:
        set_interface(net, old, True)
    return {"old": old, **interruption(df, old, t["fault"])}


def leave(ctx, net, wk, vip: str, tag: str) -> dict:
    echo_servers(ctx, net, wk.servers)
    old = wk.owner(vip)
    t = {}

    def go():
        time.sleep(PRE_S)
        t["fault"] = time.time()
        wk.leave(old)

    try:
        df = probe(net, "c1", vip, PRE_S + POST_S, go, tag)
    finally:
        wk.start(old)
    return {"old": old, **interruption(df, old, t["fault"])}


def sample(ctx, measure, settle, kind, system, label, n, rep, bound_s, **extra) -> None:
    """One measurement, repeated (up to RETRIES times) while the probing client stalled."""
    for attempt in range(RETRIES + 1):
        res = measure(f"{label}-{n}-{rep}-{attempt}")
        settle()
        valid = res["gap_ms"] is not None and res["stall_ms"] <= STALL_MS
        add(ctx, kind, system, label, n, rep, res, bound_s, attempt=attempt, valid=valid,
            **extra)
        if valid:
            return


def run_wackamole(ctx, net, n: int, label: str, timeouts, reps: int, leaves: int) -> None:
    if reps + leaves == 0:
        return
    servers = wackamole_lan.server_names(n)
    vip = wackamole_lan.vips(N_VIPS)[0]
    wk = start_wackamole(net, servers, wackamole_lan.vips(N_VIPS), timeouts=timeouts,
                         balance_s=BALANCE_S, mature_s=MATURE_S)
    settle_s = 3 * timeouts.discovery_s + 10
    t = {"fault_s": timeouts.fault_s, "heartbeat_s": timeouts.heartbeat_s,
         "discovery_s": timeouts.discovery_s}

    def settle():
        wk.wait_stable(settle_s, balanced=True)

    try:
        settle()
        for r in range(reps):
            sample(ctx, lambda tag: failure(ctx, net, wk, vip, timeouts.fault_s, tag), settle,
                   "failure", "wackamole", label, n, r, timeouts.fault_s, **t)
        for r in range(leaves):
            sample(ctx, lambda tag: leave(ctx, net, wk, vip, f"leave-{tag}"), settle,
                   "leave", "wackamole", f"leave ({label})", n, r, None, **t)
        drops = {s: (wk.status(s) or {}).get("drops", {}) for s in servers}
        ctx.params.setdefault("wackamole_drops", {})[f"{label}-{n}"] = drops
    finally:
        wk.stop()


def run_keepalived(ctx, net, n: int, advert: float, reps: int) -> None:
    if reps == 0:
        return
    servers = wackamole_lan.server_names(n)
    vip = wackamole_lan.vips(N_VIPS)[0]
    # without preemption a recovered master stays backup: nothing moves after a repair
    ka = keepalived.start(net, servers, wackamole_lan.vips(N_VIPS), advert_int=advert,
                          preempt=False)
    label = f"keepalived {advert:g} s"
    inst = next(i for i in ka.instances if vip in i.vips)

    def measure(tag):
        old = ka.owner(vip)
        backup = max((s for s in servers if s != old), key=lambda s: inst.priorities[s])
        down_s = ka.opts.master_down_s(inst.priorities[backup])
        res = failure(ctx, net, ka, vip, down_s, f"ka{tag}")
        res["master_down_s"] = round(down_s, 3)
        return res

    try:
        for r in range(reps):
            sample(ctx, measure, lambda: ka.wait_ready(20, any_owner=True), "failure",
                   "keepalived", label, n, r, None, advert_int=advert)
    finally:
        ka.stop()


def add(ctx, kind, system, label, n, rep, res, bound_s, **extra) -> None:
    row = {"kind": kind, "system": system, "config": label, "servers": n, "rep": rep,
           **res, "detection_s": bound_s, **extra}
    ctx.add(**row)
    gap = "no switch-over seen" if res["gap_ms"] is None else \
        f"{res['gap_ms']:.0f} ms ({res['lost']} lost)"
    note = "" if row.get("valid", True) else \
        f"  [probe stalled {res['stall_ms']} ms: not counted, repeated]"
    ctx.progress(f"{n:2} servers, {label:22} #{rep}: {res['old']} -> {res['new']}: {gap}{note}")


def run(ctx) -> None:
    sizes = ctx.pick(smoke=[2], quick=[2, 4, 8], full=list(range(2, 13)))
    # repeats per cluster size: (tuned, default, leaves, vrrp-like 1 s, keepalived 1 s,
    # vrrp-like 0.1 s, keepalived 0.1 s)
    reps = ctx.pick(smoke=(1, 0, 1, 0, 0, 1, 1), quick=(2, 1, 2, 2, 2, 2, 2),
                    full=(5, 3, 5, 4, 4, 4, 4))
    tuned, default, leaves, cmp1, ka1, cmp01, ka01 = reps
    ctx.params.update(sizes=sizes, vips=N_VIPS, interval_ms=INTERVAL_MS, rate_mbit=100,
                      repeats=dict(zip(("tuned", "default", "leave", "vrrp_like_1s",
                                        "keepalived_1s", "vrrp_like_0.1s", "keepalived_0.1s"),
                                       reps)),
                      balance_s=BALANCE_S, mature_s=MATURE_S, default=DEFAULT.as_dict(),
                      tuned=TUNED.as_dict(), vrrp_like_1s=comparable(1.0).as_dict(),
                      vrrp_like_01s=comparable(0.1).as_dict(),
                      keepalived_available=keepalived.available(),
                      loadavg_start=os.getloadavg(), cpus=os.cpu_count())
    for n in sizes:
        with Network(wackamole_lan.build(servers=n, vips=N_VIPS, rate_mbit=100)) as net:
            ctx.note_network(net)
            echo_servers(ctx, net, wackamole_lan.server_names(n))
            run_wackamole(ctx, net, n, "tuned", TUNED, tuned, leaves)
            run_wackamole(ctx, net, n, "default", DEFAULT, default, 0)
            run_wackamole(ctx, net, n, "VRRP-like 1 s", comparable(1.0), cmp1, 0)
            run_wackamole(ctx, net, n, "VRRP-like 0.1 s", comparable(0.1), cmp01, 0)
            if keepalived.available():
                run_keepalived(ctx, net, n, 1.0, ka1)
                run_keepalived(ctx, net, n, 0.1, ka01)
    ctx.params["loadavg_end"] = os.getloadavg()
    claims(ctx)
    plot(ctx)


def _gaps(df, config, kind="failure"):
    """The valid samples' interruptions (s), and how many samples were attempted (each
    counted once: repeats of a stalled probe are the same sample)."""
    g = df[(df["config"] == config) & (df["kind"] == kind)]
    ok = g[g["valid"].astype(bool)]
    return [x / 1000 for x in ok["gap_ms"]], len(g.drop_duplicates(["servers", "rep"]))


def claims(ctx) -> None:
    df = pd.DataFrame(ctx.rows)
    for label, t, paper in (("tuned", TUNED, PAPER_TUNED), ("default", DEFAULT, PAPER_DEFAULT)):
        gaps, n = _gaps(df, label)
        if not n:
            continue
        worst = max(gaps) if gaps else None
        ok = len(gaps) == n and worst <= t.fault_s + 0.1
        extra = (" and below Wackamole's 2 s" if label == "tuned" else "")
        if label == "tuned":
            ok = ok and worst < 2.0
        ctx.claim(f"{label}_interruption",
                  f"{label.capitalize()} timeouts (fault {t.fault_s:g} s, heartbeat "
                  f"{t.heartbeat_s:g} s, discovery {t.discovery_s:g} s): Wackamole's "
                  f"interruption was {paper[0]:g}-{paper[1]:g} s; ours at most the detection "
                  f"timeout + 100 ms{extra}",
                  paper[1], worst, "s (worst)", ok,
                  f"{len(gaps)} of {n} failures switched over; median "
                  f"{statistics.median(gaps) if gaps else float('nan'):.3f} s, worst "
                  f"{worst if worst is not None else float('nan'):.3f} s against a bound of "
                  f"{t.fault_s + 0.1:.1f} s. The paper's 10-12 / 2-2.4 s add Spread's "
                  f"discovery timeout to the detection; this membership proposes the new view "
                  f"as soon as a failure is detected")
    gaps, n = _gaps(df, "leave (tuned)", "leave")
    if n:
        worst = max(gaps) * 1000 if gaps else None
        med = statistics.median(gaps) * 1000 if gaps else None
        ctx.claim("leave_max", "A voluntary leave interrupts at most 250 ms",
                  PAPER_LEAVE_MAX_MS, worst, "ms (worst)", len(gaps) == n and worst <= 250,
                  f"{len(gaps)} of {n} leaves switched over; SIGTERM: the daemon asks the "
                  f"representative to move its VIPs (each changes hands with one RELEASED "
                  f"message), then announces LEAVE")
        ctx.claim("leave_typical", "Most voluntary leaves interrupt about 10 ms (one 10 ms "
                  "probe interval: no request lost)", PAPER_LEAVE_TYPICAL_MS, med,
                  "ms (median)", med is not None and med <= 2 * INTERVAL_MS + 5,
                  f"median of {len(gaps)}; holds if at most one 10 ms request is lost "
                  f"(gap <= {2 * INTERVAL_MS + 5} ms)")
    for adv, label in ((1.0, "VRRP-like 1 s"), (0.1, "VRRP-like 0.1 s")):
        ours, n1 = _gaps(df, label)
        ka, n2 = _gaps(df, f"keepalived {adv:g} s")
        if not (n1 and n2):
            continue
        mo = statistics.median(ours) if ours else None
        mk = statistics.median(ka) if ka else None
        # a failure falls at a random moment of the heartbeat (advert) interval, which
        # spreads each interruption uniformly over one interval: with a few failures a side,
        # two medians of the same timers differ by up to ~half an interval by chance alone
        ok = bool(ours and ka and len(ours) == n1 and mo <= mk + adv / 2)
        ctx.claim(f"vs_keepalived_{adv:g}s",
                  f"At comparable timers (heartbeat {adv:g} s, fault {3 * adv:g} s vs VRRP "
                  f"advert_int {adv:g} s) no longer than keepalived's interruption in the same "
                  f"run", None, mo, "s (median, ours)", ok,
                  f"ours: median {mo if mo is not None else float('nan'):.3f} s over "
                  f"{len(ours)}/{n1}; keepalived: median "
                  f"{mk if mk is not None else float('nan'):.3f} s over {len(ka)}/{n2} "
                  f"(reference measured earlier here: {REFERENCE_KA[adv]}). Holds if ours is "
                  f"at most keepalived's + half a heartbeat ({adv / 2:g} s): where in the "
                  f"heartbeat interval a failure falls spreads each interruption over one "
                  f"interval, on both sides")


def plot(ctx) -> None:
    plt = pyplot()

    df = pd.DataFrame(ctx.rows)
    fig, ax = plt.subplots(figsize=(11.5, 5.5))
    ax.axhspan(*PAPER_DEFAULT, color="tab:red", alpha=0.08, label="paper: default Spread")
    ax.axhspan(*PAPER_TUNED, color="tab:blue", alpha=0.08, label="paper: tuned Spread")
    ax.axhline(PAPER_LEAVE_MAX_MS / 1000, color="tab:green", ls=":", lw=1,
               label="paper: voluntary leave, at most")
    styles = {"default": ("tab:red", "o-"), "tuned": ("tab:blue", "o-"),
              "VRRP-like 1 s": ("tab:purple", "s-"), "keepalived 1 s": ("tab:purple", "^--"),
              "VRRP-like 0.1 s": ("tab:orange", "s-"), "keepalived 0.1 s": ("tab:orange", "^--"),
              "leave (tuned)": ("tab:green", "D-")}
    for config, (color, fmt) in styles.items():
        g = df[(df["config"] == config) & df["valid"].astype(bool)] if len(df) else df
        if g.empty:
            continue
        s = g.groupby("servers")["gap_ms"].agg(["mean", "min", "max"]) / 1000
        name = f"ours, {config}" if not config.startswith("keepalived") else config
        ax.errorbar(s.index, s["mean"], yerr=[s["mean"] - s["min"], s["max"] - s["mean"]],
                    fmt=fmt, color=color, capsize=3, label=name)
    ax.set(yscale="log", xlabel="servers in the cluster", ylabel="interruption (s)",
           title="VIP failover: client-seen interruption (mean, min-max), 10 VIPs, "
                 "100 Mbit/s LAN")
    ax.set_xticks(sorted(df["servers"].unique()) if len(df) else [])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(ctx.figure("interruption_vs_cluster_size"), dpi=110)
    plt.close(fig)
