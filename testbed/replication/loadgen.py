"""Closed-loop clients: `python -m testbed.replication.loadgen --server IP:PORT --clients K
--seconds T [--size 200] [--warmup S] [--timeout 10] --out FILE.json`.

K clients in one process (one selector; each its own TCP connection and random client_id,
one action outstanding): a client sends its next update as soon as the previous one is
answered, as the paper's clients do. Each update is a strict `set` of the client's own key
padded to `--size` bytes (klen u16 | key | value, db.py's strict payload).

The run: connect every client, then `warmup` seconds whose answers are not counted, then
the measured window of `seconds`, then up to `--grace` seconds for the actions still
outstanding (their outcomes are counted apart, not in the throughput). A client whose
connection drops, or whose action is not answered within `--timeout`, counts as
`unavailable` and stops (its outstanding action's outcome is unknown; never a silent
loss). An error reply counts in `errors` (with its reasons) and the client goes on after
`--error-pause` seconds.

The JSON written to --out: server, clients, size, warmup, seconds, completed (answered OK
in the window), errors, unavailable, timeouts, throughput (completed / seconds), latency
mean / p50 / p90 / p99 / max (ms, over the window), latencies_ms (every answered action
of the window, in completion order, at most --max-samples), completed_total (warmup and
grace included), outstanding_at_end, error_reasons {reason: count}.
"""

from __future__ import annotations

import os
import selectors
import socket
import statistics
import struct
import sys
import time

from testbed.daemon import ArgParser, addr, float_in, int_in, run_main, write_json_atomic
from testbed.replication import protocol


def update_payload(index: int, size: int) -> bytes:
    key = b"lg%d" % index
    head = struct.pack("!H", len(key)) + key
    return head + b"v" * max(0, size - len(head))


class Client:
    __slots__ = ("i", "sock", "cid", "seq", "sent_at", "decoder", "alive", "resume_at",
                 "payload", "out")

    def __init__(self, i: int, sock: socket.socket, size: int):
        self.i, self.sock = i, sock
        self.cid = struct.unpack("!Q", os.urandom(8))[0]
        self.seq = 0
        self.sent_at = None
        self.decoder = protocol.Decoder()
        self.alive = True
        self.resume_at = 0.0
        self.payload = update_payload(i, size)
        self.out = b""


