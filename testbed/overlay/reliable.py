"""Selective repeat, congestion windows and reordering: pure state machines, no sockets.

The daemon drives them with sequence numbers, acks and a clock (seconds, any origin):

- `SRSender`: one direction of a link's reliable (or real-time) protocol, or the sending end
  of an end-to-end session. Numbers items, remembers what is in flight in transmission
  order, takes cumulative + selective acks, detects losses (an item is lost once an item
  transmitted `dupthresh` transmissions after it was acknowledged, or on a retransmission
  timeout), and keeps a TCP-like congestion window (slow start, AIMD, one reduction per
  window of data, cwnd 1 after a timeout). SACKed items are done: receivers never renege
  (a link receiver has forwarded them, an end receiver has buffered them).
- `ReceiveWindow`: the receiving end of a link protocol: which sequence numbers arrived
  (a cumulative point and an int bitmap above it), duplicates refused, acks built. With
  `slide=True` (real-time) holes the sender gave up on are forgotten once the window moves
  past them.
- `ReorderBuffer`: the end receiver of a reliable session: buffers out-of-order payloads and
  releases them in order, exactly once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from testbed.overlay.wire import MAX_SACK_BYTES, bits_to_bytes


class RttEstimator:
    """RFC 6298 smoothed RTT and retransmission timeout, with exponential backoff."""

    __slots__ = ("srtt", "rttvar", "min_rto", "max_rto", "granularity", "backoff",
                 "max_backoff", "_init")

    def __init__(self, init_rto: float = 1.0, min_rto: float = 0.2, max_rto: float = 2.0,
                 granularity: float = 0.0, max_backoff: int = 64):
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self.min_rto, self.max_rto, self._init = min_rto, max_rto, init_rto
        self.granularity = granularity  # RFC 6298's G: the timer's (here: the acks') slack
        self.backoff = 1
        self.max_backoff = max_backoff

    def sample(self, rtt: float) -> None:
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 1

    @property
    def base_rto(self) -> float:
        if self.srtt is None:
            return max(self._init, self.min_rto)
        return min(self.max_rto, max(self.min_rto,
                                     self.srtt + max(self.granularity, 4 * self.rttvar)))

    @property
    def rto(self) -> float:
        return min(self.max_rto, self.base_rto * self.backoff)


class Entry:
    __slots__ = ("seq", "item", "xmit", "sent_at", "sends")

    def __init__(self, seq: int, item):
        self.seq, self.item = seq, item
        self.xmit = -1
        self.sent_at = 0.0
        self.sends = 0


class SRSender:
    """Selective-repeat sender with an optional congestion window (see module docstring).

    Use: `if s.can_send(): seq = s.new(item); <transmit>; s.transmitted(seq, now)`; for
    retransmissions `seq = s.next_lost()`; feed `on_ack(cum, bits, now, rtt)`; call
    `on_timeout(now)` when `now >= s.deadline()`."""

    def __init__(self, cc: bool = True, fast_retransmit: bool = True, window: int = 1024,
                 init_cwnd: float = 10, dupthresh: int = 3, rtt: Optional[RttEstimator] = None,
                 min_cwnd: float = 1.0, timeout_is_congestion: bool = True):
        self.cc, self.fast_retransmit = cc, fast_retransmit
        # False: a timeout resends and backs the timer off but leaves the window alone.
        # An end-to-end session over reliable links loses nothing but to a failed node: a
        # timeout there means a slow path (a daemon descheduled, a hop resending), and the
        # congestion stamps of the hops' queues, not the timer, say how congested it is
        self.timeout_is_congestion = timeout_is_congestion
        # after repeated timeouts (TCP: 1). A link uses 2: with one message in flight, a
        # lost ack alone means another timeout; with two, the other one's ack reveals it
        self.min_cwnd = float(min_cwnd)
        self.window, self.dupthresh = window, dupthresh
        self.cwnd = float(init_cwnd)
        self.ssthresh = float(window)
        self.rtt = rtt or RttEstimator()
        self.next_seq = 0
        self.una = 0  # every seq below this is acknowledged
        self.entries: dict = {}  # seq -> Entry, every unacknowledged item
        self.flight: "OrderedDict[int, None]" = OrderedDict()  # in transmission order
        self.lost: "OrderedDict[int, None]" = OrderedDict()  # awaiting retransmission
        self.xmits = 0
        self.high_acked_xmit = -1
        self.recovery_xmit = -1  # losses of items sent before this do not reduce again
        # counters
        self.sent = self.retransmitted = self.acked = self.losses = self.timeouts = 0
        self.reductions = 0

    # state ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.flight)

    @property
    def outstanding(self) -> int:
        return len(self.entries)

    def can_send(self) -> bool:
        """Room for a new item: the congestion window and the receiver's window."""
        if self.next_seq >= self.una + self.window:
            return False
        return not self.cc or len(self.flight) < self.cwnd

    def can_retransmit(self) -> bool:
        return bool(self.lost) and (not self.cc or len(self.flight) < self.cwnd)

    def next_lost(self) -> Optional[int]:
        return next(iter(self.lost)) if self.lost else None

    def deadline(self) -> Optional[float]:
        """When the oldest in-flight item times out (None if nothing is in flight)."""
        if not self.flight:
            return None
        return self.entries[next(iter(self.flight))].sent_at + self.rtt.rto

    # sending ----------------------------------------------------------------------------
    def new(self, item) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.entries[seq] = Entry(seq, item)
        return seq

    def transmitted(self, seq: int, now: float) -> None:
        e = self.entries[seq]
        e.xmit = self.xmits
        self.xmits += 1
        e.sent_at = now
        if e.sends:
            self.retransmitted += 1
        self.sent += 1
        e.sends += 1
        self.lost.pop(seq, None)
        self.flight[seq] = None
        self.flight.move_to_end(seq)

    def item(self, seq: int):
        return self.entries[seq].item

    def drop(self, seq: int) -> None:
        """Give up on an item (a real-time message past its deadline)."""
        self.entries.pop(seq, None)
        self.flight.pop(seq, None)
        self.lost.pop(seq, None)

    def take_all(self) -> list:
        """Every unacknowledged item in sequence order, and forget them (a link reset)."""
        items = [self.entries[s].item for s in sorted(self.entries)]
        self.entries.clear()
        self.flight.clear()
        self.lost.clear()
        self.una = self.next_seq = 0
        self.xmits, self.high_acked_xmit, self.recovery_xmit = 0, -1, -1
        self.cwnd = min(self.cwnd, 10.0)
        return items

    # acks -------------------------------------------------------------------------------
    def on_ack(self, cum: int, bits: int, now: float, rtt: Optional[float] = None) -> list:
        """Apply an ack (every seq < cum, and cum + 1 + i for each bit i of bits). Returns
        the newly acknowledged entries; marks losses it reveals."""
        cum = min(cum, self.next_seq)
        done = []
        entries = self.entries
        if cum > self.una:
            if cum - self.una <= len(entries):
                for s in range(self.una, cum):
                    e = entries.pop(s, None)
                    if e is not None:
                        done.append(e)
            else:
                for s in [s for s in entries if s < cum]:
                    done.append(entries.pop(s))
            self.una = cum
        if bits and entries:
            base = cum + 1
            if bits.bit_length() < 4 * len(entries):
                b = bits
                while b:
                    low = b & -b
                    e = entries.pop(base + low.bit_length() - 1, None)
                    if e is not None:
                        done.append(e)
                    b ^= low
            else:
                for s in [s for s in entries if s >= base and (bits >> (s - base)) & 1]:
                    done.append(entries.pop(s))
        if not done:
            return done
        flight, lost = self.flight, self.lost
        high = self.high_acked_xmit
        usable = len(flight) + len(done) >= self.cwnd / 2  # the window was in use
        recovery = self.recovery_xmit
        for e in done:
            flight.pop(e.seq, None)
            lost.pop(e.seq, None)
            if e.xmit > high:
                high = e.xmit
            # grow on acks of what was sent after the last reduction (not during recovery)
            if self.cc and usable and e.xmit >= recovery:
                if self.cwnd < self.ssthresh:
                    self.cwnd += 1
                else:
                    self.cwnd += 1 / self.cwnd
        self.cwnd = min(self.cwnd, float(self.window))
        self.high_acked_xmit = high
        self.acked += len(done)
        if rtt is not None:
            self.rtt.sample(rtt)
        if self.fast_retransmit:
            self._detect(high)
        return done

    def _detect(self, high: int) -> None:
        newly = False
        flight, entries = self.flight, self.entries
        limit = high - self.dupthresh
        while flight:
            seq = next(iter(flight))
            e = entries[seq]
            if e.xmit > limit:
                break
            del flight[seq]
            self.lost[seq] = None
            self.losses += 1
            if e.xmit >= self.recovery_xmit:
                newly = True
        if newly:
            self._reduce()

    def _reduce(self) -> None:
        if self.cc:
            self.ssthresh = max(len(self.flight) / 2, 2.0, self.cwnd / 2)
            self.cwnd = self.ssthresh
        self.recovery_xmit = self.xmits
        self.reductions += 1

    def congestion(self) -> bool:
        """An explicit congestion signal: reduce as for a loss, once per window of data."""
        if self.reductions and self.high_acked_xmit < self.recovery_xmit:
            return False  # already reduced for this window
        self._reduce()
        return True

    def on_timeout(self, now: float) -> int:
        """Mark every in-flight item older than the RTO lost and back off. The first timeout
        reduces the window as a detected loss does (it is most often a lost tail: nothing
        after it to reveal it, TCP's tail loss probe case); a second one in a row, with
        nothing acknowledged between, takes cwnd to min_cwnd as TCP's RTO does. With
        timeout_is_congestion off the window stays. Returns how many items were marked."""
        rto = self.rtt.rto
        n, newest = 0, -1
        while self.flight:
            seq = next(iter(self.flight))
            e = self.entries[seq]
            if now - e.sent_at < rto:
                break
            del self.flight[seq]
            self.lost[seq] = None
            newest = max(newest, e.xmit)
            n += 1
        if n:
            self.timeouts += 1
            self.losses += n
            if self.timeout_is_congestion and self.rtt.backoff > 1:
                if self.cc:
                    self.ssthresh = max(self.cwnd / 2, 2.0)
                    self.cwnd = self.min_cwnd
                self.recovery_xmit = self.xmits
            elif self.timeout_is_congestion and newest >= self.recovery_xmit:
                self._reduce()
            self.rtt.backoff = min(self.rtt.backoff * 2, self.rtt.max_backoff)
        return n

    def stats(self) -> dict:
        return {"cwnd": round(self.cwnd, 2), "ssthresh": round(self.ssthresh, 2),
                "in_flight": len(self.flight), "outstanding": len(self.entries),
                "lost_pending": len(self.lost), "sent": self.sent,
                "retransmitted": self.retransmitted, "acked": self.acked,
                "losses": self.losses, "timeouts": self.timeouts,
                "srtt_ms": None if self.rtt.srtt is None else round(self.rtt.srtt * 1e3, 3),
                "rto_ms": round(self.rtt.rto * 1e3, 3)}


