"""Emulator scaling: build + teardown time and peak memory of Mininet's linear,N topologies.

Mininet's `linear,N` has N switches in a chain and one host on each switch: 2N nodes, 2N-1
links. Each size is built by the testbed (Topology.from_mininet(LinearTopo(N)), then
Network.start / stop) and, when the Debian `mn` is installed, by Mininet itself in the same
run (`mn --topo linear,N --switch lxbr --controller none --test none`, wall clock of the
whole command, including its Python start-up, as a user sees it).

Per run: build_s, teardown_s, total_s = build + teardown; the testbed's network is checked
once (h1 pings hN) between the two, timed apart (ping_s). Memory: the system's used memory
(MemTotal - MemAvailable) sampled every 50 ms from just before the build to the end of the
teardown, peak minus the baseline; and the peak RSS of the emulator's own process (the
testbed's Python process: growth of VmHWM, reset before each run; Mininet: the peak
VmRSS of the `mn` Python process, sampled with the memory; its host shells and `ip`
processes are in the system figure).

Deleting a namespace returns at once; the kernel frees it (and its interfaces) seconds later
in a work queue. So after each run we wait until the used memory is back near its baseline,
report that wait as kernel_free_s (not part of total_s, for either tool), and only then
start the next run, so that one run's freeing does not hide in the next one's memory peak.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import threading
import time

from testbed import Network, capabilities
from testbed.run import run as run_cmd
from testbed.experiment import pyplot

PAPER = "emulator"
TITLE = "Emulator scaling: build + teardown time and memory of linear,N against Mininet"

QUICK = {"testbed": [10, 50, 100, 500], "mininet": [10, 50]}
FULL = {"testbed": [10, 50, 100, 200, 500, 1000], "mininet": [10, 50, 100, 200]}
SMOKE = {"testbed": [10, 50], "mininet": [10]}
REPEATS_SMALL = 3  # linear,10 and linear,50: median of 3
SMALL = (10, 50)
MININET_MAX_S = 180.0  # full mode: Mininet's linear,500 only if it is predicted under this
MININET_MIN_EXPONENT = 2.0
MN_TIMEOUT_S = 900.0
SAMPLE_S = 0.05
SETTLE_TIMEOUT_S = 20.0
TARGET_RATIO = 5.0
TARGET_NODES = 1000
TARGET_S = 30.0
TARGET_MB = 2048.0
MN_ARGS = ["--switch", "lxbr", "--controller", "none", "--test", "none"]
MN_ROOT_NAME = re.compile(r"^s\d+(-eth\d+)?$")  # what `mn` puts in the root namespace


# memory ---------------------------------------------------------------------------------
def used_mb() -> float:
    """System memory in use: MemTotal - MemAvailable, in MB."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


class MemSampler:
    """Samples used_mb() every SAMPLE_S in a thread; peak_mb is the peak above the baseline.
    Set .pid to also follow that process's RSS (peak in .rss_peak_mb)."""

    def __init__(self):
        self.base = used_mb()
        self.peak = self.base
        self.samples = 0
        self.pid = None
        self.rss_peak_mb = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, used_mb())
            if self.pid is not None:
                rss = rss_mb(self.pid)
                if rss is not None:
                    self.rss_peak_mb = max(self.rss_peak_mb or 0.0, rss)
            self.samples += 1
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_mb())

    @property
    def peak_mb(self) -> float:
        return self.peak - self.base


def reset_hwm() -> None:
    """Reset this process's peak RSS (VmHWM) so the next read covers one run only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_mb(pid, key: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def hwm_mb():
    """This process's peak RSS since the last reset_hwm(), in MB."""
    return _status_mb("self", "VmHWM")


def rss_mb(pid: int):
    return _status_mb(pid, "VmRSS")


# kernel clean-up -------------------------------------------------------------------------
def wait_freed(mem: MemSampler):
    """Seconds until the system's used memory is back near its baseline before the run: the
    kernel frees deleted namespaces in a work queue, seconds after `ip netns del` returned.
    None if it did not come back within SETTLE_TIMEOUT_S (others use this machine too)."""
    slack = max(8.0, 0.1 * mem.peak_mb)
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_TIMEOUT_S:
        if used_mb() <= mem.base + slack:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


