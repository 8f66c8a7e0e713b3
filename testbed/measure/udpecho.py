"""The processes behind measure.udp_probe (kept free of pandas so they start fast).

Server: `python -m testbed.measure.udpecho server --port P --name NAME [--bind IP]` echoes
each request with its own name, so a client sees which server answered (for failover
experiments). Bound to one address (--bind), replies come from it; bound to 0.0.0.0 they
come from whatever address the route to the client prefers.
Client: `... client --dst IP --port P --interval-ms 10 (--seconds S | --stop-file F)
--out FILE.csv` prints "probing" when it starts, sends until S seconds have passed or F
appears, collects late replies for a while longer, and writes one row per request: seq,
t_send, t_recv (NaN if no reply), rtt_ms, responder.
"""

from __future__ import annotations

import csv
import io
import math
import os
import select
import socket
import struct
import sys
import time
from typing import Optional

from testbed.daemon.args import ArgParser, float_in, ipv4, port
from testbed.daemon.files import write_atomic
from testbed.daemon.loop import Stop, raise_stop_on_signals
from testbed.daemon.main import run_main

HDR = struct.Struct("!Id")  # seq, client send time


def serve(port: int, name: str, bind: str = "0.0.0.0") -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    tag = name.encode()[:64]
    print(f"udpprobe server {name} listening on {bind}:{port}", flush=True)
    while True:
        try:
            data, addr = s.recvfrom(2048)
            if len(data) >= HDR.size:
                s.sendto(data[:HDR.size] + tag, addr)
        except OSError:  # e.g. ENETUNREACH while our interface is down: a fault being
            continue  # emulated, not a reason to stop answering once it is back


def probe(dst: str, port: int, interval_ms: float, seconds: Optional[float], out: str,
          stop_file: Optional[str] = None) -> None:
    """Send for `seconds` (then collect replies for 1 s more), or until stop_file appears
    (then 0.5 s more)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    n = int(seconds * 1000 / interval_ms) if seconds is not None else math.inf
    sent: dict = {}
    recv: dict = {}
    print("probing", flush=True)
    start = time.monotonic()
    seq = 0
    end = start + seconds + 1.0 if seconds is not None else math.inf
    while True:
        now = time.monotonic()
        if stop_file and end == math.inf and seq % 10 == 0 and os.path.exists(stop_file):
            n, end = seq, now + 0.5  # collect the last replies
        if now >= end:
            break
        next_send = start + seq * interval_ms / 1000.0
        if seq < n and now >= next_send:
            sent[seq] = time.time()
            try:
                s.sendto(HDR.pack(seq, sent[seq]), (dst, port))
            except OSError:
                pass  # no route while the network changes: counts as lost
            seq += 1
            continue
        timeout = max(0.0, (next_send if seq < n else end) - now)
        r, _, _ = select.select([s], [], [], timeout)
        while r:
            try:
                data, _ = s.recvfrom(2048)
            except BlockingIOError:
                break
            if len(data) >= HDR.size:
                q, _t = HDR.unpack_from(data)
                recv.setdefault(q, (time.time(), data[HDR.size:].decode(errors="replace")))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["seq", "t_send", "t_recv", "rtt_ms", "responder"])
    for q in range(seq):
        t_recv, who = recv.get(q, (math.nan, ""))
        w.writerow([q, f"{sent[q]:.6f}", f"{t_recv:.6f}",
                    f"{(t_recv - sent[q]) * 1000:.3f}", who])
    write_atomic(out, buf.getvalue())


def _main(argv) -> int:
    ap = ArgParser("udpecho", prog="python -m testbed.measure.udpecho")
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("server")
    a.add_argument("--port", type=port, required=True)
    a.add_argument("--name", default=socket.gethostname())
    a.add_argument("--bind", type=ipv4, default="0.0.0.0")
    b = sub.add_parser("client")
    b.add_argument("--dst", type=ipv4, required=True)
    b.add_argument("--port", type=port, required=True)
    b.add_argument("--interval-ms", type=float_in(0.001, 3.6e6), default=10)
    until = b.add_mutually_exclusive_group(required=True)
    until.add_argument("--seconds", type=float)
    until.add_argument("--stop-file")
    b.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    raise_stop_on_signals()
    try:
        if args.mode == "server":
            serve(args.port, args.name, args.bind)
        else:
            probe(args.dst, args.port, args.interval_ms, args.seconds, args.out,
                  args.stop_file)
    except Stop:
        pass
    return 0


def main(argv=None) -> int:
    return run_main("udpecho", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
