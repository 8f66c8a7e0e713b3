"""A paced TCP byte stream with an integrity check: did a connection survive, intact?

Receiver: `python -m testbed.measure.tcpstream recv --port P --out FILE.json` accepts one
connection, reads to EOF and writes {bytes, sha256, peer, max_gap_s, reset}: max_gap_s is
the longest time without data (a stall), reset is true if the connection was reset.
Sender: `... send --dst IP --port P --rate-mbit R --seconds S --out FILE.json` sends a
deterministic byte stream (a counter pattern) at rate R for S seconds, closes cleanly and
writes {bytes, sha256, local, reset}. Equal sha256 and byte counts on both sides mean the
stream arrived whole and in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

from testbed.daemon.args import ArgParser, float_in, ipv4, port
from testbed.daemon.files import write_json_atomic
from testbed.daemon.loop import Stop, raise_stop_on_signals
from testbed.daemon.main import run_main

CHUNK = 16384


def pattern(offset: int, n: int) -> bytes:
    """n bytes of the stream starting at offset: each 8-byte word is its own word index."""
    first, skip = divmod(offset, 8)
    words = (n + skip + 7) // 8
    buf = b"".join((first + i).to_bytes(8, "big") for i in range(words))
    return buf[skip:skip + n]


def recv(port: int, out: str) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print(f"tcpstream receiver listening on {port}", flush=True)
    conn, peer = srv.accept()
    h, total, reset, max_gap = hashlib.sha256(), 0, False, 0.0
    last = time.monotonic()
    while True:
        try:
            data = conn.recv(1 << 16)
        except ConnectionResetError:
            reset = True
            break
        now = time.monotonic()
        if not data:
            break
        max_gap = max(max_gap, now - last)
        last = now
        h.update(data)
        total += len(data)
    write_json_atomic(out, {"bytes": total, "sha256": h.hexdigest(),
                            "peer": f"{peer[0]}:{peer[1]}", "max_gap_s": round(max_gap, 6),
                            "reset": reset})


def send(dst: str, port: int, rate_mbit: float, seconds: float, out: str) -> None:
    s = socket.create_connection((dst, port), timeout=10)
    s.settimeout(None)
    local = "%s:%d" % s.getsockname()
    print(f"tcpstream sender connected from {local}", flush=True)
    h, sent, reset = hashlib.sha256(), 0, False
    start = time.monotonic()
    bytes_per_s = rate_mbit * 1e6 / 8
    try:
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = int((now - start) * bytes_per_s) + CHUNK
            if sent >= due:
                time.sleep(min(0.005, (sent - due + CHUNK) / bytes_per_s))
                continue
            chunk = pattern(sent, CHUNK)
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver's close, so its JSON is written first
    except (ConnectionResetError, BrokenPipeError):
        reset = True
    s.close()
    write_json_atomic(out, {"bytes": sent, "sha256": h.hexdigest(), "local": local,
                            "reset": reset})


def stream(client, server, port: int = 5600, rate_mbit: float = 10.0, seconds: float = 3.0,
           during=None, timeout: float = 60.0) -> tuple:
    """Stream from node client to node server; call during() while it flows. Returns
    (sender, receiver) dicts as written by the two processes (see the module doc)."""
    from testbed.process import listening, log_matches

    log_dir = client.net.log_dir
    rout = os.path.join(log_dir, f"tcpstream-{server.name}-{port}.recv.json")
    sout = os.path.join(log_dir, f"tcpstream-{client.name}-{port}.send.json")
    me = [sys.executable, "-m", "testbed.measure.tcpstream"]
    rp = server.start(me + ["recv", "--port", str(port), "--out", rout],
                      name=f"tcprecv{port}", ready=listening(server.ns, port))
    sp = client.start(me + ["send", "--dst", server.ip_toward(client), "--port", str(port),
                            "--rate-mbit", str(rate_mbit), "--seconds", str(seconds),
                            "--out", sout], name=f"tcpsend{port}")
    sp.wait_ready(log_matches(lambda: sp, "connected"), timeout=15)
    if during is not None:
        during()
    sp.wait(timeout)
    rp.wait(10)
    with open(sout) as f:
        sent = json.load(f)
    with open(rout) as f:
        got = json.load(f)
    return sent, got


def _main(argv) -> int:
    ap = ArgParser("tcpstream", prog="python -m testbed.measure.tcpstream")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=port, required=True)
    r.add_argument("--out", required=True)
    s = sub.add_parser("send")
    s.add_argument("--dst", type=ipv4, required=True)
    s.add_argument("--port", type=port, required=True)
    s.add_argument("--rate-mbit", type=float_in(1e-6, 1e6), default=10.0)
    s.add_argument("--seconds", type=float_in(0, 1e6), default=5.0)
    s.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    raise_stop_on_signals()  # TERM/INT: leave cleanly, status 0
    try:
        if a.cmd == "recv":
            recv(a.port, a.out)
        else:
            send(a.dst, a.port, a.rate_mbit, a.seconds, a.out)
    except Stop:
        pass
    return 0


def main(argv=None) -> int:
    return run_main("tcpstream", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
