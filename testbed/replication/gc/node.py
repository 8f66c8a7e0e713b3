"""GroupNode: one daemon's group communication (docs/replication.md, "Group communication").

The node is the I/O shell around two parts, mixed in: ordering.py (a sequencer with
acknowledgement vectors inside one regular configuration) and membership.py (heartbeats,
failure detection, GATHER/JOIN consensus, COMMIT, recovery, INSTALL and the EVS delivery
order at a change). Here: the socket (or a transport object), the datagram header with
HMAC and replay protection, one-shot timers guarded by name, the housekeeping tick
(every heartbeat/2) and the counters of status().

Driven without sockets (unit tests, simulations): pass `transport` (an object with
`send(dest, data)`, dest a member id or `wire.BROADCAST`), `clock` (monotonic seconds) and
`wallclock` (seconds since the epoch: the header's timestamps), and a `loop` with
`at(when, fn)` on that clock; feed datagrams with `receive(data)` followed by `flush()`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional

from testbed.replication.gc import wire
from testbed.replication.gc.membership import Membership
from testbed.replication.gc.ordering import Ordering
from testbed.replication.gc.wire import AGREED, SAFE, ConfId, WireError

KINDS = {wire.DATA: "data", wire.ORDERED: "ordered", wire.ACK: "ack", wire.NACK: "nack"}


@dataclass(frozen=True)
class Timeouts:
    """Seconds. The defaults suit a LAN of up to 14 Python daemons on 2 cores: measured
    with 14 daemons in namespaces on one switch (2 cores), 200-byte Safe messages offered
    at 1000/s: all delivered, Safe latency p50 9 ms, p99 20 ms; at 2000/s: all delivered,
    p50 18 ms, p99 54 ms (3 daemons at 1000/s: p50 3.2 ms, p99 5.6 ms)."""

    heartbeat: float = 0.1        # a broadcast at least this often (the tick is half)
    fail_timeout: float = 0.5     # a member not heard for this long is suspected
    ack_interval: float = 0.003   # cumulative ACKs (and the safe line) at most this often
    nack_interval: float = 0.01   # a gap is asked for after this, and again every this
    retrans: float = 0.05         # a DATA not seen ordered after this is sent again
    join_interval: float = 0.05   # JOIN rebroadcast while gathering
    min_gather: float = 0.15      # gather at least this long (hear everyone's heartbeat)
    consensus_timeout: float = 1.0  # no consensus by then: drop the members that disagree
    commit_timeout: float = 1.0   # COMMIT, recovery or INSTALL missing: gather again
    window: int = 20000           # the sequencer orders at most this far above the safe line

    @classmethod
    def from_dict(cls, d) -> "Timeouts":
        """Timeouts from a configuration's {name: value}; ValueError (one line) for an
        unknown name, or a value that is not a positive number (window: a whole number)."""
        if not isinstance(d, dict):
            raise ValueError(f"timeouts must be {{name: seconds}}, got {d!r}")
        names = [f.name for f in fields(cls)]
        extra = sorted(set(d) - set(names))
        if extra:
            raise ValueError(f"unknown timeouts {extra} (known: {names})")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (
                    k == "window" and not isinstance(v, int)):
                kind = "a positive whole number" if k == "window" else "positive seconds"
                raise ValueError(f"timeout {k} must be {kind}, got {v!r}")
        return cls(**d)


class UdpTransport:
    """The real network: UDP datagrams to peers[dest]:port or to the broadcast address."""

    def __init__(self, peers: dict, port: int, bind_ip: str, broadcast_ip: str):
        self.addrs = {m: (ip, port) for m, ip in peers.items()}
        self.bcast = (broadcast_ip, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        # bound to every address: a socket bound to one unicast address gets no broadcasts
        self.sock.bind(("", port))
        self.sock.setblocking(False)

    def send(self, dest: int, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.bcast if dest == wire.BROADCAST else self.addrs[dest])
        except (BlockingIOError, OSError):
            pass  # a lost datagram: the protocol retransmits

    def close(self) -> None:
        self.sock.close()


class GroupNode(Membership, Ordering):
    """See the module's docstring and docs/replication.md for the API."""

    def __init__(self, loop, me: int, peers: dict, port: int = 8300, key: bytes = b"",
                 bind_ip: Optional[str] = None, broadcast_ip: str = "255.255.255.255",
                 on_event: Optional[Callable] = None, timeouts: Optional[Timeouts] = None,
                 *, transport=None, clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 incarnation: Optional[int] = None):
        if not key:
            raise ValueError("an HMAC key is required")
        if me not in peers:
            raise ValueError(f"member {me} is not in peers {sorted(peers)}")
        if any(not (0 < m <= wire.MAX_ID) for m in peers):
            raise ValueError(f"member ids must be in 1..{wire.MAX_ID}")
        self.loop, self.me, self.peers, self.port, self.key = loop, me, dict(peers), port, key
        self.bind_ip, self.broadcast_ip = bind_ip, broadcast_ip
        self.on_event = on_event or (lambda event: None)
        self.timeouts = timeouts or Timeouts()
        self.transport, self.clock, self.wallclock = transport, clock, wallclock
        self.own_transport = transport is None
        self.started_us = int(wallclock() * 1e6)
        self.inc = incarnation if incarnation is not None else self.started_us
        self.guard = wire.ReplayGuard(self.started_us, me)
        self.seqno = 0
        self.armed: set = set()
        self.closed = False
        self.last_bcast = -1.0
        self.stats = {"sent": {}, "received": {}, "bytes_sent": 0, "bytes_received": 0,
                      "drops": {r: 0 for r in wire.DROP_REASONS}, "delivered": 0,
                      "multicast": 0, "retrans": 0, "resent": 0, "configurations": 0}
        self.conf = ConfId(0, me, self.inc)
        self.members = (me,)
        self.state = "new"
        self.queued: list = []
        self.reset_ordering()
        self.init_membership()

    # life --------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the socket (unless a transport was given), register it and the tick."""
        if self.transport is None:
            self.transport = UdpTransport(self.peers, self.port, self.bind_ip,
                                          self.broadcast_ip)
            self.loop.add(self.transport.sock, self.readable)
        self.start_membership()
        self.loop.at(self.clock(), self.tick)

    def close(self) -> None:
        self.closed = True
        if self.own_transport and self.transport is not None:
            self.loop.remove(self.transport.sock)
            self.transport.close()

    def readable(self, mask: int = 0) -> None:
        sock = self.transport.sock
        for _ in range(256):
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.receive(data)
        self.flush()

    # the application's side ---------------------------------------------------------------
    def multicast(self, payload: bytes, service: int = SAFE) -> None:
        """Send payload (<= MAX_PAYLOAD bytes) to the group, AGREED or SAFE; queued while no
        regular configuration is installed, sent in the next one."""
        if service not in (AGREED, SAFE):
            raise ValueError(f"service must be AGREED ({AGREED}) or SAFE ({SAFE})")
        payload = bytes(payload)
        if len(payload) > wire.MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {wire.MAX_PAYLOAD}")
        self.stats["multicast"] += 1
        if self.state == "regular":
            self.submit(service, payload)
        else:
            self.queued.append((service, payload))

    def emit(self, event) -> None:
        if isinstance(event, wire.Delivery):
            self.stats["delivered"] += 1
        self.on_event(event)

    def status(self) -> dict:
        st = self.stats
        kinds: dict = {}
        for way in ("sent", "received"):
            k = {"data": 0, "ordered": 0, "ack": 0, "nack": 0, "membership": 0}
            for name, n in st[way].items():
                k[KINDS.get(getattr(wire, name.upper()), "membership")] += n
            kinds[way] = k
        c = self.conf
        return {"me": self.me, "inc": self.inc, "state": self.state,
                "conf": [c.seq, c.coord, c.inc], "members": list(self.members),
                "sequencer": self.sequencer, "queued": len(self.queued),
                "pending": len(self.pending), "aru": self.aru, "high": self.high,
                "safe": self.safe, "delivered_seq": self.delivered,
                "packets_sent": kinds["sent"], "packets_received": kinds["received"],
                "sent_by_type": dict(st["sent"]), "received_by_type": dict(st["received"]),
                "bytes_sent": st["bytes_sent"], "bytes_received": st["bytes_received"],
                "drops": dict(st["drops"]), "delivered": st["delivered"],
                "multicast": st["multicast"], "retransmitted": st["retrans"],
                "resent": st["resent"], "configurations": st["configurations"]}

    # datagrams ---------------------------------------------------------------------------
    def send(self, mtype: int, dest: int, body: bytes) -> None:
        self.seqno += 1
        now = self.clock()
        data = wire.encode(self.key, mtype, self.me, dest, self.inc, self.seqno,
                           int(self.wallclock() * 1e6), body)
        name = wire.TYPE_NAMES[mtype]
        sent = self.stats["sent"]
        sent[name] = sent.get(name, 0) + 1
        self.stats["bytes_sent"] += len(data)
        if dest == wire.BROADCAST:
            self.last_bcast = now
        self.transport.send(dest, data)

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n

    def drop(self, reason: str) -> None:
        self.stats["drops"][reason] += 1

    def receive(self, data) -> None:
        """One datagram from the network (call flush() after a batch of them)."""
        if self.closed:
            return
        try:
            (mtype, sender, dest, inc, seq, ts), body = wire.decode(self.key, data)
        except WireError as e:
            self.drop(e.reason)
            return
        if sender == self.me and inc == self.inc:
            return  # my own broadcast, looped back
        if sender not in self.peers:
            self.drop("unknown_sender")
            return
        reason = self.guard.check(sender, dest, inc, seq, ts, int(self.wallclock() * 1e6))
        if reason:
            self.drop(reason)
            return
        name = wire.TYPE_NAMES[mtype]
        got = self.stats["received"]
        got[name] = got.get(name, 0) + 1
        self.stats["bytes_received"] += len(data)
        self.heard(sender, inc)
        if mtype == wire.ORDERED:
            conf, safe, high, items = body
            if self.check_conf(sender, conf):
                self.on_ordered(sender, conf, safe, high, items)
        elif mtype == wire.DATA:
            if self.check_conf(sender, body[0]):
                self.on_data(sender, body[0], body[1])
        elif mtype == wire.ACK:
            if self.check_conf(sender, body[0]):
                self.on_ack(sender, body[0], body[1])
        elif mtype == wire.NACK:
            self.on_nack(sender, body[0], body[1])
        elif mtype == wire.HEARTBEAT:
            conf, flags, high, safe = body
            if self.check_conf(sender, conf, flags) and flags & wire.HF_SEQUENCER:
                self.on_seq_heartbeat(conf, high, safe)
        else:
            self.on_membership(mtype, sender, body)

    # timers ------------------------------------------------------------------------------
    def arm(self, name: str, when: float) -> None:
        """A one-shot timer `name` unless one is armed; on_timer(name) when it fires."""
        if name not in self.armed:
            self.armed.add(name)
            self.loop.at(when, lambda now, name=name: self.fire(name))

    def arm_flush(self) -> None:
        self.arm("flush", self.clock())

    def fire(self, name: str) -> None:
        self.armed.discard(name)
        if self.closed:
            return
        if name == "flush":
            self.flush()
        else:
            self.on_timer(name)
            self.membership_timer(name)

    def tick(self, now: float = 0.0) -> None:
        if self.closed:
            return
        now = self.clock()
        self.membership_tick(now)
        self.resend_pending(now)
        if now - self.last_bcast >= self.timeouts.heartbeat * 0.95:
            self.send_heartbeat(now)
        self.flush()
        self.loop.at(now + self.timeouts.heartbeat / 2, self.tick)

    def send_heartbeat(self, now: float) -> None:
        if self.state == "gather":
            self.send_join()
            return
        regular = self.state == "regular"
        flags = (wire.HF_INSTALLED if regular else 0) | (
            wire.HF_SEQUENCER if regular and self.me == self.sequencer else 0)
        self.safe_sent, self.safe_time = self.safe, now
        self.send(wire.HEARTBEAT, wire.BROADCAST,
                  wire.heartbeat_body(self.beacon_conf(), flags, self.high, self.safe))