class LoadGen:
    def __init__(self, server: tuple, clients: int, size: int, warmup: float, seconds: float,
                 timeout: float, grace: float, error_pause: float, max_samples: int):
        self.server, self.size = server, size
        self.warmup, self.seconds, self.timeout = warmup, seconds, timeout
        self.grace, self.error_pause, self.max_samples = grace, error_pause, max_samples
        self.sel = selectors.DefaultSelector()
        self.clients = []
        self.lat: list = []
        self.c = {"completed": 0, "completed_total": 0, "errors": 0, "unavailable": 0,
                  "timeouts": 0, "errors_total": 0}
        self.reasons: dict = {}
        for i in range(clients):
            try:
                s = socket.create_connection(server, timeout=timeout)
            except OSError as e:
                raise ConnectionError(f"cannot connect to {server[0]}:{server[1]}: "
                                      f"{e.strerror or e}") from None
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            cl = Client(i, s, size)
            self.clients.append(cl)
            self.sel.register(s, selectors.EVENT_READ, cl)

    def _send(self, cl: Client, now: float) -> None:
        cl.seq += 1
        req = protocol.Request(cl.cid, cl.seq, protocol.UPDATE, protocol.STRICT, cl.payload)
        cl.out = protocol.encode_request(req)
        cl.sent_at = now
        self._flush(cl)

    def _flush(self, cl: Client) -> None:
        try:
            k = cl.sock.send(cl.out)
            cl.out = cl.out[k:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._lose(cl, "send failed")
            return
        self.sel.modify(cl.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if cl.out
                                                         else 0), cl)

    def _lose(self, cl: Client, why: str, timeout: bool = False) -> None:
        if not cl.alive:
            return
        cl.alive = False
        self.c["unavailable"] += 1
        if timeout:
            self.c["timeouts"] += 1
        self.reasons[f"unavailable: {why}"] = self.reasons.get(f"unavailable: {why}", 0) + 1
        self.sel.unregister(cl.sock)
        cl.sock.close()

    def _on_reply(self, cl: Client, rep: protocol.Reply, now: float, t_start: float,
                  t_end: float, sending: bool) -> None:
        if rep.client_seq != cl.seq or cl.sent_at is None:
            return
        lat = now - cl.sent_at
        cl.sent_at = None
        in_window = t_start <= now <= t_end
        if rep.ok:
            self.c["completed_total"] += 1
            if in_window:
                self.c["completed"] += 1
                if len(self.lat) < self.max_samples:
                    self.lat.append(lat * 1000.0)
        else:
            self.c["errors_total"] += 1
            if in_window:
                self.c["errors"] += 1
            self.reasons[rep.reason] = self.reasons.get(rep.reason, 0) + 1
            cl.resume_at = now + self.error_pause
            return
        if sending:
            self._send(cl, now)

    def run(self) -> dict:
        t0 = time.monotonic()
        t_start, t_end = t0 + self.warmup, t0 + self.warmup + self.seconds
        t_stop = t_end + self.grace
        for cl in self.clients:
            self._send(cl, t0)
        while True:
            now = time.monotonic()
            sending = now < t_end
            busy = [cl for cl in self.clients if cl.alive and cl.sent_at is not None]
            if not sending and (not busy or now >= t_stop):
                break
            for cl in busy:
                if now - cl.sent_at > self.timeout:
                    self._lose(cl, f"no reply within {self.timeout:g} s", timeout=True)
            if sending:
                for cl in self.clients:
                    if cl.alive and cl.sent_at is None and now >= cl.resume_at:
                        self._send(cl, now)
            wait = min(0.05, max(0.0, (t_end if sending else t_stop) - now))
            for key, mask in self.sel.select(wait):
                cl = key.data
                if not cl.alive:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(cl)
                if not mask & selectors.EVENT_READ or not cl.alive:
                    continue
                try:
                    data = cl.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    self._lose(cl, f"connection lost: {e.strerror or e}")
                    continue
                if not data:
                    self._lose(cl, "connection closed by the replica")
                    continue
                try:
                    msgs, _ = cl.decoder.feed(data)
                except protocol.ProtocolError as e:
                    self._lose(cl, f"bad reply: {e}")
                    continue
                now = time.monotonic()
                for m in msgs:
                    if isinstance(m, protocol.Reply):
                        self._on_reply(cl, m, now, t_start, t_end, now < t_end)
        outstanding = sum(1 for cl in self.clients if cl.alive and cl.sent_at is not None)
        for cl in self.clients:
            if cl.alive:
                cl.sock.close()
        return self.result(outstanding)

    def result(self, outstanding: int) -> dict:
        lat = self.lat
        out = {"server": f"{self.server[0]}:{self.server[1]}", "clients": len(self.clients),
               "size": self.size, "warmup": self.warmup, "seconds": self.seconds,
               **self.c, "throughput": round(self.c["completed"] / self.seconds, 2),
               "outstanding_at_end": outstanding, "error_reasons": self.reasons}
        if lat:
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
            out.update(latency_mean_ms=round(statistics.fmean(lat), 3),
                       latency_p50_ms=round(statistics.median(lat), 3),
                       latency_p90_ms=round(q[89], 3), latency_p99_ms=round(q[98], 3),
                       latency_max_ms=round(max(lat), 3))
        out["latencies_ms"] = [round(x, 3) for x in lat]
        return out


def main(argv) -> int:
    ap = ArgParser("replication.loadgen")
    ap.add_argument("--server", type=addr, required=True, help="IP:PORT of the replica")
    ap.add_argument("--clients", type=int_in(1, 1000), default=1)
    ap.add_argument("--seconds", type=float_in(0.05, 86400), required=True)
    ap.add_argument("--size", type=int_in(1, protocol.MAX_PAYLOAD), default=200)
    ap.add_argument("--warmup", type=float_in(0, 3600), default=0.0)
    ap.add_argument("--timeout", type=float_in(0.01, 3600), default=10.0)
    ap.add_argument("--grace", type=float_in(0, 3600), default=2.0)
    ap.add_argument("--error-pause", type=float_in(0, 60), default=0.01)
    ap.add_argument("--max-samples", type=int_in(0, 10_000_000), default=200_000)
    ap.add_argument("--out", required=True, help="the JSON results file")
    a = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        ap.error(f"--out: no directory {out_dir}")
    try:
        lg = LoadGen(a.server, a.clients, a.size, a.warmup, a.seconds, a.timeout, a.grace,
                     a.error_pause, a.max_samples)
    except ConnectionError as e:
        print(f"replication.loadgen: {e}", file=sys.stderr, flush=True)
        return 1
    res = lg.run()
    write_json_atomic(a.out, res)
    print(f"replication.loadgen: {res['completed']} actions in {a.seconds:g} s "
          f"({res['throughput']}/s), mean {res.get('latency_mean_ms')} ms, "
          f"errors {res['errors']}, unavailable {res['unavailable']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main("replication.loadgen", main))
