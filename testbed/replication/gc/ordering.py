"""Ordering within one regular configuration: a sequencer with acknowledgement vectors.

A mixin of GroupNode (node.py), which owns the socket, the timers and the counters; this
part keeps, for the configuration `self.conf` with members `self.members`:

- `store`: seq -> (sender, counter, service, payload), the ordered messages received and
  not yet both delivered and known to be safe (the sequencer keeps them for NACKs, every
  member keeps them for the recovery at a configuration change);
- `aru` (all received up to), `high` (the highest seq known to exist), `safe` (the safe
  line: every member has everything up to it), `delivered`;
- a member's own messages: `outq` (to send in the next DATA) and `pending` (sent, not yet
  seen ordered: resent, from the lowest counter, when the oldest is `retrans` old);
- at the sequencer: `expect` (next counter per member: out-of-order DATA is dropped and
  comes again), `acks` (per member aru: the safe line is their minimum) and `order_out`
  (ordered items to broadcast, several per ORDERED datagram).

Nothing here arms a timer per message: the socket reader drains the socket and then calls
flush() once (DATA, ORDERED, the cumulative ACK at most every `ack_interval`, a safe-line
HEARTBEAT from the sequencer when no ORDERED carries it); one-shot timers are guarded by a
flag each (flush, ack, nack, safe).
"""

from __future__ import annotations

from testbed.replication.gc import wire
from testbed.replication.gc.wire import SAFE, Delivery


