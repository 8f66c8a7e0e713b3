"""A migratable video-like streamer: one TCP connection, paced, movable between namespaces.

    python -m testbed.migration.streamer serve --port P --ctl SOCK --out JSON
        [--rate-mbit 2] [--seconds 60] [--burst-s 30] [--image-mb 40]
    python -m testbed.migration.streamer restore --listen IP --mport M --ctl SOCK --out JSON

`serve` accepts one client and sends a deterministic byte stream (testbed.measure.tcpstream's
counter pattern): first burst-s seconds of content at once (to fill the player's buffer),
then rate-mbit, catching up after a pause, until seconds of content are sent. Its state is a
memory image of image-mb random bytes plus the stream position.

Control commands (testbed.migration.control): freeze, resume, status, end (close the
stream cleanly where it is), and
migrate {host, port, timeout_s}: dump the frozen connection with TCP_REPAIR, send the image
to a `restore` process over the migration path and, once it answers OK, close the socket in
repair mode (no FIN, no RST) and exit. If the transfer fails or is refused, the socket leaves
repair mode and the stream goes on from here (resume_on_failure, default true).

`restore` listens on the migration path for one image, verifies its checksum (a corrupt or
truncated one is refused and the sender keeps serving), and on `resume` rebuilds the
connection (same 4-tuple) and carries on streaming: it is then itself migratable.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import sys
import threading
import time

from testbed import daemon
from testbed.kernel.sockq import send_queue_bytes
from testbed.measure.tcpstream import pattern
from testbed.migration import control, repair
from testbed.migration import state
from testbed.migration.state import Image, StateError

NAME = "migration.streamer"
CHUNK = 16384
PAGE = 4096
FAULTS = ("", "corrupt", "truncate")
SETTLE_S = 1.0  # before a dump: let the in-flight data be acked (less to retransmit later)


def drain(sock: socket.socket, timeout_s: float, interval_s: float = 0.002) -> bool:
    """Wait until the peer has acknowledged everything in sock's send queue, at most
    timeout_s (a protocol deadline: not scaled); True if it has."""
    deadline = time.monotonic() + timeout_s
    while send_queue_bytes(sock):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def _log(msg: str) -> None:
    print(f"{time.time():.6f} {msg}", flush=True)


class Streamer:
    def __init__(self, ctl: str, out: str):
        self.out = out
        self.lock = threading.Lock()
        self.frozen = False
        self.migrated = False
        self.conn = None
        self.app: dict = {}
        self.image = b""
        self.start_offset = 0
        self.pending: Image = None
        self.refused = 0
        self.done = threading.Event()
        self.events: list = []
        self.dirty: set = set()  # pages of the memory image written since the last copy
        self.dirty_lock = threading.Lock()
        self.server = control.serve(ctl, self.handle)

    @property
    def image_len(self) -> int:
        return len(self.image)

    @property
    def offset(self) -> int:
        return self.app.get("offset", 0)

    # the stream --------------------------------------------------------------------------
    def stream(self) -> None:
        rate = self.app["rate_mbit"] * 1e6 / 8
        while True:
            with self.lock:
                if self.migrated:
                    return
                frozen = self.frozen
                off, total = self.offset, self.app["total_bytes"]
            if off >= total:
                break
            if frozen:
                time.sleep(0.005)
                continue
            due = self.app["burst_bytes"] + rate * (time.time() - self.app["t0"])
            if off >= due:
                time.sleep(min(0.005, (off - due) / rate + 0.0005))
                continue
            _, w, _ = select.select([], [self.conn], [], 0.05)
            if not w:
                continue
            with self.lock:
                if self.frozen or self.migrated:
                    continue
                n = min(CHUNK, total - self.offset)
                try:
                    sent = self.conn.send(pattern(self.offset, n), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as e:
                    _log(f"stream error: {e}")
                    self.finish(error=str(e))
                    return
                self.app["offset"] += sent
        self.conn.setblocking(True)
        t_close = time.time()
        self.conn.shutdown(socket.SHUT_WR)
        self.conn.settimeout(30)
        try:
            self.conn.recv(1)  # the player's close: its report is written first
        except OSError:
            pass
        self.conn.close()
        self.finish(t_close=t_close)

    def finish(self, **extra) -> None:
        daemon.write_json_atomic(self.out, {
            "start_offset": self.start_offset, "end_offset": self.offset,
            "migrated_out": self.migrated, "refused": self.refused,
            "local": list(self.app.get("local", [])),
            "remote": list(self.app.get("remote", [])),
            "migrations": self.app.get("migrations", 0), "events": self.events, **extra})
        self.done.set()

    # the application's writes to its memory (pre-copy has to chase them) -----------------
    def dirtier(self) -> None:
        """Write random pages of the image at app["dirty_mbps"] MB/s while streaming."""
        import random

        rng = random.Random(self.offset)
        pages = len(self.image) // PAGE
        carry = 0.0
        while not self.done.is_set():
            time.sleep(0.01)
            rate = self.app.get("dirty_mbps", 0) * 1e6
            if self.frozen or self.migrated or not rate or not pages:
                continue
            carry += rate * 0.01 / PAGE
            n, carry = int(carry), carry - int(carry)
            with self.dirty_lock:
                for _ in range(n):
                    p = rng.randrange(pages)
                    self.image[p * PAGE:p * PAGE + 8] = (self.offset + p).to_bytes(8, "big")
                    self.dirty.add(p)

    def _pages(self, pages: list) -> bytes:
        img = self.image
        return b"".join(bytes(img[p * PAGE:(p + 1) * PAGE]) for p in pages)

    # commands ------------------------------------------------------------------------------
    def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "status":
            with self.lock:
                return {"offset": self.offset, "frozen": self.frozen, "migrated": self.migrated,
                        "connected": self.conn is not None, "have_image": self.pending is not None,
                        "refused": self.refused}
        if op == "freeze":
            with self.lock:
                if self.conn is None:
                    raise RuntimeError("no connection to freeze")
                self.frozen = True
            self.events.append(("freeze", time.time()))
            return {"offset": self.offset}
        if op == "resume":
            if self.conn is None and self.pending is not None:
                return self.restore()
            with self.lock:
                if self.conn is None:
                    raise RuntimeError("nothing to resume")
                self.frozen = False
            self.events.append(("resume", time.time()))
            return {"offset": self.offset}
        if op == "end":  # finish the stream at the current position (a clean close)
            with self.lock:
                if self.conn is None or self.migrated:
                    raise RuntimeError("no stream to end here")
                self.app["total_bytes"] = self.offset
            return {"offset": self.offset}
        if op == "migrate":
            args = (msg["host"], int(msg["port"]), float(msg.get("timeout_s", 30)))
            if msg.get("precopy"):
                return self.precopy(*args, stop_bytes=int(msg.get("stop_bytes", 1 << 20)),
                                    max_rounds=int(msg.get("max_rounds", 30)))
            return self.migrate(*args, msg.get("fault", ""),
                                bool(msg.get("resume_on_failure", True)))
        raise ValueError(f"unknown command {op!r}")

    def migrate(self, host: str, port: int, timeout: float, fault: str,
                resume_on_failure: bool) -> dict:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self.lock:
            if not self.frozen or self.conn is None:
                raise RuntimeError("freeze the stream before migrating it")
        t0 = time.time()
        drain(self.conn, SETTLE_S)
        with self.lock:
            st, sendq, recvq = repair.dump(self.conn)
            app = dict(self.app, offset=self.offset, migrations=self.app["migrations"] + 1)
        img = Image(st.to_dict(), app, {"sendq": sendq, "recvq": recvq, "image": self.image})
        t_dump = time.time()
        sent = 0
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.settimeout(timeout)
                for i, chunk in enumerate(img.chunks()):
                    if fault == "corrupt" and i == 3:  # flip one payload byte (tests only)
                        chunk = bytearray(chunk)
                        chunk[len(chunk) // 2] ^= 0xFF
                    if fault == "truncate" and sent > self.image_len // 2:
                        break
                    s.sendall(chunk)
                    sent += len(chunk)
                s.shutdown(socket.SHUT_WR)
                reply = s.makefile("rb").readline().decode().strip()
            if reply != "OK":
                raise StateError(f"target refused the image: {reply or 'no answer'}")
        except (OSError, StateError) as e:
            self._failed(e, True, resume_on_failure, "migration")
        t_sent = self._handed_over(f"migrated out: {sent} bytes to {host}:{port}")
        return {"bytes": sent, "dump_s": t_dump - t0, "transfer_s": t_sent - t_dump,
                "outq": st.outq_len, "inq": st.inq_len, "offset": app["offset"]}

    def precopy(self, host: str, port: int, timeout: float, stop_bytes: int,
                max_rounds: int) -> dict:
        """Live migration by pre-copy: the whole image while the stream runs, then rounds
        of the pages written meanwhile until at most stop_bytes remain (or max_rounds),
        then freeze and send the rest with the TCP state (stop-and-copy)."""
        with self.lock:
            if self.frozen or self.conn is None:
                raise RuntimeError("pre-copy migrates a running stream: resume it first")
        rounds, t_start, dumped = [], time.time(), False
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.settimeout(timeout)

                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def send(img: Image) -> int:
                    """Send one round and wait until the peer has acked all of it: the
                    next round must hold what was written while this one travelled."""
                    n = 0
                    for chunk in img.chunks():
                        s.sendall(chunk)
                        n += len(chunk)
                    if not drain(s, timeout, interval_s=0.001):
                        raise OSError(f"pre-copy round not acked within {timeout:g} s")
                    return n

                with self.dirty_lock:
                    self.dirty.clear()
                    snap = bytes(self.image)
                t = time.time()
                n = send(Image({}, {"kind": "precopy", "round": 0, "image_len": len(snap),
                                    "pages": None}, {"data": snap}))
                rounds.append({"round": 0, "bytes": n, "pages": len(snap) // PAGE,
                               "seconds": time.time() - t})
                del snap
                while True:
                    with self.dirty_lock:
                        pages = sorted(self.dirty)
                        if len(pages) * PAGE <= stop_bytes or len(rounds) > max_rounds:
                            break
                        self.dirty.clear()
                        data = self._pages(pages)
                    t = time.time()
                    n = send(Image({}, {"kind": "precopy", "round": len(rounds),
                                        "pages": pages}, {"data": data}))
                    rounds.append({"round": len(rounds), "bytes": n, "pages": len(pages),
                                   "seconds": time.time() - t})
                # stop-and-copy
                t_freeze = time.time()
                with self.lock:
                    self.frozen = True
                self.events.append(("freeze", t_freeze))
                drain(self.conn, SETTLE_S)
                with self.lock, self.dirty_lock:
                    st, sendq, recvq = repair.dump(self.conn)
                    dumped = True
                    pages = sorted(self.dirty)
                    self.dirty.clear()
                    app = dict(self.app, offset=self.offset,
                               migrations=self.app["migrations"] + 1)
                    data = self._pages(pages)
                    sha = hashlib.sha256(self.image).hexdigest()
                t = time.time()
                n = send(Image(st.to_dict(), {"kind": "final", "pages": pages, "state": app,
                                              "image_sha256": sha},
                               {"sendq": sendq, "recvq": recvq, "data": data}))
                s.shutdown(socket.SHUT_WR)
                reply = s.makefile("rb").readline().decode().strip()
                rounds.append({"round": len(rounds), "bytes": n, "pages": len(pages),
                               "seconds": time.time() - t, "final": True})
            if reply != "OK":
                raise StateError(f"target refused the image: {reply or 'no answer'}")
        except (OSError, StateError) as e:
            self._failed(e, dumped, True, "pre-copy migration")
        t_sent = self._handed_over(f"pre-copied out in {len(rounds)} rounds to {host}:{port}")
        return {"bytes": sum(r["bytes"] for r in rounds), "rounds": rounds,
                "t_freeze": t_freeze, "dump_s": 0.0, "transfer_s": t_sent - t_start,
                "final_bytes": rounds[-1]["bytes"], "outq": st.outq_len, "inq": st.inq_len,
                "offset": app["offset"]}

    def _failed(self, e: Exception, dumped: bool, resume: bool, what: str) -> None:
        """A migration out failed: the original keeps the connection (out of repair mode)
        and, if resume, streams on. Raises RuntimeError."""
        if dumped:
            repair.repair(self.conn, False)
        with self.lock:
            if resume:
                self.frozen = False
        self.events.append(("migrate_failed", time.time(), str(e)))
        _log(f"{what} failed, {'resuming' if resume else 'frozen'}: {e}")
        raise RuntimeError(f"migration failed: {e}") from None

    def _handed_over(self, msg: str) -> float:
        """The target has the connection: close ours silently (in repair mode: neither FIN
        nor RST) and finish. Returns the time."""
        t_sent = time.time()
        with self.lock:
            self.migrated = True
            self.conn.close()
        self.events.append(("migrated", t_sent))
        _log(msg)
        self.finish()
        return t_sent

    # restore side ----------------------------------------------------------------------------
    def listen_images(self, host: str, port: int, timeout: float = 300.0) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(4)
        _log(f"restore listening on {host}:{port}")

        def loop() -> None:
            while self.pending is None:
                c, peer = srv.accept()
                with c:
                    c.settimeout(timeout)
                    try:
                        img = self._receive(c)
                    except (OSError, StateError) as e:
                        self.refused += 1
                        _log(f"refused image from {peer[0]}: {e}")
                        try:
                            c.sendall(f"ERR {e}\n".encode())
                        except OSError:
                            pass
                        continue
                    self.pending = img
                    c.sendall(b"OK\n")
                    _log(f"image received: {img.app['offset']} bytes streamed so far")
            srv.close()

        threading.Thread(target=loop, daemon=True).start()

    @staticmethod
    def _receive(c: socket.socket) -> Image:
        """One image, or a pre-copy sequence (rounds of pages, then the final one)."""
        first = state.read(c.recv_into, eof=False)
        if first.app.get("kind") != "precopy":
            if c.recv_into(memoryview(bytearray(1))):
                raise StateError("oversized image: bytes after the checksum")
            return first
        image = bytearray(int(first.app["image_len"]))
        image[:] = first.parts["data"]
        while True:
            img = state.read(c.recv_into, eof=False)
            pages, data = img.app.get("pages") or [], img.parts["data"]
            if len(data) != len(pages) * PAGE:
                raise StateError("pre-copy round: data does not match its page list")
            for i, p in enumerate(pages):
                image[p * PAGE:(p + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
            if img.app.get("kind") == "final":
                break
        if hashlib.sha256(image).hexdigest() != img.app["image_sha256"]:
            raise StateError("pre-copy: the assembled image differs from the source's")
        return Image(img.tcp, img.app["state"], {"sendq": img.parts["sendq"],
                                                 "recvq": img.parts["recvq"], "image": image})

    def restore(self) -> dict:
        img = self.pending
        t0 = time.time()
        st = repair.TcpState.from_dict(img.tcp)
        image = img.parts["image"]  # verified by the image's checksum on arrival
        conn = repair.restore(st, bytes(img.parts["sendq"]), bytes(img.parts["recvq"]))
        with self.lock:
            self.conn, self.app = conn, dict(img.app)
            # the received buffer itself (writable: the dirtier writes into it), no copy
            writable = isinstance(image, bytearray) or (isinstance(image, memoryview)
                                                        and not image.readonly)
            self.image = image if writable else bytearray(image)
            self.start_offset = self.offset
            self.frozen = False
        self.events.append(("restored", time.time()))
        _log(f"restored {st.local} -> {st.remote} at offset {self.offset}")
        threading.Thread(target=self.stream, daemon=True).start()
        threading.Thread(target=self.dirtier, daemon=True).start()
        return {"offset": self.offset, "restore_s": time.time() - t0,
                "local": list(conn.getsockname()), "remote": list(conn.getpeername())}


def body(argv) -> int:
    ap = daemon.ArgParser(NAME, description="A migratable streamer (serve), or the target "
                                            "that restores one (restore).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="0.0.0.0", type=daemon.ipv4)
    s.add_argument("--port", type=daemon.port, required=True)
    s.add_argument("--rate-mbit", type=float, default=2.0)
    s.add_argument("--seconds", type=float, default=60.0)
    s.add_argument("--burst-s", type=float, default=30.0)
    s.add_argument("--image-mb", type=float, default=40.0)
    s.add_argument("--dirty-mbps", type=float, default=0.0,
                   help="MB/s of random page writes into the memory image while streaming")
    r = sub.add_parser("restore")
    r.add_argument("--listen", required=True, type=daemon.ipv4)
    r.add_argument("--mport", type=daemon.port, required=True)
    for p in (s, r):
        p.add_argument("--ctl", required=True)
        p.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        for name in ("rate_mbit", "seconds", "image_mb"):
            if getattr(a, name) <= 0:
                ap.error(f"--{name.replace('_', '-')} must be positive")
        if a.burst_s < 0 or a.dirty_mbps < 0:
            ap.error("--burst-s and --dirty-mbps must be >= 0")
    st = Streamer(a.ctl, a.out)
    daemon.raise_stop_on_signals()
    try:
        if a.cmd == "restore":
            st.listen_images(a.listen, a.mport)
        else:
            serve(st, a)
        st.done.wait()
        st.server.idle()
    except daemon.Stop:
        pass
    finally:
        st.server.close()
    return 0


def serve(st: Streamer, a) -> None:
    """Accept the player and stream to it (in this thread) until the end or a migration."""
    image = bytearray(os.urandom(int(a.image_mb * 1e6)))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(1)
    _log(f"streamer listening on {a.port}")
    conn, peer = srv.accept()
    srv.close()
    rate = a.rate_mbit * 1e6 / 8
    st.conn, st.image = conn, image
    st.app = {"offset": 0, "rate_mbit": a.rate_mbit, "burst_bytes": int(a.burst_s * rate),
              "total_bytes": int((a.burst_s + a.seconds) * rate), "t0": time.time(),
              "dirty_mbps": a.dirty_mbps, "migrations": 0,
              "local": list(conn.getsockname()), "remote": list(peer)}
    _log(f"streaming to {peer[0]}:{peer[1]}")
    threading.Thread(target=st.dirtier, daemon=True).start()
    st.stream()


def main(argv=None) -> int:
    return daemon.run_main(NAME, body, argv)


if __name__ == "__main__":
    sys.exit(main())
