"""How fast one overlay daemon forwards: a 3-node chain a - b - c on plain veth links, a
stream from a to c, and b's CPU time from /proc while it forwards.

    python -m testbed.overlay.bench [--seconds 5] [--size 1400] [--link best_effort|reliable]
        [--datagram] [--rate-mbit 0] [--json]

Reports the payload rate c received, b's CPU use (a fraction of one core) and the rate b
would forward at one full core (received rate / CPU fraction): on a machine shared with the
sender's and receiver's daemons and clients, b rarely gets a whole core to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from testbed import Network, Topology
from testbed.overlay import start_overlay

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.overlay.bench")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--link", default="best_effort", choices=("best_effort", "reliable",
                                                              "realtime"))
    p.add_argument("--datagram", action="store_true")
    p.add_argument("--rate-mbit", type=float, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
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
