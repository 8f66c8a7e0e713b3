"""Socket-like client library: talk to the local overlay daemon over its UNIX socket.

    from testbed.overlay import client as overlay
    c = overlay.connect("/tmp/testbed-runs/<run>/a.overlay.sock")
    s = c.socket(9, reliable=True, link="reliable")     # bind overlay port 9
    s.sendto(b"hello", (6, 9))                         # to overlay node 6, port 9
    data, (node, port) = s.recvfrom(timeout=5)
    s.wait_acked(timeout=10)                           # every message acknowledged end to end
    c.routes(); c.stats(); c.neighbours()

Each overlay socket is its own UNIX SOCK_SEQPACKET connection to the daemon (so a full
session window blocks only that socket's sendto, as a full TCP buffer would). Sockets:
`reliable=True` is an end-to-end reliable FIFO session per destination (exactly once, in
order); `reliable=False` sends datagrams. `link` picks the link protocol on every hop:
"reliable" (hop-by-hop recovery), "best_effort", or "realtime" (recovery only while the
message can still arrive within `deadline_ms`).

The first sendto to each destination node waits for the daemon's answer, so that an
unknown or unreachable destination raises OverlayError("no route to overlay node 7") at
once; later sends do not wait. Errors the daemon reports later (e.g. nobody bound the
destination port of a reliable session) raise OverlayError from the next call.
One socket is meant for one thread at a time.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import stat
import time
from typing import Optional

from testbed.errors import TestbedError
from testbed.overlay import wire
from testbed.poll import WaitTimeout, wait_until

LINKS = tuple(wire.PROTOS)


class OverlayError(TestbedError):
    """Something the overlay refused or could not do."""


class OverlayTimeout(OverlayError, TimeoutError):
    """No message within the timeout."""


def _open(path: str, timeout: float) -> socket.socket:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OverlayError(f"{path} is not a UNIX socket (no overlay daemon there)")
    except FileNotFoundError:
        raise OverlayError(f"no overlay daemon at {path} (socket missing)") from None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise OverlayError(f"cannot connect to the overlay daemon at {path}: {e}") from None
    return s


class _Channel:
    """One SEQPACKET connection: frames out, frames in (data queued, replies matched)."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.sock = _open(path, timeout)
        self.timeout = timeout
        self.rx: collections.deque = collections.deque()  # (payload, (src, sport))
        self.errors: collections.deque = collections.deque()
        self._mode: object = timeout  # the socket's current timeout setting

    def _settimeout(self, t: Optional[float]) -> None:
        if t != self._mode:
            self.sock.settimeout(t)
            self._mode = t

    def send(self, frame: bytes) -> None:
        self._settimeout(None)
        try:
            self.sock.send(frame)
        except OSError as e:
            raise OverlayError(f"overlay daemon at {self.path}: {e}") from None

    def read(self, timeout: Optional[float]) -> Optional[bytes]:
        """One frame (None on timeout)."""
        self._settimeout(timeout)
        try:
            data = self.sock.recv(wire.MAX_FRAME)
        except (socket.timeout, BlockingIOError):
            return None
        except OSError as e:
            raise OverlayError(f"overlay daemon at {self.path}: {e}") from None
        if not data:
            raise OverlayError(f"the overlay daemon at {self.path} closed the connection")
        return data

    def dispatch(self, data: bytes) -> Optional[dict]:
        """Queue a data or error frame; return a reply frame's JSON."""
        t = data[0]
        if t == wire.SV_DATA:
            _t, _z, src, sport = wire.SV_DATA_HEAD.unpack_from(data)
            self.rx.append((data[wire.SV_DATA_HEAD.size:], (src, sport)))
        elif t == wire.SV_REPLY:
            return json.loads(data[1:])
        elif t == wire.SV_ERROR:
            self.errors.append(data[1:].decode(errors="replace"))
        return None

    def raise_errors(self) -> None:
        if self.errors:
            raise OverlayError(self.errors.popleft())

    def request(self, req: dict, frame: Optional[bytes] = None) -> dict:
        """Send a control request (or a frame that wants a reply); wait for the reply."""
        self.send(frame if frame is not None else bytes([wire.CL_CTRL]) + json.dumps(req).encode())
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            data = self.read(max(left, 0.0)) if left > 0 else None
            if data is None:
                raise OverlayTimeout(f"no reply from the overlay daemon at {self.path} "
                                     f"within {self.timeout:g} s")
            reply = self.dispatch(data)
            if reply is not None:
                return reply

    def close(self) -> None:
        self.sock.close()