class ReceiveWindow:
    """Which sequence numbers arrived: `cum` (every seq below it did) and an int bitmap
    (bit d: seq cum + d arrived; bit 0 is always clear)."""

    __slots__ = ("cum", "bits", "limit", "slide", "dups", "beyond", "skipped")

    def __init__(self, limit: int = 8 * MAX_SACK_BYTES, slide: bool = False):
        self.cum = 0
        self.bits = 0
        self.limit, self.slide = limit, slide
        self.dups = self.beyond = self.skipped = 0

    def receive(self, seq: int) -> bool:
        """True if seq is new (deliver it), False for a duplicate or one beyond the window."""
        off = seq - self.cum
        if off < 0 or (self.bits >> off) & 1:
            self.dups += 1
            return False
        if off >= self.limit:
            if not self.slide:
                self.beyond += 1
                return False
            shift = off - self.limit + 1  # forget the oldest holes
            self.skipped += shift - bin(self.bits & ((1 << shift) - 1)).count("1")
            self.cum += shift
            self.bits >>= shift
            off -= shift
        self.bits |= 1 << off
        if self.bits & 1:
            run = ((~self.bits) & (self.bits + 1)).bit_length() - 1  # trailing ones
            self.cum += run
            self.bits >>= run
        return True

    def ack(self) -> tuple:
        """(cum, bitmap bytes): bit i of the bitmap acknowledges seq cum + 1 + i."""
        return self.cum, bits_to_bytes(self.bits >> 1)

    @property
    def pending_holes(self) -> bool:
        return self.bits != 0


