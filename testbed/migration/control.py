"""Commands to the agents: one JSON line over a unix socket, one JSON line back.

Unix sockets with a path are not tied to a network namespace, so the controller in the
root process reaches daemons inside the nodes through files in the run's log directory.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Callable

from testbed.daemon import remove_quietly
from testbed.poll import WaitTimeout, wait_until


class ControlError(RuntimeError):
    pass


def recv_line(sock: socket.socket) -> bytes:
    """One message: the bytes up to and with the newline (less if the peer closes first)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def request(path: str, timeout: float = 120.0, **msg) -> dict:
    """Send one command; return the reply; ControlError if it says ok=false."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = recv_line(s)
    if not buf:
        raise ControlError(f"{path}: no reply to {msg.get('op')!r}")
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(f"{msg.get('op')}: {reply.get('error', 'failed')}")
    return reply


class Server:
    """Counts the commands being answered, so a daemon can exit after its last reply."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.active = 0
        self.lock = threading.Lock()
        self.sock = None

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait until no command is being answered (at most timeout s); True if none is."""
        try:
            wait_until(lambda: not self.active, timeout, "the last control reply",
                       interval=0.005)
        except WaitTimeout:
            return False
        return True

    def close(self) -> None:
        """Stop listening and remove the socket's path (answers under way finish)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self.sock.close()
        remove_quietly(self.path)


def serve(path: str, handle: Callable[[dict], dict]) -> Server:
    """Answer commands on path in daemon threads: handle(msg) -> reply (ok added)."""
    server = Server(path)
    remove_quietly(path)  # the socket of a daemon that died
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    server.sock = srv

    def one(conn: socket.socket) -> None:
        try:
            answer(conn)
        finally:
            with server.lock:
                server.active -= 1

    def answer(conn: socket.socket) -> None:
        with conn:
            buf = recv_line(conn)
            if not buf.endswith(b"\n"):
                return  # the client went away mid-command
            try:
                reply = {"ok": True, **(handle(json.loads(buf)) or {})}
            except Exception as e:  # the reply carries the error; the daemon lives on
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed
                return
            with server.lock:
                server.active += 1
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server
