"""HANet (paper 002): the failover time and its parts, and a web server's throughput and
latency over its public link, over the private Fast Ethernet link and over the USB-like link
after a takeover, with and without the daemon.

Part 1, failover breakdown. s1's public link is cut (both ends down) at a random phase of
s1's 100 ms detector tick (stratified: the i-th of n failures falls in the i-th n-th of the
tick, shuffled), and restored once s2 carries s1's packets. Each phase comes from the daemons'
own timestamps on the host's shared clock: Td (fault -> the tick that saw it), Tsrv (that tick
-> the TAKEOVER request sent), Tmid (sent -> received by the sibling's responder), Tsib
(received -> the sibling's first gratuitous ARP sent). A UDP request every 10 ms from a LAN
client (c1) and from a client behind the router (w1) to s1's service address gives the
interruption a client sees.

Part 2, web workload. nginx (Debian's; Python's threaded http.server where it is absent) on
s1 serves a Surge-like file set (1000 files, lognormal body and Pareto tail sizes capped at
1 MB, Zipf popularity) to closed-loop keep-alive users spread over the five LAN clients;
think times are set so that the most users offer 40 Mbit/s (40 % of the public link, over
three times the USB link). The daemons run SCHED_FIFO (rt_priority 10, as keepalived can):
an in-kernel module is not delayed by other jobs either. Conditions: `off` (no daemon, the
NIC's own address), `on` (daemon running, every link up), `fe` (public link cut: through s2
over the private 100 Mbit/s link), `usb` (public and private Ethernet cut: over the 12 Mbit/s
link). Every condition replays the
same requests (users' picks and think times are seeded by user), so latencies are compared
request by request; conditions alternate in order across repeats. A last run fails s1's
public link under the largest load and restores it 2 s later: no request may fail.
"""

from __future__ import annotations

import os
import random
import shutil
import time

from testbed import Network
from testbed.failover import hanet
from testbed.failover import hanet_web as web
from testbed.experiment import pyplot
from topologies import hanet as topo

PAPER = "002"
TITLE = ("HANet: failover time (Td, Tsrv, Tmid, Tsib) and web service over the public, "
         "private Fast Ethernet and USB links")

TICK_MS = 100
RT_PRIORITY = 10  # the daemons run SCHED_FIFO, as an in-kernel module effectively does
TARGET_MBIT = 40.0  # offered load at the largest number of users
CONDITIONS = ("off", "on", "fe", "usb")


def _wait_until(t: float) -> None:
    """Sleep until wall-clock t (the fault's chosen phase: a schedule, not a readiness wait)."""
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(left if left > 0.002 else 0)


# part 1 ---------------------------------------------------------------------------------

