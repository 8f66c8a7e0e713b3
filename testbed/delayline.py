"""NFQUEUE delay line: delay, jitter and loss without netem (one process per direction).

Runs inside a link's "wire" namespace (see GUIDE.md section 1), bound to one NFQUEUE fed by
`iptables -A FORWARD -m physdev --physdev-in <port> -j NFQUEUE --queue-num N`. Each packet is
held (COPY_META: we never read or modify payloads) and accepted when its release time comes:

    release = max(previous release, arrival + delay + U(-jitter, +jitter))

so packets are never reordered. Loss is decided on arrival (verdict DROP).

Speed matters (1 Gbit/s of TCP on a 2-core machine), so the hot path avoids one syscall per
packet where it can:
- due packets are released with one NFQNL_MSG_VERDICT_BATCH message ("accept every id up to
  N"), valid because ids grow in arrival order and we never reorder;
- while loss is 0 the queue takes GSO packets whole (NFQA_CFG_F_GSO), one verdict per 64 KB
  instead of per MTU. With loss > 0 the flag is cleared so that loss applies per MTU packet,
  as on a real link (a whole GSO burst dropped at once would be a 40-packet loss burst).
Neither message is exposed by netfilterqueue 1.1, so we write them on its netlink fd.

CLI:  python -m testbed.delayline --queue N --delay-ms D [--jitter-ms J] [--loss-pct L]
          [--seed S] --control PATH [--ready-file PATH] [--max-held N]
Control (JSON datagrams on the UNIX socket PATH, replies to the sender's bound address):
    {"set": {"delay_ms": .., "jitter_ms": .., "loss_pct": ..}} -> {"ok": true, "params": {..}}
    {"stats": true} -> {"ok": true, "received", "dropped_loss", "released", "held", "params",
                        "gso", "batches", "late_us_mean", "late_us_max", "stamped",
                        "read_lag_us_mean", "lead_us",
                        "kernel_held", "kernel_queue_dropped", "kernel_user_dropped"}
    errors -> {"ok": false, "error": "one line"}
testbed.kernel.delayline.control(path, message) is the client. Exit codes: 0 on
SIGTERM/SIGINT (held packets are dropped by the kernel on unbind), 1 if the queue or control
socket cannot be set up, 2 for bad arguments (nothing bound).

Arrival times come from the kernel's receive stamp (we enable stamping with one
SO_TIMESTAMPNS socket), so our own wake-up latency does not add to the delay; releases are
paced by `Pacer` to offset the VM's timer wake-up latency.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import os
import random
import select
import socket
import struct
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from testbed.daemon.args import ArgParser, int_in
from testbed.daemon.control import MAX_DATAGRAM, bind_control
from testbed.daemon.files import ready_file, remove_quietly
from testbed.daemon.loop import Wakeup, on_signals
from testbed.daemon.main import run_main

PARAM_KEYS = ("delay_ms", "jitter_ms", "loss_pct")
DEFAULT_MAX_HELD = 100_000  # 1 Gbit/s x 1 s of 1500-byte packets is ~83k
_MAX_STAMP_LAG_NS = 100_000_000  # kernel stamps older than this are taken as clock steps


# --------------------------------------------------------------------------- pure logic


@dataclass(frozen=True)
class LineParams:
    """Delay line parameters, validated at construction (raises ValueError, one line)."""

    delay_ms: float
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        for key in PARAM_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")  # noqa: TRY004
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value!r}")
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.loss_pct > 100:
            raise ValueError(f"loss_pct must be <= 100, got {self.loss_pct!r}")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(
                f"jitter_ms ({self.jitter_ms:g}) must be <= delay_ms ({self.delay_ms:g})"
            )

    def updated(self, changes: Mapping[str, Any]) -> LineParams:
        """A copy with `changes` applied (a subset of PARAM_KEYS); validates the result."""
        if not isinstance(changes, Mapping):
            raise ValueError(f"'set' needs an object, got {type(changes).__name__}")  # noqa: TRY004
        unknown = sorted(set(changes) - set(PARAM_KEYS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(map(str, unknown))}")
        merged = self.to_dict()
        merged.update(changes)
        return LineParams(**merged)

    def to_dict(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in PARAM_KEYS}


class Scheduler:
    """Release times and loss decisions; no I/O, so it is testable without root.

    Times are integer nanoseconds of one monotonic clock. `arrive` returns the release time of
    a packet arriving at `now_ns`, or None if the packet is lost.
    """

    def __init__(self, params: LineParams, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.last_release_ns = 0
        self.set_params(params)

    def set_params(self, params: LineParams) -> None:
        """Apply to packets arriving from now on (held packets keep their release time)."""
        self.params = params
        self._delay_ns = round(params.delay_ms * 1e6)
        self._jitter_ns = params.jitter_ms * 1e6
        self._loss = params.loss_pct / 100.0

    def arrive(self, now_ns: int) -> int | None:
        if self._loss and self.rng.random() < self._loss:
            return None
        release = now_ns + self._delay_ns
        if self._jitter_ns:
            release += round(self.rng.uniform(-self._jitter_ns, self._jitter_ns))
        release = max(release, self.last_release_ns)
        self.last_release_ns = release
        return release


class Pacer:
    """Decides how long to sleep before a release deadline, so that releases are on time.

    A timer wake-up here comes 50-150 us late (VM vCPU wake-up), so we sleep `lead_ns` less
    than asked, `lead_ns` being a running average of how late past wake-ups were. When the
    deadline is closer than `lead_ns` we busy-wait for it, but only within a CPU budget
    (`spin_share` of wall time); past that budget the packet goes up to `lead_ns` early.
    """

    def __init__(
        self,
        lead_ns: int = 80_000,
        max_lead_ns: int = 500_000,
        spin_share: float = 0.05,
        max_tokens_ns: int = 5_000_000,
    ) -> None:
        self.lead_ns = lead_ns
        self.max_lead_ns = max_lead_ns
        self.spin_share = spin_share
        self.max_tokens_ns = max_tokens_ns
        self.tokens_ns = max_tokens_ns
        self._last_ns: int | None = None

    def sleep_ns(self, now_ns: int, deadline_ns: int) -> int:
        """> 0: sleep this long; 0: spin until the deadline; -1: release now (early)."""
        if self._last_ns is not None:
            self.tokens_ns = min(
                self.max_tokens_ns, self.tokens_ns + (now_ns - self._last_ns) * self.spin_share
            )
        self._last_ns = now_ns
        wait = deadline_ns - now_ns
        if wait > self.lead_ns:
            return wait - self.lead_ns
        if self.tokens_ns >= wait:
            self.tokens_ns -= wait
            return 0
        return -1

    def woke(self, late_ns: int) -> None:
        """Record how late a pure timer wake-up was (negative: early)."""
        late_ns = min(max(late_ns, 0), self.max_lead_ns)
        self.lead_ns += (late_ns - self.lead_ns) // 8


# --------------------------------------------------------------------------- netlink helpers

_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQNL_MSG_VERDICT_BATCH = 3
_NFQA_VERDICT_HDR = 2
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
NFQA_CFG_F_GSO = 1 << 2
_NLM_F_REQUEST = 1
_NF_ACCEPT = 1
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _nla(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def _nfq_message(msg_type: int, queue: int, attrs: bytes) -> bytes:
    """An nfnetlink message to the queue subsystem (nlmsghdr + nfgenmsg + attributes)."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
    nl_type = (_NFNL_SUBSYS_QUEUE << 8) | msg_type
    return struct.pack("=IHHII", 16 + len(body), nl_type, _NLM_F_REQUEST, 0, 0) + body


