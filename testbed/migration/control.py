"""Commands to the agents: one JSON line over a unix socket, one JSON line back.

Unix sockets with a path are not tied to a network namespace, so the controller in the
root process reaches daemons inside the nodes through files in the run's log directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Callable


class ControlError(RuntimeError):
    pass


def request(path: str, timeout: float = 120.0, **msg) -> dict:
    """Send one command; return the reply; ControlError if it says ok=false."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ControlError(f"{path}: no reply to {msg.get('op')!r}")
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(f"{msg.get('op')}: {reply.get('error', 'failed')}")
    return reply


class Server:
    """Counts the commands being answered, so a daemon can exit after its last reply."""

    def __init__(self) -> None:
        self.active = 0
        self.lock = threading.Lock()

    def idle(self, timeout: float = 5.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self.active


def serve(path: str, handle: Callable[[dict], dict]) -> Server:
    """Answer commands on path in daemon threads: handle(msg) -> reply (ok added)."""
    server = Server()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def one(conn: socket.socket) -> None:
        try:
            answer(conn)
        finally:
            with server.lock:
                server.active -= 1

    def answer(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            try:
                reply = {"ok": True, **(handle(json.loads(buf)) or {})}
            except Exception as e:  # the reply carries the error; the daemon lives on
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            with server.lock:
                server.active += 1
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server