class OverlaySocket:
    """A bound overlay port. sendto/recvfrom as on a UDP socket, addresses (node, port)."""

    def __init__(self, conn: "Connection", ch: _Channel, port: int, node: int, reliable: bool,
                 link: str):
        self.conn, self._ch = conn, ch
        self.port, self.node, self.reliable, self.link = port, node, reliable, link
        self.timeout: Optional[float] = None
        self._checked: set = set()
        self.closed = False

    def __repr__(self) -> str:
        kind = "reliable" if self.reliable else "datagram"
        return f"<overlay socket node {self.node} port {self.port} {kind} link={self.link}>"

    def __enter__(self) -> "OverlaySocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def settimeout(self, timeout: Optional[float]) -> None:
        self.timeout = timeout

    def sendto(self, data, addr) -> int:
        """Send one message (at most wire.MAX_PAYLOAD bytes) to (node id, port)."""
        self._check_open()
        node, port = _check_addr(addr)
        data = bytes(data)
        if len(data) > wire.MAX_PAYLOAD:
            raise OverlayError(f"message of {len(data)} bytes exceeds the overlay's "
                               f"{wire.MAX_PAYLOAD}")
        ch = self._ch
        ch.raise_errors()
        first = node not in self._checked
        frame = wire.CL_SEND_HEAD.pack(wire.CL_SEND, wire.SEND_WANT_REPLY if first else 0,
                                       node, port) + data
        if first:
            reply = ch.request({}, frame)
            if not reply.get("ok"):
                raise OverlayError(reply.get("error", "refused"))
            self._checked.add(node)
        else:
            ch.send(frame)
        return len(data)

    send_to = sendto

    def recvfrom(self, timeout: Optional[float] = -1.0) -> tuple:
        """(data, (node, port)) of the next message; OverlayTimeout after timeout seconds
        (default: the socket's settimeout(), None = wait for ever)."""
        self._check_open()
        ch = self._ch
        if timeout == -1.0:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ch.rx:
            ch.raise_errors()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise OverlayTimeout(f"no message on overlay port {self.port} within "
                                     f"{timeout:g} s")
            data = ch.read(left)
            if data is not None:
                ch.dispatch(data)
        return ch.rx.popleft()

    def recv(self, timeout: Optional[float] = -1.0) -> bytes:
        return self.recvfrom(timeout)[0]

    def pending(self) -> int:
        """Messages sent on this socket and not yet acknowledged end to end."""
        self._check_open()
        reply = self._ch.request({"op": "pending"})
        return int(reply["pending"])

    def wait_acked(self, timeout: float = 30.0) -> float:
        """Wait until every message sent is acknowledged end to end; returns the seconds
        waited. OverlayTimeout if some are still unacknowledged after timeout."""
        def acked() -> bool:
            self._ch.raise_errors()
            return self.pending() == 0

        t0 = time.monotonic()
        try:
            wait_until(acked, timeout, "acknowledged", scale=False)
        except WaitTimeout:
            raise OverlayTimeout(f"{self.pending()} messages still unacknowledged after "
                                 f"{timeout:g} s") from None
        return time.monotonic() - t0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ch.close()

    def _check_open(self) -> None:
        if self.closed:
            raise OverlayError("overlay socket is closed")


def _check_addr(addr) -> tuple:
    try:
        node, port = addr
    except (TypeError, ValueError):
        raise OverlayError(f"an overlay address is (node id, port), got {addr!r}") from None
    for v, lo, what in ((node, 1, "node id"), (port, 0, "port")):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 65535:
            raise OverlayError(f"bad overlay {what} {v!r} (want {lo}..65535)")
    return node, port


class Connection:
    """The local daemon: opens overlay sockets and asks for its state."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path, self.timeout = path, timeout
        self._ctl: Optional[_Channel] = _Channel(path, timeout)
        self.node = int(self.request("info")["id"])

    def __repr__(self) -> str:
        return f"<overlay connection to node {self.node} at {self.path}>"

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def socket(self, port: int = 0, reliable: bool = True, link: str = "reliable",
               deadline_ms: Optional[int] = None) -> OverlaySocket:
        """Bind an overlay port (0: any free one) on this node."""
        if link not in LINKS:
            raise OverlayError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
        req = {"op": "bind", "port": port, "reliable": reliable, "link": link}
        if deadline_ms is not None:
            req["deadline_ms"] = deadline_ms
        ch = _Channel(self.path, self.timeout)
        try:
            reply = ch.request(req)
        except BaseException:
            ch.close()
            raise
        if not reply.get("ok"):
            ch.close()
            raise OverlayError(reply.get("error", "bind refused"))
        return OverlaySocket(self, ch, reply["port"], reply["node"], reliable, link)

    def request(self, op: str, **kw) -> dict:
        if self._ctl is None:
            raise OverlayError("overlay connection is closed")
        reply = self._ctl.request({"op": op, **kw})
        if not reply.get("ok"):
            raise OverlayError(reply.get("error", f"{op} refused"))
        return reply

    def routes(self) -> dict:
        """{dst: {"next_hop", "cost", "path"}} as this daemon computed them."""
        return {r["dst"]: {k: r[k] for k in ("next_hop", "cost", "path")}
                for r in self.request("routes")["routes"]}

    def neighbours(self) -> dict:
        return {n["id"]: n for n in self.request("neighbours")["neighbours"]}

    def stats(self) -> dict:
        return self.request("stats")

    def close(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None


def connect(control_path: str, timeout: float = 5.0) -> Connection:
    """Connect to the overlay daemon listening on control_path."""
    return Connection(control_path, timeout)