# one run of each tool ----------------------------------------------------------------------
def run_testbed(n: int, first: list) -> dict:
    from mininet.topo import LinearTopo

    from testbed.topology import Topology

    topo = Topology.from_mininet(LinearTopo(n), name=f"linear{n}")
    net = Network(topo)
    row = {"status": "ok"}
    reset_hwm()
    rss0 = hwm_mb()
    build = ping_s = teardown = None
    ping_ok = None
    with MemSampler() as mem:
        t0 = time.monotonic()
        try:
            net.start()
            build = time.monotonic() - t0
            if not first:
                first.append(True)
                NOTE.append(net)
            t1 = time.monotonic()
            r = net["h1"].run(["ping", "-c1", "-W2", net[f"h{n}"].ip], check=False, timeout=10)
            ping_s = time.monotonic() - t1
            ping_ok = r.returncode == 0
        except Exception as e:  # noqa: BLE001 - record the failure, tear down, go on
            row["status"] = f"failed: {e}"[:300]
        finally:
            t2 = time.monotonic()
            try:
                net.stop()
            except Exception as e:  # noqa: BLE001 - record it; the next size still runs
                row["status"] = f"teardown failed: {e}"[:300]
            teardown = time.monotonic() - t2
    row.update(build_s=build, ping_s=ping_s, teardown_s=teardown,
               total_s=None if build is None else build + teardown,
               peak_mem_mb=mem.peak_mb, proc_rss_mb=None if rss0 is None else hwm_mb() - rss0,
               mem_samples=mem.samples, ping_ok=ping_ok,
               kernel_free_s=wait_freed(mem))
    return row


NOTE: list = []  # the first network built, for ctx.note_network


def root_links() -> set:
    out = run_cmd(["ip", "-o", "link", "show"]).stdout
    return {m.group(1).split("@")[0] for m in re.finditer(r"^\d+: ([^:]+):", out, re.MULTILINE)}


def run_mininet(mn: str, n: int) -> dict:
    """`mn --topo linear,N ...` as a subprocess; build/teardown split at its '*** Stopping'."""
    before = root_links()
    busy = sorted(x for x in before if MN_ROOT_NAME.match(x))
    if busy:  # another Mininet is running here: its objects would clash with ours
        return {"status": f"skipped: root namespace already has {busy[0]} (another Mininet?)"}
    argv = [mn, "--topo", f"linear,{n}"] + MN_ARGS
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    row = {"status": "ok"}
    lines, stop_at = [], None
    with MemSampler() as mem:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
        mem.pid = p.pid  # wait4's maxrss would count our own pages, shared before the exec
        timer = threading.Timer(MN_TIMEOUT_S, p.terminate)
        timer.start()
        for line in p.stdout:
            if stop_at is None and line.startswith("*** Stopping"):
                stop_at = time.monotonic()
            lines.append(line.rstrip())
        _, status, _ = os.wait4(p.pid, 0)
        t1 = time.monotonic()
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    reported = None
    for line in lines:
        m = re.match(r"completed in ([\d.]+) seconds", line)
        if m:
            reported = float(m.group(1))
    if p.returncode != 0:
        row["status"] = f"failed rc={p.returncode}: " + " | ".join(lines[-3:])[:300]
    total = t1 - t0
    build = (stop_at - t0) if stop_at else None
    row.update(build_s=build, ping_s=None, teardown_s=(t1 - stop_at) if stop_at else None,
               total_s=total, mn_reported_s=reported, peak_mem_mb=mem.peak_mb,
               proc_rss_mb=mem.rss_peak_mb, mem_samples=mem.samples, ping_ok=None,
               kernel_free_s=wait_freed(mem))
    left = sorted(x for x in root_links() - before if MN_ROOT_NAME.match(x))
    if left:  # only what this run added: never `mn -c`, it removes other people's objects
        run_cmd(["ip", "-force", "-batch", "-"], input="".join(f"link del {x}\n" for x in left),
                check=False)
        row["status"] += f"; removed {len(left)} leftovers"
    return row


