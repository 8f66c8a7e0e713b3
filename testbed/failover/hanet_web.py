"""A web workload for the HANet experiment (paper 002 served a Surge workload from Apache):
a Surge-like file set, a real HTTP server in a node (nginx where installed, else Python's
threaded http.server), a load generator of keep-alive users, and a UDP probe (udpecho) that runs
until told to stop.

    files = make_files(dir, n=1000, seed=1)        # -> manifest.json beside the files
    srv = start_server(net["s1"], dir)           # nginx (or python) on port 80
    df = run_load([net["c1"], ...], "10.20.0.11", users=400, seconds=10, think_s=2,
                  manifest=files)                 # one row per request

The processes (`python testbed/failover/hanet_web.py load|serve`, also
`python -m testbed.failover.hanet_web ...`) import nothing heavy so that they start fast;
the helpers that run them use pandas.

Load generator: `users` closed-loop users per process, each on its own keep-alive
connection: pick a file (Zipf popularity over the file set), GET it, read the whole body,
think (exponential, mean think_s), again. It starts when a "go" file appears (so that every
client process starts together) and stops issuing requests after `seconds`; requests in
flight then finish (or time out). One CSV row per request: user, t_start, t_end, bytes,
status, error (empty for a complete 200 response; else the exception, and the connection is
reopened).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

from testbed.daemon import ArgParser, Stop, raise_stop_on_signals, run_main, write_atomic
from testbed.daemon.args import port as port_arg
from testbed.poll import wait_until

# Surge (Barford and Crovella 1998): file sizes lognormal in the body, Pareto in the tail
BODY_MU, BODY_SIGMA = 9.357, 1.318
TAIL_K, TAIL_ALPHA, TAIL_P = 133_000, 1.1, 0.07
CSV_HEADER = "user,t_start,t_end,bytes,status,error\n"
# the processes run this file as a script: they import nothing of the testbed package but
# the daemon runtime and poll (and so start fast, and do not depend on the rest of
# testbed.failover importing)
SELF = os.path.abspath(__file__)


# the file set ---------------------------------------------------------------------------

def surge_sizes(n: int, seed: int, max_bytes: int = 1_000_000, min_bytes: int = 100) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < TAIL_P:
            size = TAIL_K / (1 - rng.random()) ** (1 / TAIL_ALPHA)
        else:
            size = rng.lognormvariate(BODY_MU, BODY_SIGMA)
        out.append(int(min(max(size, min_bytes), max_bytes)))
    return out


def make_files(root: str, n: int = 1000, seed: int = 1, max_bytes: int = 1_000_000,
               zipf_s: float = 1.0, sizes=None) -> str:
    """Write n files under root (Surge-like sizes unless given) and root/manifest.json:
    [{"path", "bytes", "weight"}] with Zipf popularity (rank r has weight ~ 1/r^zipf_s,
    ranks assigned at random to sizes, as in Surge). Returns the manifest's path."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive whole number, got {n!r}")
    sizes = list(sizes) if sizes is not None else surge_sizes(n, seed, max_bytes)
    rng = random.Random(seed + 1)
    ranks = list(range(1, len(sizes) + 1))
    rng.shuffle(ranks)
    total = sum(1 / r ** zipf_s for r in ranks)
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    entries = []
    for i, (size, r) in enumerate(zip(sizes, ranks)):
        name = f"f{i:04d}.bin"
        with open(os.path.join(root, name), "wb") as f:
            f.truncate(size)  # sparse: served as zeros, takes no disk
        entries.append({"path": "/" + name, "bytes": size, "weight": (1 / r ** zipf_s) / total})
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def mean_bytes(manifest: str) -> float:
    """Bytes per request on average (popularity-weighted)."""
    with open(manifest) as f:
        return sum(e["bytes"] * e["weight"] for e in json.load(f))


# the server -----------------------------------------------------------------------------

def nginx_available() -> bool:
    return shutil.which("nginx") is not None


def _nginx_temp_paths() -> dict:
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    return {m.group(1).replace("-", "_"): m.group(0)
            for m in re.finditer(r"--http-([a-z-]+)-temp-path=\S+", out)}


