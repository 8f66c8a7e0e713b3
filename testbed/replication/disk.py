"""The per-replica log file: length-prefixed, checksummed records and forced writes.

Every replica (engine, COReL, 2PC) writes what it must remember to one append-only file:

    record := length u32 | crc32 u32 | data (length bytes)          (big-endian)

At open the file is read back (`records()`, for recovery); a torn or corrupt tail (a length
that runs past the end, or a checksum that does not match) is cut off, so that new records
follow the last good one.

Writes go through **one writer thread per disk**, which serialises them as one disk arm
does: a forced append costs `write + fsync + extra_latency_s` of that thread's time (the
extra latency stands for the seek and rotation of the paper's disks: 8.5 ms by default), so
forced appends queue behind each other and a replica that forces every action is bounded
at about 1 / (fsync + extra) actions per second, as in the paper. Forced appends are not
batched into one fsync (no group commit): the paper's baselines force per action.

`done()` of a forced append runs **on the loop's thread**: the writer thread puts it on a
queue and writes a byte to a wake-up socketpair registered on the `testbed.daemon` Loop; the
loop drains it and runs the callbacks in the order the writes completed. An unforced append
is handed to the writer (so the file keeps the order of the appends) and its `done()` runs
at once, inside append(). Unforced records are not written one by one: the writer waits up
to GATHER_S (5 ms) for more, and writes every queued record up to and including the next
forced one with one write() (a forced append, BATCH_RECORDS queued, flush() or close() end
the wait at once). Handing each record to the thread cost a wake-up and a GIL hand-off: at
14 replicas and 1240 actions/s that was 23 % of a replica's busy time (cProfile of r2:
1.2 of 5.3 s in append, 0.95 s of it releasing the lock). A SIGKILL may lose the unforced
records of the last GATHER_S, never one before a completed forced write.

With `forced=False` (the "asynchronous disk" runs) no append is
forced and none waits, but the appends that asked for force are still counted
(`force_requests`), so the number of forced writes per action stays measurable.

`stats()`: writes (records written), forced_writes (real fsync'd writes), force_requests
(appends that asked for force, in both modes), bytes, force_seconds (writer time spent in
fsync + extra latency), queued (appends not written yet).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
import time
import zlib
from typing import Callable, Optional

HEAD = struct.Struct("!II")  # length, crc32
MAX_RECORD = 16 << 20
BATCH_RECORDS = 256  # unforced records written together at most
GATHER_S = 0.005  # how long unforced records may wait for others to share their write


class DiskError(OSError):
    """The log cannot be opened or written (the message names the file)."""


def encode_record(data: bytes) -> bytes:
    return HEAD.pack(len(data), zlib.crc32(data)) + data


def read_records(path: str) -> tuple:
    """(records, good_length) of a log file: the records up to the first torn or corrupt
    one, and the file offset just after the last good record."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return [], 0
    out, off = [], 0
    while off + HEAD.size <= len(buf):
        n, crc = HEAD.unpack_from(buf, off)
        end = off + HEAD.size + n
        if n > MAX_RECORD or end > len(buf):
            break
        data = buf[off + HEAD.size:end]
        if zlib.crc32(data) != crc:
            break
        out.append(data)
        off = end
    return out, off


