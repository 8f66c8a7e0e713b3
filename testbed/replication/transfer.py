"""PERSISTENT_JOIN's state transfer (paper 004, section "dynamic replica instantiation"),
both ends, on the replica server's Loop; and the harness's join() / leave().

A new replica r is started with the addresses of some members (server config `join_via`).
Its `Joiner` connects by TCP to the first one's transfer port and says HELLO(r, offset,
digest). The member (`TransferService`, every engine server runs one) acts as r's
representative: if r's PERSISTENT_JOIN is not green there it issues one
(`engine.request_join(r)`, once per server) and answers WAIT every second until the JOIN is
green (the engine calls on_joined(r), or the next tick sees `snapshot_for(r)`); then it
sends META(size, digest, start) and the snapshot from `start` in CHUNKs, then END.
`snapshot_for(r)` is the same bytes at every member that ordered the JOIN, so when the
member dies (EOF) or goes quiet (nothing for `timeout` s: a partition) the joiner
connects to the next address of its list, round robin, and asks for the rest: HELLO with
the offset it has and the digest it was told; a member whose digest is the same resumes
there, one with another digest (cannot happen unless a snapshot differs) starts at 0. A
member that has not ordered the JOIN yet issues its own (the engine counts only the first
green one). The joiner checks the length and the SHA-256 (`Engine.snapshot_digest`) at END
and hands the bytes to `on_complete` (the server builds `Engine.from_snapshot` and only then
starts its group communication); a bad digest drops what it had and starts again.

Frames (both ways): `len u32 | type u8 | seq u32 | body | tag`, tag =
HMAC-SHA256(key, nonce | type | seq | body)[:16] (testbed.sealed), `len` counting from
`type`. `nonce` is the 16 random bytes the joiner puts first in its HELLO (seq 0), so a
member's frames are bound to one connection; seq counts each direction's frames from 0 and
a receiver takes only the next one. A frame that fails any check closes the connection.
HELLO's own replay is harmless: it only makes a member request the join again.

    HELLO   nonce 16 | joiner u16 | offset u64 | digest 32 (zeros: none yet)
    WAIT    (empty)                     JOIN issued, not green here yet
    META    size u64 | digest 32 | start u64
    CHUNK   offset u64 | bytes
    END     (empty)
    REFUSE  reason (utf-8, one line)    not the engine, r left, r already a server

Pacing (member side): `chunk` bytes per CHUNK; `pace` > 0 sends one CHUNK per `pace`
seconds (a test knob to make a transfer last), 0 as fast as the socket takes them.

Harness side: join(replicas, node, via) writes `join_via` into node's configuration and
starts it; wait_joined() waits for its status to say the transfer is done; leave(replicas,
node, via) asks a running member over its control socket (server.py: {"op": "leave",
"server": id}) to issue PERSISTENT_LEAVE and waits until its status no longer lists node
among the servers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import socket
import struct
import time
from typing import Callable, Optional

from testbed.daemon import Stream
from testbed.sealed import TAG_LEN, tag

HELLO, WAIT, META, CHUNK, END, REFUSE = range(1, 7)
NAMES = {HELLO: "hello", WAIT: "wait", META: "meta", CHUNK: "chunk", END: "end",
         REFUSE: "refuse"}
HEAD = struct.Struct("!IBI")          # len, type, seq
HELLO_BODY = struct.Struct("!16sHQ32s")
META_BODY = struct.Struct("!Q32sQ")
OFFSET = struct.Struct("!Q")
MAX_FRAME = (1 << 20) + 64
USER_TIMEOUT_MS = 10_000  # unacknowledged data for this long ends a member's connection
MAX_CHUNK = 1 << 20
WAIT_EVERY = 1.0
OUT_HIGH = 256 * 1024                 # bytes queued on a member's socket before it waits


class TransferError(ValueError):
    """A frame to drop the connection for (one line)."""


def digest_of(blob: bytes) -> bytes:
    """SHA-256 of a snapshot (the raw form of Engine.snapshot_digest)."""
    return hashlib.sha256(blob).digest()


def encode(key: bytes, nonce: bytes, ftype: int, seq: int, body: bytes = b"") -> bytes:
    t = tag(key, nonce + bytes([ftype]) + struct.pack("!I", seq) + body)
    return HEAD.pack(1 + 4 + len(body) + TAG_LEN, ftype, seq) + body + t


def hello(key: bytes, nonce: bytes, joiner: int, offset: int, digest: bytes) -> bytes:
    return encode(key, nonce, HELLO, 0, HELLO_BODY.pack(nonce, joiner, offset,
                                                        digest or bytes(32)))


class Reader:
    """Frames out of a byte stream, checked: tag, then the next seq. The nonce is set by
    the HELLO (member side) or known beforehand (joiner side)."""

    def __init__(self, key: bytes, nonce: Optional[bytes] = None):
        self.key, self.nonce, self.buf, self.seq = key, nonce, bytearray(), 0

    def feed(self, data: bytes) -> list:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = struct.unpack_from("!I", self.buf)
            if not 5 + TAG_LEN <= n <= MAX_FRAME:
                raise TransferError(f"bad frame length {n}")
            if len(self.buf) < 4 + n:
                break
            frame = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            ftype, seq = frame[0], struct.unpack_from("!I", frame, 1)[0]
            body, t = frame[5:-TAG_LEN], frame[-TAG_LEN:]
            nonce = self.nonce
            if nonce is None:
                if ftype != HELLO or len(body) != HELLO_BODY.size:
                    raise TransferError("the first frame must be a HELLO")
                nonce = body[:16]
            if tag(self.key, nonce + frame[:5] + body) != t:
                raise TransferError("bad tag")
            if seq != self.seq:
                raise TransferError(f"frame {seq} out of order (expected {self.seq})")
            self.nonce = nonce
            self.seq += 1
            out.append((ftype, body))
        return out


# member side ------------------------------------------------------------------------------

class _Serve:
    """One joiner's connection at a member."""

    def __init__(self, svc: "TransferService", sock):
        self.svc = svc
        self.reader = Reader(svc.key)
        self.joiner = None
        self.want_offset, self.want_digest = 0, b""
        self.blob, self.pos, self.seq = None, 0, 0
        self.done = False
        self.last_wait = 0.0
        self.stream = Stream(svc.loop, sock, self._data, self._closed,
                              on_drain=None if svc.pace > 0 else
                              lambda: self.tick(time.monotonic()))

    def _send(self, ftype: int, body: bytes = b"") -> None:
        self.stream.send(encode(self.svc.key, self.reader.nonce, ftype, self.seq, body))
        self.seq += 1

    def _data(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for ftype, body in frames:
                if ftype != HELLO or self.joiner is not None:
                    raise TransferError(f"unexpected {NAMES.get(ftype, ftype)} frame")
                _n, self.joiner, self.want_offset, d = HELLO_BODY.unpack(body)
                self.want_digest = d if any(d) else b""
                self.svc.counts["hellos"] += 1
        except (TransferError, struct.error) as e:
            self.svc.counts["bad_frames"] += 1
            self.svc.log(f"transfer: dropping a joiner's connection: {e}")
            self.stream.close()
            return
        self.tick(time.monotonic())

    def refuse(self, reason: str) -> None:
        self._send(REFUSE, reason.encode()[:500])
        self.done = True
        self.svc.counts["refused"] += 1

    def tick(self, now: float) -> None:
        """Advance: wait for the JOIN, then send the snapshot (one chunk a tick if paced)."""
        svc, j = self.svc, self.joiner
        if j is None or self.done or not self.stream.open:
            return
        if self.blob is None:
            eng = svc.engine()
            if eng is None or not hasattr(eng, "snapshot_for"):
                return self.refuse("this server does not run the engine (yet)")
            blob = eng.snapshot_for(j)
            if blob is None:
                if j in eng.left:
                    return self.refuse(f"server {j} left the system")
                if j in eng.servers:
                    return self.refuse(f"server {j} is a server already")
                if j not in svc.requested:
                    svc.requested.add(j)
                    eng.request_join(j)
                    svc.counts["joins_requested"] += 1
                if now - self.last_wait >= WAIT_EVERY:
                    self.last_wait = now
                    self._send(WAIT)
                return
            self.blob, d = bytes(blob), digest_of(blob)
            ok = self.want_digest == d and self.want_offset <= len(blob)
            self.pos = self.want_offset if ok else 0
            svc.counts["resumed"] += bool(self.pos)
            self._send(META, META_BODY.pack(len(blob), d, self.pos))
        while self.pos < len(self.blob) and len(self.stream.out) < OUT_HIGH:
            piece = self.blob[self.pos:self.pos + svc.chunk]
            self._send(CHUNK, OFFSET.pack(self.pos) + piece)
            self.pos += len(piece)
            svc.counts["bytes"] += len(piece)
            if svc.pace > 0:
                break
        if self.pos >= len(self.blob) and len(self.stream.out) < OUT_HIGH:
            self._send(END)
            self.done = True
            svc.counts["served"] += 1

    def _closed(self) -> None:
        self.svc.conns.discard(self)


class TransferService:
    """Every engine server's side: a TCP listener on (ip, port); engine() returns the
    server's Engine (None while it has none)."""

    def __init__(self, loop, key: bytes, ip: str, port: int, engine: Callable,
                 chunk: int = 65536, pace: float = 0.0, log: Callable = print):
        self.loop, self.key, self.engine, self.log = loop, key, engine, log
        self.chunk, self.pace = chunk, pace
        self.conns: set = set()
        self.requested: set = set()
        self.counts = {k: 0 for k in ("connections", "hellos", "bad_frames", "refused",
                                      "joins_requested", "resumed", "served", "bytes")}
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((ip, port))
        self.listener.listen(16)
        self.listener.setblocking(False)
        loop.add(self.listener, self._accept)
        self.closed = False
        loop.after(self._interval(), self._tick)

    def _interval(self) -> float:
        return self.pace if self.pace > 0 else 0.2

    def _accept(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.counts["connections"] += 1
            # a joiner that vanishes (a partition) stops acknowledging what we send: the
            # kernel then ends the connection after this long instead of ~15 minutes
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
            self.conns.add(_Serve(self, sock))

    def _tick(self, now: float) -> None:
        if self.closed:
            return
        for c in list(self.conns):
            c.tick(now)
        self.loop.after(self._interval(), self._tick)

    def on_joined(self, joiner: int) -> None:
        """The engine's on_joined: joiner's JOIN is green here; start its waiting transfers."""
        now = time.monotonic()
        for c in list(self.conns):
            if c.joiner == joiner:
                c.tick(now)

    def status(self) -> dict:
        return {**self.counts, "open": len(self.conns), "requested": sorted(self.requested)}

    def close(self) -> None:
        self.closed = True
        for c in list(self.conns):
            c.stream.close()
        self.loop.remove(self.listener)
        self.listener.close()


# joiner side ------------------------------------------------------------------------------

class Joiner:
    """A joining server's side: fetch snapshot_for(me) from the members at via (IPv4s,
    round robin), then on_complete(blob) once, on the loop."""

    def __init__(self, loop, key: bytes, me: int, via: list, port: int,
                 on_complete: Callable, timeout: float = 3.0, retry: float = 0.2,
                 log: Callable = print):
        self.loop, self.key, self.me, self.via, self.port = loop, key, me, list(via), port
        self.on_complete, self.timeout, self.retry, self.log = on_complete, timeout, retry, log
        self.data, self.size, self.digest = bytearray(), None, b""
        self.phase, self.peer, self.index = "connecting", None, -1
        self.stream, self.reader, self.last_rx = None, None, 0.0
        self.connecting = None                  # the socket while its connect is in progress
        self.sources: list = []                 # [{"peer", "from", "to"}] per META
        self.attempts, self.errors, self.last_error = 0, 0, ""
        self.t0, self.seconds = time.monotonic(), None
        self.closed = False
        loop.after(0, lambda now: self._connect_next())
        loop.after(self.timeout / 4, self._watch)

    def _connect_next(self) -> None:
        if self.closed or self.phase == "done":
            return
        self.index = (self.index + 1) % len(self.via)
        self.peer = self.via[self.index]
        self.phase = "connecting"
        self.attempts += 1
        self.last_rx = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        rc = sock.connect_ex((self.peer, self.port))
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(f"connect to {self.peer}: {os.strerror(rc)}")
            return
        self.connecting = sock
        self.loop.add(sock, lambda mask: self._connected(sock), selectors.EVENT_WRITE)

    def _abandon_connect(self) -> None:
        if self.connecting is not None:
            self.loop.remove(self.connecting)
            self.connecting.close()
            self.connecting = None

    def _connected(self, sock) -> None:
        self.loop.remove(sock)
        self.connecting = None
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            sock.close()
            self._failed(f"connect to {self.peer}: {os.strerror(rc)}")
            return
        nonce = os.urandom(16)
        self.reader = Reader(self.key, nonce)
        self.stream = Stream(self.loop, sock, self._data, self._lost)
        self.phase = "hello"
        self.last_rx = time.monotonic()
        self.stream.send(hello(self.key, nonce, self.me, len(self.data), self.digest))

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
        if not self.closed and self.phase != "done":
            self.loop.after(self.retry, lambda now: self._connect_next())

    def _lost(self) -> None:
        if self.phase != "done":
            self._failed(f"{self.peer} closed the connection in phase {self.phase}")

    def _drop(self, why: str) -> None:
        self.log(f"transfer: leaving {self.peer}: {why}")
        s, self.stream = self.stream, None
        if s is not None:
            s.on_close = lambda: None
            s.close()
        self._failed(why)

    def _watch(self, now: float) -> None:
        if self.closed or self.phase == "done":
            return
        if self.stream is not None and now - self.last_rx > self.timeout:
            self._drop(f"nothing from {self.peer} for {self.timeout:g} s")
        elif self.connecting is not None and now - self.last_rx > self.timeout:
            self._abandon_connect()  # SYNs dropped (a partition): try the next member
            self._failed(f"connect to {self.peer}: no answer in {self.timeout:g} s")
        self.loop.after(self.timeout / 4, self._watch)

    def _data(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            for ftype, body in self.reader.feed(data):
                self._frame(ftype, body)
                if self.stream is None or self.phase == "done":
                    return
        except (TransferError, struct.error) as e:
            self._drop(str(e))

    def _frame(self, ftype: int, body: bytes) -> None:
        if ftype == WAIT:
            self.phase = "waiting"
        elif ftype == REFUSE:
            self._drop("refused: " + body.decode("utf-8", "replace"))
        elif ftype == META:
            size, d, start = META_BODY.unpack(body)
            if d != self.digest or start == 0:
                self.data, self.digest = bytearray(), d
                if start != 0:
                    raise TransferError("a new snapshot must start at 0")
            elif start != len(self.data):
                raise TransferError(f"resumes at {start}, have {len(self.data)}")
            self.size = size
            self.phase = "transfer"
            self.sources.append({"peer": self.peer, "from": start, "to": start})
        elif ftype == CHUNK:
            if self.phase != "transfer":
                raise TransferError("a chunk before META")
            (off,) = OFFSET.unpack_from(body)
            if off != len(self.data) or off + len(body) - OFFSET.size > self.size:
                raise TransferError(f"chunk at {off}, have {len(self.data)}")
            self.data += body[OFFSET.size:]
            self.sources[-1]["to"] = len(self.data)
        elif ftype == END:
            blob = bytes(self.data)
            if self.phase != "transfer" or len(blob) != self.size:
                raise TransferError(f"END at {len(blob)} of {self.size}")
            if digest_of(blob) != self.digest:
                self.data, self.digest = bytearray(), b""
                raise TransferError("the snapshot's digest does not match")
            self.phase, self.seconds = "done", time.monotonic() - self.t0
            s, self.stream = self.stream, None
            s.on_close = lambda: None
            s.close()
            self.on_complete(blob)
        else:
            raise TransferError(f"unexpected {NAMES.get(ftype, ftype)} frame")

    def status(self) -> dict:
        return {"phase": self.phase, "peer": self.peer, "offset": len(self.data),
                "size": self.size, "digest": self.digest.hex() or None,
                "sources": list(self.sources), "attempts": self.attempts,
                "errors": self.errors, "last_error": self.last_error,
                "seconds": self.seconds}

    def close(self) -> None:
        self.closed = True
        self._abandon_connect()
        if self.stream is not None:
            self.stream.on_close = lambda: None
            self.stream.close()


# harness side -----------------------------------------------------------------------------

def join_status(replicas, node: str) -> dict:
    """node's joiner status ({} if it is not joining or has no status yet)."""
    st = replicas.status(node) or {}
    return st.get("join") or {}


def join(replicas, node: str, via, wait: bool = True, timeout: float = 30.0) -> None:
    """Start node's server as a joiner that fetches its state from via (replicas, tried in
    this order, round robin): node must be a replica of `replicas` that is not running and
    not among the initial servers (start_replicas(..., options={"servers": [...]})).
    wait: also wait until the transfer is done (wait_joined)."""
    from testbed.errors import SpecError

    if node not in replicas.nodes:
        raise SpecError(f"replication: {node!r} is not a replica")
    if replicas.alive(node):
        raise SpecError(f"replication: {node} is running already")
    via = [via] if isinstance(via, str) else list(via)
    if not via or any(v not in replicas.nodes or v == node for v in via):
        raise SpecError(f"replication: via must list other replicas, got {via!r}")
    cfg = replicas.configs[node]
    cfg["join_via"] = [replicas.ips[v] for v in via]
    on_disk = {k: v for k, v in cfg.items() if k not in ("path", "profile_file")}
    tmp = cfg["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(on_disk, f, indent=1)
    os.replace(tmp, cfg["path"])
    replicas.start(node, timeout=timeout)
    if wait:
        wait_joined(replicas, node, timeout)


def wait_joined(replicas, node: str, timeout: float = 30.0) -> dict:
    """Wait until node's transfer is done and its engine runs; its join status."""
    from testbed.poll import wait_until

    def done():
        st = replicas.status(node) or {}
        j = st.get("join") or {}
        return j if j.get("phase") == "done" and (st.get("alg") or {}).get("state") not in (
            None, "Joining") else None

    return wait_until(done, timeout, f"replication: {node} joined", interval=0.05)


def control_path(cfg: dict) -> str:
    """A server's control socket (server.py: config control_socket, else data_dir/ctl)."""
    return cfg.get("control_socket") or os.path.join(cfg["data_dir"], "ctl")


def control(replicas, node: str, message: dict, timeout: float = 5.0) -> dict:
    """One request to node's server over its control socket; its reply."""
    from testbed.daemon.control import request

    return request(control_path(replicas.configs[node]), message, timeout=timeout,
                   what=f"replica {node}")


def leave(replicas, node: str, via: Optional[str] = None, timeout: float = 30.0) -> None:
    """Have via (default: the first running replica other than node) issue
    PERSISTENT_LEAVE(node), and wait until via's status no longer counts node among the
    servers (the LEAVE is green there)."""
    from testbed.errors import SpecError, TestbedError
    from testbed.poll import wait_until

    if node not in replicas.nodes:
        raise SpecError(f"replication: {node!r} is not a replica")
    if via is None:
        others = [n for n in replicas.running() if n != node]
        if not others:
            raise TestbedError("replication: no running replica to issue the leave")
        via = others[0]
    rid = replicas.ids[node]
    rep = control(replicas, via, {"op": "leave", "server": rid})
    if not rep.get("ok"):
        raise TestbedError(f"replication: {via} refused to issue the leave of {node}: "
                           f"{rep.get('error')}")

    def gone():
        a = (replicas.status(via) or {}).get("alg") or {}
        return "servers" in a and rid not in a["servers"]

    wait_until(gone, timeout, f"replication: {node} left (at {via})", interval=0.05)
