"""Stream sender and receiver over the overlay, for measurements.

    python -m testbed.overlay.tool recv --control SOCK --port P [--count N] [--seconds T]
        [--out CSV] [--ready-file F]
    python -m testbed.overlay.tool send --control SOCK --dst NODE:PORT [--count N]
        [--seconds T] [--size BYTES] [--rate-kbit R] [--datagram] [--link L]
        [--deadline-ms D] [--port P] [--wait-acked S]

Each message carries seq u32 | send time u64 (CLOCK_REALTIME, ns: nodes of one testbed share
the host's clock) | sha256-free filler, so the receiver computes one-way delays. `send` paces
messages at --rate-kbit (payload bits; 0: as fast as the daemon takes them), in bursts of
whatever is due every millisecond. `recv` writes one CSV row per message (seq, t_send,
t_recv, delay_ms) and prints a JSON summary on its last line: received, duplicates,
in_order, first/last times, payload bytes, mbit_s, delay percentiles.
Exit codes: 0; 1 on an overlay error; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time

from testbed.daemon.args import ArgParser, int_in
from testbed.daemon.files import ready_file
from testbed.daemon.main import run_main
from testbed.overlay import wire
from testbed.overlay.client import LINKS, OverlayError, OverlayTimeout, connect

HEAD = struct.Struct("!IQ")


def _dst(text: str) -> tuple:
    """An argparse type: NODE:PORT -> (node, port)."""
    node, sep, port = text.partition(":")
    try:
        if sep:
            return int(node), int(port)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"bad --dst {text!r} (want NODE:PORT)")


def send(a) -> dict:
    c = connect(a.control)
    s = c.socket(a.port, reliable=not a.datagram, link=a.link, deadline_ms=a.deadline_ms)
    dst = a.dst
    filler = b"\0" * (a.size - HEAD.size)
    interval = a.size * 8 / (a.rate_kbit * 1000) if a.rate_kbit else 0.0
    t0 = time.monotonic()
    end = t0 + a.seconds if a.seconds else None
    n = 0
    while (a.count is None or n < a.count) and (end is None or time.monotonic() < end):
        if interval:
            due = int((time.monotonic() - t0) / interval) + 1
            if a.count is not None:
                due = min(due, a.count)
            if due <= n:
                time.sleep(max(0.0, min(0.001, (n + 1) * interval - (time.monotonic() - t0))))
                continue
        else:
            due = n + 1
        while n < due:
            s.sendto(HEAD.pack(n, time.time_ns()) + filler, dst)
            n += 1
    took = time.monotonic() - t0
    acked = None
    if a.wait_acked and not a.datagram:
        acked = s.wait_acked(a.wait_acked)
    s.close()
    return {"sent": n, "seconds": round(took, 3), "bytes": n * a.size,
            "mbit_s": round(n * a.size * 8 / took / 1e6, 3) if took else None,
            "wait_acked_s": None if acked is None else round(acked, 3)}


def recv(a) -> dict:
    c = connect(a.control)
    s = c.socket(a.port, reliable=True, link="best_effort")  # receiving: any kind arrives
    with ready_file(a.ready_file, {"node": s.node, "port": s.port}):
        return _receive(a, s)


def _receive(a, s) -> dict:
    out = open(a.out, "w") if a.out else None
    if out:
        out.write("seq,src,t_send,t_recv,delay_ms\n")
    seen: set = set()
    dups, last, in_order, nbytes, n = 0, -1, True, 0, 0
    first_t = last_t = None
    delays = []
    end = time.monotonic() + a.seconds if a.seconds else None
    idle = a.idle  # once messages came, this long without one ends the stream
    while a.count is None or n < a.count:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            break
        wait = idle if left is None else min(idle, left)
        try:
            data, (src, _sport) = s.recvfrom(timeout=wait)
        except OverlayTimeout:
            if n:
                break  # the stream stopped
            continue
        t_recv = time.time_ns()
        seq, t_send = HEAD.unpack_from(data)
        if seq in seen:
            dups += 1
            continue
        seen.add(seq)
        if seq != last + 1:
            in_order = False
        last = max(last, seq)
        n += 1
        nbytes += len(data)
        delay = (t_recv - t_send) / 1e6
        delays.append(delay)
        first_t = t_recv if first_t is None else first_t
        last_t = t_recv
        if out:
            out.write(f"{seq},{src},{t_send / 1e9:.6f},{t_recv / 1e9:.6f},{delay:.3f}\n")
    if out:
        out.close()
    s.close()
    span = (last_t - first_t) / 1e9 if n > 1 else None
    delays.sort()

    def pct(p):
        return round(delays[min(len(delays) - 1, int(p * len(delays)))], 3) if delays else None

    return {"received": n, "duplicates": dups, "in_order": in_order, "bytes": nbytes,
            "span_s": None if span is None else round(span, 3),
            "mbit_s": round(nbytes * 8 / span / 1e6, 3) if span else None,
            "delay_ms_p50": pct(0.5), "delay_ms_p99": pct(0.99),
            "delay_ms_max": round(delays[-1], 3) if delays else None}


def _main(argv) -> int:
    p = ArgParser("overlay tool", prog="python -m testbed.overlay.tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("send")
    ps.add_argument("--control", required=True)
    ps.add_argument("--dst", required=True, type=_dst)
    ps.add_argument("--port", type=int_in(0, 65535), default=0)
    ps.add_argument("--count", type=int)
    ps.add_argument("--seconds", type=float)
    ps.add_argument("--size", type=int, default=1000)
    ps.add_argument("--rate-kbit", type=float, default=0)
    ps.add_argument("--datagram", action="store_true")
    ps.add_argument("--link", default="reliable", choices=LINKS)
    ps.add_argument("--deadline-ms", type=int)
    ps.add_argument("--wait-acked", type=float, default=0)
    pr = sub.add_parser("recv")
    pr.add_argument("--control", required=True)
    pr.add_argument("--port", type=int_in(0, 65535), required=True)
    pr.add_argument("--count", type=int)
    pr.add_argument("--seconds", type=float)
    pr.add_argument("--idle", type=float, default=5.0, help="stop after this long silent")
    pr.add_argument("--out")
    pr.add_argument("--ready-file")
    a = p.parse_args(argv)
    if a.cmd == "send":
        if not HEAD.size <= a.size <= wire.MAX_PAYLOAD:
            p.error(f"--size must be {HEAD.size}..{wire.MAX_PAYLOAD}")
        if a.count is None and a.seconds is None:
            p.error("give --count or --seconds")
        if a.rate_kbit < 0:
            p.error("--rate-kbit must be >= 0")
    try:
        result = send(a) if a.cmd == "send" else recv(a)
    except OverlayError as e:
        print(f"overlay tool: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    return run_main("overlay tool", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
