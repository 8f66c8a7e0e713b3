"""Paper 003's live migration across a WAN: the management sequence on topologies.wan_migration.

    with Network(wan_migration.build()) as net:
        wm = WanMigration(net, wan_migration.VS_IP, state_mb=100, wws_mb=1,
                          dirty_mbps=10)
        wm.setup()                 # the VS serving at A (vs_a), routes to it
        res = wm.migrate()         # signals 1-3, timestamped; the VS now serves from vs_b
        wm.teardown_vm()           # stop the VM processes (setup() again for another run)

The virtual server (VS) is a real process, ``python -m testbed.migration.wan vm-source``:
it answers UDP echo requests on VS_IP:port (testbed.measure.udpecho's format, tagged with
its site) and holds a memory image of state_mb that a dirtier thread writes at dirty_mbps
(uniformly over a writable working set of wws_mb at the start of the image; wws_mb =
state_mb dirties the whole image). ``vm-sink`` on vs_b receives the image.

The sequence (the paper's three signals from the migration management system):
1. migration imminent: the tunnel PE_a -> PE_b is set up (add_tunnel), PE_b routes
   VS_IP to vs_b, and the VM starts the bulk copy over TCP across the WAN core: round 0
   sends every page, each next round the pages dirtied meanwhile, until the dirty set is at
   most stop_mb, stops shrinking for 3 rounds, or max_rounds (logs "converged").
2. quiesce: the VM stops serving and dirtying and sends the pages still dirty (stop-and-
   copy); the sink checks every page's CRC32, resumes the VS at B (answers on VS_IP) and
   acks; PE_a then moves VS_IP's /32 onto the tunnel (local switchover).
3. PE_b advertises: the ingress PE routes VS_IP straight to PE_b (replace_route), PE_a's
   /32 goes to PE_b over the core and the tunnel is torn down.

Every signal and phase is timestamped (time.time(), the probes' clock). After the run both
sides report the SHA-256 of the whole image (computed after the resume, outside the downtime).
TERM or INT end either process (exit 0).

The network must have the nodes client, ingress, pe_a, pe_b, vs_a and vs_b of
topologies.wan_migration; the caller passes VS_IP (the library never imports topologies/).
The tunnel is the emulator's (testbed.tunnel.add_tunnel).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib

from testbed import daemon
from testbed.errors import TestbedError
from testbed.process import listening, log_matches
from testbed.tunnel import add_tunnel

NAME = "migration.wan"
PAGE = 4096
PAGE_HDR = struct.Struct("!II")          # page number, crc32
FRAME = struct.Struct("!cII")            # kind, round / count, payload length
ECHO = struct.Struct("!Id")              # udpecho's header


def _echo(sock: socket.socket, tag: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(2048)
        except OSError:
            return
        if len(data) >= ECHO.size and not stop.is_set():
            try:
                sock.sendto(data[:ECHO.size] + tag, addr)
            except OSError:
                pass


class VmSource:
    """The VS at A: echo service, memory image, dirtier, pre-copy sender."""

    def __init__(self, a):
        self.a = a
        self.pages = int(a.state_mb * (1 << 20)) // PAGE
        self.wws = max(1, min(self.pages, int(a.wws_mb * (1 << 20)) // PAGE))
        rnd = random.Random(a.seed)
        self.mem = bytearray(rnd.randbytes(self.pages * PAGE))
        self.lock = threading.Lock()
        self.dirty: set = set()
        self.stop_dirty = threading.Event()
        self.start_copy = False  # flags set by the signal handlers (no locks in handlers)
        self.quiesce = False
        self.echo_stop = threading.Event()
        self.echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.echo.bind((a.vs_ip, a.port))
        self.dirtied_bytes = 0
        self.out: dict = {"pages": self.pages, "wws_pages": self.wws, "rounds": []}

    def dirtier(self) -> None:
        rate = self.a.dirty_mbps * (1 << 20) / PAGE  # pages per second
        if rate <= 0:
            return
        rnd = random.Random(self.a.seed + 1)
        t0 = time.monotonic()
        done = 0
        while not self.stop_dirty.is_set():
            due = int((time.monotonic() - t0) * rate)
            with self.lock:
                for _ in range(due - done):
                    p = rnd.randrange(self.wws)
                    off = p * PAGE + rnd.randrange(PAGE // 8) * 8
                    self.mem[off:off + 8] = rnd.getrandbits(64).to_bytes(8, "big")
                    self.dirty.add(p)
            self.dirtied_bytes += (due - done) * PAGE
            done = due
            self.stop_dirty.wait(0.002)

    def _send_pages(self, s: socket.socket, rnd_no: int, pages: list, final: bool) -> int:
        """Send pages in batches; returns how many were sent (all unless quiesced mid-round,
        then the rest goes into the final round)."""
        sent = 0
        batch = 64
        for i in range(0, len(pages), batch):
            if not final and self.quiesce:
                with self.lock:
                    self.dirty.update(pages[i:])
                return sent
            chunk = pages[i:i + batch]
            parts = []
            with self.lock:
                for p in chunk:
                    data = bytes(self.mem[p * PAGE:(p + 1) * PAGE])
                    parts.append(PAGE_HDR.pack(p, zlib.crc32(data)))
                    parts.append(data)
            body = b"".join(parts)
            s.sendall(FRAME.pack(b"P", len(chunk), len(body)) + body)
            sent += len(chunk)
        return sent

    def run(self) -> None:
        a = self.a
        daemon.on_signals(lambda *_: setattr(self, "start_copy", True), (signal.SIGUSR1,))
        daemon.on_signals(lambda *_: setattr(self, "quiesce", True), (signal.SIGUSR2,))
        threading.Thread(target=_echo, args=(self.echo, b"vs_a", self.echo_stop),
                         daemon=True).start()
        dt = threading.Thread(target=self.dirtier, daemon=True)
        dt.start()
        print(f"serving {a.vs_ip}:{a.port} state {self.pages} pages", flush=True)
        while not self.start_copy:
            time.sleep(0.005)
        out = self.out
        out["t_copy_start"] = time.time()
        s = socket.create_connection((a.dst, a.mport), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pages = list(range(self.pages))
        with self.lock:
            self.dirty.clear()
        rnd_no, best, stale = 0, None, 0
        converged = False
        while True:
            t = time.time()
            n = self._send_pages(s, rnd_no, pages, final=False)
            # the round is over when the sink has it (not when it is in our send buffer)
            s.sendall(FRAME.pack(b"R", rnd_no, 0))
            kind, _, _ = FRAME.unpack(daemon.recv_exact(s, FRAME.size))
            if kind != b"r":
                raise ConnectionError(f"unexpected reply {kind!r} to round {rnd_no}")
            out["rounds"].append({"round": rnd_no, "pages": n, "bytes": n * PAGE,
                                  "t_start": t, "t_end": time.time()})
            if self.quiesce:
                break
            with self.lock:
                pages = sorted(self.dirty)
                self.dirty.clear()
            rnd_no += 1
            left = len(pages) * PAGE
            if best is None or left < best:
                best, stale = left, 0
            else:
                stale += 1
            if not converged and (left <= a.stop_mb * (1 << 20) or stale >= 3
                                  or rnd_no >= a.max_rounds):
                converged = True
                out["t_converged"] = time.time()
                out["converged_round"] = rnd_no
                print(f"converged round {rnd_no} dirty {left}", flush=True)
            if converged:
                # mirror the changes until the quiesce signal arrives
                with self.lock:
                    self.dirty.update(pages)
                time.sleep(0.002)
                if self.quiesce:
                    break
                with self.lock:
                    pages = sorted(self.dirty)
                    self.dirty.clear()
        # signal 2: quiesce -> stop-and-copy
        tq = time.time()
        self.echo_stop.set()
        self.echo.close()
        self.stop_dirty.set()
        dt.join()
        with self.lock:  # an interrupted round put its unsent pages back in the dirty set
            final = sorted(self.dirty)
            self.dirty.clear()
        out["t_quiesce"] = tq
        n = self._send_pages(s, rnd_no + 1, final, final=True)
        s.sendall(FRAME.pack(b"F", n, 0))
        out["final_pages"] = n
        out["final_bytes"] = n * PAGE
        kind, _, _ = FRAME.unpack(daemon.recv_exact(s, FRAME.size))
        out["t_acked"] = time.time()
        out["resumed_ok"] = kind == b"K"
        s.close()
        out["dirtied_bytes"] = self.dirtied_bytes
        out["sent_bytes"] = sum(r["bytes"] for r in out["rounds"]) + n * PAGE
        out["sha256"] = hashlib.sha256(self.mem).hexdigest()
        daemon.write_json_atomic(a.out, out)
        print("migrated", flush=True)


def vm_sink(a) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a.mport))
    srv.listen(1)
    print(f"sink listening on {a.mport}", flush=True)
    c, _ = srv.accept()
    out: dict = {"t_first": None, "bytes": 0, "bad_pages": 0, "pages_seen": 0}
    mem = bytearray(a.pages * PAGE)
    seen = bytearray(a.pages)
    while True:
        kind, count, n = FRAME.unpack(daemon.recv_exact(c, FRAME.size))
        if out["t_first"] is None:
            out["t_first"] = time.time()
        if kind == b"F":
            break
        if kind == b"R":
            c.sendall(FRAME.pack(b"r", count, 0))
            continue
        body = memoryview(daemon.recv_exact(c, n))  # the pages are slices of it, no copies
        out["bytes"] += n
        off = 0
        for _ in range(count):
            p, crc = PAGE_HDR.unpack_from(body, off)
            data = body[off + PAGE_HDR.size:off + PAGE_HDR.size + PAGE]
            off += PAGE_HDR.size + PAGE
            if zlib.crc32(data) != crc:
                out["bad_pages"] += 1
                continue
            if p >= a.pages:
                out["bad_pages"] += 1
                continue
            mem[p * PAGE:(p + 1) * PAGE] = data
            seen[p] = 1
    out["t_final"] = time.time()
    out["pages_seen"] = sum(seen)
    ok = out["bad_pages"] == 0 and out["pages_seen"] == a.pages  # every page arrived intact
    if ok:
        # resume: the VS answers at B
        es = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        es.bind((a.vs_ip, a.port))
        threading.Thread(target=_echo, args=(es, b"vs_b", threading.Event()),
                         daemon=True).start()
        out["t_resumed"] = time.time()
        print(f"resumed {a.vs_ip}:{a.port}", flush=True)
    c.sendall(FRAME.pack(b"K" if ok else b"X", 0, 0))
    c.close()
    out["sha256"] = hashlib.sha256(mem).hexdigest()
    daemon.write_json_atomic(a.out, out)
    print("sink done", flush=True)
    while True:  # keep serving until stopped
        signal.pause()


class WanMigration:
    def __init__(self, net, vs_ip: str, port: int = 9999,
                 mport: int = 9400, state_mb: float = 100.0, wws_mb: float = 1.0,
                 dirty_mbps: float = 10.0, stop_mb: float = 1.0, max_rounds: int = 30,
                 tunnel_kind: str = "auto", seed: int = 1, tag: str = ""):
        """vs_ip: the virtual server's address (topologies.wan_migration.VS_IP), a /32
        outside every link's subnet. The tunnel PE_a -> PE_b (testbed.tunnel.add_tunnel,
        of tunnel_kind) is made at signal 1."""
        self.net = net
        self.vs_ip = vs_ip
        self.port, self.mport = port, mport
        self.state_mb, self.wws_mb, self.dirty_mbps = state_mb, wws_mb, dirty_mbps
        self.stop_mb, self.max_rounds, self.kind, self.seed = stop_mb, max_rounds, tunnel_kind, seed
        self.src = self.sink = None
        self.tunnel = None
        self.runs = 0
        self.tag = tag  # names of the processes and their output files
        self._vs_b_addr = False

    def _n(self, name):
        return self.net[name]

    def setup(self) -> None:
        """The VS serving at A with the routes of the starting state."""
        n = self._n
        self.runs += 1
        if f" {self.vs_ip}/32 " not in n("vs_a").run(["ip", "-o", "addr", "show", "dev",
                                                        "lo"]).stdout:
            n("vs_a").run(["ip", "addr", "add", f"{self.vs_ip}/32", "dev", "lo"])
            n("vs_b").run(["ip", "addr", "add", f"{self.vs_ip}/32", "dev", "lo"])
            n("client").add_route(f"{self.vs_ip}/32", via=n("ingress").ip_toward(n("client")))
            n("pe_b").add_route(f"{self.vs_ip}/32", via=n("vs_b").ip_toward(n("pe_b")))
        n("ingress").replace_route(f"{self.vs_ip}/32", via=n("pe_a").ip_toward(n("ingress")))
        n("pe_a").replace_route(f"{self.vs_ip}/32", via=n("vs_a").ip_toward(n("pe_a")))
        tag = f"{self.tag}{self.runs}"
        self.out_src = os.path.join(self.net.log_dir, f"wanvm-src-{tag}.json")
        self.out_sink = os.path.join(self.net.log_dir, f"wanvm-sink-{tag}.json")
        pages = int(self.state_mb * (1 << 20)) // PAGE
        self.sink = n("vs_b").start(
            [sys.executable, "-m", "testbed.migration.wan", "vm-sink", "--vs-ip", self.vs_ip,
             "--port", str(self.port), "--mport", str(self.mport), "--pages", str(pages),
             "--out", self.out_sink], name=f"wanvm-sink{tag}",
            ready=listening(n("vs_b").ns, self.mport))
        self.src = n("vs_a").start(
            [sys.executable, "-m", "testbed.migration.wan", "vm-source", "--vs-ip", self.vs_ip,
             "--port", str(self.port), "--mport", str(self.mport),
             "--dst", n("vs_b").ip_toward(n("pe_b")), "--state-mb", str(self.state_mb),
             "--wws-mb", str(self.wws_mb), "--dirty-mbps", str(self.dirty_mbps),
             "--stop-mb", str(self.stop_mb), "--max-rounds", str(self.max_rounds),
             "--seed", str(self.seed + self.runs), "--out", self.out_src],
            name=f"wanvm-src{tag}", ready=None)
        src = self.src
        src.wait_ready(log_matches(lambda: src, r"^serving"), timeout=60)

    def migrate(self, hold_s: float = 1.0, on_signal=None, timeout: float = 300.0) -> dict:
        """Signals 1-3; hold_s: time between the local switchover and signal 3 (the tunnel
        carries the client meanwhile). on_signal(n) is called right after signal n."""
        n = self._n
        ev: dict = {}
        ev["signal1"] = time.time()
        self.tunnel = add_tunnel(self.net, "pe_a", "pe_b", kind=self.kind)
        ev["tunnel_up"] = time.time()
        self.src.signal(signal.SIGUSR1)
        if on_signal:
            on_signal(1)
        src, sink = self.src, self.sink
        src.wait_ready(log_matches(lambda: src, r"converged"), timeout=timeout, interval=0.002)
        ev["converged"] = time.time()
        ev["signal2"] = time.time()
        src.signal(signal.SIGUSR2)
        sink.wait_ready(log_matches(lambda: sink, r"resumed"), timeout=timeout,
                        interval=0.001)
        ev["resumed_seen"] = time.time()
        n("pe_a").replace_route(f"{self.vs_ip}/32", via=self.tunnel.peer_ip("pe_a"))
        ev["switchover"] = time.time()
        if on_signal:
            on_signal(2)
        src.wait_ready(log_matches(lambda: src, r"migrated"), timeout=timeout)
        time.sleep(hold_s)  # the tunnel phase lasts hold_s (a measured phase)
        ev["signal3"] = time.time()
        n("ingress").replace_route(f"{self.vs_ip}/32", via=n("pe_b").ip_toward(n("ingress")))
        ev["ingress_moved"] = time.time()
        n("pe_a").replace_route(f"{self.vs_ip}/32", via=n("pe_b").ip_toward(n("pe_a")))
        self.tunnel.remove()
        ev["tunnel_down"] = time.time()
        if on_signal:
            on_signal(3)
        sink.wait_ready(log_matches(lambda: sink, r"sink done"), timeout=timeout)
        with open(self.out_src) as f:
            s = json.load(f)
        with open(self.out_sink) as f:
            k = json.load(f)
        if not s.get("resumed_ok"):
            raise TestbedError("the sink refused the image")
        ev.update(copy_start=s["t_copy_start"], quiesce=s["t_quiesce"],
                  resumed=k["t_resumed"], acked=s["t_acked"])
        return {"events": ev, "rounds": s["rounds"], "final_bytes": s["final_bytes"],
                "sent_bytes": s["sent_bytes"], "state_bytes": s["pages"] * PAGE,
                "dirtied_bytes": s["dirtied_bytes"], "bad_pages": k["bad_pages"],
                "state_equal": s["sha256"] == k["sha256"],
                "converged_round": s.get("converged_round"),
                "total_s": k["t_resumed"] - ev["signal1"],
                "precopy_s": ev["signal2"] - s["t_copy_start"],
                "stop_copy_s": k["t_resumed"] - s["t_quiesce"],
                "vm_downtime_s": ev["switchover"] - s["t_quiesce"]}

    def teardown_vm(self) -> None:
        for p in (self.src, self.sink):
            if p is not None:
                p.stop()
        self.src = self.sink = None
        if self.tunnel is not None:
            self.tunnel.remove()
            self.tunnel = None


def body(argv) -> int:
    ap = daemon.ArgParser(NAME, description="Paper 003's virtual server: the source "
                                            "(vm-source) or the target (vm-sink).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("vm-source", "vm-sink"):
        p = sub.add_parser(name)
        p.add_argument("--vs-ip", required=True, type=daemon.ipv4)
        p.add_argument("--port", type=daemon.port, default=9999)
        p.add_argument("--mport", type=daemon.port, default=9400)
        p.add_argument("--out", required=True)
    s = sub.choices["vm-source"]
    s.add_argument("--dst", required=True, type=daemon.ipv4)
    s.add_argument("--state-mb", type=float, default=100.0)
    s.add_argument("--wws-mb", type=float, default=1.0)
    s.add_argument("--dirty-mbps", type=float, default=10.0)
    s.add_argument("--stop-mb", type=float, default=1.0)
    s.add_argument("--max-rounds", type=int, default=30)
    s.add_argument("--seed", type=int, default=1)
    sub.choices["vm-sink"].add_argument("--pages", type=int, required=True)
    a = ap.parse_args(argv)
    daemon.raise_stop_on_signals()
    try:
        if a.cmd == "vm-source":
            VmSource(a).run()
        else:
            vm_sink(a)
    except daemon.Stop:
        pass
    return 0


def main(argv=None) -> int:
    return daemon.run_main(NAME, body, argv)


if __name__ == "__main__":
    sys.exit(main())
