"""Emulator: VLAN change-over time and isolation, on each VLAN backend this kernel offers.

A host on switch s1 (VLAN 1) probes a server address every 1 ms over UDP. Two servers hold
that address and the same MAC, one in VLAN 1 (on s2, across a trunk) and one in VLAN 2 (on
s1), as paper 001's main and backup sites do. The host's port is moved between VLAN 1 and
VLAN 2 again and again; for each change-over we record how long the switch took to apply it
(the netlink request) and the interruption the client saw: from the last reply of the
server it left to the first reply of the server it joined. Every reply must come from the
server in the host's current VLAN: a reply from the other would be a frame crossing VLANs.
"""

from __future__ import annotations

import sys
import time

import pandas as pd

from testbed import Network, capabilities
from testbed.process import listening, log_matches
from testbed.topology import Topology
from testbed.experiment import pyplot

PAPER = "emulator"
TITLE = "VLAN change-over: time to apply, client-visible interruption, isolation"

TARGET_MS = 10.0  # the target for a change-over
SERVER_IP = "10.5.0.100/24"
SERVER_MAC = "02:00:00:00:00:64"
PORT = 9100


def build() -> Topology:
    t = Topology("vlan_changeover", auto_routes=False)
    t.add_switch("s1", vlans=[1, 2])
    t.add_switch("s2")
    t.add_host("user")
    t.add_host("main")
    t.add_host("backup")
    t.add_link("user", "s1", vlan=1, ip_a="10.5.0.1/24")
    t.add_link("backup", "s1", vlan=2, ip_a=SERVER_IP)
    t.add_link("main", "s2", vlan=1, ip_a=SERVER_IP)
    t.add_link("s1", "s2", trunk=[1, 2])
    return t


def backends() -> list:
    caps = capabilities.probe()
    out = ["802.1q"] if caps.bridge_vlan_filtering else []  # Network(vlan_backend=...)
    if caps.links.get("vxlan"):
        out.append("bridges")
    return out


def changeovers(ctx, backend: str, moves: int, period_s: float) -> pd.DataFrame:
    with Network(build(), vlan_backend=backend) as net:
        ctx.note_network(net)
        user, sw = net["user"], net.switch("s1")
        for name in ("main", "backup"):  # one address, one MAC: only the VLAN tells them apart
            h = net[name]
            h.run(["ip", "link", "set", "dev", h.intfs[0], "address", SERVER_MAC])
            h.start([sys.executable, "-m", "testbed.measure.udpecho", "server", "--port",
                     str(PORT), "--name", name], name="udpecho",
                    ready=listening(h.ns, PORT, "udp"))
        out = f"{net.log_dir}/probe.csv"
        seconds = (moves + 1) * period_s + 0.5
        p = user.start([sys.executable, "-m", "testbed.measure.udpecho", "client", "--dst",
                        SERVER_IP.split("/")[0], "--port", str(PORT), "--interval-ms", "1",
                        "--seconds", str(seconds), "--out", out], name="probe")
        p.wait_ready(log_matches(lambda: p, "probing"), timeout=15)
        deadline = time.monotonic() + period_s
        events = []
        for i in range(moves):
            while time.monotonic() < deadline:  # pacing the moves, not waiting for readiness
                time.sleep(0.005)
            deadline += period_s
            new = 2 if sw.vlan_of("user") == 1 else 1
            t = time.time()  # the probe's clock (wall time, as its t_send/t_recv)
            took = sw.set_vlan("user", new)
            events.append({"move": i, "t": t, "to_vlan": new, "apply_ms": took * 1000})
        p.wait(seconds + 30)
        probe = pd.read_csv(out)
    return analyse(ctx, backend, probe, events)