def nginx_conf(prefix: str, root: str, port: int = 80, workers: int = 1) -> str:
    temps = "".join(f"    {k}_temp_path {prefix}/{k};\n" for k in _nginx_temp_paths())
    return f"""worker_processes {workers};
daemon off;
master_process on;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    default_type application/octet-stream;
{temps}    server {{
        listen {port} reuseport backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


def _niced(argv: list, nice: int) -> list:
    return ["nice", "-n", str(nice)] + argv if nice else argv


def start_server(node, root: str, port: int = 80, prefer: str = "nginx", workers: int = 1,
                 nice: int = 0):
    """An HTTP server in node serving root on port (every address of the node); returns
    (Process, "nginx" or "python"). nice: its scheduling niceness (negative: favoured over
    the machine's other jobs, for steadier latencies)."""
    from testbed.process import listening

    if prefer not in ("nginx", "python"):
        raise ValueError(f"prefer must be nginx or python, got {prefer!r}")
    kind = "nginx" if prefer == "nginx" and nginx_available() else "python"
    if kind == "nginx":
        prefix = os.path.join(node.net.log_dir, f"nginx-{node.name}-{port}")
        os.makedirs(prefix, exist_ok=True)
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(prefix, os.path.abspath(root), port, workers))
        argv = ["nginx", "-c", conf, "-p", prefix + "/", "-e", f"{prefix}/error.log"]
    else:
        argv = [sys.executable, SELF, "serve", "--root",
                os.path.abspath(root), "--port", str(port)]
    proc = node.start(_niced(argv, nice), name=f"http{port}", ready=listening(node.ns, port),
                      ready_timeout=15)
    return proc, kind