def failovers(ctx, net, n: int) -> dict:
    h = hanet.start(net, topo.SERVICE_IPS, tick_ms=TICK_MS, rt_priority=RT_PRIORITY)
    sip = topo.SERVICE_IPS["s1"]
    pub = hanet.link_of(net, "s1", "s1-pub")
    h.wait_active("s1", "pub")
    echo = web.Echo(net["s1"], sip)
    probes = {"lan": web.Probe(net["c1"], sip), "remote": web.Probe(net["w1"], sip)}
    ipr, nic = net["s1"].ipr(), net["s1"].ifindex("s1-pub")
    rng = random.Random(2)
    slots = list(range(n))
    rng.shuffle(slots)
    faults = []
    try:
        for i, slot in enumerate(slots):
            st = h.status("s1")
            epoch, tick = st["tick_epoch"], st["tick_ms"] / 1000
            phase = (slot + rng.random()) / n * tick
            k = int((time.time() + 0.02 - epoch) / tick) + 1
            _wait_until(epoch + k * tick + phase)
            # the NIC fails: s1's end first, with one netlink request timed on both sides,
            # then the switch's end through the Link (a cable cut; it keeps the link's state)
            t0 = time.time()
            ipr.link("set", index=nic, state="down")
            t1 = time.time()
            pub.set(up=False)
            h.wait_active("s1", "priv", timeout=5)
            h.wait_serving("s2", "s1", timeout=5)
            time.sleep(0.3)  # the probes see replies through s2
            t_up = time.time()
            pub.set(up=True)
            h.wait_active("s1", "pub", timeout=5)
            h.wait_serving("s2", None, timeout=5)
            time.sleep(0.3)
            # IFF_RUNNING goes at the start of the request (the rest is the kernel tearing
            # the interface down): the fault is at t0, within set_ms
            t_fault = t0
            faults.append({"i": i, "t_fault": t_fault, "set_ms": (t1 - t0) * 1000,
                           "phase_ms": ((t_fault - epoch) % tick) * 1000, "t_up": t_up})
            if (i + 1) % 10 == 0 or i + 1 == n:
                ctx.progress(f"failure {i + 1}/{n}")
    finally:
        frames = {k: p.stop() for k, p in probes.items()}
        echo.stop()
    fo = [f for f in h.failovers("s1") if f["kind"] == "failover"]
    fb = [f for f in h.events("s1", "switch") if f.get("kind") == "failback"]
    acks = {a["req"]: a for a in h.events("s1", "ack")}
    h.stop()
    rows = []
    for f in faults:
        # the failover that followed this fault, and the failback that followed its repair
        d = next((x for x in fo if f["t_fault"] <= x["t_tick"] < f["t_up"]), None)
        b = next((x for x in fb if x["t_tick"] >= f["t_up"]), None)
        if d is None or d["t_sib_done"] is None:
            raise RuntimeError(f"failure {f['i']}: no acknowledged failover in the daemon's log")
        td = (d["t_tick"] - f["t_fault"]) * 1000
        row = {"kind": "failover", "i": f["i"], "phase_ms": f["phase_ms"], "td_ms": td,
               "tsrv_ms": d["tsrv_ms"], "tmid_ms": d["tmid_ms"], "tsib_ms": d["tsib_ms"],
               "tack_ms": d["tack_ms"], "attempts": d["attempts"],
               "total_ms": (d["t_sib_done"] - f["t_fault"]) * 1000, "set_ms": f["set_ms"],
               "interruption_lan_ms": web.interruption_ms(frames["lan"], f["t_fault"]),
               "interruption_remote_ms": web.interruption_ms(frames["remote"], f["t_fault"])}
        rows.append(row)
        ctx.add(**row)
        if b is not None:
            a = acks.get(b.get("req"), {})
            ctx.add(kind="failback", i=f["i"], td_ms=(b["t_tick"] - f["t_up"]) * 1000,
                    tsrv_ms=(b["t_sent"] - b["t_tick"]) * 1000,
                    tmid_ms=(a["t_sib_recv"] - a["t_sent"]) * 1000 if a else None,
                    tsib_ms=(a["t_sib_done"] - a["t_sib_recv"]) * 1000 if a else None,
                    attempts=a.get("attempts"),
                    interruption_lan_ms=web.interruption_ms(frames["lan"], f["t_up"]),
                    interruption_remote_ms=web.interruption_ms(frames["remote"], f["t_up"]))
    return {"rows": rows}


# part 2 ---------------------------------------------------------------------------------

def _paired(df, base, t_from: float, t_from_base: float) -> tuple:
    """Requests both runs made (same user, same index: the same file) and completed after
    their run's warm-up: (median of the per-request latency ratios df/base, ratio of the
    mean latencies, pairs). The median ratio is robust to the odd request that another job
    on the machine delayed; the mean ratio is the paper's measure."""
    def keyed(d, t0):
        d = d[d["error"] == ""].sort_values("t_start").copy()
        d["k"] = d.groupby("user").cumcount()
        d = d[d["t_start"] >= t0]
        return d.set_index(["user", "k"])["latency_ms"]

    a, b = keyed(df, t_from), keyed(base, t_from_base)
    common = a.index.intersection(b.index)
    if len(common) == 0:
        return float("nan"), float("nan"), 0
    x, y = a.loc[common], b.loc[common]
    return float((x / y).median()), float(x.mean() / y.mean()), int(len(common))