class Disk:
    """An append-only record log with a writer thread (see the module's doc)."""

    def __init__(self, path: str, forced: bool = True, extra_latency_s: float = 0.0085,
                 loop=None):
        if extra_latency_s < 0:
            raise ValueError(f"extra_latency_s must be >= 0, got {extra_latency_s}")
        self.path = path
        self.forced = bool(forced)
        self.extra_latency_s = float(extra_latency_s)
        self.loop = loop
        try:
            self._records, good = read_records(path)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            self.torn_bytes = os.fstat(self.fd).st_size - good
            os.ftruncate(self.fd, good)  # drop a torn tail
            os.lseek(self.fd, good, os.SEEK_SET)
        except OSError as e:
            raise DiskError(f"cannot open log {path}: {e.strerror or e}") from None
        self._stats = {"writes": 0, "forced_writes": 0, "force_requests": 0, "bytes": 0,
                       "force_seconds": 0.0}
        self._cv = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (bytes, force, done)
        self._completed: collections.deque = collections.deque()  # done callbacks
        self._forced_queued = 0  # forced appends in the queue
        self._flush_req = False
        self._busy = False
        self._closing = False
        self.error: Optional[str] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if loop is not None:
            loop.add(self._wake_r, self._on_wake)
        self._thread = threading.Thread(target=self._writer, name=f"disk:{path}",
                                        daemon=True)
        self._thread.start()

    # the caller's side (loop thread) -------------------------------------------------------
    def records(self) -> list:
        """The records found at open, in order (recovery)."""
        return list(self._records)

    def append(self, record: bytes, force: bool,
               done: Optional[Callable[[], None]] = None) -> None:
        if self._closing:
            raise DiskError(f"log {self.path} is closed")
        if self.error:
            raise DiskError(self.error)
        really = bool(force) and self.forced
        if force:
            self._stats["force_requests"] += 1
        entry = (encode_record(bytes(record)), really, done if really else None)
        with self._cv:
            was_empty = not self._queue
            self._queue.append(entry)
            if really:
                self._forced_queued += 1
                self._cv.notify()
            elif was_empty or len(self._queue) >= BATCH_RECORDS:
                self._cv.notify()  # once per batch, not per record: no thread hand-off each
        if not really and done is not None:
            done()

    def stats(self) -> dict:
        s = dict(self._stats)
        s["force_seconds"] = round(s["force_seconds"], 6)
        s["queued"] = len(self._queue) + (1 if self._busy else 0)
        return s

    def run_completed(self) -> int:
        """Run the done() callbacks of completed forced writes (the loop does this on
        its own through the wake-up fd; without a loop, call it yourself)."""
        n = 0
        while self._completed:
            fn = self._completed.popleft()
            n += 1
            fn()
        return n

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued append is written; then run completed callbacks.
        True if the queue drained within timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._flush_req = True
            self._cv.notify_all()
            try:
                while (self._queue or self._busy) and self.error is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cv.wait(left)
            finally:
                self._flush_req = False
        self.run_completed()
        return self.error is None

    def close(self) -> None:
        """Write what is queued, stop the writer, close the file. Callbacks of writes
        still pending are not run."""
        if self._closing:
            return
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if self.loop is not None:
            self.loop.remove(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.run_completed()

    # the writer thread ---------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:  # closing and drained
                    return
                if not (self._forced_queued or self._closing or self._flush_req
                        or len(self._queue) >= BATCH_RECORDS):
                    self._cv.wait(GATHER_S)  # let unforced records gather (a forced one,
                    # a full batch, a flush or close cuts this short)
                # every record up to and including the first forced one, in one write
                batch, force, done = [], False, None
                while self._queue:
                    data, f, d = self._queue.popleft()
                    batch.append(data)
                    if f:
                        force, done = True, d
                        self._forced_queued -= 1
                        break
                self._busy = True
            try:
                self._write(b"".join(batch), force, len(batch))
            except OSError as e:
                self.error = f"writing log {self.path}: {e.strerror or e}"
            with self._cv:
                if done is not None and self.error is None:
                    # before _busy clears: flush() must find it once the queue looks done
                    self._completed.append(done)
                self._busy = False
                self._cv.notify_all()
            if done is not None and self.error is None:
                try:
                    self._wake_w.send(b"x")
                except (BlockingIOError, OSError):
                    pass  # already readable (full) or closing

    def _write(self, data: bytes, force: bool, records: int = 1) -> None:
        view = memoryview(data)
        while view:
            k = os.write(self.fd, view)
            view = view[k:]
        st = self._stats
        st["writes"] += records
        st["bytes"] += len(data)
        if force:
            t0 = time.monotonic()
            os.fsync(self.fd)
            if self.extra_latency_s:
                time.sleep(self.extra_latency_s)
            st["force_seconds"] += time.monotonic() - t0
            st["forced_writes"] += 1
