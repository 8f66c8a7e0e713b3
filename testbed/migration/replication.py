"""Paper 003's storage replication agent: a primary writes blocks, a replica persists them.

    rep = Replica(("0.0.0.0", 9500), path="/tmp/disk.img").start()  # or the process:
    #   python -m testbed.migration.replication replica --port 9500 --out disk.img
    p = Primary(("10.0.0.2", 9500), mode="async", max_bytes=1 << 20)
    lat = p.write(block=7, data=b"x" * 4096)    # seconds this write held the caller
    p.to_sync()                                 # drain the pending writes, then sync
    p.pending()                                 # (writes, bytes) issued but not acked
    p.close()

Modes:
- ``sync``: a write returns after the replica wrote the block (and fsync'ed it) and acked:
  at least one round trip per write.
- ``async``: a write is queued and returns; a background thread sends the queue; acks come
  back on the same connection. Bounded by bytes (``max_bytes``: a write waits while the
  unacked bytes would exceed it) and/or by time (``max_lag_s``: a write waits while the
  oldest unacked write is older than that).
- ``checkpoint_s``: asynchronous with periodic checkpoints: the queue is shipped only every
  checkpoint_s seconds, so a crash of the primary loses the writes since the last shipped
  checkpoint (the RPO is a function of the interval).
- ``to_sync()``: the switch before migration: new writes wait, the queue is drained until
  every issued write is acked, then every write is replicated synchronously.

Wire (TCP, big-endian): frame = kind (1 byte) seq (u64) block (u64) length (u32) + data.
Kinds: W write (primary -> replica), A ack of seq (replica -> primary; acks are in order),
S stat request, T stat reply (seq = last persisted seq, block = writes, length = 0, data =
JSON).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Optional

from testbed import daemon

NAME = "migration.replication"
HDR = struct.Struct("!cQQI")
MODES = ("sync", "async")


class ReplicationError(RuntimeError):
    pass


def _frame(kind: bytes, seq: int, block: int, data: bytes = b"") -> bytes:
    return HDR.pack(kind, seq, block, len(data)) + data


def _read_frame(s: socket.socket) -> tuple:
    kind, seq, block, n = HDR.unpack(daemon.recv_exact(s, HDR.size))
    return kind, seq, block, daemon.recv_exact(s, n) if n else b""


class Replica:
    """The replica: accepts primaries, writes each block at block x len into path (or keeps
    it in memory), fsyncs if asked, then acks. Stats: last persisted seq per connection."""

    def __init__(self, addr: tuple, path: Optional[str] = None, fsync: bool = True):
        self.addr = addr
        self.path = path
        self.fsync = fsync and path is not None
        self.blocks: dict = {}
        self.last_seq = 0
        self.writes = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path else None

    def start(self) -> "Replica":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.addr)
        s.listen(16)
        self.sock = s
        self.addr = s.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def stats(self) -> dict:
        with self.lock:
            return {"last_seq": self.last_seq, "writes": self.writes, "bytes": self.bytes}

    def _serve(self, c: socket.socket) -> None:
        try:
            while True:
                kind, seq, block, data = _read_frame(c)
                if kind == b"W":
                    if self._fd is not None:
                        os.pwrite(self._fd, data, block * len(data))
                        if self.fsync:
                            os.fdatasync(self._fd)
                    else:
                        self.blocks[block] = data
                    with self.lock:
                        self.last_seq = max(self.last_seq, seq)
                        self.writes += 1
                        self.bytes += len(data)
                    c.sendall(_frame(b"A", seq, block))
                elif kind == b"S":
                    c.sendall(_frame(b"T", 0, 0, json.dumps(self.stats()).encode()))
        except (ConnectionError, OSError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def replica_stats(addr: tuple, timeout: float = 10.0) -> dict:
    """Ask a replica (from any client) what it has persisted."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(_frame(b"S", 0, 0))
        kind, _, _, data = _read_frame(s)
        if kind != b"T":
            raise ReplicationError(f"unexpected reply {kind!r}")
        return json.loads(data)