def web_runs(ctx, net, users_list, seconds, repeats) -> list:
    root = os.path.join(net.log_dir, "www")
    manifest = web.make_files(root, n=1000, seed=1)
    mean_b = web.mean_bytes(manifest)
    think_s = max(users_list) * mean_b * 8 / (TARGET_MBIT * 1e6)
    _srv, kind = web.start_server(net["s1"], root)
    ctx.params.update(http_server=kind, files=1000, mean_bytes=round(mean_b),
                      think_s=round(think_s, 3), target_mbit=TARGET_MBIT)
    ctx.progress(f"web: {kind}, mean {mean_b / 1000:.1f} KB per request, think {think_s:.2f} s")
    clients = [net[c] for c in topo.client_names(5)]
    pub, priv = hanet.link_of(net, "s1", "s1-pub"), hanet.link_of(net, "s1", "s1-priv")
    out = []
    h = None
    try:
        for rep in range(repeats):
            for users in users_list:
                # on and fe side by side in both orders, so slow drifts of the machine's
                # other load hit both alike
                order = CONDITIONS if rep % 2 == 0 else tuple(reversed(CONDITIONS))
                runs = {}
                for cond in order:
                    if cond == "off":
                        if h is not None:
                            h.stop()
                            h = None
                        dst = topo.PUBLIC_IPS["s1"]
                    else:
                        if h is None:
                            h = hanet.start(net, topo.SERVICE_IPS, tick_ms=TICK_MS,
                                            rt_priority=RT_PRIORITY)
                        dst = topo.SERVICE_IPS["s1"]
                        if cond == "on":
                            pub.set(up=True); priv.set(up=True)
                            h.wait_active("s1", "pub")
                            h.wait_serving("s2", None)
                        elif cond == "fe":
                            pub.set(up=False); priv.set(up=True)
                            h.wait_active("s1", "priv")
                            h.wait_serving("s2", "s1")
                        else:
                            pub.set(up=False); priv.set(up=False)
                            h.wait_active("s1", "usb")
                            h.wait_serving("s2", "s1")
                    daemons = list(h.procs.values()) if h is not None else []
                    cpu0, t0 = _cpu_s(daemons), time.monotonic()
                    df = web.run_load(clients, dst, users, seconds, think_s, manifest, seed=rep + 1,
                                      tag=f"{cond}-{users}-{rep}")
                    cpu_pct = 100 * (_cpu_s(daemons) - cpu0) / (time.monotonic() - t0)
                    t_from = df.attrs["start"] + df.attrs["ramp_s"] + 1.0
                    s = web.summarize(df, t_from, df.attrs["end"])
                    s["daemon_cpu_pct"] = cpu_pct if daemons else None
                    runs[cond] = (df, s, t_from)
                    ctx.progress(f"{cond:3} {users:4} users: {s['throughput_mbit']:6.2f} Mbit/s, "
                                 f"latency mean {s['latency_mean_ms']:8.1f} ms, median "
                                 f"{s['latency_median_ms']:7.1f} ms, {s['requests']} requests, "
                                 f"{s['errors']} errors")
                pub.set(up=True); priv.set(up=True)
                if h is not None:
                    h.wait_active("s1", "pub")
                    h.wait_serving("s2", None)
                for cond, (df, s, t_from) in runs.items():
                    vs_on = _paired(df, runs["on"][0], t_from, runs["on"][2])
                    vs_off = _paired(df, runs["off"][0], t_from, runs["off"][2])
                    row = {"kind": "web", "condition": cond, "users": users, "rep": rep,
                           **{k: (round(v, 4) if v is not None else None)
                              for k, v in s.items()},
                           "latency_vs_on": vs_on[0], "latency_mean_vs_on": vs_on[1],
                           "latency_vs_off": vs_off[0], "latency_mean_vs_off": vs_off[1],
                           "pairs_on": vs_on[2], "seconds": seconds, "think_s": think_s}
                    ctx.add(**row)
                    out.append(row)
        # a takeover and a failback under the largest load: no request may fail
        users = max(users_list)
        if h is None:
            h = hanet.start(net, topo.SERVICE_IPS, tick_ms=TICK_MS, rt_priority=RT_PRIORITY)
        h.wait_active("s1", "pub")
        marks = {}

        def during(start):
            ramp = min(think_s, seconds / 4)
            _wait_until(start + ramp + 0.5)
            marks["fault"] = time.time()
            pub.set(up=False)
            h.wait_active("s1", "priv")
            h.wait_serving("s2", "s1")
            marks["switched"] = time.time()
            _wait_until(marks["fault"] + 2.0)
            marks["repair"] = time.time()
            pub.set(up=True)
            h.wait_active("s1", "pub")

        df = web.run_load(clients, topo.SERVICE_IPS["s1"], users, seconds, think_s, manifest,
                          seed=1, tag=f"takeover-{users}", during=during)
        # caught by the outage: in flight at some moment between the fault and the takeover
        caught = df[(df["t_start"] < marks["switched"]) & (df["t_end"] > marks["fault"])]
        row = {"kind": "web_takeover", "condition": "takeover", "users": users,
               "requests": int(len(df)), "errors": int((df["error"] != "").sum()),
               "outage_ms": (marks["switched"] - marks["fault"]) * 1000,
               "in_flight_at_fault": int(len(caught)),
               "in_flight_failed": int((caught["error"] != "").sum()),
               "max_latency_in_flight_ms": float(caught["latency_ms"].max())
               if len(caught) else None, "seconds": seconds}
        ctx.add(**row)
        out.append(row)
        ctx.progress(f"takeover under {users} users: {row['requests']} requests, "
                     f"{row['errors']} failed, {row['in_flight_at_fault']} in flight at the fault")
    finally:
        if h is not None:
            h.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


