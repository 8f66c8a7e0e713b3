"""One replica: `python -m testbed.replication.server CONFIG.json` (on testbed.daemon).

The configuration (JSON; unknown keys are left to the algorithm, which gets the whole dict):

    id            this replica's id (a key of peers)
    algo          "engine", "corel" or "2pc"
    peers         {id: IPv4}: every replica that may ever take part
    gc_port       UDP port of the group communication (engine, COReL)
    client_port   TCP port the clients connect to (on this replica's peer address, or
                  client_ip if given)
    twopc_port    UDP port of 2PC's own messages
    key_file      the shared HMAC key (hex, testbed.daemon.read_key)
    data_dir      where the log lives (data_dir/log; created if missing)
    disk          {"forced": bool, "extra_latency_ms": float}
    status_file   JSON status, rewritten at most every 0.5 s and at once when the
                  algorithm's state changes (a configuration event, or its `state`)
    ready_file    written once the replica serves clients, removed at exit
    broadcast_ip  the LAN's broadcast address (the group communication's ORDERED)
    gc_timeouts   optional {name: seconds} for gc.Timeouts
    weights       optional {id: weight} for the engine's dynamic linear voting

Joins and leaves (engine only; transfer.py has the protocol):
    servers           optional [id, ...]: the initial servers (the first primary; default
                      every peer). A peer outside it can only come in by PERSISTENT_JOIN.
    join_via          optional [IPv4, ...]: start as a joiner: fetch this server's snapshot
                      from these members (round robin) and only then build the engine and
                      start the group communication. Ignored once the disk holds the join
                      (a restarted joiner recovers from its log).
    transfer_port     TCP port of the state transfer (default client_port + 1); every
                      engine server listens on it (its peer address) as a transfer source
    transfer_chunk    bytes per chunk (default 65536)
    transfer_pace_ms  one chunk per this many ms (default 0: as fast as TCP takes them); a
                      test knob to make a transfer last long enough to cut it
    transfer_timeout  seconds without a frame before a joiner tries the next member (3)
    control_socket    UNIX datagram socket (testbed.daemon.control; default data_dir/ctl):
                      {"op": "leave", "server": id} issues PERSISTENT_LEAVE(id) here,
                      {"op": "join", "server": id} PERSISTENT_JOIN(id), {"op": "status"};
                      the reply is {"ok": bool, "error": reason} (+ "status")

Every bad key is a one-line error (exit 2) before anything is created. The server is a
Loop: the group communication's socket and timers, the disk's wake-up fd, the client
listener and connections (non-blocking, many at once; a connection may have several
requests outstanding, its replies are written as the algorithm produces them). A request
goes to `alg.submit(req, reply)`; reply() writes the frame if the connection is still
open (a client that went away gets nothing; its ReplicaClient has raised already).

Algorithms (one interface: submit, on_event, status, close):
    2pc     twopc.TwoPC(loop, me, peers, twopc_port, key, disk, bind_ip)
    corel   corel.COReL(me, servers, node, disk, loop)                 on a gc.GroupNode
    engine  engine.Engine(me, servers, disk, send, weights=cfg.get("weights"),
            on_joined=transfer.on_joined) on a gc.GroupNode; send(payload, service) is
            node.multicast (imported lazily); a joiner's is Engine.from_snapshot(...),
            built when its transfer completes, and only then is its GroupNode started.

Status: {"id", "algo", "pid", "time", "alg": alg.status(), "disk": disk.stats(),
"gc": node.status() (engine and COReL), "clients": {connections, requests, replies,
errors, dropped_replies, protocol_errors}, "transfer": the member side's counters (engine),
"join": the joiner's progress (phase connecting / hello / waiting / transfer / done, peer,
offset, size, sources [{peer, from, to}], seconds) when started with join_via}. While a
joiner has no engine, "alg" is {"state": "Joining", "servers": []} and clients get
errors.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
from testbed.daemon import (ArgParser, Loop, Stream, UsageError, read_key, ready_file,
                            remove_quietly, run_main, write_json_atomic)
from testbed.replication import protocol
from testbed.replication.disk import Disk, DiskError

ALGOS = ("engine", "corel", "2pc")
STATUS_EVERY = 0.5
REQUIRED = ("id", "algo", "peers", "client_port", "key_file", "data_dir", "disk",
            "status_file")


def _log(msg: str) -> None:
    print(f"replica: {msg}", file=sys.stderr, flush=True)


# configuration --------------------------------------------------------------------------

def _port(cfg: dict, name: str) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise UsageError(f"config: {name} must be a port 1-65535, got {v!r}")
    return v


def _ip(v, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(v))
    except (ValueError, TypeError):
        raise UsageError(f"config: {what} must be an IPv4 address, got {v!r}") from None


def load_config(path: str) -> dict:
    """The checked configuration (see the module's doc); UsageError on the first problem."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"config {path} is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"config {path} must be a JSON object")
    for k in REQUIRED:
        if k not in cfg:
            raise UsageError(f"config: missing key {k!r}")
    if cfg["algo"] not in ALGOS:
        raise UsageError(f"config: algo must be one of {', '.join(ALGOS)}, got "
                         f"{cfg['algo']!r}")
    peers = cfg["peers"]
    if not isinstance(peers, dict) or not peers:
        raise UsageError("config: peers must be a non-empty {id: ip} object")
    out = {}
    for k, v in peers.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"config: peer id {k!r} is not an integer") from None
        if not 1 <= i <= 65535:
            raise UsageError(f"config: peer id {i} out of 1..65535")
        out[i] = _ip(v, f"peer {k}'s address")
    cfg["peers"] = out
    me = cfg["id"]
    if isinstance(me, bool) or not isinstance(me, int) or me not in out:
        raise UsageError(f"config: id {me!r} is not one of the peers {sorted(out)}")
    _port(cfg, "client_port")
    if cfg["algo"] == "2pc":
        _port(cfg, "twopc_port")
    else:
        _port(cfg, "gc_port")
        cfg["broadcast_ip"] = _ip(cfg.get("broadcast_ip"), "broadcast_ip")
    if "client_ip" in cfg:
        cfg["client_ip"] = _ip(cfg["client_ip"], "client_ip")
    disk = cfg["disk"]
    if not isinstance(disk, dict) or not isinstance(disk.get("forced"), bool):
        raise UsageError("config: disk must be {\"forced\": true|false, "
                         "\"extra_latency_ms\": number}")
    lat = disk.get("extra_latency_ms", 0.0)
    if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not 0 <= lat <= 10000:
        raise UsageError(f"config: disk.extra_latency_ms must be 0..10000, got {lat!r}")
    for k in ("data_dir", "status_file"):
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise UsageError(f"config: {k} must be a path")
    if cfg.get("ready_file") is not None and not isinstance(cfg["ready_file"], str):
        raise UsageError("config: ready_file must be a path")
    w = cfg.get("weights")
    if w is not None:
        try:
            cfg["weights"] = {int(k): float(v) for k, v in w.items()}
        except (AttributeError, TypeError, ValueError):
            raise UsageError("config: weights must be {id: number}") from None
        if any(i not in out or v <= 0 for i, v in cfg["weights"].items()):
            raise UsageError("config: weights must give peers positive numbers")
    from testbed.replication.gc import Timeouts

    try:
        Timeouts.from_dict(cfg.get("gc_timeouts", {}))
    except ValueError as e:
        raise UsageError(f"config: gc_timeouts: {e}") from None
    _check_join_keys(cfg, out)
    return cfg


