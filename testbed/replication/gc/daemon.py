"""`python -m testbed.replication.gc CONFIG.json`: a GroupNode serving local clients.

The configuration (JSON; every field checked before anything is created):

    id            this daemon's id (a key of peers)
    peers         {id: IPv4} every daemon that may ever take part
    port          the UDP port of the group (all daemons)
    broadcast     the LAN's broadcast address
    key_file      the shared HMAC key (testbed.daemon.write_key)
    group         the one group of this daemon set (clients joining another name get an
                  error: one group per daemon set)
    socket        the UNIX stream socket the clients connect to (client.py: GroupClient)
    status        the status file (JSON, replaced atomically every 0.5 s and at changes)
    ready         optional ready file (written when serving, removed at exit)
    timeouts      optional {field: seconds} overriding gc.Timeouts

The daemon runs one testbed.daemon.Loop: the group's UDP socket, the client socket and
the clients; every GroupNode event goes to every joined client, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys

from testbed.daemon import (ArgParser, Loop, UsageError, read_key, ready_file, run_main,
                            write_json_atomic)
from testbed.replication.gc.client import (F_CONF, F_ERROR, F_JOIN, F_JOINED, F_MCAST,
                                           F_MSG, GroupError, conf_frame, frame,
                                           msg_frame, parse_frames)
from testbed.replication.gc.node import GroupNode, Timeouts
from testbed.replication.gc.wire import (MAX_ID, MAX_PAYLOAD, SERVICES, Configuration)
from testbed.sealed import ip_to_int

__all__ = ["main", "load_config", "F_CONF", "F_MSG"]


def load_config(path: str) -> dict:
    """The checked configuration; UsageError (one line) on anything wrong."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"bad configuration {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"bad configuration {path}: not a JSON object")
    for k in ("id", "peers", "port", "broadcast", "key_file", "group", "socket", "status"):
        if k not in cfg:
            raise UsageError(f"configuration {path} lacks {k!r}")
    try:
        peers = {int(k): str(v) for k, v in dict(cfg["peers"]).items()}
        for ip in list(peers.values()) + [cfg["broadcast"]]:
            ip_to_int(ip)
        me, port = int(cfg["id"]), int(cfg["port"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad configuration {path}: {e}") from None
    if me not in peers:
        raise UsageError(f"id {me} is not in peers {sorted(peers)}")
    if any(not 0 < m <= MAX_ID for m in peers):
        raise UsageError(f"peer ids must be in 1..{MAX_ID}")
    if not 0 < port < 65536:
        raise UsageError(f"port {port} out of range")
    try:
        timeouts = Timeouts.from_dict(cfg.get("timeouts", {}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        cfg["key"] = read_key(cfg["key_file"])
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read key {cfg['key_file']}: {e}") from None
    cfg.update(id=me, peers=peers, port=port, timeouts=timeouts)
    return cfg


class Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.joined = False


class Daemon:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.loop = Loop()
        self.clients: dict = {}
        self.conf_event = None
        self.node = GroupNode(self.loop, cfg["id"], cfg["peers"], cfg["port"], cfg["key"],
                              broadcast_ip=cfg["broadcast"], on_event=self.on_event,
                              timeouts=cfg["timeouts"])

    # the group's events -----------------------------------------------------------------
    def on_event(self, ev) -> None:
        if isinstance(ev, Configuration):
            if not ev.transitional:
                self.conf_event = ev
            data = conf_frame(ev)
            self.write_status()
        else:
            data = msg_frame(ev)
        for c in list(self.clients.values()):
            if c.joined:
                self.push(c, data)

    # clients -----------------------------------------------------------------------------
    def accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = c = Client(sock)
        self.loop.add(sock, lambda m, c=c: self.client_io(c, m))

    def client_io(self, c: Client, mask: int) -> None:
        if mask & 2:  # EVENT_WRITE
            self.push(c, b"")
        if not mask & 1:
            return
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop_client(c)
            return
        c.inbuf += data
        try:
            frames = parse_frames(c.inbuf)
        except GroupError as e:
            self.push(c, frame(F_ERROR, str(e).encode()))
            self.drop_client(c)
            return
        for ftype, body in frames:
            self.client_frame(c, ftype, body)
        self.node.flush()

    def client_frame(self, c: Client, ftype: int, body: bytes) -> None:
        if ftype == F_JOIN:
            name = body.decode(errors="replace")
            if name != self.cfg["group"]:
                self.push(c, frame(F_ERROR, (
                    f"this daemon set serves the one group {self.cfg['group']!r}, "
                    f"not {name!r}").encode()))
                return
            c.joined = True
            self.push(c, frame(F_JOINED))
            if self.conf_event is not None:
                self.push(c, conf_frame(self.conf_event))
        elif ftype == F_MCAST and c.joined and len(body) >= 1 and body[0] in SERVICES \
                and len(body) - 1 <= MAX_PAYLOAD:
            self.node.multicast(body[1:], body[0])
        else:
            self.push(c, frame(F_ERROR, b"bad request (join first; service 1 or 2; "
                                        b"payload <= %d bytes)" % MAX_PAYLOAD))

    def push(self, c: Client, data: bytes) -> None:
        c.out += data
        try:
            n = c.sock.send(c.out) if c.out else 0
            del c.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.drop_client(c)
            return
        if c.sock.fileno() in self.clients:
            self.loop.modify(c.sock, lambda m, c=c: self.client_io(c, m),
                             3 if c.out else 1)

    def drop_client(self, c: Client) -> None:
        fd = c.sock.fileno()
        if fd in self.clients:
            del self.clients[fd]
            self.loop.remove(c.sock)
            c.sock.close()

    # status ------------------------------------------------------------------------------
    def write_status(self) -> None:
        st = self.node.status()
        st["clients"] = sum(1 for c in self.clients.values() if c.joined)
        st["group"] = self.cfg["group"]
        st["timeouts"] = dataclasses.asdict(self.cfg["timeouts"])
        write_json_atomic(self.cfg["status"], st)

    def status_tick(self, now: float) -> None:
        self.write_status()
        self.loop.after(0.5, self.status_tick)

    def run(self) -> None:
        path = self.cfg["socket"]
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.loop.add(self.listener, self.accept)
        self.loop.stop_on_signals()
        self.node.start()
        try:
            with ready_file(self.cfg.get("ready"), {"id": self.cfg["id"],
                                                    "socket": path}):
                self.status_tick(0.0)
                self.loop.run()
        finally:
            self.write_status()
            self.node.close()
            self.listener.close()
            if os.path.exists(path):
                os.unlink(path)
            self.loop.close()


def main(argv=None) -> int:
    return run_main("gc", _main, argv)


def _main(argv) -> int:
    ap = ArgParser("gc", prog="python -m testbed.replication.gc",
                   description="group communication daemon with extended virtual "
                   "synchrony (config: see testbed.replication.gc.daemon)")
    ap.add_argument("config", help="JSON configuration file")
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    try:
        Daemon(cfg).run()
    except OSError as e:
        print(f"gc: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