def verdict_batch_message(queue: int, last_id: int, verdict: int = _NF_ACCEPT) -> bytes:
    """Give `verdict` to every packet of `queue` with id <= last_id (kernel >= 3.1)."""
    return _nfq_message(
        _NFQNL_MSG_VERDICT_BATCH,
        queue,
        _nla(_NFQA_VERDICT_HDR, struct.pack("!II", verdict, last_id & 0xFFFFFFFF)),
    )


def queue_flags_message(queue: int, mask: int, flags: int) -> bytes:
    """Set the queue's NFQA_CFG_F_* `flags` under `mask` (kernel >= 3.6 for GSO)."""
    attrs = _nla(_NFQA_CFG_MASK, struct.pack("!I", mask))
    attrs += _nla(_NFQA_CFG_FLAGS, struct.pack("!I", flags))
    return _nfq_message(_NFQNL_MSG_CONFIG, queue, attrs)


def kernel_queue_counters(
    queue: int, path: str = "/proc/net/netfilter/nfnetlink_queue"
) -> dict[str, int]:
    """Kernel-side drops for `queue` in this namespace: queue full / netlink socket full."""
    try:
        with open(path) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 7 and int(cols[0]) == queue:
                    return {
                        "kernel_held": int(cols[2]),
                        "kernel_queue_dropped": int(cols[5]),
                        "kernel_user_dropped": int(cols[6]),
                    }
    except (OSError, ValueError):
        pass
    return {}


# --------------------------------------------------------------------------- daemon