# claims and figures -----------------------------------------------------------------------

def _cpu_s(procs) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return total


def _ratios(rows, cond, users, key) -> list:
    return [r[key] for r in rows if r["condition"] == cond and r["users"] == users
            and r.get(key) == r.get(key)]


def _geo(ratios) -> float:
    import math

    return math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else math.nan


def _fmt_pct(ratios) -> str:
    return ", ".join(f"{100 * (x - 1):+.1f} %" for x in ratios) or "none"


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def run(ctx) -> None:
    n_fail = ctx.pick(smoke=3, quick=20, full=200)
    users_list = ctx.pick(smoke=[40], quick=[100, 400], full=[50, 100, 200, 300, 400])
    seconds = ctx.pick(smoke=4, quick=8, full=30)
    repeats = ctx.pick(smoke=1, quick=2, full=4)
    ctx.params.update(failures=n_fail, tick_ms=TICK_MS, users=users_list, run_seconds=seconds,
                      repeats=repeats, topology="topologies/hanet.py defaults",
                      fault="s1-sw link down (both ends), restored after the takeover")
    with Network(topo.build()) as net:
        ctx.note_network(net)
        ctx.progress(f"part 1: {n_fail} failures at random phase of the {TICK_MS} ms tick")
        fo = failovers(ctx, net, n_fail)["rows"]
        ctx.progress("part 2: web workload")
        wb = web_runs(ctx, net, users_list, seconds, repeats)
    claims(ctx, fo, wb, max(users_list))
    plot(ctx)