def _number(cfg: dict, name: str, lo: float, hi: float, default):
    v = cfg.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise UsageError(f"config: {name} must be a number {lo:g}..{hi:g}, got {v!r}")
    return v


def _check_join_keys(cfg: dict, peers: dict) -> None:
    engine = cfg["algo"] == "engine"
    for k in ("servers", "join_via"):
        if k in cfg and not engine:
            raise UsageError(f"config: {k} is for algo engine only")
    s = cfg.get("servers")
    if s is not None:
        if not isinstance(s, list) or not s or any(
                isinstance(i, bool) or not isinstance(i, int) or i not in peers for i in s):
            raise UsageError(f"config: servers must be a non-empty list of peer ids, got {s!r}")
        cfg["servers"] = sorted(set(s))
    via = cfg.get("join_via")
    if via is not None:
        if not isinstance(via, list) or not via:
            raise UsageError("config: join_via must be a non-empty list of IPv4 addresses")
        cfg["join_via"] = [_ip(v, "a join_via address") for v in via]
        if cfg["id"] in cfg.get("servers", peers):
            raise UsageError(f"config: join_via: server {cfg['id']} is one of the initial "
                             "servers (set servers without it)")
    if "transfer_port" in cfg:
        _port(cfg, "transfer_port")
    else:
        cfg["transfer_port"] = cfg["client_port"] % 65535 + 1
    if engine and cfg["transfer_port"] in (cfg["client_port"], cfg["gc_port"]):
        raise UsageError("config: transfer_port must differ from client_port and gc_port")
    cfg["transfer_chunk"] = int(_number(cfg, "transfer_chunk", 1, 1 << 20, 65536))
    cfg["transfer_pace_ms"] = _number(cfg, "transfer_pace_ms", 0, 10000, 0)
    cfg["transfer_timeout"] = _number(cfg, "transfer_timeout", 0.1, 3600, 3.0)
    c = cfg.get("control_socket")
    if c is not None and (not isinstance(c, str) or not c):
        raise UsageError("config: control_socket must be a path")