def analyse(ctx, backend: str, probe: pd.DataFrame, events: list) -> pd.DataFrame:
    got = probe[probe["t_recv"].notna()].sort_values("t_recv")
    want = {1: "main", 2: "backup"}
    rows = []
    # Isolation, without trusting timestamps: in sequence order the replies must switch
    # server exactly once per change-over (main, ..., backup, ..., main, ...). A frame
    # crossing VLANs would answer from the other server in between: an extra switch.
    by_seq = got.sort_values("seq")["responder"].tolist()
    switches = sum(1 for x, y in zip(by_seq, by_seq[1:]) if x != y)
    leaks = max(0, switches - len(events))
    judged = len(by_seq)
    for e in events:
        old, new = want[1 if e["to_vlan"] == 2 else 2], want[e["to_vlan"]]
        before = got[(got["responder"] == old) & (got["t_recv"] <= e["t"] + 0.05)]
        after = got[(got["responder"] == new) & (got["t_recv"] >= e["t"])]
        last_old = before["t_recv"].max() if len(before) else float("nan")
        first_new = after["t_recv"].min() if len(after) else float("nan")
        row = dict(kind="changeover", backend=backend, move=e["move"], to_vlan=e["to_vlan"],
                   apply_ms=round(e["apply_ms"], 3),
                   interruption_ms=round((first_new - last_old) * 1000, 3),
                   first_reply_after_ms=round((first_new - e["t"]) * 1000, 3))
        rows.append(row)
        ctx.add(**row)
    ctx.add(kind="isolation", backend=backend, replies=len(got), judged=judged, leaks=leaks,
            switches=switches, requests=len(probe))
    df = pd.DataFrame(rows)
    ctx.progress(f"{backend}: {len(df)} change-overs, apply median "
                 f"{df['apply_ms'].median():.2f} ms max {df['apply_ms'].max():.2f} ms; "
                 f"interruption median {df['interruption_ms'].median():.2f} ms max "
                 f"{df['interruption_ms'].max():.2f} ms; {leaks} replies from the wrong VLAN "
                 f"of {len(got)}")
    df.attrs["leaks"] = leaks
    df.attrs["replies"] = judged
    df.attrs["switches"] = switches
    return df


def run(ctx) -> None:
    moves = ctx.pick(smoke=4, quick=40, full=200)
    period = ctx.pick(smoke=0.2, quick=0.25, full=0.25)
    ctx.params.update(moves=moves, period_s=period, probe_interval_ms=1)
    results = {}
    for backend in backends():
        df = changeovers(ctx, backend, moves, period)
        results[backend] = df
        ctx.claim(f"apply_{backend}", "A VLAN change-over is applied within 10 ms (the "
                  "issue's target; paper 001's step 7 moved the user in about 0.1 s)", TARGET_MS,
                  df["apply_ms"].max(), "ms", bool(df["apply_ms"].max() <= TARGET_MS),
                  f"max of {len(df)} change-overs, {backend} backend; the time of the switch's "
                  f"netlink request(s), median {df['apply_ms'].median():.2f} ms")
        p95 = float(df["interruption_ms"].quantile(0.95))
        ctx.claim(f"interruption_{backend}", "The client sees the new VLAN's server within "
                  "10 ms of the change-over", TARGET_MS, p95, "ms",
                  bool(p95 <= TARGET_MS),
                  f"95th percentile over {len(df)} change-overs of the time from the last reply "
                  f"of the old VLAN's server to the first of the new one's, probing every 1 ms "
                  f"(so up to 1 ms is probe spacing); median "
                  f"{df['interruption_ms'].median():.2f} ms")
        ctx.claim(f"isolation_{backend}", "No frame crosses between VLANs: every reply comes "
                  "from the server in the client's current VLAN", 0, df.attrs["leaks"],
                  "replies", df.attrs["leaks"] == 0,
                  f"{df.attrs['replies']} replies in sequence order switched server "
                  f"{df.attrs['switches']} times for {len(df)} change-overs (an extra switch "
                  f"would be a frame crossing VLANs); both servers share one IP and MAC")
    plot(ctx, results)


def plot(ctx, results: dict) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend, df in results.items():
        ax[0].plot(df["move"], df["apply_ms"], "o", ms=4, label=backend)
        ax[1].plot(df["move"], df["interruption_ms"], "o", ms=4, label=backend)
    for a, title in zip(ax, ("Time to apply (netlink)", "Interruption seen by a 1 ms UDP probe")):
        a.axhline(TARGET_MS, color="red", ls="--", lw=1, label="target 10 ms")
        a.set(xlabel="change-over #", ylabel="ms", title=title, yscale="log")
        a.legend()
    fig.suptitle("VLAN change-over: user moved between VLAN 1 (main) and VLAN 2 (backup)")
    fig.tight_layout()
    fig.savefig(ctx.figure("vlan_changeover"), dpi=110)
    plt.close(fig)
