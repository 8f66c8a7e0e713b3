"""Paced fixed-size messages over one kernel TCP connection, with per-message one-way delay.

Receiver: `python -m testbed.measure.msgstream recv --port P --out CSV [--ready-file F]`
accepts one connection, reads SIZE-byte messages until EOF and writes one CSV row per
message (seq, t_send, t_recv, delay_ms); its last stdout line is a JSON summary.
Sender: `... send --dst IP --port P --rate-kbit R --seconds S [--size 1000] [--cc NAME]
[--nodelay]` connects (TCP_CONGESTION set per socket before connect), and sends a message
every size*8/rate seconds. Each message is seq u32 | size u32 | generation time u64
(CLOCK_REALTIME ns; namespaces of one testbed share the host's clock) | filler. The time
is the message's scheduled generation time, so time spent blocked in the sender's
socket buffer counts as delay, as it does for an application.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from testbed.daemon.args import ArgParser, port
from testbed.daemon.files import ready_file
from testbed.daemon.io import PeerClosed, recv_exact
from testbed.daemon.loop import Stop, raise_stop_on_signals
from testbed.daemon.main import run_main

HEAD = struct.Struct("!IIQ")


def recv(a) -> dict:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a.port))
    srv.listen(1)
    with ready_file(a.ready_file, {"port": a.port}):
        conn, _peer = srv.accept()
        return _receive(a, srv, conn)


def _receive(a, srv, conn) -> dict:
    out = open(a.out, "w") if a.out else None
    if out:
        out.write("seq,t_send,t_recv,delay_ms\n")
    n, last, in_order, delays = 0, -1, True, []
    while True:
        try:  # EOF at a message boundary ends the stream; within one, drops its rest
            seq, size, t_send = HEAD.unpack(recv_exact(conn, HEAD.size))
            recv_exact(conn, max(0, size - HEAD.size))
        except PeerClosed:
            break
        t_recv = time.time_ns()
        in_order &= seq == last + 1
        last = seq
        n += 1
        d = (t_recv - t_send) / 1e6
        delays.append(d)
        if out:
            out.write(f"{seq},{t_send / 1e9:.6f},{t_recv / 1e9:.6f},{d:.3f}\n")
    if out:
        out.close()
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    conn.close()
    srv.close()
    delays.sort()
    return {"received": n, "in_order": in_order,
            "receiver_cc": info.split(b"\0")[0].decode(),
            "delay_ms_mean": round(sum(delays) / n, 3) if n else None,
            "delay_ms_max": round(delays[-1], 3) if delays else None}


def send(a) -> dict:
    s = socket.socket()
    if a.cc:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, a.cc.encode())
    if a.nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    s.connect((a.dst, a.port))
    s.settimeout(None)
    cc = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()
    interval_ns = int(a.size * 8 / (a.rate_kbit * 1000) * 1e9)
    filler = b"\0" * (a.size - HEAD.size)
    t0 = time.time_ns()
    n = 0
    end = t0 + int(a.seconds * 1e9)
    while True:
        due = t0 + n * interval_ns
        if due >= end:
            break
        now = time.time_ns()
        if now < due:
            time.sleep((due - now) / 1e9)
        s.sendall(HEAD.pack(n, a.size, due) + filler)
        n += 1
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the receiver to close: every byte arrived
    s.close()
    return {"sent": n, "cc": cc, "nodelay": bool(a.nodelay)}


def _main(argv) -> int:
    p = ArgParser("msgstream", prog="python -m testbed.measure.msgstream")
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("send")
    ps.add_argument("--dst", required=True)
    ps.add_argument("--port", type=port, required=True)
    ps.add_argument("--rate-kbit", type=float, required=True)
    ps.add_argument("--seconds", type=float, required=True)
    ps.add_argument("--size", type=int, default=1000)
    ps.add_argument("--cc")
    ps.add_argument("--nodelay", action="store_true")
    pr = sub.add_parser("recv")
    pr.add_argument("--port", type=port, required=True)
    pr.add_argument("--out")
    pr.add_argument("--ready-file")
    a = p.parse_args(argv)
    if a.cmd == "send" and (a.size < HEAD.size or a.rate_kbit <= 0):
        p.error(f"--size must be >= {HEAD.size} and --rate-kbit > 0")
    raise_stop_on_signals()  # TERM/INT: leave cleanly (the ready file removed), status 0
    try:
        result = send(a) if a.cmd == "send" else recv(a)
    except Stop:
        return 0
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    return run_main("msgstream", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