# client connections ---------------------------------------------------------------------

class Connection:
    """One client's TCP connection: frames in, replies out (testbed.daemon.Stream queues
    what the socket does not take at once)."""

    def __init__(self, server: "Server", sock: socket.socket):
        self.server = server
        self.decoder = protocol.Decoder()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = Stream(server.loop, sock, self._data, self._closed)

    @property
    def open(self) -> bool:
        return self.stream.open

    def _data(self, data: bytes) -> None:
        try:
            msgs, _ = self.decoder.feed(data)
        except protocol.ProtocolError as e:
            self.server.counts["protocol_errors"] += 1
            print(f"replica: closing a client connection: {e}", file=sys.stderr, flush=True)
            self.close()
            return
        for m in msgs:
            if not isinstance(m, protocol.Request):
                self.server.counts["protocol_errors"] += 1
                self.close()
                return
            self.server.counts["requests"] += 1
            self.server.submit(m, self.reply)

    def reply(self, rep: protocol.Reply) -> None:
        s = self.server.counts
        s["replies"] += 1
        if not rep.ok:
            s["errors"] += 1
        if not self.stream.open:
            s["dropped_replies"] += 1
            return
        self.stream.send(protocol.encode_reply(rep))

    def close(self) -> None:
        self.stream.close()

    def _closed(self) -> None:
        self.server.conns.discard(self)


# the server -----------------------------------------------------------------------------