def claims(ctx, fo, wb, top_users) -> None:
    n = len(fo)
    td = _mean(fo, "td_ms")
    rest = [r["tsrv_ms"] + r["tmid_ms"] + r["tsib_ms"] for r in fo]
    rest_mean = sum(rest) / len(rest)
    parts = {k: _mean(fo, k) for k in ("tsrv_ms", "tmid_ms", "tsib_ms")}
    ctx.claim("td_mean", "Since fault detection is triggered every 100ms in HANet, the average "
              "value of Td can be regarded as 50 ms", 50, td, "ms", abs(td - 50) <= 10,
              f"mean of {n} failures injected at stratified random phases of the daemon's "
              f"100 ms tick (carrier method); holds within 10 ms")
    share = 100 * td / (td + rest_mean)
    ctx.claim("detection_dominates", "in our current implementation, the failover time is "
              "dominated by the fault detection time", None, share, "% of failover time",
              share >= 90,
              f"Td / (Td + Tsrv + Tmid + Tsib), means over {n} failures; holds at 90 % or more")
    ctx.claim("rest_of_failover", "the total failover time is about 0.66us plus Td", 0.00066,
              rest_mean, "ms (Tsrv + Tmid + Tsib)", rest_mean <= 10 * 0.00066,
              f"Tsrv {parts['tsrv_ms']:.2f} + Tmid {parts['tmid_ms']:.2f} + Tsib "
              f"{parts['tsib_ms']:.2f} ms (means over {n} failures). Holds within 10x of the "
              f"paper's number: it does not. This daemon runs in user space (Python, netlink "
              f"route and neighbour requests, sysctl writes, a UDP request between namespaces) "
              f"and takes milliseconds where the paper's in-kernel module took 0.66 us as "
              f"printed; it is still small next to Td, which dominates (detection_dominates)")
    worst = max(max(r["interruption_lan_ms"], r["interruption_remote_ms"]) for r in fo)
    lan = _mean(fo, "interruption_lan_ms")
    ctx.claim("interruption_bound", "Interruption at most the detection timeout plus 100 ms "
              "(issue 6 target)", None, worst, "ms (worst)", worst <= TICK_MS + 100,
              f"longest gap in the replies to a UDP request every 10 ms, from c1 on the LAN "
              f"and w1 behind the router, over {n} failures (mean {lan:.1f} ms on the LAN)")

    wb, takeover = [r for r in wb if r["kind"] == "web"], [r for r in wb
                                                            if r["kind"] == "web_takeover"]

    def at(cond):
        rows = [r for r in wb if r["condition"] == cond and r["users"] == top_users]
        return {k: _mean(rows, k) for k in ("throughput_mbit", "latency_mean_ms",
                                             "latency_median_ms",
                                             "latency_vs_on", "latency_vs_off",
                                             "latency_mean_vs_on", "latency_mean_vs_off",
                                             "daemon_cpu_pct", "errors")}

    on, off, fe, usb = at("on"), at("off"), at("fe"), at("usb")
    # latency: per repeat, the ratio of the mean latencies of the same requests (the paper's
    # measure is the mean); across repeats, their geometric mean and their range
    fe_r = _ratios(wb, "fe", top_users, "latency_mean_vs_on")
    on_r = _ratios(wb, "on", top_users, "latency_mean_vs_off")
    fe_lo = _ratios(wb, "fe", min(r["users"] for r in wb), "latency_mean_vs_on")
    on_lo = _ratios(wb, "on", min(r["users"] for r in wb), "latency_mean_vs_off")
    inc = 100 * (_geo(fe_r) - 1)
    lo_users = min(r["users"] for r in wb)
    noise = 100 * max(abs(x - 1) for x in on_r) if on_r else float("nan")
    ctx.claim("fe_latency", "packet transmission through the private Ethernet link is only "
              "about 1% slower than the original case when the load of the server is heavy "
              "(e.g., 400 users)", 1, inc, "% more latency", inc <= 5 and noise <= 5,
              f"{top_users} users; mean latency of the same requests (same user, same file) "
              f"through s2 over the private 100 Mbit/s link against the public link, daemon on in "
              f"both: {_fmt_pct(fe_r)} per repeat (geometric mean above). Holds if at most 5 % "
              f"and if this machine can tell 5 % apart: between two identical paths (daemon on "
              f"vs off) the same measure gives {_fmt_pct(on_r)} at {top_users} users and "
              f"{_fmt_pct(on_lo)} at {lo_users} users (private link there: {_fmt_pct(fe_lo)}), "
              f"from scheduling noise on {ctx.machine}; with noise above 5 % the claim is "
              f"neither shown nor refuted here")
    ratio = 100 * fe["throughput_mbit"] / on["throughput_mbit"]
    ctx.claim("fe_throughput", "the server using a Fast Ethernet link does not incur throughput "
              "degradation", None, ratio, "% of the public link's throughput", ratio >= 97,
              f"{top_users} users offering {TARGET_MBIT:g} Mbit/s; goodput of response bodies "
              f"(means over the repeats); holds at 97 % or more")
    cap_lo = 0.85 * 12 * 1448 / 1514
    ctx.claim("usb_cap", "the bandwidth of USB link is only 12Mbps, which limits the server "
              "throughput", 12, usb["throughput_mbit"], "Mbit/s",
              cap_lo <= usb["throughput_mbit"] <= 12,
              f"{top_users} users offering {TARGET_MBIT:g} Mbit/s over the 12 Mbit/s link; holds "
              f"if goodput is at most 12 Mbit/s and at least 85 % of the link's TCP payload rate "
              f"({cap_lo:.1f} Mbit/s: the link, not the load, is what limits)")
    usb_r = _ratios(wb, "usb", top_users, "latency_mean_vs_on")
    lr = _geo(usb_r)
    ctx.claim("usb_latency", "owing to the low bandwidth, the latency of the USB link is clearly "
              "higher than the other cases", None, lr, "x the public link's latency", lr >= 2,
              f"{top_users} users, mean latency of the same requests ({usb['latency_mean_ms']:.0f}"
              f" vs {on['latency_mean_ms']:.1f} ms); holds at twice or more")
    tr = 100 * on["throughput_mbit"] / off["throughput_mbit"]
    cpu = on["daemon_cpu_pct"]
    ctx.claim("no_overhead", "adding HANet code into the Linux kernel does not incur visible "
              "performance degradation", None, cpu, "% of a core (both daemons)",
              tr >= 97 and cpu <= 1,
              f"{top_users} users over the public link: throughput {tr:.1f} % of the server "
              f"without HANet; the daemons (100 ms ticks, carrier checks) used {cpu:.2f} % of "
              f"one core between them during the run. Holds if throughput is at least 97 % and "
              f"the daemons take at most 1 % of a core. Mean latency of the same requests, on "
              f"vs off: {_fmt_pct(on_r)} per repeat at {top_users} users, {_fmt_pct(on_lo)} at "
              f"{lo_users} users: the machine's run-to-run noise (see fe_latency)")
    errors = sum(r["errors"] for r in wb + takeover)
    caught = sum(r["in_flight_at_fault"] for r in takeover)
    total = sum(r["requests"] for r in wb + takeover)
    ctx.claim("no_failed_requests", "a network-failed server will not lose any requests which "
              "are being processed", 0, errors, "failed requests", errors == 0 and caught > 0,
              f"{total} HTTP requests over every run; in the takeover run s1's public link "
              f"failed under {top_users} users and came back 2 s later, {caught} requests were "
              f"in flight between the fault and the takeover (they waited for TCP to "
              f"retransmit); holds if none failed (and some were caught)")


