"""The overlay daemon: one per overlay node, a Spines-style router and session server.

    python -m testbed.overlay --id N --listen IP:PORT --neighbour ID=IP:PORT ...
        --key-file F --control SOCK [--ready-file F] [--hello-ms 500]
        [--cost hops|latency|expected] [--dead-hellos 2.5] [--refresh-s 30] [--max-age-s 120]

One UDP socket for the overlay, one UNIX SOCK_SEQPACKET socket for local clients and
control, one thread: the daemon runtime's Loop (a selector with timers). After each batch
of events the loop "flushes": re-originates its LSA, recomputes routes, floods, sends the
link acks due (one per link per batch: per-packet acks at low rates, batched at high rates,
no timers) and pumps the link and session queues.

Per link (wire.py has the formats):
- hello protocol: a HELLO every hello interval, answered at once by a HELLO_ACK (RTT from
  the echoed timestamp, EWMA 1/8; routing uses half the smallest of the last 10; the peer
  reports the loss it sees from the gaps in our hello numbers). After one silent interval
  hellos go out eight times as often, so that loss alone rarely kills a link; a link is
  down after `dead_hellos` intervals without any authenticated message from the neighbour
  (default 2.5: rerouting within three intervals).
- three link protocols, chosen per message (ROUTED.proto): best effort (straight out);
  reliable (selective repeat, acks per batch, TCP-like window, RTO from the link's RTT,
  dupthresh 1 since one link does not reorder; intermediate nodes keep no per-flow state:
  a message is forwarded as soon as it arrives, in any order, and acknowledged per link);
  real-time (no window; a lost message is resent only if its remaining budget covers the
  link's one-way delay).
- link state: our LSA (live links, one-way delay = RTT / 2, outgoing loss) is flooded on a
  significant change and every refresh interval; HELLOs carry a digest of the database,
  and a neighbour whose digest stays different gets our whole database (so a lost flood on
  a lossy link is repaired within a few hellos). Routes: Dijkstra by the configured cost.

End to end (the sender and receiver daemons only): reliable FIFO sessions (a window of
messages per destination socket, acks from the receiver at least four times per window
and at once on a duplicate, a new hole or a congestion stamp; the sender treats a stamped
ack as a loss for its window but resends only on timeout, or at once after a reroute)
and unreliable datagrams.

Nothing a peer or client sends can raise out of the loop: bad datagrams are dropped and
counted by reason (stats "drops"), bad client frames get an error frame.
Exit codes: 0 on SIGTERM/SIGINT (after flooding an LSA without links), 1 if a socket
cannot be set up, 2 for bad arguments (nothing created). With TESTBED_OVERLAY_PROFILE_DIR
set, the daemon runs under cProfile and writes overlay-<id>.prof there when it stops.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
import traceback
from typing import Optional

from testbed.overlay import wire
from testbed.overlay.linkstate import COSTS, LinkStateDB, shortest_paths
from testbed.overlay.reliable import ReceiveWindow, ReorderBuffer, RttEstimator, SRSender
from testbed.overlay.wire import (BEST_EFFORT, DATA, E2E_ACK, HELLO, HELLO_ACK, LINK_ACK,
                                  LINK_STATE, MASK32, REALTIME, RELIABLE)
from testbed.daemon.args import ArgParser, UsageError, addr, int_in
from testbed.daemon.files import ready_file
from testbed.daemon.keys import read_key
from testbed.daemon.loop import Loop
from testbed.daemon.main import run_main

DEFAULT_PORT = 8100
BATCH = 64  # datagrams (or client frames) read per readiness event
SOCKBUF = 4 << 20
LINK_WINDOW = 1024  # reliable link: most messages in flight
LINK_QUEUE_LIMIT = 4096  # reliable link: messages waiting for the window, then dropped
STAMP_FULL = 64  # queue length stamped as 255
STAMP_THRESHOLD = 128  # an end receiver reacts to stamps from here (a queue of 32)
RT_KEEP = 4096  # real-time messages kept for retransmission per link
E2E_WINDOW = 2048
REORDER_LIMIT = 4096
PENDING_LIMIT = 256  # messages a session holds before the client's reads pause
CLIENT_BACKLOG = 8192  # frames queued to a slow client before it loses data / acks stop
E2E_ACK_DELAY = 0.05  # leftovers are acknowledged this late (about RTT / 2 on a WAN path)
LINGER_S = 30.0  # a closed socket's sessions keep retransmitting this long
RECV_IDLE_S = 300.0
LOSS_ALPHA = 1 / 16
RTT_ALPHA = 1 / 8
RTT_WINDOW = 10  # hello RTT samples the routing delay is the minimum of
PROBES = 8  # hellos per interval to a neighbour that has been silent for an interval
EPHEMERAL = range(49152, 65536)

mono = time.monotonic


def now_us32() -> int:
    return (time.monotonic_ns() // 1000) & MASK32


def _since_us(ts: int) -> float:
    """Seconds from an echoed now_us32() stamp to now (None-safe use: < 60 s sanity)."""
    return ((now_us32() - ts) & MASK32) / 1e6


def link_rtt_estimator() -> RttEstimator:
    """A link's retransmission timer: RTT-based with 10 ms of slack for batched acks, at
    least 20 ms, backing off to at most 8x (a link's loss is not an outage: the hello
    protocol, not the timer, decides that a neighbour is gone). The 20 ms floor keeps a
    daemon descheduled for a few ms on a busy machine from resending a whole window.
    The ceiling is far above any link's RTT: a slow link with a long queue (0.5 Mbit/s
    behind 100 packets: 2.2 s) has RTTs of seconds, and a ceiling below them (it was
    0.5 s) fires on every window and resends what is still queued."""
    return RttEstimator(init_rto=0.2, min_rto=0.02, max_rto=10.0, granularity=0.01,
                        max_backoff=8)


class Neighbour:
    """One overlay link: hello state, replay window, link protocols, counters."""

    def __init__(self, nid: int, addr: tuple, nonce_start: int):
        self.id, self.addr = nid, addr
        self.up = False
        self.inc = random.randrange(256)
        self.peer_inc: Optional[int] = None
        self.nonce = nonce_start
        self.replay = wire.ReplayWindow()
        self.last_heard: Optional[float] = None
        self.up_since: Optional[float] = None
        self.downs = 0
        self.hello_seq = 0
        self.last_hello_sent = -1e9
        self.next_hello = 0.0
        self.rx_hello_seq: Optional[int] = None
        self.rtt: Optional[float] = None  # EWMA of hello RTTs (what a message sees)
        self.rtt_samples: collections.deque = collections.deque(maxlen=RTT_WINDOW)
        self.rx_loss = 0.0  # of peer -> us, from the gaps in its hello numbers
        self.tx_loss = 0.0  # of us -> peer, as the peer reports it
        self.advertised: Optional[tuple] = None  # (delay_us, loss) in our LSA
        self.mismatch = 0
        self.last_sync = -1e9
        self.hello_timer_at: Optional[float] = None
        self.timer_at: Optional[float] = None
        self.ack_echo = [None, None, None]  # per proto: timestamp to echo in the next ack
        self.c = collections.Counter()
        self.reset_protocols()

    def reset_protocols(self) -> None:
        rtt = link_rtt_estimator()
        if self.rtt is not None:
            rtt.sample(self.rtt)
        self.rel = SRSender(cc=True, fast_retransmit=True, window=LINK_WINDOW, dupthresh=1,
                            rtt=rtt, min_cwnd=2)
        self.rel_queue: collections.deque = collections.deque()
        self.rel_rx = ReceiveWindow()
        rt_rtt = link_rtt_estimator()
        if self.rtt is not None:
            rt_rtt.sample(self.rtt)
        self.rt = SRSender(cc=False, fast_retransmit=True, window=1 << 30, dupthresh=1,
                           rtt=rt_rtt)
        self.rt_rx = ReceiveWindow(slide=True)
        self.ack_echo = [None, None, None]

    @property
    def rtt_min(self) -> Optional[float]:
        return min(self.rtt_samples) if self.rtt_samples else None

    def delay_us(self) -> int:
        """The link's one-way delay for routing: half the smallest of the last RTT_WINDOW
        hello RTTs, the propagation delay without the queueing and scheduling spikes
        that an average drags along (routes should not move for a busy moment)."""
        m = self.rtt_min
        return 0 if m is None else int(m / 2 * 1e6)

    def loss_e4(self) -> int:
        return int(round(self.tx_loss * 1e4))

    def info(self, now: float) -> dict:
        return {"id": self.id, "addr": f"{self.addr[0]}:{self.addr[1]}", "up": self.up,
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1e3, 3),
                "rtt_min_ms": None if not self.rtt_samples else round(self.rtt_min * 1e3, 3),
                "loss_out_pct": round(self.tx_loss * 100, 2),
                "loss_in_pct": round(self.rx_loss * 100, 2),
                "last_heard_ms": None if self.last_heard is None else
                round((now - self.last_heard) * 1e3, 1),
                "up_for_s": None if not self.up else round(now - self.up_since, 3),
                "downs": self.downs}

    def stats(self, now: float) -> dict:
        out = self.info(now)
        out.update(dict(self.c))
        out["queue"] = len(self.rel_queue)
        out["reliable"] = self.rel.stats()
        out["reliable_rx"] = {"cum": self.rel_rx.cum, "dups": self.rel_rx.dups,
                              "beyond": self.rel_rx.beyond}
        out["realtime"] = self.rt.stats()
        out["realtime_rx"] = {"cum": self.rt_rx.cum, "dups": self.rt_rx.dups,
                              "skipped": self.rt_rx.skipped}
        return out


class SendSession:
    """The sending end of a reliable session: (local port) -> (dst node, dst port)."""

    def __init__(self, d: "Daemon", conn: "Conn", dst: int, dport: int):
        self.d, self.conn, self.dst, self.dport = d, conn, dst, dport
        self.port, self.proto, self.budget = conn.port, conn.proto, conn.budget
        while True:
            sid = random.getrandbits(32)
            if sid and sid not in d.sessions_by_id:
                break
        self.sid = sid
        # over reliable links messages overtake each other (a hop resends a lost one while
        # later ones go on): only a timeout, or a reroute, means a loss. Over best-effort
        # and real-time links a path does not reorder: a later message acknowledged means
        # an earlier one is lost (as RACK treats it)
        self.sr = SRSender(cc=True, fast_retransmit=self.proto != RELIABLE, window=E2E_WINDOW,
                           dupthresh=1, timeout_is_congestion=self.proto != RELIABLE,
                           # RTO = srtt + max(200 ms, 4 rttvar), as Linux TCP's: the
                           # receiver delays acks up to E2E_ACK_DELAY, and with 20 ms of
                           # slack a 100 ms path timed out on every ack that came late
                           # (a lost ack, a daemon descheduled), resending the whole window
                           rtt=RttEstimator(init_rto=1.0, min_rto=0.2, max_rto=20.0,
                                            granularity=0.2, max_backoff=16))
        self.pending: collections.deque = collections.deque()
        self.timer_at: Optional[float] = None
        self.closed_at: Optional[float] = None
        self.congestion = 0
        self.reroutes = 0

    def pump(self, now: float) -> None:
        sr = self.sr
        while sr.can_retransmit():
            self.transmit(sr.next_lost(), now)
        pending = self.pending
        while pending and sr.can_send():
            self.transmit(sr.new(pending.popleft()), now)
        dl = sr.deadline()
        if dl is not None and (self.timer_at is None or dl < self.timer_at):
            self.timer_at = dl
            self.d.loop.at(dl, self.on_timer)
        conn = self.conn
        if conn is not None and conn.paused and len(pending) < PENDING_LIMIT // 2:
            conn.maybe_resume()
        if self.closed_at is not None and not pending and not sr.outstanding:
            self.d.drop_session(self)

    def transmit(self, seq: int, now: float) -> None:
        sr = self.sr
        body = bytearray(wire.ROUTED.pack(self.d.id, self.dst, self.port, self.dport, 64,
                                          self.proto, 0, wire.KIND_SESSION, 0, self.budget))
        body += wire.SESSION.pack(self.sid, seq, min(int(sr.cwnd), 0xFFFF), now_us32())
        body += sr.entries[seq].item
        sr.transmitted(seq, now)
        self.d.route_out(DATA, body, now, self.budget, now)

    def on_timer(self, now: float) -> None:
        self.timer_at = None
        if self.d.sessions_by_id.get(self.sid) is not self:
            return
        dl = self.sr.deadline()
        if dl is not None and dl <= now:
            self.sr.on_timeout(now)
        self.pump(now)

    def rerouted(self, now: float) -> None:
        """The route to dst changed: what is in flight may be lost (a failed node): resend
        everything older than a round trip now rather than after a backed-off timeout."""
        sr = self.sr
        sr.rtt.backoff = 1
        age = sr.rtt.srtt if sr.rtt.srtt is not None else 0.0
        while sr.flight:
            seq = next(iter(sr.flight))
            if now - sr.entries[seq].sent_at < age:
                break
            del sr.flight[seq]
            sr.lost[seq] = None
        self.reroutes += 1
        self.pump(now)

    def info(self) -> dict:
        out = {"session": self.sid, "port": self.port, "dst": self.dst, "dport": self.dport,
               "link": wire.PROTO_NAMES[self.proto], "pending": len(self.pending),
               "congestion_acks": self.congestion, "reroutes": self.reroutes,
               "closed": self.closed_at is not None}
        out.update(self.sr.stats())
        return out


class RecvSession:
    """The receiving end of a reliable session: reorder buffer and ack policy."""

    def __init__(self, src: int, sport: int, sid: int, port: int):
        self.src, self.sport, self.sid, self.port = src, sport, sid, port
        self.buf = ReorderBuffer(REORDER_LIMIT)
        self.unacked = 0
        self.echo = 0
        self.proto = RELIABLE
        self.timer_at: Optional[float] = None
        self.last = mono()
        self.acks = 0


class Conn:
    """A client connection: a bound overlay socket, or a control channel."""

    def __init__(self, d: "Daemon", sock: socket.socket):
        self.d, self.sock = d, sock
        self.port: Optional[int] = None
        self.reliable, self.proto, self.budget = True, RELIABLE, 0
        self.out: collections.deque = collections.deque()
        self.paused = False
        self.registered = 0
        self.sessions: dict = {}  # (dst, dport) -> SendSession
        self.closed = False
        self.dg_seq = 0
        self.delivered = 0
        self.dropped = 0
        self.update_events()

    def update_events(self) -> None:
        if self.closed:
            return
        mask = (0 if self.paused else selectors.EVENT_READ) | \
            (selectors.EVENT_WRITE if self.out else 0)
        if mask == self.registered:
            return
        loop = self.d.loop
        if mask == 0:
            loop.remove(self.sock)
        elif self.registered == 0:
            loop.add(self.sock, self.on_event, mask)
        else:
            loop.modify(self.sock, self.on_event, mask)
        self.registered = mask

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.drain()
        if mask & selectors.EVENT_READ and not self.closed:
            self.d.client_read(self)

    def send_frame(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out.append(frame)
            return
        try:
            self.sock.send(frame)
        except BlockingIOError:
            self.out.append(frame)
            self.update_events()
        except OSError:
            self.d.close_conn(self)

    def drain(self) -> None:
        out = self.out
        while out:
            try:
                self.sock.send(out[0])
            except BlockingIOError:
                break
            except OSError:
                self.d.close_conn(self)
                return
            out.popleft()
        self.update_events()

    def deliver(self, src: int, sport: int, payload) -> None:
        self.delivered += 1
        self.send_frame(wire.SV_DATA_HEAD.pack(wire.SV_DATA, 0, src, sport) + payload)

    def reply(self, obj: dict) -> None:
        self.send_frame(bytes([wire.SV_REPLY]) + json.dumps(obj).encode())

    def error(self, msg: str) -> None:
        self.send_frame(bytes([wire.SV_ERROR]) + msg.encode())

    @property
    def backlogged(self) -> bool:
        return len(self.out) >= CLIENT_BACKLOG

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.update_events()

    def maybe_resume(self) -> None:
        if self.paused and all(len(s.pending) < PENDING_LIMIT // 2
                               for s in self.sessions.values()):
            self.paused = False
            self.update_events()


class Daemon:
    def __init__(self, node_id: int, listen: tuple, neighbours: dict, key: bytes,
                 control: str, hello_ms: float = 500, cost: str = "latency",
                 dead_hellos: float = 2.5, refresh_s: float = 30, max_age_s: int = 120):
        self.id = node_id
        self.key = key
        self.hello_s = hello_ms / 1000.0
        self.dead_s = dead_hellos * self.hello_s
        self.cost = cost
        self.refresh_s = refresh_s
        self.control_path = control
        self.started = mono()
        start_us = time.time_ns() // 1000
        self.neighbours = {nid: Neighbour(nid, addr, start_us)
                           for nid, addr in sorted(neighbours.items())}
        self.lsdb = LinkStateDB(max_age_s)
        self.lsa_seq = start_us
        self.routes: dict = {}
        self.next_hop: dict = {}
        self.route_changes = 0
        self.last_route_change: Optional[float] = None
        self.c = collections.Counter()  # daemon-wide counters
        self.drops = collections.Counter({r: 0 for r in wire.DROP_REASONS})
        self.ports: dict = {}
        self.conns: set = set()
        self.sessions_by_id: dict = {}
        self.recv_sessions: dict = {}
        # work for the next flush
        self.lsa_dirty = True
        self.routes_dirty = True
        self.flood: dict = {}  # origin -> neighbour id it came from (not flooded back)
        self.sync_to: set = set()
        self.ack_due: set = set()
        self.pump_due: set = set()
        self.sessions_due: set = set()
        self.reroute: list = []
        self.errors_logged = 0
        self.loop = Loop()
        self.buf = bytearray(wire.MAX_FRAME)
        self.mv = memoryview(self.buf)
        self.handlers = {HELLO: self.on_hello, HELLO_ACK: self.on_hello_ack,
                         LINK_STATE: self.on_link_state, DATA: self.on_data,
                         LINK_ACK: self.on_link_ack, E2E_ACK: self.on_e2e}
        self.sock = self._udp(listen)
        self.lsock = self._unix(control)

    # setup --------------------------------------------------------------------------------
    def _udp(self, listen: tuple) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCKBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        s.bind(listen)
        s.setblocking(False)
        self.loop.add(s, self.on_udp)
        return s

    def _unix(self, path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(path)
        s.listen(64)
        s.setblocking(False)
        self.loop.add(s, self.on_accept)
        return s

    def log(self, msg: str) -> None:
        print(f"overlay[{self.id}] {mono() - self.started:9.3f} {msg}", file=sys.stderr,
              flush=True)

    # loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until self.loop stops (a stop signal, with loop.stop_on_signals()), then
        say goodbye."""
        now = mono()
        for i, nb in enumerate(self.neighbours.values()):
            self.arm_hello(nb, now + 0.001 * i)
        self.loop.at(now + self.refresh_s, self.on_refresh)
        self.loop.at(now + 5.0, self.on_gc)
        self.flush(now)
        loop = self.loop
        while not loop.stopping:
            loop.run_once()  # files ready, then timers due
            self.flush(mono())
        self.goodbye()

    def goodbye(self) -> None:
        """Flood an LSA without links, so that routes move before hellos time out."""
        self.lsa_seq += 1
        lsa = wire.Lsa(self.id, self.lsa_seq, 0, ())
        for body in wire.pack_link_states([lsa]):
            for nb in self.neighbours.values():
                if nb.up:
                    self.send(nb, LINK_STATE, body)

    def close(self) -> None:
        for conn in list(self.conns):
            self.close_conn(conn)
        self.sock.close()
        self.lsock.close()
        self.loop.close()
        try:
            os.unlink(self.control_path)
        except OSError:
            pass

    def internal_error(self, where: str) -> None:
        self.c["internal_errors"] += 1
        if self.errors_logged < 10:
            self.errors_logged += 1
            self.log(f"internal error in {where}: {traceback.format_exc().strip()}")

    def flush(self, now: float) -> None:
        try:
            if self.lsa_dirty:
                self.originate(now)
            if self.routes_dirty:
                self.recompute(now)
            if self.reroute:
                items, self.reroute = self.reroute, []
                for typ, body, t_in, budget in items:
                    self.route_out(typ, body, now, budget, t_in)
            if self.flood or self.sync_to:
                self.do_flood(now)
            while self.sessions_due:
                self.sessions_due.pop().pump(now)
            while self.pump_due:  # data first, then the acks of what arrived
                self.pump(self.pump_due.pop(), now)
            if self.ack_due:
                for nb in self.ack_due:
                    self.send_link_acks(nb)
                self.ack_due.clear()
        except Exception:
            self.internal_error("flush")

    # sending ------------------------------------------------------------------------------
    def send(self, nb: Neighbour, typ: int, body) -> bool:
        nb.nonce += 1
        msg = wire.COMMON.pack(wire.VERSION, typ, nb.inc, nb.peer_inc or 0, self.id, nb.nonce,
                               now_us32()) + body
        try:
            self.sock.sendto(msg + hmac.digest(self.key, msg, "sha256")[:wire.TAG_LEN],
                             nb.addr)
        except OSError:
            nb.c["send_errors"] += 1
            return False
        nb.c["tx"] += 1
        return True

    # receiving ----------------------------------------------------------------------------
    def on_udp(self, mask: int) -> None:
        sock, buf = self.sock, self.buf
        for _ in range(BATCH):
            try:
                n, _addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.c["rx_errors"] += 1
                return
            self.c["rx"] += 1
            try:
                self.handle(n)
            except wire.WireError as e:
                self.drops[e.reason] += 1
            except (struct.error, ValueError, IndexError, KeyError):
                self.drops["malformed"] += 1
            except Exception:
                self.internal_error("receive")

    def handle(self, n: int) -> None:
        _v, typ, inc, pinc, sender, nonce, ts = wire.check(self.buf, n, self.key)
        nb = self.neighbours.get(sender)
        if nb is None:
            raise wire.WireError("unknown_sender", str(sender))
        if not nb.replay.accept(nonce):
            raise wire.WireError("replay")
        now = mono()
        nb.last_heard = now
        nb.c["rx"] += 1
        self.handlers[typ](nb, inc, pinc, ts, self.mv[wire.HEADER_LEN:n - wire.TAG_LEN], now)

    def link_ok(self, nb: Neighbour, inc: int, pinc: int) -> bool:
        if nb.up and inc == nb.peer_inc and pinc == nb.inc:
            return True
        self.drops["stale_link"] += 1
        return False

    # hello protocol -----------------------------------------------------------------------
    def arm_hello(self, nb: Neighbour, when: float) -> None:
        if nb.hello_timer_at is None or when < nb.hello_timer_at:
            nb.hello_timer_at = when
            self.loop.at(when, lambda now, nb=nb: self.on_hello_timer(nb, now))

    def on_hello_timer(self, nb: Neighbour, now: float) -> None:
        if nb.hello_timer_at is None or now < nb.hello_timer_at:
            return  # superseded by an earlier timer that already ran
        nb.hello_timer_at = None
        hello, probe = self.hello_s, self.hello_s / PROBES
        if nb.up and (nb.last_heard is None or now - nb.last_heard >= self.dead_s):
            self.link_down(nb, now)
        # an up link silent for a whole interval is probed PROBES times per interval, so
        # that loss alone (even 30 %) rarely silences it for the dead interval
        silent = nb.up and now - nb.last_heard >= hello
        regular = now >= nb.next_hello
        if regular or (silent and now - nb.last_hello_sent >= probe * 0.99):
            self.send_hello(nb, now)
            if regular:
                nb.next_hello = now + hello * random.uniform(0.9, 1.0)
        wake = nb.next_hello
        if nb.up:
            if silent:
                wake = min(wake, nb.last_hello_sent + probe, nb.last_heard + self.dead_s)
            else:
                wake = min(wake, nb.last_heard + hello)  # when silence would begin
        self.arm_hello(nb, max(wake, now + 0.001))

    def send_hello(self, nb: Neighbour, now: float) -> None:
        nb.hello_seq = (nb.hello_seq + 1) & 0xFFFF
        nb.last_hello_sent = now
        nb.c["hellos_tx"] += 1
        self.send(nb, HELLO, wire.HELLO_BODY.pack(nb.hello_seq, self.lsdb.digest))

    def on_hello(self, nb: Neighbour, inc: int, pinc: int, ts: int, body, now: float) -> None:
        hello = wire.Hello.unpack(body)
        seq, digest = hello.seq, hello.digest
        nb.c["hellos_rx"] += 1
        if inc != nb.peer_inc:
            self.peer_reset(nb, inc)
        if nb.rx_hello_seq is not None:
            gap = (seq - nb.rx_hello_seq) & 0xFFFF
            if 0 < gap < 256:
                for _ in range(gap - 1):
                    nb.rx_loss += (1.0 - nb.rx_loss) * LOSS_ALPHA
                nb.rx_loss -= nb.rx_loss * LOSS_ALPHA
        nb.rx_hello_seq = seq
        self.send(nb, HELLO_ACK, wire.HELLO_ACK_BODY.pack(seq, ts, int(nb.rx_loss * 1e4)))
        if not nb.up:
            if now - nb.last_hello_sent > self.hello_s / 8:
                self.send_hello(nb, now)  # speed up the handshake
        elif digest != self.lsdb.digest:
            nb.mismatch += 1
            if nb.mismatch >= 2 and now - nb.last_sync >= 2 * self.hello_s:
                self.sync_to.add(nb)
                nb.mismatch = 0
        else:
            nb.mismatch = 0

    def on_hello_ack(self, nb: Neighbour, inc: int, pinc: int, ts: int, body,
                     now: float) -> None:
        ack = wire.HelloAck.unpack(body)
        if inc != nb.peer_inc:
            self.peer_reset(nb, inc)
        if pinc != nb.inc:
            self.drops["stale_link"] += 1
            return
        rtt = _since_us(ack.echo)
        if rtt < 60:
            nb.rtt = rtt if nb.rtt is None else nb.rtt + (rtt - nb.rtt) * RTT_ALPHA
            nb.rtt_samples.append(rtt)
        nb.tx_loss = min(ack.rx_loss, 10000) / 1e4
        if not nb.up:
            self.link_up(nb, now)
        elif self.metrics_changed(nb):
            self.lsa_dirty = True

    def metrics_changed(self, nb: Neighbour) -> bool:
        if nb.advertised is None:
            return True
        d0, l0 = nb.advertised
        d1, l1 = nb.delay_us(), nb.loss_e4()
        if abs(d1 - d0) > max(500, 0.1 * d0):  # hysteresis: routes must not flap
            return True
        return abs(l1 - l0) > max(50, 0.25 * l0)

    def peer_reset(self, nb: Neighbour, inc: int) -> None:
        """The neighbour started a new incarnation of the link (or restarted)."""
        if nb.peer_inc is not None:
            self.reset_link(nb)
            nb.c["peer_resets"] += 1
        nb.peer_inc = inc
        nb.rx_hello_seq = None

    def link_up(self, nb: Neighbour, now: float) -> None:
        nb.up = True
        nb.up_since = now
        nb.mismatch = 0
        for sender in (nb.rel, nb.rt):
            if sender.rtt.srtt is None and nb.rtt is not None:
                sender.rtt.sample(nb.rtt)
        self.lsa_dirty = True
        self.sync_to.add(nb)
        self.log(f"link to {nb.id} up (rtt {nb.rtt * 1e3:.2f} ms)" if nb.rtt is not None
                 else f"link to {nb.id} up")

    def link_down(self, nb: Neighbour, now: float) -> None:
        nb.up = False
        nb.downs += 1
        nb.inc = (nb.inc + 1) & 0xFF
        nb.rx_hello_seq = None
        nb.advertised = None
        self.reset_link(nb)
        self.lsa_dirty = True
        heard = "never" if nb.last_heard is None else f"{(now - nb.last_heard) * 1e3:.0f} ms ago"
        self.log(f"link to {nb.id} down (last heard {heard})")

    def reset_link(self, nb: Neighbour) -> None:
        """Forget the link protocols' state; hand queued and unacknowledged reliable
        messages back for rerouting (real-time ones are dropped: their time is short)."""
        items = [(typ, body, None, 0) for typ, body in nb.rel.take_all()]
        items += [(typ, body, None, 0) for typ, body in nb.rel_queue]
        nb.rt.take_all()
        nb.reset_protocols()
        self.ack_due.discard(nb)
        self.pump_due.discard(nb)
        if items:
            nb.c["handed_back"] += len(items)
            self.reroute.extend(items)

    # link state ---------------------------------------------------------------------------
    def originate(self, now: float) -> None:
        self.lsa_dirty = False
        self.lsa_seq += 1
        links = []
        for nb in self.neighbours.values():
            if nb.up:
                links.append(wire.LsaLink(nb.id, nb.delay_us(), nb.loss_e4()))
                nb.advertised = (nb.delay_us(), nb.loss_e4())
        self.lsdb.install(wire.Lsa(self.id, self.lsa_seq, 0, tuple(links)), now)
        self.flood[self.id] = None
        self.routes_dirty = True

    def on_link_state(self, nb: Neighbour, inc: int, pinc: int, ts: int, body,
                      now: float) -> None:
        ls = wire.LinkState.unpack(body)
        nb.c["lsas_rx"] += len(ls.lsas)
        for lsa in ls.lsas:
            if lsa.origin == self.id:
                if lsa.seq >= self.lsa_seq:  # an older incarnation of us: jump above it
                    self.lsa_seq = lsa.seq
                    self.lsa_dirty = True
                continue
            if self.lsdb.install(lsa, now):
                self.flood[lsa.origin] = nb.id
                self.routes_dirty = True

    def do_flood(self, now: float) -> None:
        flood, self.flood = self.flood, {}
        sync, self.sync_to = self.sync_to, set()
        for nb in self.neighbours.values():
            if not nb.up:
                continue
            if nb in sync:
                lsas = self.lsdb.current(now)
                nb.last_sync = now
                nb.c["syncs"] += 1
            else:
                lsas = self.lsdb.current(now, [o for o, src in flood.items() if src != nb.id])
            for body in wire.pack_link_states(lsas):
                nb.c["lsas_tx"] += 1
                self.send(nb, LINK_STATE, body)

    def recompute(self, now: float) -> None:
        self.routes_dirty = False
        routes = shortest_paths(self.lsdb.graph(self.cost), self.id)
        old = self.next_hop
        self.routes = routes
        self.next_hop = {d: r.next_hop for d, r in routes.items()}
        changed = {d for d in set(old) | set(self.next_hop) if old.get(d) != self.next_hop.get(d)}
        if changed:
            self.route_changes += 1
            self.last_route_change = now
            self.log("routes: " + ", ".join(
                f"{d}->{self.next_hop.get(d, '-')}" for d in sorted(changed)))
            for s in list(self.sessions_by_id.values()):
                if s.dst in changed and s.dst in self.next_hop:
                    s.rerouted(now)

    def on_refresh(self, now: float) -> None:
        self.lsa_dirty = True
        if self.lsdb.expire(now, keep=(self.id,)):
            self.routes_dirty = True
        self.loop.at(now + self.refresh_s, self.on_refresh)

    def on_gc(self, now: float) -> None:
        for s in list(self.sessions_by_id.values()):
            if s.closed_at is not None and now - s.closed_at > LINGER_S:
                self.drop_session(s)
        for key, rs in list(self.recv_sessions.items()):
            if now - rs.last > RECV_IDLE_S:
                del self.recv_sessions[key]
        self.loop.at(now + 5.0, self.on_gc)

    # forwarding ---------------------------------------------------------------------------
    def route_out(self, typ: int, body: bytearray, now: float, budget: int = 0,
                  t_in: Optional[float] = None) -> bool:
        """Send a routed message (DATA or E2E_ACK body) toward its destination."""
        dst = body[2] << 8 | body[3]
        if dst == self.id:
            self.deliver_local(typ, body, now)
            return True
        nb = self.neighbours.get(self.next_hop.get(dst))
        if nb is None or not nb.up:
            self.c["no_route"] += 1
            return False
        proto = body[wire.OFF_PROTO]
        if proto == RELIABLE:
            q = nb.rel_queue
            if len(q) >= LINK_QUEUE_LIMIT:
                nb.c["queue_drops"] += 1
                return False
            # congestion stamp: how many messages are already waiting for the window
            # (what will not fit in it, not a batch queued for the next flush)
            excess = len(q) + nb.rel.in_flight - int(nb.rel.cwnd)
            if excess > 0:
                stamp = min(255, excess * 255 // STAMP_FULL)
                if stamp > body[wire.OFF_STAMP]:
                    body[wire.OFF_STAMP] = stamp
            if not q and nb.up and nb.rel.can_send():  # the window is open: no queueing
                seq = nb.rel.new((typ, body))
                wire.LINK_SEQ.pack_into(body, wire.OFF_LINK_SEQ, seq)
                nb.rel.transmitted(seq, now)
                nb.c["data_tx"] += 1
                self.send(nb, typ, body)
                self.arm_link_timer(nb)
            else:
                q.append((typ, body))
                self.pump_due.add(nb)
        elif proto == REALTIME:
            self.rt_send(nb, typ, body, now if t_in is None else t_in, budget, now)
        else:
            wire.LINK_SEQ.pack_into(body, wire.OFF_LINK_SEQ, 0)
            nb.c["data_tx"] += 1
            self.send(nb, typ, body)
        return True

    def pump(self, nb: Neighbour, now: float) -> None:
        if not nb.up:
            return
        rel, q = nb.rel, nb.rel_queue
        while rel.can_retransmit():
            seq = rel.next_lost()
            typ, body = rel.entries[seq].item
            rel.transmitted(seq, now)
            nb.c["data_tx"] += 1
            self.send(nb, typ, body)
        while q and rel.can_send():
            item = q.popleft()
            seq = rel.new(item)
            wire.LINK_SEQ.pack_into(item[1], wire.OFF_LINK_SEQ, seq)
            rel.transmitted(seq, now)
            nb.c["data_tx"] += 1
            self.send(nb, item[0], item[1])
        self.arm_link_timer(nb)

    def rt_send(self, nb: Neighbour, typ: int, body: bytearray, t_in: float, budget: int,
                now: float) -> None:
        owd = 0.0 if nb.rtt is None else nb.rtt / 2
        left = budget - (now - t_in + owd) * 1000
        if left <= 0:
            nb.c["rt_expired"] += 1
            return
        rt = nb.rt
        seq = rt.new((typ, body, t_in, budget))
        wire.LINK_SEQ.pack_into(body, wire.OFF_LINK_SEQ, seq)
        wire.BUDGET.pack_into(body, wire.OFF_BUDGET, min(int(left), 0xFFFF))
        rt.transmitted(seq, now)
        nb.c["data_tx"] += 1
        self.send(nb, typ, body)
        while len(rt.entries) > RT_KEEP:
            rt.drop(next(iter(rt.entries)))
        self.arm_link_timer(nb)

    def rt_retransmit(self, nb: Neighbour, now: float) -> None:
        rt = nb.rt
        owd = 0.0 if nb.rtt is None else nb.rtt / 2
        while rt.lost:
            seq = rt.next_lost()
            typ, body, t_in, budget = rt.entries[seq].item
            left = budget - (now - t_in + owd) * 1000
            if left <= 0:
                rt.drop(seq)
                nb.c["rt_expired"] += 1
                continue
            wire.BUDGET.pack_into(body, wire.OFF_BUDGET, min(int(left), 0xFFFF))
            rt.transmitted(seq, now)
            nb.c["data_tx"] += 1
            self.send(nb, typ, body)
        self.arm_link_timer(nb)

    def arm_link_timer(self, nb: Neighbour) -> None:
        dl = nb.rel.deadline()
        d2 = nb.rt.deadline()
        if d2 is not None and (dl is None or d2 < dl):
            dl = d2
        if dl is not None and (nb.timer_at is None or dl < nb.timer_at):
            nb.timer_at = dl
            self.loop.at(dl, lambda now, nb=nb: self.on_link_timer(nb, now))

    def on_link_timer(self, nb: Neighbour, now: float) -> None:
        nb.timer_at = None
        if not nb.up:
            return
        dl = nb.rel.deadline()
        if dl is not None and dl <= now and nb.rel.on_timeout(now):
            nb.c["rto"] += 1
            self.pump_due.add(nb)
        dl = nb.rt.deadline()
        if dl is not None and dl <= now and nb.rt.on_timeout(now):
            self.rt_retransmit(nb, now)
        self.arm_link_timer(nb)

    def send_link_acks(self, nb: Neighbour) -> None:
        for proto in (RELIABLE, REALTIME):
            echo = nb.ack_echo[proto]
            if echo is None:
                continue
            nb.ack_echo[proto] = None
            cum, bitmap = (nb.rel_rx if proto == RELIABLE else nb.rt_rx).ack()
            nb.c["link_acks_tx"] += 1
            self.send(nb, LINK_ACK, wire.LINK_ACK_BODY.pack(proto, cum, echo, len(bitmap))
                      + bitmap)

    def on_link_ack(self, nb: Neighbour, inc: int, pinc: int, ts: int, body,
                    now: float) -> None:
        if not self.link_ok(nb, inc, pinc):
            return
        proto, cum, echo, nbytes = wire.LINK_ACK_BODY.unpack_from(body)
        if nbytes > wire.MAX_SACK_BYTES or len(body) != wire.LINK_ACK_BODY.size + nbytes:
            raise wire.WireError("malformed", "link ack bitmap")
        bits = int.from_bytes(body[wire.LINK_ACK_BODY.size:], "little") if nbytes else 0
        rtt = _since_us(echo)
        nb.c["link_acks_rx"] += 1
        if proto == RELIABLE:
            nb.rel.on_ack(cum, bits, now, rtt if rtt < 60 else None)
            if nb.rel.lost or nb.rel_queue:
                self.pump_due.add(nb)
        elif proto == REALTIME:
            nb.rt.on_ack(cum, bits, now, rtt if rtt < 60 else None)
            if nb.rt.lost:
                self.rt_retransmit(nb, now)
        else:
            raise wire.WireError("malformed", f"link ack for protocol {proto}")

    def on_data(self, nb: Neighbour, inc: int, pinc: int, ts: int, body, now: float) -> None:
        self.on_hop(DATA, nb, inc, pinc, ts, body, now)

    def on_e2e(self, nb: Neighbour, inc: int, pinc: int, ts: int, body, now: float) -> None:
        self.on_hop(E2E_ACK, nb, inc, pinc, ts, body, now)

    def on_hop(self, typ: int, nb: Neighbour, inc: int, pinc: int, ts: int, body,
               now: float) -> None:
        """DATA or E2E_ACK from a neighbour: link protocol, then deliver or forward."""
        if not self.link_ok(nb, inc, pinc):
            return
        if len(body) < wire.ROUTED.size + (wire.SESSION.size if typ == DATA
                                           else wire.E2E_ACK_BODY.size):
            raise wire.WireError("malformed", "short routed message")
        proto = body[wire.OFF_PROTO]
        if proto != BEST_EFFORT:
            if proto == RELIABLE:
                rx = nb.rel_rx
            elif proto == REALTIME:
                rx = nb.rt_rx
            else:
                raise wire.WireError("malformed", f"link protocol {proto}")
            new = rx.receive(wire.LINK_SEQ.unpack_from(body, wire.OFF_LINK_SEQ)[0])
            nb.ack_echo[proto] = ts
            self.ack_due.add(nb)
            if not new:
                nb.c["data_dups"] += 1
                return
        nb.c["data_rx"] += 1
        dst = body[2] << 8 | body[3]
        if dst == self.id:
            self.deliver_local(typ, body, now)
            return
        ttl = body[wire.OFF_TTL]
        if ttl <= 1:
            self.c["ttl_expired"] += 1
            return
        out = bytearray(body)
        out[wire.OFF_TTL] = ttl - 1
        self.c["forwarded"] += 1
        budget = wire.BUDGET.unpack_from(out, wire.OFF_BUDGET)[0] if proto == REALTIME else 0
        self.route_out(typ, out, now, budget, now)

    # local delivery -----------------------------------------------------------------------
    def deliver_local(self, typ: int, body, now: float) -> None:
        src, _dst, sport, dport, _ttl, proto, stamp, kind, _ls, _b = \
            wire.ROUTED.unpack_from(body)
        if typ == E2E_ACK:
            self.on_e2e_ack(src, sport, dport, body, now)
            return
        conn = self.ports.get(dport)
        start = wire.ROUTED.size + wire.SESSION.size
        if kind == wire.KIND_DATAGRAM:
            if conn is None:
                self.c["no_port"] += 1
                return
            if conn.backlogged:
                conn.dropped += 1
                self.c["client_backlog_drops"] += 1
                return
            self.c["delivered"] += 1
            conn.deliver(src, sport, body[start:])
            return
        sid, seq, wnd, sts = wire.SESSION.unpack_from(body, wire.ROUTED.size)
        # end-to-end acks go best effort whatever the data used: each one is cumulative
        # with a SACK bitmap, so the next one repairs a lost one, and they stay light (no
        # per-hop acks of acks)
        ack_proto = BEST_EFFORT
        if conn is None:
            self.c["no_port"] += 1
            self.send_e2e_ack(src, sport, dport, sid, 0, b"", sts, wire.ACK_NOPORT,
                              ack_proto, now)
            return
        key = (src, sport, sid)
        rs = self.recv_sessions.get(key)
        if rs is None:
            rs = self.recv_sessions[key] = RecvSession(src, sport, sid, dport)
        rs.last = now
        rs.proto = ack_proto
        rs.echo = sts
        if conn.backlogged:
            self.c["client_backlog_drops"] += 1
            return  # not acknowledged: the sender will resend
        before = rs.buf.highest
        status, ready = rs.buf.push(seq, bytes(body[start:]))
        for p in ready:
            conn.deliver(src, sport, p)
        self.c["delivered"] += len(ready)
        rs.unacked += 1
        congested = stamp >= STAMP_THRESHOLD
        if congested:
            self.c["stamped_rx"] += 1
        if (status != ReorderBuffer.NEW or congested or seq > before + 1
                or rs.unacked >= max(1, wnd // 4)):
            self.ack_session(rs, now, wire.ACK_CONGESTED if congested else 0)
        elif rs.timer_at is None:
            rs.timer_at = now + E2E_ACK_DELAY
            self.loop.at(rs.timer_at, lambda t, rs=rs: self.on_ack_timer(rs, t))

    def on_ack_timer(self, rs: RecvSession, now: float) -> None:
        rs.timer_at = None
        if rs.unacked and self.recv_sessions.get((rs.src, rs.sport, rs.sid)) is rs:
            self.ack_session(rs, now, 0)

    def ack_session(self, rs: RecvSession, now: float, flags: int) -> None:
        cum, bitmap = rs.buf.ack()
        rs.unacked = 0
        rs.acks += 1
        self.send_e2e_ack(rs.src, rs.sport, rs.port, rs.sid, cum, bitmap, rs.echo, flags,
                          rs.proto, now)

    def send_e2e_ack(self, dst: int, dport: int, sport: int, sid: int, cum: int, bitmap: bytes,
                     echo: int, flags: int, proto: int, now: float) -> None:
        body = bytearray(wire.ROUTED.pack(self.id, dst, sport, dport, 64, proto, 0,
                                          wire.KIND_SESSION, 0, 0))
        body += wire.E2E_ACK_BODY.pack(sid, cum, echo, flags, len(bitmap)) + bitmap
        self.c["e2e_acks_tx"] += 1
        self.route_out(E2E_ACK, body, now)

    def on_e2e_ack(self, src: int, sport: int, dport: int, body, now: float) -> None:
        sid, cum, echo, flags, nbytes = wire.E2E_ACK_BODY.unpack_from(body, wire.ROUTED.size)
        start = wire.ROUTED.size + wire.E2E_ACK_BODY.size
        if nbytes > wire.MAX_SACK_BYTES or len(body) != start + nbytes:
            raise wire.WireError("malformed", "e2e ack bitmap")
        s = self.sessions_by_id.get(sid)
        if s is None or s.dst != src or s.dport != sport or s.port != dport:
            self.c["unknown_session"] += 1
            return
        self.c["e2e_acks_rx"] += 1
        if flags & wire.ACK_NOPORT:
            if s.conn is not None:
                s.conn.error(f"overlay node {src} port {sport} is not bound")
            self.drop_session(s)
            return
        bits = int.from_bytes(body[start:], "little") if nbytes else 0
        rtt = _since_us(echo)
        s.sr.on_ack(cum, bits, now, rtt if rtt < 60 else None)
        if flags & wire.ACK_CONGESTED:
            s.congestion += 1
            s.sr.congestion()
        self.sessions_due.add(s)

    def drop_session(self, s: SendSession) -> None:
        self.sessions_by_id.pop(s.sid, None)
        self.sessions_due.discard(s)
        if s.conn is not None:
            s.conn.sessions.pop((s.dst, s.dport), None)
            s.conn.maybe_resume()

    # clients ------------------------------------------------------------------------------
    def on_accept(self, mask: int) -> None:
        for _ in range(16):
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.c["accept_errors"] += 1
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            except OSError:
                pass
            self.conns.add(Conn(self, sock))

    def close_conn(self, conn: Conn) -> None:
        if conn.closed:
            return
        if conn.registered:
            self.loop.remove(conn.sock)
            conn.registered = 0
        conn.closed = True
        conn.sock.close()
        self.conns.discard(conn)
        if conn.port is not None and self.ports.get(conn.port) is conn:
            del self.ports[conn.port]
        now = mono()
        for s in list(conn.sessions.values()):
            s.closed_at = now
            s.conn = None
            self.sessions_due.add(s)
        conn.sessions.clear()

    def client_read(self, conn: Conn) -> None:
        for _ in range(BATCH):
            try:
                data = conn.sock.recv(wire.MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close_conn(conn)
                return
            if not data:
                self.close_conn(conn)
                return
            try:
                self.client_frame(conn, data)
            except (ValueError, struct.error, KeyError, TypeError) as e:
                self.c["client_errors"] += 1
                conn.error(f"bad request: {e}")
            except Exception:
                self.internal_error("client")
                conn.error("internal error")
            if conn.paused or conn.closed:
                return

    def client_frame(self, conn: Conn, data: bytes) -> None:
        t = data[0]
        if t == wire.CL_SEND:
            if len(data) < wire.CL_SEND_HEAD.size:
                raise ValueError("short send frame")
            _t, flags, dst, dport = wire.CL_SEND_HEAD.unpack_from(data)
            self.client_send(conn, dst, dport, data[wire.CL_SEND_HEAD.size:],
                             bool(flags & wire.SEND_WANT_REPLY))
        elif t == wire.CL_CTRL:
            req = json.loads(data[1:])
            if not isinstance(req, dict):
                raise ValueError("a control request is a JSON object")
            conn.reply(self.control(conn, req))
        else:
            raise ValueError(f"unknown frame type {t}")

    def client_send(self, conn: Conn, dst: int, dport: int, payload: bytes,
                    want_reply: bool) -> None:
        def fail(msg: str) -> None:
            if want_reply:
                conn.reply({"ok": False, "error": msg})
            else:
                conn.error(msg)

        if conn.port is None:
            return fail("socket not bound (bind first)")
        if len(payload) > wire.MAX_PAYLOAD:
            return fail(f"message of {len(payload)} bytes exceeds the overlay's "
                        f"{wire.MAX_PAYLOAD}")
        routable = dst == self.id or dst in self.next_hop
        if not routable and (want_reply or not conn.reliable):
            self.c["no_route"] += 1
            if want_reply:
                return fail(f"no route to overlay node {dst}")
            return  # a datagram to nowhere: counted, like a lost packet
        now = mono()
        if conn.reliable:
            s = conn.sessions.get((dst, dport))
            if s is None:
                s = conn.sessions[(dst, dport)] = SendSession(self, conn, dst, dport)
                self.sessions_by_id[s.sid] = s
            s.pending.append(payload)
            self.sessions_due.add(s)
            if len(s.pending) >= PENDING_LIMIT:
                conn.pause()
        else:
            conn.dg_seq = (conn.dg_seq + 1) & MASK32
            body = bytearray(wire.ROUTED.pack(self.id, dst, conn.port, dport, 64, conn.proto,
                                              0, wire.KIND_DATAGRAM, 0, conn.budget))
            body += wire.SESSION.pack(0, conn.dg_seq, 0, now_us32()) + payload
            self.route_out(DATA, body, now, conn.budget, now)
        if want_reply:
            conn.reply({"ok": True})

    def control(self, conn: Conn, req: dict) -> dict:
        op = req.get("op")
        now = mono()
        if op == "bind":
            return self.bind(conn, req)
        if op == "pending":
            return {"ok": True, "pending": sum(len(s.pending) + s.sr.outstanding
                                                for s in conn.sessions.values())}
        if op == "info":
            return {"ok": True, "id": self.id, "cost": self.cost,
                    "hello_ms": self.hello_s * 1e3, "dead_ms": self.dead_s * 1e3,
                    "pid": os.getpid()}
        if op == "neighbours":
            return {"ok": True, "neighbours": [nb.info(now) for nb in self.neighbours.values()]}
        if op == "routes":
            return {"ok": True, "id": self.id, "cost": self.cost, "routes": [
                {"dst": d, "next_hop": r.next_hop, "cost": r.cost, "path": list(r.path)}
                for d, r in sorted(self.routes.items())],
                "route_changes": self.route_changes,
                "last_change_s_ago": None if self.last_route_change is None
                else round(now - self.last_route_change, 3)}
        if op == "stats":
            return {"ok": True, "id": self.id, "uptime_s": round(now - self.started, 3),
                    "counters": dict(self.c), "drops": dict(self.drops),
                    "links": {str(nb.id): nb.stats(now) for nb in self.neighbours.values()},
                    "sessions": [s.info() for s in self.sessions_by_id.values()],
                    "recv_sessions": [{"src": rs.src, "sport": rs.sport, "session": rs.sid,
                                       "port": rs.port, "expected": rs.buf.expected,
                                       "buffered": rs.buf.buffered, "dups": rs.buf.dups,
                                       "acks": rs.acks}
                                      for rs in self.recv_sessions.values()],
                    "lsdb": {str(o): {"seq": lsa.seq, "age_s": self.lsdb.age(o, now),
                                      "links": [ln.nbr for ln in lsa.links]}
                             for o, (lsa, _) in self.lsdb.lsas.items()},
                    "route_changes": self.route_changes}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def bind(self, conn: Conn, req: dict) -> dict:
        if conn.port is not None:
            return {"ok": False, "error": f"already bound to port {conn.port}"}
        port = req.get("port", 0)
        link = req.get("link", "reliable")
        reliable = req.get("reliable", True)
        deadline = req.get("deadline_ms", 0 if link != "realtime" else 200)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            return {"ok": False, "error": f"port must be 0..65535, got {port!r}"}
        if link not in wire.PROTOS:
            return {"ok": False, "error": f"link must be one of "
                                          f"{', '.join(wire.PROTOS)}, got {link!r}"}
        if not isinstance(reliable, bool):
            return {"ok": False, "error": "reliable must be true or false"}
        if not isinstance(deadline, int) or not 0 <= deadline <= 0xFFFF:
            return {"ok": False, "error": f"deadline_ms must be 0..65535, got {deadline!r}"}
        if link == "realtime" and deadline <= 0:
            return {"ok": False, "error": "a realtime socket needs deadline_ms > 0"}
        if port == 0:
            port = next((p for p in EPHEMERAL if p not in self.ports), None)
            if port is None:
                return {"ok": False, "error": "no free overlay port"}
        elif port in self.ports:
            return {"ok": False, "error": f"overlay port {port} is in use on node {self.id}"}
        conn.port, conn.reliable = port, reliable
        conn.proto, conn.budget = wire.PROTOS[link], deadline
        self.ports[port] = conn
        return {"ok": True, "port": port, "node": self.id}


# command line -----------------------------------------------------------------------------

def _neighbour(text: str, me: int) -> tuple:
    """ID=IP:PORT -> (id, (ip, port)); UsageError naming what is wrong."""
    nid, sep, where = text.partition("=")
    if not sep:
        raise UsageError(f"bad --neighbour {text!r} (want ID=IP:PORT)")
    try:
        n = int_in(1, 65535)(nid)
    except argparse.ArgumentTypeError:
        raise UsageError(f"a --neighbour id must be a node id 1..65535, got {nid!r}") from None
    try:
        where = addr(where)
    except argparse.ArgumentTypeError:
        raise UsageError(f"bad --neighbour address {where!r} (want IPv4:PORT)") from None
    if n == me:
        raise UsageError(f"node {me} cannot be its own neighbour")
    return n, where


def parse_args(argv=None) -> dict:
    p = ArgParser("overlay", description="Spines-style overlay daemon")
    p.add_argument("--id", required=True, type=int_in(1, 65535), help="node id 1..65535")
    p.add_argument("--listen", required=True, type=addr,
                   help="IP:PORT of the overlay UDP socket")
    p.add_argument("--neighbour", action="append", default=[], help="ID=IP:PORT (repeat)")
    p.add_argument("--key-file", required=True)
    p.add_argument("--control", required=True, help="path of the UNIX control socket")
    p.add_argument("--ready-file")
    p.add_argument("--hello-ms", type=float, default=500)
    p.add_argument("--cost", default="latency")
    p.add_argument("--dead-hellos", type=float, default=2.5)
    p.add_argument("--refresh-s", type=float, default=30)
    p.add_argument("--max-age-s", type=int, default=120)
    a = p.parse_args(argv)
    me = a.id
    nbrs = {}
    for text in a.neighbour:
        n, where = _neighbour(text, me)
        if n in nbrs:
            raise UsageError(f"neighbour {n} given twice")
        nbrs[n] = where
    if len(nbrs) > wire.MAX_LSA_LINKS:
        raise UsageError(f"at most {wire.MAX_LSA_LINKS} neighbours")
    if a.cost not in COSTS:
        raise UsageError(f"--cost must be one of {', '.join(COSTS)}, got {a.cost!r}")
    if not 10 <= a.hello_ms <= 60000:
        raise UsageError(f"--hello-ms must be 10..60000, got {a.hello_ms:g}")
    if not 1.5 <= a.dead_hellos <= 100:
        raise UsageError(f"--dead-hellos must be 1.5..100, got {a.dead_hellos:g}")
    if not 1 <= a.refresh_s <= 3600 or not 3 * a.refresh_s <= a.max_age_s <= 65535:
        raise UsageError("need 1 <= --refresh-s <= 3600 and "
                         "3 x refresh <= --max-age-s <= 65535")
    if len(a.control.encode()) > 107:
        raise UsageError(f"--control path too long for a UNIX socket: {a.control}")
    key = read_key(a.key_file)
    return {"node_id": me, "listen": a.listen, "neighbours": nbrs,
            "key": key, "control": a.control, "hello_ms": a.hello_ms, "cost": a.cost,
            "dead_hellos": a.dead_hellos, "refresh_s": a.refresh_s,
            "max_age_s": a.max_age_s, "ready_file": a.ready_file}


def serve(argv) -> int:
    cfg = parse_args(argv)
    ready = cfg.pop("ready_file")
    try:
        d = Daemon(**cfg)
    except OSError as e:
        print(f"overlay: cannot set up sockets: {e}", file=sys.stderr)
        return 1
    d.loop.stop_on_signals()
    d.log(f"listening on {cfg['listen'][0]}:{cfg['listen'][1]}, control {cfg['control']}, "
          f"neighbours {sorted(cfg['neighbours'])}, cost {cfg['cost']}, "
          f"hello {cfg['hello_ms']:g} ms")
    profile_dir = os.environ.get("TESTBED_OVERLAY_PROFILE_DIR")
    prof = None
    if profile_dir:  # where the CPU goes: cProfile stats written at exit
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        with ready_file(ready, {"id": d.id, "control": cfg["control"]}):
            d.run()
    finally:
        d.close()
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir, f"overlay-{d.id}.prof"))
    return 0


def main(argv=None) -> int:
    return run_main("overlay", serve, argv)