# the experiment ----------------------------------------------------------------------------
def median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def run(ctx) -> None:
    sizes = ctx.pick(smoke=SMOKE, quick=QUICK, full=FULL)
    mn = shutil.which("mn")
    mn_version = None
    if mn:
        r = run_cmd([mn, "--version"], check=False)
        mn_version = (r.stdout or r.stderr).strip() or None
    if mn and not shutil.which("brctl"):
        mn_missing = "Mininet's lxbr switch needs brctl (apt-get install bridge-utils)"
    else:
        mn_missing = None if mn else "Mininet (`mn`) is not installed"
    t = time.monotonic()
    capabilities.probe()  # once per process: not part of any build
    probe_s = time.monotonic() - t
    ctx.params.update(
        topology="Mininet linear,N: N switches in a chain, one host each; nodes = 2N",
        testbed_sizes=sizes["testbed"], mininet_sizes=sizes["mininet"],
        repeats={str(n): REPEATS_SMALL if n in SMALL else 1 for n in sizes["testbed"]},
        mininet_command=f"mn --topo linear,N {' '.join(MN_ARGS)}", mininet=mn,
        mininet_version=mn_version, mem_sample_s=SAMPLE_S, capability_probe_s=round(probe_s, 3),
        mininet_500_if_predicted_under_s=None if ctx.quick else MININET_MAX_S)
    ctx.progress(f"capability probe {probe_s:.2f} s (once, not timed); mininet: "
                 f"{mn_version or mn_missing}")

    first: list = []
    all_sizes = sorted(set(sizes["testbed"]) | set(sizes["mininet"]))
    if not ctx.quick:
        all_sizes = sorted(set(all_sizes) | {500})
    for n in all_sizes:
        reps = REPEATS_SMALL if n in SMALL and not ctx.smoke else 1
        want_tb = n in sizes["testbed"]
        want_mn = n in sizes["mininet"]
        if not ctx.quick and n == 500 and not mn_missing:
            want_mn, why = _predict_mininet(ctx.rows, n)
            ctx.progress(f"mininet linear,{n}: {why}")
            if not want_mn:
                ctx.add(tool="mininet", n=n, nodes=2 * n, links=2 * n - 1, repeat=0,
                        status=why)
        # the two tools alternate, repeat by repeat, so that both see the same load
        for rep in range(reps):
            if want_tb:
                _record(ctx, "testbed", n, rep, run_testbed(n, first))
            if want_mn and mn_missing:
                ctx.add(tool="mininet", n=n, nodes=2 * n, links=2 * n - 1, repeat=rep,
                        status="not installed: " + mn_missing)
            elif want_mn:
                _record(ctx, "mininet", n, rep, run_mininet(mn, n))
    if first:
        ctx.note_network(NOTE.pop())

    _claims(ctx, mn_missing)
    _figure(ctx)


def _record(ctx, tool, n, rep, row) -> None:
    row["load1"] = round(os.getloadavg()[0], 2)  # others share this machine: say how busy
    ctx.add(tool=tool, n=n, nodes=2 * n, links=2 * n - 1, repeat=rep, **row)
    ctx.progress(_line(tool, n, rep, row))


def _line(tool, n, rep, row) -> str:
    def f(x, unit="s"):
        return "—" if x is None else f"{x:.2f} {unit}"
    return (f"{tool:7} linear,{n:<4} ({2 * n:4} nodes) #{rep}: build {f(row.get('build_s'))} "
            f"teardown {f(row.get('teardown_s'))} total {f(row.get('total_s'))} mem "
            f"{f(row.get('peak_mem_mb'), 'MB')} ping {row.get('ping_ok')} kernel-free "
            f"{f(row.get('kernel_free_s'))} [{row.get('status')}]")


def _ok(rows, tool, n):
    return [r for r in rows if r["tool"] == tool and r["n"] == n and r.get("total_s") is not None
            and str(r.get("status", "")).startswith("ok")]