class Server:
    def __init__(self, cfg: dict, loop: Loop):
        self.cfg, self.loop = cfg, loop
        self.me = cfg["id"]
        self.key = read_key(cfg["key_file"])
        os.makedirs(cfg["data_dir"], exist_ok=True)
        d = cfg["disk"]
        self.disk = Disk(os.path.join(cfg["data_dir"], "log"), forced=d["forced"],
                         extra_latency_s=float(d.get("extra_latency_ms", 0.0)) / 1000.0,
                         loop=loop)
        self.node = None
        self.alg = None
        self.conns: set = set()
        self.counts = {"connections": 0, "requests": 0, "replies": 0, "errors": 0,
                       "dropped_replies": 0, "protocol_errors": 0}
        self.last_state = None
        self.last_write = 0.0
        self.transfer = self.joiner = self.ctl = None
        if cfg["algo"] == "engine":
            from testbed.replication.transfer import Joiner, TransferService
            self.transfer = TransferService(
                loop, self.key, cfg["peers"][self.me], cfg["transfer_port"],
                lambda: self.alg, chunk=cfg["transfer_chunk"],
                pace=cfg["transfer_pace_ms"] / 1000.0, log=_log)
            if cfg.get("join_via") and not self._disk_has_join():
                self.joiner = Joiner(loop, self.key, self.me, cfg["join_via"],
                                     cfg["transfer_port"], self._joined,
                                     timeout=cfg["transfer_timeout"], log=_log)
        if self.joiner is None:
            self.alg = self._make_algorithm()
        self._bind_control()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((cfg.get("client_ip") or cfg["peers"][self.me],
                            cfg["client_port"]))
        self.listener.listen(256)
        self.listener.setblocking(False)
        loop.add(self.listener, self._accept)
        loop.after(STATUS_EVERY, self._status_tick)

    def _disk_has_join(self) -> bool:
        from testbed.replication.actions import REC_JOIN
        return any(rec[:1] == REC_JOIN for rec in self.disk.records())

    def _joined(self, snapshot: bytes) -> None:
        """The joiner's transfer is complete: the engine from the snapshot, then the group
        communication (a joiner is never in a configuration before it has an engine)."""
        self.alg = self._make_algorithm(snapshot)
        self.write_status()

    def _make_algorithm(self, snapshot: bytes = None):
        cfg, me, peers = self.cfg, self.me, self.cfg["peers"]
        if cfg["algo"] == "2pc":
            from testbed.replication.twopc import TwoPC
            return TwoPC(self.loop, me, peers, cfg["twopc_port"], self.key, self.disk,
                         bind_ip=peers[me])
        from testbed.replication.gc import GroupNode, Timeouts
        self.node = GroupNode(self.loop, me=me, peers=peers, port=cfg["gc_port"],
                              key=self.key, bind_ip=peers[me],
                              broadcast_ip=cfg["broadcast_ip"], on_event=self._on_event,
                              timeouts=Timeouts.from_dict(cfg.get("gc_timeouts", {})))
        if cfg["algo"] == "corel":
            from testbed.replication.corel import COReL
            alg = COReL(me, sorted(peers), self.node, self.disk, loop=self.loop)
        else:
            from testbed.replication.engine import Engine
            node = self.node
            send = lambda payload, service: node.multicast(payload, service)  # noqa: E731
            kw = {"weights": cfg.get("weights") or None,
                  "on_joined": self.transfer.on_joined}
            if snapshot is not None:
                alg = Engine.from_snapshot(me, snapshot, self.disk, send, **kw)
            else:
                alg = Engine(me, cfg.get("servers") or sorted(peers), self.disk, send, **kw)
        self.alg = alg
        self.node.start()
        return alg

    def _on_event(self, ev) -> None:
        if self.alg is None:
            return
        self.alg.on_event(ev)
        state = getattr(self.alg, "state", None)
        if not hasattr(ev, "payload") or state != self.last_state:
            self.last_state = state
            self.write_status()

    def submit(self, req, reply) -> None:
        if self.alg is None:
            self.counts["errors"] += 1
            reply(protocol.error_reply(req.client_seq, "this replica is still joining"))
            return
        self.alg.submit(req, reply)

    # the control socket -------------------------------------------------------------------

    def _bind_control(self) -> None:
        from testbed.daemon.control import bind_control
        path = self.cfg.get("control_socket") or os.path.join(self.cfg["data_dir"], "ctl")
        try:
            self.ctl = bind_control(path)
        except OSError as e:            # e.g. a path too long for AF_UNIX: serve without
            _log(f"no control socket: {e}")
            return
        self.ctl_path = path
        self.loop.add(self.ctl, self._control)

    def _control(self, mask: int) -> None:
        for _ in range(16):
            try:
                data, addr = self.ctl.recvfrom(65536)
            except OSError:
                return
            try:
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError("a control request is a JSON object")
                rep = self._control_op(msg)
            except (ValueError, TypeError, KeyError) as e:
                rep = {"ok": False, "error": f"bad request: {e}"}
            if addr:
                try:
                    self.ctl.sendto(json.dumps(rep).encode(), addr)
                except OSError:
                    pass

    def _control_op(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op not in ("leave", "join"):
            raise ValueError(f"unknown op {op!r}")
        sid = msg["server"]
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise ValueError(f"server must be an id, got {sid!r}")
        if self.alg is None or not hasattr(self.alg, "request_leave"):
            return {"ok": False, "error": "this replica runs no engine (yet)"}
        if op == "leave":
            ok = self.alg.request_leave(sid)
            why = f"{sid} is not a server here"
        else:
            ok = sid in self.cfg["peers"] and self.alg.request_join(sid)
            why = f"{sid} is not a peer, or a server already, or left"
        _log(f"control: {op} {sid}: {'issued' if ok else why}")
        return {"ok": True} if ok else {"ok": False, "error": why}

    def _accept(self, mask: int) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.counts["connections"] += 1
            self.conns.add(Connection(self, sock))

    def status(self) -> dict:
        st = {"id": self.me, "algo": self.cfg["algo"], "pid": os.getpid(),
              "time": time.time(), "disk": self.disk.stats(),
              "alg": self.alg.status() if self.alg is not None else
              {"state": "Joining", "servers": []},
              "clients": {**self.counts, "open": len(self.conns)}}
        if self.node is not None:
            st["gc"] = self.node.status()
        if self.transfer is not None:
            st["transfer"] = self.transfer.status()
        if self.joiner is not None:
            st["join"] = self.joiner.status()
        return st

    def write_status(self) -> None:
        self.last_write = time.monotonic()
        write_json_atomic(self.cfg["status_file"], self.status())

    def _status_tick(self, now: float) -> None:
        if now - self.last_write >= STATUS_EVERY * 0.9:
            self.write_status()
        self.loop.after(STATUS_EVERY, self._status_tick)

    def close(self) -> None:
        self.loop.remove(self.listener)
        self.listener.close()
        if self.ctl is not None:
            self.loop.remove(self.ctl)
            self.ctl.close()
            remove_quietly(self.ctl_path)
        if self.joiner is not None:
            self.joiner.close()
        if self.transfer is not None:
            self.transfer.close()
        if self.alg is not None:
            self.alg.close()  # waiting clients get "shutting down" before their sockets close
        for c in list(self.conns):
            c.close()
        if self.node is not None:
            self.node.close()
        try:
            self.write_status()
        except OSError:
            pass
        self.disk.close()


def main(argv) -> int:
    ap = ArgParser("replication.server")
    ap.add_argument("config", help="the replica's JSON configuration")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    loop = Loop()
    loop.stop_on_signals()
    try:
        server = Server(cfg, loop)
    except (OSError, DiskError) as e:
        print(f"replication.server: {e}", file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # a configuration the algorithm refuses (e.g. id not a server)
        loop.close()
        raise UsageError(f"config: {e}") from None
    try:
        with ready_file(cfg.get("ready_file"), {"id": cfg["id"], "algo": cfg["algo"],
                                                "client_port": cfg["client_port"]}):
            server.write_status()
            loop.run()
    except DiskError as e:  # the log cannot be written: the replica stops (a crash)
        print(f"replication.server: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        server.close()
        loop.close()
    return 0


def run(argv=None) -> int:
    return run_main("replication.server", main, argv)


if __name__ == "__main__":
    sys.exit(run())