def serve(root: str, port: int) -> None:
    """Python's threaded HTTP/1.1 server (keep-alive), the fallback where nginx is absent."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    httpd = ThreadingHTTPServer(("0.0.0.0", port), functools.partial(Handler, directory=root))
    print(f"serving {root} on {port}", flush=True)
    httpd.serve_forever()


# the load generator ---------------------------------------------------------------------

class Picker:
    def __init__(self, manifest: str, rng: random.Random):
        with open(manifest) as f:
            entries = json.load(f)
        self.paths = [e["path"] for e in entries]
        acc, self.cum = 0.0, []
        for e in entries:
            acc += e["weight"]
            self.cum.append(acc)
        self.rng = rng

    def pick(self) -> str:
        import bisect

        i = bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])
        return self.paths[min(i, len(self.paths) - 1)]


BIN_S = 0.1  # the goodput time series: bytes of response bodies received per 100 ms


async def _read_body(reader, n: int, timeout: float, bins: dict) -> None:
    while n > 0:
        chunk = await asyncio.wait_for(reader.read(min(n, 262144)), timeout)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(chunk)
        k = int(time.time() / BIN_S)
        bins[k] = bins.get(k, 0) + len(chunk)


async def _user(uid: int, dst: str, port: int, picker: Picker, think_s: float, end: float,
                timeout: float, rows: list, rng: random.Random, bins: dict) -> None:
    """One user. Its file picks and think times come from its own generators, seeded by
    its id, so that every run with the same seed makes the same requests in the same order
    (requests of two runs can be paired by user and index)."""
    reader = writer = None
    while time.time() < end:
        if writer is None:
            t0 = time.time()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(dst, port),
                                                        timeout)
            except (OSError, asyncio.TimeoutError) as e:
                rows.append((uid, t0, time.time(), 0, 0, f"connect:{type(e).__name__}"))
                reader = writer = None
                await asyncio.sleep(0.1)
                continue
        path = picker.pick()
        t0 = time.time()
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {dst}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            await _read_body(reader, length, timeout, bins)
            rows.append((uid, t0, time.time(), length, status, "" if status == 200 else "status"))
            if close:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError, asyncio.LimitOverrunError) as e:
            rows.append((uid, t0, time.time(), 0, 0, type(e).__name__))
            try:
                writer.close()
            except Exception:
                pass
            reader = writer = None
        if think_s > 0:
            await asyncio.sleep(min(rng.expovariate(1 / think_s), max(0.0, end - time.time())))
    if writer is not None:
        writer.close()


GO_TIMEOUT_S = 600.0  # the harness writes the go file once every client is ready


async def _load(a, start: float) -> list:
    rng = random.Random(a.seed)
    await asyncio.sleep(max(0.0, start - time.time()))
    end = start + a.seconds
    rows: list = []
    a.bins = bins = {}
    users = []
    for u in range(a.users):
        uid = a.first_user + u
        picker = Picker(a.manifest, random.Random(f"pick{a.seed}/{uid}"))
        users.append(_user(uid, a.dst, a.port, picker, a.think_s, end, a.timeout_s, rows,
                           random.Random(f"think{a.seed}/{uid}"), bins))

    async def staggered(i, coro):
        # users arrive spread over one think time (at most a quarter of the run)
        if a.think_s > 0:
            await asyncio.sleep(rng.uniform(0, min(a.think_s, a.seconds / 4)))
        await coro

    await asyncio.gather(*(staggered(i, c) for i, c in enumerate(users)))
    return rows


def load_main(a) -> None:
    print("ready", flush=True)
    wait_until(lambda: os.path.exists(a.go_file), GO_TIMEOUT_S, f"go file {a.go_file}",
               interval=0.002)
    with open(a.go_file) as f:
        start = float(f.read().strip() or 0)
    rows = asyncio.run(_load(a, start))
    with open(a.out + ".tmp", "w") as f:
        f.write(CSV_HEADER)
        for r in rows:
            f.write(f"{r[0]},{r[1]:.6f},{r[2]:.6f},{r[3]},{r[4]},{r[5]}\n")
    with open(a.out + ".bins.tmp", "w") as f:
        f.write("t,bytes\n")
        for k in sorted(a.bins):
            f.write(f"{k * BIN_S:.3f},{a.bins[k]}\n")
    os.replace(a.out + ".bins.tmp", a.out + ".bins")
    os.replace(a.out + ".tmp", a.out)


def run_load(clients: list, dst: str, users: int, seconds: float, think_s: float,
             manifest: str, port: int = 80, timeout_s: float = 30.0, seed: int = 1,
             tag: str = "load", during=None, nice: int = 0):
    """users spread over the client nodes, each node one generator process; returns a
    DataFrame (user, t_start, t_end, bytes, status, error, client, latency_ms) with attrs
    start and end (the run, wall clock), ramp_s (the users' arrival spread) and bins (a
    DataFrame t, bytes: response-body bytes received per 100 ms, all clients). during(start)
    is called once the load has started (inject faults there)."""
    import pandas as pd

    from testbed.process import log_matches

    if not clients:
        raise ValueError("run_load needs at least one client node")
    net = clients[0].net
    go = os.path.join(net.log_dir, f"{tag}.go")
    if os.path.exists(go):
        os.unlink(go)
    procs, outs = [], []
    per = [users // len(clients) + (1 if i < users % len(clients) else 0)
           for i in range(len(clients))]
    first = 0
    for c, n in zip(clients, per):
        if n == 0:
            continue
        out = os.path.join(net.log_dir, f"{tag}-{c.name}.csv")
        if os.path.exists(out):
            os.unlink(out)
        argv = [sys.executable, SELF, "load", "--dst", dst,
                "--port", str(port), "--users", str(n), "--first-user", str(first),
                "--seconds", str(seconds), "--think-s", str(think_s), "--manifest", manifest,
                "--seed", str(seed), "--timeout-s", str(timeout_s), "--go-file", go,
                "--out", out]
        p = c.start(_niced(argv, nice), name=f"{tag}-{c.name}")
        first += n
        procs.append((c, p))
        outs.append((c, out))
    try:
        for _, p in procs:
            p.wait_ready(log_matches(lambda p=p: p, "ready"), timeout=20)
        start = time.time() + 0.2
        write_atomic(go, f"{start:.6f}")
        if during is not None:
            time.sleep(max(0.0, start - time.time()))
            during(start)
        for _, p in procs:
            p.wait(seconds + timeout_s + 30)
    finally:
        for _, p in procs:
            p.stop()
    frames, bins = [], []
    for c, out in outs:
        df = pd.read_csv(out, keep_default_na=False)
        df["client"] = c.name
        frames.append(df)
        bins.append(pd.read_csv(out + ".bins"))
    df = pd.concat(frames, ignore_index=True)
    df["latency_ms"] = (df["t_end"] - df["t_start"]) * 1000
    b = pd.concat(bins, ignore_index=True).groupby("t", as_index=False)["bytes"].sum()
    df.attrs.update(start=start, end=start + seconds, bins=b,
                    ramp_s=min(think_s, seconds / 4) if think_s > 0 else 0.0)
    return df


def summarize(df, t_from: float, t_to: float) -> dict:
    """Over [t_from, t_to): throughput (Mbit/s of response bodies received, from the
    100 ms bins), and of the requests completed in it: count, errors, latency mean/median/p95
    (ms). Bytes still arriving count when they arrive, not when their response completes
    (under overload, large responses in progress would otherwise be missed)."""
    w = df[(df["t_end"] >= t_from) & (df["t_end"] < t_to)]
    ok = w[w["error"] == ""]
    span = t_to - t_from
    b = df.attrs.get("bins")
    if b is not None:  # whole 100 ms slots inside the window
        k0, k1 = math.ceil(t_from / BIN_S - 1e-6), math.floor(t_to / BIN_S + 1e-6)
        k = (b["t"] / BIN_S).round()
        got = b[(k >= k0) & (k < k1)]["bytes"].sum()
        thr = float(got * 8 / ((k1 - k0) * BIN_S) / 1e6) if k1 > k0 else math.nan
    else:
        thr = float(ok["bytes"].sum() * 8 / span / 1e6) if span > 0 else math.nan
    return {"requests": int(len(ok)), "errors": int((w["error"] != "").sum()),
            "throughput_mbit": thr,
            "req_per_s": len(ok) / span if span > 0 else math.nan,
            "latency_mean_ms": float(ok["latency_ms"].mean()) if len(ok) else math.nan,
            "latency_median_ms": float(ok["latency_ms"].median()) if len(ok) else math.nan,
            "latency_p95_ms": float(ok["latency_ms"].quantile(0.95)) if len(ok) else math.nan}


# a UDP probe across faults (the processes are testbed.measure.udpecho's) ----------------

class Echo:
    """An echo server on node, bound to ip:port, for Probe."""

    def __init__(self, node, ip: str, port: int = 9998):
        from testbed.process import listening

        self.proc = node.start([sys.executable, "-m", "testbed.measure.udpecho", "server",
                                "--bind", ip, "--port", str(port), "--name", node.name],
                               name=f"echo{port}", ready=listening(node.ns, port, "udp"))

    def stop(self) -> None:
        self.proc.stop()


class Probe:
    """A UDP probe (a request every interval_ms) from client to an Echo at dst:port,
    across many faults: construct, then stop() -> the udpecho-style DataFrame."""

    def __init__(self, client, dst: str, port: int = 9998, interval_ms: float = 10):
        from testbed.process import log_matches

        self.net = client.net
        self.stop_file = os.path.join(self.net.log_dir, f"probe-{client.name}-{port}.stop")
        self.out = os.path.join(self.net.log_dir, f"probe-{client.name}-{port}.csv")
        for p in (self.stop_file, self.out):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = client.start([sys.executable, "-m", "testbed.measure.udpecho", "client",
                                  "--dst", dst, "--port", str(port), "--interval-ms",
                                  str(interval_ms), "--stop-file", self.stop_file,
                                  "--out", self.out], name=f"probe{port}")
        self.proc.wait_ready(log_matches(lambda: self.proc, "probing"), timeout=15)

    def stop(self):
        import pandas as pd

        with open(self.stop_file, "w"):
            pass
        try:
            self.proc.wait(30)
        finally:
            self.proc.stop()
        return pd.read_csv(self.out)


def interruption_ms(df, t_fault: float, after_s: float = 0.25) -> float:
    """The longest wait between two consecutive replies from just before t_fault to
    after_s after it (the interruption a client of the probe saw); NaN without replies."""
    got = df["t_recv"].dropna().sort_values()
    w = got[(got >= t_fault - 0.1) & (got <= t_fault + after_s)]
    before = got[got < t_fault - 0.1]
    if len(before):
        w = [before.iloc[-1]] + list(w)
    else:
        w = list(w)
    if len(w) < 2:
        return math.nan
    return max(b - a for a, b in zip(w, w[1:])) * 1000


# entry ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    return run_main("hanet_web", _main, argv)


def _main(argv) -> int:
    ap = ArgParser("hanet_web", prog="python -m testbed.failover.hanet_web",
                   description="the HANet experiment's HTTP server and load generator")
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--root", required=True)
    s.add_argument("--port", type=port_arg, default=80)
    ld = sub.add_parser("load")
    ld.add_argument("--dst", required=True)
    ld.add_argument("--port", type=port_arg, default=80)
    ld.add_argument("--users", type=int, required=True)
    ld.add_argument("--first-user", type=int, default=0)
    ld.add_argument("--seconds", type=float, required=True)
    ld.add_argument("--think-s", type=float, default=1.0)
    ld.add_argument("--manifest", required=True)
    ld.add_argument("--seed", type=int, default=1)
    ld.add_argument("--timeout-s", type=float, default=30.0)
    ld.add_argument("--go-file", required=True)
    ld.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    raise_stop_on_signals()
    try:
        if a.mode == "serve":
            serve(a.root, a.port)
        else:
            load_main(a)
    except Stop:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