def _predict_mininet(rows, n):
    """Full mode: run Mininet's linear,n only if the growth seen so far predicts < 3 min."""
    pts = sorted((r["n"], r["total_s"]) for r in rows if r["tool"] == "mininet"
                 and r.get("total_s") and str(r.get("status", "")).startswith("ok"))
    if len(pts) < 2:
        return False, "skipped: too few Mininet sizes to predict its time"
    import math

    (n1, t1), (n2, t2) = pts[-2], pts[-1]
    # Mininet grows about as N^2 at large N (measured here: linear,200 38 s -> linear,500
    # 238 s); a fit over two noisy small sizes can say far less, so never predict below N^2
    k = max(MININET_MIN_EXPONENT, math.log(t2 / t1) / math.log(n2 / n1))
    pred = t2 * (n / n2) ** k
    if pred < MININET_MAX_S:
        return True, f"predicted {pred:.0f} s (t ~ N^{k:.2f}): run it"
    return False, f"skipped: predicted {pred:.0f} s (t ~ N^{k:.2f}) > {MININET_MAX_S:.0f} s"


def _claims(ctx, mn_missing) -> None:
    rows = ctx.rows
    tb50, mn50 = _ok(rows, "testbed", 50), _ok(rows, "mininet", 50)
    t_tb, t_mn = median(tb50, "total_s"), median(mn50, "total_s")
    text = ("Build + teardown of Mininet's linear,50 topology at least 5x faster than Mininet "
            "in the same run")
    if t_tb and t_mn:
        ratio = t_mn / t_tb
        ctx.claim("scaling_vs_mininet_linear50", text, None, round(ratio, 2), "x",
                  ratio >= TARGET_RATIO,
                  f"linear,50 (100 nodes, 99 links), median of {len(mn50)} Mininet and "
                  f"{len(tb50)} testbed runs: Mininet {t_mn:.2f} s (`mn --switch lxbr "
                  f"--controller none --test none`, whole command) against testbed "
                  f"{t_tb:.2f} s (Network.start + stop); the h1-h50 ping check, timed "
                  f"apart, took {_fmt(median(tb50, 'ping_s'))}; testbed's teardown returns once "
                  f"the namespaces are unlinked, the kernel frees them asynchronously "
                  f"(kernel_free_s in data.csv, not counted); the guide's "
                  f"reference for Mininet here is 6.6 s; the two alternated run by run; "
                  f"1-min load average {_load(tb50 + mn50)} ({os.cpu_count()} CPUs)")
    else:
        why = mn_missing or "Mininet did not complete linear,50 (see data.csv status)"
        if not tb50:
            why = "the testbed did not complete linear,50 (see data.csv status)"
        ctx.claim("scaling_vs_mininet_linear50", text, None, None, "x", False,
                  f"not compared: {why}")

    done = [r for r in rows if r["tool"] == "testbed" and r.get("total_s") is not None
            and str(r.get("status", "")).startswith("ok")]
    at = [r for r in done if r["nodes"] == TARGET_NODES]
    if at:
        used, note = at, f"linear,{TARGET_NODES // 2} = {TARGET_NODES} nodes"
        reached = True
    elif done:
        big = max(r["nodes"] for r in done)
        used = [r for r in done if r["nodes"] == big]
        note = (f"not shown: no {TARGET_NODES}-node run completed; largest run: "
                f"linear,{big // 2} = {big} nodes")
        reached = False
    else:
        used, note, reached = [], "no testbed run completed", False
    extra = ""
    bigger = [r for r in done if r["nodes"] > TARGET_NODES]
    if bigger:
        b = max(bigger, key=lambda r: r["nodes"])
        extra = (f"; for scale: linear,{b['n']} ({b['nodes']} nodes) took {b['total_s']:.1f} s "
                 f"and {b['peak_mem_mb']:.0f} MB")
    t = median(used, "total_s")
    mem = median(used, "peak_mem_mb")
    ping = all(r.get("ping_ok") for r in used) if used else False
    if t is not None:
        r0 = used[0]
        ctx.claim("scaling_1000_nodes_time", "1000 nodes in at most 30 s", None, round(t, 2),
                  "s", reached and t <= TARGET_S,
                  f"{note}, {r0['links']} links: build {median(used, 'build_s'):.1f} s + "
                  f"teardown {median(used, 'teardown_s'):.2f} s; h1 pings h{r0['n']}: {ping}; "
                  f"the kernel freed the namespaces {_fmt(median(used, 'kernel_free_s'))} "
                  f"after the teardown returned (not counted){extra}")
        ctx.claim("scaling_1000_nodes_memory", "1000 nodes in at most 2 GB", None,
                  round(mem, 1), "MB", reached and mem <= TARGET_MB,
                  f"{note}: peak of the system's used memory (MemTotal - MemAvailable, "
                  f"sampled every {int(SAMPLE_S * 1000)} ms) above the baseline before the "
                  f"build; the testbed's own Python process grew by "
                  f"{_fmt(median(used, 'proc_rss_mb'), 'MB')} (peak RSS); other users of this "
                  f"machine add noise to a system-wide figure{extra}")
    else:
        for cid, txt, unit in (("scaling_1000_nodes_time", "1000 nodes in at most 30 s", "s"),
                               ("scaling_1000_nodes_memory", "1000 nodes in at most 2 GB",
                                "MB")):
            ctx.claim(cid, txt, None, None, unit, False, note)