class Primary:
    def __init__(self, addr: tuple, mode: str = "sync", max_bytes: Optional[int] = None,
                 max_lag_s: Optional[float] = None, checkpoint_s: Optional[float] = None,
                 timeout: float = 30.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, v in (("max_bytes", max_bytes), ("max_lag_s", max_lag_s),
                        ("checkpoint_s", checkpoint_s)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        self.mode = mode
        self.max_bytes, self.max_lag_s, self.checkpoint_s = max_bytes, max_lag_s, checkpoint_s
        self.timeout = timeout
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.cv = threading.Condition()
        self.send_lock = threading.Lock()
        self.seq = 0                     # last issued
        self.acked = 0                   # last acked (acks in order)
        self.unacked: collections.OrderedDict = collections.OrderedDict()  # seq -> (t, n)
        self.unacked_bytes = 0
        self.queue: collections.deque = collections.deque()  # not yet sent (async)
        self.last_acked_issue_t: Optional[float] = None  # issue time of the last acked write
        self.closed = False
        self._flush = False
        self.error: Optional[BaseException] = None
        self.switch: Optional[dict] = None
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._sender.start()

    # -- background ---------------------------------------------------------------------
    def _read_acks(self) -> None:
        try:
            while True:
                kind, seq, _, _ = _read_frame(self.sock)
                if kind != b"A":
                    continue
                with self.cv:
                    while self.unacked and next(iter(self.unacked)) <= seq:
                        _, (t_issue, n) = self.unacked.popitem(last=False)
                        self.unacked_bytes -= n
                        self.last_acked_issue_t = t_issue
                    self.acked = max(self.acked, seq)
                    self.cv.notify_all()
        except (ConnectionError, OSError) as e:
            with self.cv:
                if not self.closed:
                    self.error = e
                self.cv.notify_all()

    def _send_loop(self) -> None:
        next_cp = time.monotonic() + (self.checkpoint_s or 0)
        while True:
            with self.cv:
                while not self.closed and self.error is None and not self.queue:
                    self.cv.wait()
                if self.closed or self.error is not None:
                    return
                if self.checkpoint_s and not self._flush:
                    now = time.monotonic()
                    if next_cp > now:
                        self.cv.wait(next_cp - now)
                        continue
                    while next_cp <= now:
                        next_cp += self.checkpoint_s
                batch = list(self.queue)
                self.queue.clear()
            try:
                with self.send_lock:
                    self.sock.sendall(b"".join(batch))
            except OSError as e:
                with self.cv:
                    self.error = e
                    self.cv.notify_all()
                return

    # -- API --------------------------------------------------------------------------
    def _check(self) -> None:
        if self.error is not None:
            raise ReplicationError(f"replica connection lost: {self.error}")
        if self.closed:
            raise ReplicationError("primary closed")

    def _wait(self, pred, what: str) -> None:
        end = time.monotonic() + self.timeout
        while not pred():
            self._check()
            left = end - time.monotonic()
            if left <= 0:
                raise ReplicationError(f"timed out waiting for {what}")
            self.cv.wait(left)

    def write(self, block: int, data: bytes) -> float:
        """Replicate one block; returns the seconds the caller was held."""
        t0 = time.monotonic()
        with self.cv:
            self._check()
            while self.switch is not None and self.switch.get("t_end") is None:
                self.cv.wait()  # the async -> sync switch is draining
                self._check()
            if self.mode == "async":
                if self.max_bytes is not None:
                    self._wait(lambda: not self.unacked
                               or self.unacked_bytes + len(data) <= self.max_bytes,
                               "the byte bound")
                if self.max_lag_s is not None:
                    self._wait(lambda: not self.unacked or time.monotonic()
                               - next(iter(self.unacked.values()))[0] <= self.max_lag_s,
                               "the time bound")
            self.seq += 1
            seq = self.seq
            self.unacked[seq] = (t0, len(data))
            self.unacked_bytes += len(data)
            frame = _frame(b"W", seq, block, data)
            if self.mode == "async":
                self.queue.append(frame)
                self.cv.notify_all()
                return time.monotonic() - t0
        try:
            with self.send_lock:
                self.sock.sendall(frame)
        except OSError as e:
            with self.cv:
                self.error = e
                self.cv.notify_all()
            raise ReplicationError(f"replica connection lost: {e}") from e
        with self.cv:
            self._wait(lambda: self.acked >= seq, f"the ack of write {seq}")
        return time.monotonic() - t0

    def pending(self) -> tuple:
        """(writes, bytes) issued and not yet acked by the replica."""
        with self.cv:
            return len(self.unacked), self.unacked_bytes

    def to_sync(self) -> dict:
        """Drain every pending write (shipping the queue now), then go synchronous."""
        with self.cv:
            self._check()
            n, b = len(self.unacked), self.unacked_bytes
            self.switch = {"t_start": time.monotonic(), "pending_writes": n,
                           "pending_bytes": b}
            self._flush = True
            self.cv.notify_all()
            try:
                self._wait(lambda: not self.unacked, "the drain")
            finally:
                self.mode = "sync"
                self.switch["t_end"] = time.monotonic()
                self.switch["drain_s"] = self.switch["t_end"] - self.switch["t_start"]
                self.cv.notify_all()
            return dict(self.switch)

    def crash(self) -> int:
        """The primary dies: the connection is cut at once, unsent writes are lost.
        Returns the last seq acked before the crash."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
            acked = self.acked
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()
        return acked

    def close(self) -> None:
        with self.cv:
            if self.closed:
                return
            self._flush = True
            self.cv.notify_all()
            try:
                self._wait(lambda: not self.unacked, "the final drain")
            finally:
                self.closed = True
                self.cv.notify_all()
        self.sock.close()


def workload(p: Primary, writes: int, block_size: int, rate: float = 0.0,
             switch_at: Optional[int] = None, crash_at_s: Optional[float] = None,
             blocks: int = 1024) -> dict:
    """Issue writes (rate per second, 0 = back to back); optionally switch to sync before
    write switch_at, or crash after crash_at_s. Returns per-write rows and the outcome."""
    rows = []
    t0 = time.monotonic()
    switch = None
    crashed = None
    for i in range(writes):
        if rate:
            due = t0 + i / rate
            while (now := time.monotonic()) < due:
                if crash_at_s is not None and now - t0 >= crash_at_s:
                    break
                time.sleep(min(0.001, due - now))
        if crash_at_s is not None and time.monotonic() - t0 >= crash_at_s:
            crashed = {"t": time.monotonic(), "issued": p.seq, "acked": p.crash()}
            break
        if switch_at is not None and i == switch_at:
            switch = p.to_sync()
            switch["pending_after"] = p.pending()[0]
        data = (i.to_bytes(8, "big") * (block_size // 8 + 1))[:block_size]
        mode = p.mode
        t = time.monotonic()
        lat = p.write(i % blocks, data)
        rows.append({"seq": p.seq, "t": t - t0, "mode": mode, "latency_s": lat})
    out = {"rows": rows, "switch": switch, "crash": None}
    if crashed is not None:
        lost = crashed["issued"] - crashed["acked"]
        last_acked_t = p.last_acked_issue_t if p.last_acked_issue_t is not None else t0
        out["crash"] = {"issued": crashed["issued"], "acked": crashed["acked"],
                        "lost_writes": lost, "t_crash": crashed["t"] - t0,
                        "rpo_s": crashed["t"] - last_acked_t}
    else:
        p.close()
    return out


def body(argv) -> int:
    ap = daemon.ArgParser(NAME, description="Paper 003's storage replication: a replica, a "
                                            "primary running a write workload, or a stat.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replica")
    r.add_argument("--port", type=daemon.port, default=9500)
    r.add_argument("--out", default=None, help="the disk image (default: in memory)")
    r.add_argument("--no-fsync", action="store_true")
    w = sub.add_parser("primary")
    w.add_argument("--dst", required=True, type=daemon.ipv4)
    w.add_argument("--port", type=daemon.port, default=9500)
    w.add_argument("--mode", choices=MODES, default="sync")
    w.add_argument("--max-bytes", type=int, default=None)
    w.add_argument("--max-lag-s", type=float, default=None)
    w.add_argument("--checkpoint-s", type=float, default=None)
    w.add_argument("--writes", type=int, default=100)
    w.add_argument("--block-size", type=int, default=4096)
    w.add_argument("--rate", type=float, default=0.0)
    w.add_argument("--switch-at", type=int, default=None)
    w.add_argument("--crash-at-s", type=float, default=None)
    w.add_argument("--out", required=True)
    st = sub.add_parser("stat")
    st.add_argument("--dst", required=True, type=daemon.ipv4)
    st.add_argument("--port", type=daemon.port, default=9500)
    a = ap.parse_args(argv)
    daemon.raise_stop_on_signals()  # Stop: run_main returns 0
    return run(a)


def run(a) -> int:
    if a.cmd == "stat":
        print(json.dumps(replica_stats((a.dst, a.port))), flush=True)
        return 0
    if a.cmd == "replica":
        rep = Replica(("0.0.0.0", a.port), path=a.out, fsync=not a.no_fsync).start()
        try:
            print(f"replica listening on {a.port}", flush=True)
            while True:
                signal.pause()
        finally:
            rep.close()
    try:
        p = Primary((a.dst, a.port), mode=a.mode, max_bytes=a.max_bytes,
                    max_lag_s=a.max_lag_s, checkpoint_s=a.checkpoint_s)
    except ValueError as e:
        raise daemon.UsageError(str(e)) from None
    print("primary connected", flush=True)
    res = workload(p, a.writes, a.block_size, a.rate, a.switch_at, a.crash_at_s)
    daemon.write_json_atomic(a.out, res)
    print("done", flush=True)
    return 0


def main(argv=None) -> int:
    return daemon.run_main(NAME, body, argv)


if __name__ == "__main__":
    sys.exit(main())