class Ordering:
    """See the module's docstring; GroupNode calls reset_ordering() at each install."""

    def reset_ordering(self) -> None:
        self.store: dict = {}
        self.aru = self.high = self.safe = self.delivered = self.gc_floor = 0
        self.counter = 1
        self.outq: list = []
        self.pending: dict = {}
        self.pending_time = 0.0
        self.expect: dict = {m: 1 for m in self.members}
        self.acks: dict = {m: 0 for m in self.members}
        self.order_out: list = []
        self.acked = 0
        self.ack_time = -1.0
        self.safe_sent = 0
        self.safe_time = -1.0
        self.nack_time = -1.0

    @property
    def sequencer(self) -> int:
        return self.members[0]

    # sending -----------------------------------------------------------------------------
    def submit(self, service: int, payload: bytes) -> None:
        """A message of mine into the current regular configuration."""
        if self.me == self.sequencer:
            self.order(self.me, self.counter, service, payload)
        else:
            item = (self.counter, service, payload)
            if not self.pending:
                self.pending_time = self.clock()
            self.pending[self.counter] = item
            self.outq.append(item)
        self.counter += 1
        self.arm_flush()

    def order(self, sender: int, counter: int, service: int, payload: bytes) -> None:
        self.high += 1
        s = self.high
        self.store[s] = (sender, counter, service, payload)
        self.order_out.append((s, sender, counter, service, payload))
        self.aru = s
        self.acks[self.me] = s

    def flush(self) -> None:
        """Send what queued up in this round, then deliver what became deliverable."""
        conf = self.conf
        if self.outq:
            self.send_batches(wire.DATA, self.sequencer, self.outq, wire.DATA_ROOM,
                              wire.data_item_size,
                              lambda items: wire.data_body(conf, items))
            self.outq = []
        if self.order_out:
            out, self.order_out = self.order_out, []
            self.send_ordered(wire.BROADCAST, out)
            self.safe_sent = self.safe
        if self.state == "regular":
            now = self.clock()
            if self.me == self.sequencer:
                self.update_safe()
                if self.safe > self.safe_sent:
                    if now - self.safe_time >= self.timeouts.ack_interval - 1e-6:
                        self.send_heartbeat(now)
                    else:
                        self.arm("safe", self.safe_time + self.timeouts.ack_interval)
            elif self.aru > self.acked:
                if now - self.ack_time >= self.timeouts.ack_interval - 1e-6:
                    self.acked, self.ack_time = self.aru, now
                    self.send(wire.ACK, self.sequencer, wire.ack_body(conf, self.aru))
                else:
                    self.arm("ack", self.ack_time + self.timeouts.ack_interval)
            self.deliver()

    def send_ordered(self, dest: int, items: list) -> None:
        conf, safe, high = self.conf, self.safe, self.high
        self.send_batches(wire.ORDERED, dest, items, wire.ORDERED_ROOM,
                          wire.ordered_item_size,
                          lambda batch: wire.ordered_body(conf, safe, high, batch))

    def send_batches(self, mtype: int, dest: int, items: list, room: int, size, body) -> None:
        batch: list = []
        used = 0
        for item in items:
            n = size(item[-1])
            if batch and used + n > room:
                self.send(mtype, dest, body(batch))
                batch, used = [], 0
            batch.append(item)
            used += n
        if batch:
            self.send(mtype, dest, body(batch))

    # receiving ---------------------------------------------------------------------------
    def on_data(self, sender: int, conf, items: list) -> None:
        if conf != self.conf or self.me != self.sequencer or self.state != "regular" \
                or sender not in self.expect:
            return
        if self.high - self.safe > self.timeouts.window:
            return  # flow control: the member sends it again
        expect = self.expect[sender]
        for counter, service, payload in items:
            if counter == expect:
                self.order(sender, counter, service, payload)
                expect += 1
        self.expect[sender] = expect

    def on_ordered(self, sender: int, conf, safe: int, high: int, items: list) -> None:
        """ORDERED of `conf` (the current or, in a change, the old configuration)."""
        if conf != self.conf:
            return
        limit = self.cutoff_limit()
        store, pending, me = self.store, self.pending, self.me
        for s, origin, counter, service, payload in items:
            if s > limit:
                continue
            if s > self.delivered and s not in store:
                store[s] = (origin, counter, service, payload)
            if origin == me:
                pending.pop(counter, None)
        if high > self.high and limit == float("inf"):
            self.high = high
        if safe > self.safe:
            self.safe = safe
        self.advance_aru()

    def on_ack(self, sender: int, conf, aru: int) -> None:
        if conf == self.conf and self.me == self.sequencer and sender in self.acks:
            if aru > self.acks[sender]:
                self.acks[sender] = min(aru, self.high)

    def on_nack(self, sender: int, conf, ranges: list) -> None:
        """Retransmit what I hold of `ranges` to `sender` (sequencer, or recovery holder)."""
        if conf != self.conf:
            return
        items = []
        for a, b in ranges:
            for s in range(a, min(b, a + 2000) + 1):
                m = self.store.get(s)
                if m is not None:
                    items.append((s,) + m)
        if items:
            self.count("retrans", len(items))
            self.send_ordered(sender, items)

    def on_seq_heartbeat(self, conf, high: int, safe: int) -> None:
        if conf == self.conf:
            if high > self.high and self.cutoff_limit() == float("inf"):
                self.high = high
            if safe > self.safe:
                self.safe = safe
            self.advance_aru()

    def advance_aru(self) -> None:
        store, aru = self.store, self.aru
        if aru < self.delivered:
            aru = self.delivered
        while aru + 1 in store:
            aru += 1
        self.aru = aru
        if aru > self.high:
            self.high = aru
        if self.aru < self.high and self.state == "regular":
            self.arm("nack", self.clock() + self.timeouts.nack_interval)

    def update_safe(self) -> None:
        safe = min(self.acks.values())
        if safe > self.safe:
            self.safe = safe

    # delivery ----------------------------------------------------------------------------
    def deliver(self, upto: float = float("inf"), transitional: bool = False) -> None:
        """Deliver in seq order what is deliverable (contiguous; Safe only at or below the
        safe line unless transitional), and drop what is delivered and safe."""
        store, conf, emit = self.store, self.conf, self.emit
        while self.delivered < upto:
            s = self.delivered + 1
            m = store.get(s)
            if m is None or (m[2] == SAFE and s > self.safe and not transitional):
                break
            self.delivered = s
            if m[0] == self.me:
                self.pending.pop(m[1], None)
            emit(Delivery(m[0], m[2], m[3], conf, transitional))
        if self.state == "regular":
            top = min(self.safe, self.delivered)
            for s in range(self.gc_floor + 1, top + 1):
                store.pop(s, None)
            if top > self.gc_floor:
                self.gc_floor = top

    # timers ------------------------------------------------------------------------------
    def on_timer(self, name: str) -> None:
        if self.state != "regular":
            return
        if name == "nack" and self.aru < self.high:
            now = self.clock()
            if now - self.nack_time >= self.timeouts.nack_interval - 1e-6:
                self.nack_time = now
                self.send(wire.NACK, self.sequencer,
                          wire.nack_body(self.conf, self.missing(self.aru, self.high)))
            self.arm("nack", now + self.timeouts.nack_interval)
        elif name == "ack" or name == "safe":
            self.flush()

    def missing(self, lo: int, hi: int) -> list:
        """Ranges of seqs in (lo, hi] that are not in the store (at most MAX_RANGES)."""
        out: list = []
        s = lo + 1
        store = self.store
        while s <= hi and len(out) < wire.MAX_RANGES:
            if s in store:
                s += 1
                continue
            a = s
            while s <= hi and s not in store:
                s += 1
            out.append((a, s - 1))
        return out

    def resend_pending(self, now: float) -> None:
        """Send again (from the lowest counter) what the sequencer has not ordered yet."""
        if self.pending and self.state == "regular" and self.me != self.sequencer \
                and now - self.pending_time >= self.timeouts.retrans:
            self.pending_time = now
            self.count("resent", len(self.pending))
            self.outq = list(self.pending.values())
            self.flush()