def _load(rows) -> str:
    vals = [r["load1"] for r in rows if r.get("load1") is not None]
    return f"{min(vals):.1f}-{max(vals):.1f}" if vals else "—"


def _fmt(x, unit="s") -> str:
    return "—" if x is None else f"{x:.2g} {unit}" if x < 1 else f"{x:.1f} {unit}"


def _figure(ctx) -> None:
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = {"testbed": ("tab:blue", "o"), "mininet": ("tab:red", "s")}
    for tool, (color, marker) in styles.items():
        ns = sorted({r["n"] for r in ctx.rows if r["tool"] == tool})
        pts = [(2 * n, median(_ok(ctx.rows, tool, n), "total_s"),
                median(_ok(ctx.rows, tool, n), "build_s"),
                median(_ok(ctx.rows, tool, n), "peak_mem_mb")) for n in ns]
        pts = [p for p in pts if p[1] is not None]
        if not pts:
            continue
        x = [p[0] for p in pts]
        label = "testbed" if tool == "testbed" else "Mininet (mn, lxbr)"
        ax1.plot(x, [p[1] for p in pts], marker=marker, color=color,
                 label=f"{label}: build + teardown")
        if tool == "testbed":
            ax1.plot(x, [p[2] for p in pts], marker=marker, color=color, ls=":", alpha=0.6,
                     mfc="none", label=f"{label}: build only")
        for p in pts:
            ax1.annotate(f"{p[1]:.1f}", (p[0], p[1]), textcoords="offset points",
                         xytext=(4, -11 if tool == "testbed" else 5), fontsize=7, color=color)
        ax2.plot(x, [max(p[3], 0.1) for p in pts], marker=marker, color=color, label=label)
    ax1.axhline(TARGET_S, color="gray", ls="--", lw=0.8)
    ax1.annotate(f"target: {TARGET_NODES} nodes in {TARGET_S:.0f} s", (TARGET_NODES, TARGET_S),
                 xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=7,
                 color="gray")
    ax2.axhline(TARGET_MB, color="gray", ls="--", lw=0.8)
    ax2.annotate(f"target: {TARGET_NODES} nodes in 2 GB", (TARGET_NODES, TARGET_MB),
                 xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=7,
                 color="gray")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes (Mininet linear,N: 2N)")
        ax.axvline(TARGET_NODES, color="gray", ls=":", lw=0.8)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="lower right")
    ax1.set_ylim(0.1, TARGET_S * 2.5)
    ax2.set_ylim(top=TARGET_MB * 2.5)
    ax1.set_ylabel("seconds (median)")
    ax1.set_title("Build + teardown time")
    ax2.set_ylabel("MB above baseline (median)")
    ax2.set_title("Peak system memory in use")
    fig.suptitle(f"Scaling of linear,N topologies ({ctx.mode} mode)", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.figure("scaling"), dpi=130)
    plt.close(fig)
