"""Two measurements of the overlay itself.

How fast one daemon forwards: a 3-node chain a - b - c on plain veth links, a stream from
a to c, and b's CPU time from /proc while it forwards.

    python -m testbed.overlay.bench [--seconds 5] [--size 1400] [--link best_effort|reliable]
        [--datagram] [--rate-mbit 0] [--json]

Reports the payload rate c received, b's CPU use (a fraction of one core) and the rate b
would forward at one full core (received rate / CPU fraction): on a machine shared with the
sender's and receiver's daemons and clients, b rarely gets a whole core to itself.

How fast routes move around a failed node: a mesh (a-b-f is the only 2-hop path from a to
f, the others take 3), datagrams a -> f every 2 ms, b's daemon killed (or stopped with
SIGTERM, which floods a goodbye), then the time until a's route to f avoids b and the
longest silence f sees.

    python -m testbed.overlay.bench --reroute [--hello-ms 200] [--trials 5] [--term] [--json]
"""

from __future__ import annotations

import json
import os
import sys
import time

from testbed import Network, Topology
from testbed.daemon.args import ArgParser
from testbed.overlay import start_overlay
from testbed.poll import wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def run(seconds: float = 5.0, size: int = 1400, link: str = "best_effort",
        datagram: bool = False, rate_mbit: float = 0.0) -> dict:
    t = Topology("overlay-bench")
    for n in ("a", "b", "c"):
        t.add_host(n)
    t.add_link("a", "b")
    t.add_link("b", "c")
    with Network(t) as net:
        ov = start_overlay(net, ["a", "b", "c"], hello_ms=500, cost="hops")
        ov.wait_converged(10)
        log = net.log_dir
        out = os.path.join(log, "bench-recv.json")
        ready = os.path.join(log, "bench-recv.ready")
        from testbed.process import file_exists

        rx = net["c"].start([sys.executable, "-m", "testbed.overlay.tool", "recv",
                             "--control", ov.control_path("c"), "--port", "9",
                             "--seconds", str(seconds + 10), "--idle", "2",
                             "--ready-file", ready], name="bench-recv",
                            ready=file_exists(ready))
        argv = [sys.executable, "-m", "testbed.overlay.tool", "send", "--control",
                ov.control_path("a"), "--dst", f"{ov.id('c')}:9", "--seconds", str(seconds),
                "--size", str(size), "--link", link,
                "--rate-kbit", str(rate_mbit * 1000)]
        if datagram:
            argv.append("--datagram")
        pids = {n: ov.procs[n].pid for n in ("a", "b", "c")}
        pids["receiver"] = rx.pid
        cpu0, t0 = {n: cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
        tx = net["a"].start(argv, name="bench-send")
        pids["sender"] = tx.pid
        cpu0["sender"] = 0.0
        time.sleep(seconds * 0.9)
        cpu1, t1 = {n: cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
        tx.wait(seconds + 60)
        rx.wait(seconds + 30)
        sent = json.loads(tx.log().strip().splitlines()[-1])
        got = json.loads(rx.log().strip().splitlines()[-1])
        with open(out, "w") as f:
            json.dump(got, f)
        stats_b = ov.stats("b")
    cpus = {n: round((cpu1[n] - cpu0[n]) / (t1 - t0), 3) for n in cpu1}
    cpu = cpus["b"]
    rate = got["mbit_s"] or 0.0
    return {"link": link, "session": "datagram" if datagram else "reliable", "size": size,
            "sent": sent["sent"], "received": got["received"], "mbit_s": rate,
            "b_cpu_fraction": round(cpu, 3), "cpu_fractions": cpus,
            "b_mbit_s_per_core": round(rate / cpu, 1) if cpu > 0 else None,
            "b_forwarded": stats_b["counters"].get("forwarded", 0),
            "b_drops": {k: v for k, v in stats_b["drops"].items() if v}}


MESH = [("a", "b"), ("b", "f"), ("a", "c"), ("c", "d"), ("d", "f"), ("b", "d"), ("c", "e"),
        ("e", "d")]


def _reroute_trial(net, trial: int, hello_ms: float, kill: bool) -> dict:
    import threading

    from testbed.overlay.client import OverlayTimeout

    ov = start_overlay(net, list("abcdef"), hello_ms=hello_ms, cost="hops", port=8100 + trial)
    converged = ov.wait_converged(10)
    assert ov.path("a", "f") == ["a", "b", "f"]
    rx = ov.client("f").socket(9, reliable=False)
    tx = ov.client("a").socket(9, reliable=False, link="best_effort")
    dst = (ov.id("f"), 9)
    times: list = []
    stop = threading.Event()

    def receive():
        while not stop.is_set():
            try:
                rx.recvfrom(timeout=0.2)
                times.append(time.monotonic())
            except OverlayTimeout:
                pass

    def send():
        while not stop.is_set():
            tx.sendto(b"x" * 100, dst)
            time.sleep(0.002)

    threads = [threading.Thread(target=f, daemon=True) for f in (receive, send)]
    for th in threads:
        th.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        ov.stop("b", kill=kill)

        def around_b():
            path = ov.routes("a").get("f", {}).get("path", [])
            return time.monotonic() if path and "b" not in path else None

        t1 = wait_until(around_b, 30, "a's route to f around b", interval=0.005, scale=False)
        time.sleep(0.5)
    finally:
        stop.set()
        for th in threads:
            th.join()
        ov.close()
    gap = max(y - x for x, y in zip(times, times[1:]) if y > t0 - 0.05)
    return {"trial": trial, "converged_s": round(converged, 3),
            "route_ms": round(1000 * (t1 - t0), 1), "data_gap_ms": round(1000 * gap, 1)}


def reroute(hello_ms: float = 200, trials: int = 5, kill: bool = True) -> dict:
    import statistics

    t = Topology("overlay-reroute")
    for n in "abcdef":
        t.add_host(n)
    for a, b in MESH:
        t.add_link(a, b)
    with Network(t) as net:
        rows = [_reroute_trial(net, i, hello_ms, kill) for i in range(trials)]
    route = [r["route_ms"] for r in rows]
    gaps = [r["data_gap_ms"] for r in rows]
    return {"hello_ms": hello_ms, "failure": "SIGKILL" if kill else "SIGTERM",
            "three_hellos_ms": 3 * hello_ms, "trials": rows,
            "route_ms_median": statistics.median(route), "route_ms_max": max(route),
            "data_gap_ms_median": statistics.median(gaps), "data_gap_ms_max": max(gaps)}


def main(argv=None) -> int:
    p = ArgParser("overlay bench", prog="python -m testbed.overlay.bench")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--link", default="best_effort", choices=("best_effort", "reliable",
                                                              "realtime"))
    p.add_argument("--datagram", action="store_true")
    p.add_argument("--rate-mbit", type=float, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--reroute", action="store_true", help="measure rerouting instead")
    p.add_argument("--hello-ms", type=float, default=200)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--term", action="store_true", help="stop b with SIGTERM, not SIGKILL")
    a = p.parse_args(argv)
    if a.reroute:
        r = reroute(a.hello_ms, a.trials, kill=not a.term)
        if a.json:
            print(json.dumps(r))
        else:
            for row in r["trials"]:
                print(f"trial {row['trial']}: route moved after {row['route_ms']} ms, "
                      f"longest silence at f {row['data_gap_ms']} ms")
            print(f"hello {a.hello_ms:g} ms, b {r['failure']}: route median "
                  f"{r['route_ms_median']} max {r['route_ms_max']} ms; data gap median "
                  f"{r['data_gap_ms_median']} max {r['data_gap_ms_max']} ms "
                  f"(three hellos: {r['three_hellos_ms']:g} ms)")
        return 0
    r = run(a.seconds, a.size, a.link, a.datagram, a.rate_mbit)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['session']} over {r['link']} links, {r['size']}-byte messages: c received "
              f"{r['received']} ({r['mbit_s']} Mbit/s); b used {100 * r['b_cpu_fraction']:.0f} "
              f"% of a core -> {r['b_mbit_s_per_core']} Mbit/s per core\n"
              f"CPU (fraction of a core): {r['cpu_fractions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