def plot(ctx) -> None:
    plt = pyplot()
    import pandas as pd

    df = pd.DataFrame(ctx.rows)
    fo = df[df["kind"] == "failover"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    parts = ["td_ms", "tsrv_ms", "tmid_ms", "tsib_ms"]
    labels = ["Td", "Tsrv", "Tmid", "Tsib"]
    means = [fo[p].mean() for p in parts]
    ax[0].bar(labels, means, color=["tab:red", "tab:blue", "tab:green", "tab:orange"])
    ax[0].boxplot([fo[p] for p in parts], positions=range(4), widths=0.3)
    ax[0].set_xticks(range(4), labels)
    for i, m in enumerate(means):
        ax[0].text(i, m, f"{m:.2f} ms", ha="center", va="bottom", fontsize=8)
    ax[0].axhline(50, ls=":", color="gray", label="paper: Td mean 50 ms")
    ax[0].set(yscale="log", ylabel="ms (log)", title=f"Failover parts, {len(fo)} failures")
    ax[0].legend(fontsize=8)
    ax[1].scatter(fo["phase_ms"], fo["td_ms"], s=12, label="measured Td")
    ax[1].plot([0, TICK_MS], [TICK_MS, 0], ":", color="gray", label="tick - phase")
    ax[1].set(xlabel="fault time after a detector tick (ms)", ylabel="Td (ms)",
              title="Td against the fault's phase")
    ax[1].legend(fontsize=8)
    for col, name in (("interruption_lan_ms", "c1 (LAN)"), ("interruption_remote_ms",
                                                            "w1 (behind r1)")):
        ax[2].hist(fo[col].dropna(), bins=20, alpha=0.6, label=name)
    fb = df[df["kind"] == "failback"]
    if len(fb):
        ax[2].hist(fb["interruption_lan_ms"].dropna(), bins=20, alpha=0.6,
                   label="c1 at failback")
    ax[2].axvline(TICK_MS + 100, ls=":", color="red", label="target: tick + 100 ms")
    ax[2].set(xlabel="longest gap in 10 ms UDP replies (ms)", ylabel="failures",
              title="Client-visible interruption")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure("failover_breakdown"), dpi=110)
    plt.close(fig)

    wb = df[df["kind"] == "web"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    if wb["users"].nunique() == 1:  # one load level: bars
        g = wb.groupby("condition").mean(numeric_only=True).reindex(list(CONDITIONS))
        ax[0].bar(g.index, g["throughput_mbit"])
        ax[1].bar(g.index, g["latency_mean_ms"])
        ax[1].set_yscale("log")
        ax[0].set(ylabel="throughput (Mbit/s)", title=f"{int(wb['users'].iloc[0])} users")
        ax[1].set(ylabel="mean latency (ms, log)", title="User-perceived latency")
        fig.tight_layout()
        fig.savefig(ctx.figure("web"), dpi=110)
        plt.close(fig)
        return
    names = {"off": "no HANet (public)", "on": "HANet, public link", "fe": "HANet, private FE",
             "usb": "HANet, USB-like 12 Mbit/s"}
    for cond in CONDITIONS:
        g = wb[wb["condition"] == cond].groupby("users", as_index=False).mean(numeric_only=True)
        ax[0].plot(g["users"], g["throughput_mbit"], "o-", label=names[cond])
        ax[1].plot(g["users"], g["latency_mean_ms"], "o-", label=names[cond])
    ax[0].axhline(12, ls=":", color="gray", label="12 Mbit/s")
    ax[0].set(xlabel="users", ylabel="throughput (Mbit/s of responses)", title="Throughput")
    ax[1].set(xlabel="users", ylabel="mean latency (ms, log)", yscale="log",
              title="User-perceived latency")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure("web"), dpi=110)
    plt.close(fig)
