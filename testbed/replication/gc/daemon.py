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

from testbed.daemon import (ArgParser, Loop, Stream, UsageError, read_key, ready_file,
                            run_main, write_json_atomic)
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


MAX_BACKLOG = 64 << 20  # a client that lets this much of its deliveries queue is dropped


class Client:
    """One client on the UNIX socket: frames in; deliveries out through a Stream, which
    queues what the socket does not take at once."""

    def __init__(self, daemon: "Daemon", sock: socket.socket):
        self.daemon = daemon
        self.inbuf = bytearray()
        self.joined = False
        self.stream = Stream(daemon.loop, sock, self.data, self.closed)

    def data(self, data: bytes) -> None:
        self.inbuf += data
        try:
            frames = parse_frames(self.inbuf)
        except GroupError as e:
            self.send(frame(F_ERROR, str(e).encode()))
            self.stream.close()
            return
        for ftype, body in frames:
            self.daemon.client_frame(self, ftype, body)
        self.daemon.node.flush()

    def send(self, data: bytes) -> None:
        self.stream.send(data)
        if len(self.stream.out) > MAX_BACKLOG:
            print(f"gc: dropping a client that does not read ({len(self.stream.out)} bytes "
                  f"queued)", file=sys.stderr, flush=True)
            self.stream.close()

    def closed(self) -> None:
        self.daemon.clients.discard(self)


class Daemon:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.loop = Loop()
        self.clients: set = set()
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
        for c in list(self.clients):
            if c.joined:
                c.send(data)

    # clients -----------------------------------------------------------------------------
    def accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.clients.add(Client(self, sock))

    def client_frame(self, c: Client, ftype: int, body: bytes) -> None:
        if ftype == F_JOIN:
            name = body.decode(errors="replace")
            if name != self.cfg["group"]:
                c.send(frame(F_ERROR, (
                    f"this daemon set serves the one group {self.cfg['group']!r}, "
                    f"not {name!r}").encode()))
                return
            c.joined = True
            c.send(frame(F_JOINED))
            if self.conf_event is not None:
                c.send(conf_frame(self.conf_event))
        elif ftype == F_MCAST and c.joined and len(body) >= 1 and body[0] in SERVICES \
                and len(body) - 1 <= MAX_PAYLOAD:
            self.node.multicast(body[1:], body[0])
        else:
            c.send(frame(F_ERROR, b"bad request (join first; service 1 or 2; "
                                        b"payload <= %d bytes)" % MAX_PAYLOAD))

    # status ------------------------------------------------------------------------------
    def write_status(self) -> None:
        st = self.node.status()
        st["clients"] = sum(1 for c in self.clients if c.joined)
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