class ReorderBuffer:
    """End receiver of a reliable session: in-order, exactly-once release."""

    NEW, DUP, FULL = 0, 1, 2

    def __init__(self, limit: int = 8192):
        self.expected = 0
        self.buf: dict = {}
        self.limit = limit
        self.highest = -1
        self.delivered = self.dups = self.refused = 0

    def push(self, seq: int, payload) -> tuple:
        """(status, [payloads now deliverable in order])."""
        if seq < self.expected or seq in self.buf:
            self.dups += 1
            return self.DUP, []
        if seq >= self.expected + self.limit:
            self.refused += 1
            return self.FULL, []
        if seq > self.highest:
            self.highest = seq
        if seq != self.expected:
            self.buf[seq] = payload
            return self.NEW, []
        out = [payload]
        self.expected += 1
        buf = self.buf
        while self.expected in buf:
            out.append(buf.pop(self.expected))
            self.expected += 1
        self.delivered += len(out)
        return self.NEW, out

    def ack(self, limit: int = MAX_SACK_BYTES) -> tuple:
        """(cum, bitmap bytes) with cum = the next expected seq."""
        bits = 0
        base = self.expected + 1
        top = base + 8 * limit
        for s in self.buf:
            if s < top:
                bits |= 1 << (s - base)
        return self.expected, bits_to_bytes(bits, limit)

    @property
    def buffered(self) -> int:
        return len(self.buf)