def _log(msg: str) -> None:
    print(f"delayline: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def _set_timer_slack(ns: int) -> None:
    """Wake up on time: the default 50 us slack would add to every release."""
    try:
        pr_set_timerslack = 29
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, ctypes.c_ulong(ns), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class DelayLine:
    """One NFQUEUE bound to a Scheduler, driven by a single select loop."""

    def __init__(self, queue: int, scheduler: Scheduler, control_path: str, max_held: int) -> None:
        self.queue = queue
        self.sched = scheduler
        self.control_path = control_path
        self.max_held = max_held
        # (release_ns, packet id) in arrival order, hence in release order too
        self.held: collections.deque[tuple[int, int]] = collections.deque()
        self.received = 0
        self.dropped_loss = 0
        self.released = 0
        # Timing diagnostics: how late batches go out, how far behind we read packets.
        self.batches = 0
        self.late_ns_sum = 0
        self.late_ns_max = 0
        self.stamped = 0
        self.stamp_lag_ns_sum = 0
        self.stop = False
        self.nfq = None
        self.nfq_fd = -1
        self.ctl: socket.socket | None = None
        self.gso = None  # current NFQA_CFG_F_GSO state we asked for
        self.pacer = Pacer()
        self.real_minus_mono = time.time_ns() - time.monotonic_ns()
        self._stamp_sock: socket.socket | None = None

    # -- setup / teardown

    def open(self) -> None:
        from netfilterqueue import COPY_META, NetfilterQueue

        self.ctl = bind_control(self.control_path)

        # Netlink receive buffer: bursts queue up here while we are busy; the kernel doubles it.
        sock_len = min(max(self.max_held * 512, 4 << 20), 256 << 20)
        try:
            self.nfq = NetfilterQueue()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.nfq.bind(
                    self.queue,
                    self._on_packet,
                    max_len=self.max_held,
                    mode=COPY_META,
                    sock_len=sock_len,
                )
        except OSError as e:
            raise OSError(
                f"cannot bind NFQUEUE {self.queue} (bound by another process? not root?): {e}"
            ) from e
        self.nfq_fd = self.nfq.get_fd()
        self._apply_gso()
        # Any socket with SO_TIMESTAMPNS turns on receive stamping of every packet (a global
        # static key), so queued packets carry their arrival time in NFQA_TIMESTAMP.
        self._stamp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamp_sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)

    def close(self) -> None:
        if self.nfq is not None:
            try:
                self.nfq.unbind()  # the kernel drops what we still hold
            except Exception as e:  # noqa: BLE001 - teardown must go on
                _log(f"unbind failed: {e}")
            self.nfq = None
        if self._stamp_sock is not None:
            self._stamp_sock.close()
            self._stamp_sock = None
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
            remove_quietly(self.control_path)

    def _apply_gso(self) -> None:
        """Take GSO packets whole unless loss must apply per MTU packet."""
        want = self.sched.params.loss_pct == 0
        if want == self.gso or self.nfq_fd < 0:
            return
        msg = queue_flags_message(self.queue, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO if want else 0)
        try:
            os.write(self.nfq_fd, msg)
            self.gso = want
        except OSError as e:
            _log(f"cannot set GSO flag on queue {self.queue}: {e}")

    # -- hot path

    def _on_packet(self, pkt) -> None:
        now = arrival = time.monotonic_ns()
        self.received += 1
        # The kernel's receive stamp (realtime) excludes our wake-up latency (~0.1-0.2 ms in
        # a VM, more when we fall behind); trust it only when it is plausible.
        stamp = pkt.get_timestamp()
        if stamp:
            stamped = int(stamp * 1e9) - self.real_minus_mono
            if now - _MAX_STAMP_LAG_NS <= stamped <= now:
                self.stamped += 1
                self.stamp_lag_ns_sum += now - stamped
                arrival = stamped
        release = self.sched.arrive(arrival)
        if release is None:
            self.dropped_loss += 1
            pkt.drop()
            return
        held = self.held
        held.append((release, pkt.id))
        if held[0][0] <= now:  # a long burst must not hold back due packets
            self._release_due(time.monotonic_ns())

    def _release_due(self, now: int) -> None:
        held = self.held
        first = held[0][0] if held else now
        last_id = None
        n = 0
        while held and held[0][0] <= now:
            last_id = held.popleft()[1]
            n += 1
        if last_id is None:
            return
        late = time.monotonic_ns() - first  # the verdict itself then runs the forwarding path
        try:
            os.write(self.nfq_fd, verdict_batch_message(self.queue, last_id))
        except OSError as e:
            # Keep ids <= last_id in the kernel queue; the next batch covers them.
            _log(f"batch verdict failed: {e}")
            held.appendleft((now, last_id))
            return
        self.released += n
        self.batches += 1
        self.late_ns_sum += late
        self.late_ns_max = max(self.late_ns_max, late)

    # -- control

    def _on_control(self) -> None:
        while True:
            try:
                data, addr = self.ctl.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log(f"control recv failed: {e}")
                return
            reply = self.handle_control(data)
            if not reply.get("ok"):
                _log(f"control error: {reply.get('error')}")
            if not addr:
                _log("control sender has no bound address; cannot reply")
                continue
            try:
                self.ctl.sendto(json.dumps(reply).encode(), addr)
            except OSError as e:
                _log(f"control reply to {addr} failed: {e}")

    def handle_control(self, data: bytes) -> dict[str, Any]:
        """Apply one control datagram; always returns a reply, never raises."""
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise ValueError("message must be a JSON object")  # noqa: TRY004
            if "set" in msg:
                params = self.sched.params.updated(msg["set"])
                self.sched.set_params(params)
                self._apply_gso()
                return {"ok": True, "params": params.to_dict()}
            if msg.get("stats"):
                return {"ok": True, **self.stats()}
            raise ValueError(f"unknown command {sorted(msg)!r}; use 'set' or 'stats'")
        except Exception as e:  # noqa: BLE001 - a bad message must never kill the link
            text = " ".join(str(e).split()) or type(e).__name__
            return {"ok": False, "error": text}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "received": self.received,
            "dropped_loss": self.dropped_loss,
            "released": self.released,
            "held": len(self.held),
            "params": self.sched.params.to_dict(),
            "gso": bool(self.gso),
            "batches": self.batches,
            "late_us_mean": (
                round(self.late_ns_sum / self.batches / 1e3, 1) if self.batches else 0.0
            ),
            "late_us_max": round(self.late_ns_max / 1e3, 1),
            "stamped": self.stamped,
            "read_lag_us_mean": (
                round(self.stamp_lag_ns_sum / self.stamped / 1e3, 1) if self.stamped else 0.0
            ),
            "lead_us": round(self.pacer.lead_ns / 1e3, 1),
        }
        out.update(kernel_queue_counters(self.queue))
        return out

    # -- loop

    def on_signal(self, signum, frame) -> None:
        self.stop = True

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (install `on_signal` for them before calling)."""
        wake = Wakeup()
        nfq_fd, ctl_fd, wake_fd = self.nfq_fd, self.ctl.fileno(), wake.fileno()
        fds = [nfq_fd, ctl_fd, wake_fd]
        held = self.held
        monotonic_ns = time.monotonic_ns
        pacer = self.pacer
        try:
            while not self.stop:
                now = monotonic_ns()
                if held and held[0][0] <= now:
                    self._release_due(now)
                timeout = None
                if held:
                    deadline = held[0][0]
                    sleep_ns = pacer.sleep_ns(now, deadline)
                    if sleep_ns <= 0:
                        if sleep_ns == 0:  # too close to sleep: spin (budget allowing) or go early
                            while monotonic_ns() < deadline:
                                pass
                        self._release_due(deadline)
                        continue
                    timeout = sleep_ns / 1e9
                try:
                    ready, _, _ = select.select(fds, [], [], timeout)
                except InterruptedError:
                    continue
                if not ready:
                    if timeout is not None:
                        pacer.woke(monotonic_ns() - now - sleep_ns)
                    continue
                if nfq_fd in ready:
                    self.real_minus_mono = time.time_ns() - monotonic_ns()
                    try:
                        self.nfq.run(block=False)
                    except OSError as e:  # ENOBUFS is absorbed inside; anything else: log
                        _log(f"queue {self.queue} receive failed: {e}")
                if ctl_fd in ready:
                    self._on_control()
                if wake_fd in ready:
                    wake.drain()
        finally:
            wake.close()


def parse_args(argv) -> argparse.Namespace:
    p = ArgParser("delayline", description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int_in(0, 65535), required=True,
                   help="NFQUEUE number (0-65535)")
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform in [-J, +J], <= delay")
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed for loss and jitter")
    p.add_argument("--control", required=True, help="UNIX datagram socket path to create")
    p.add_argument("--ready-file", default=None, help="written once the queue is bound")
    p.add_argument(
        "--max-held",
        type=int_in(1, 1 << 31),
        default=DEFAULT_MAX_HELD,
        help="kernel queue length: most packets held at once",
    )
    args = p.parse_args(argv)
    try:
        args.params = LineParams(args.delay_ms, args.jitter_ms, args.loss_pct)
    except ValueError as e:
        p.error(str(e))
    return args


def serve(argv) -> int:
    args = parse_args(argv)
    _set_timer_slack(1000)
    line = DelayLine(args.queue, Scheduler(args.params, args.seed), args.control, args.max_held)
    on_signals(line.on_signal)
    try:
        try:
            line.open()
        except OSError as e:
            _log(str(e))
            return 1
        info = {"queue": args.queue, "control": args.control, "params": args.params.to_dict()}
        with ready_file(args.ready_file, info):
            if not line.stop:
                line.run()
    finally:
        line.close()
    return 0


def main(argv=None) -> int:
    return run_main("delayline", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
