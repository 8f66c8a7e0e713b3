"""The daemons' event loop: Stop, signals with a wake-up fd, timers and a selector loop.

A daemon either serves from a Loop (sockets plus timers; a stop signal wakes the select at
once through the wake-up fd and ends run()), or blocks in its own calls and lets the
signal raise Stop (raise_stop_on_signals), which nothing in its error handling catches.
"""

from __future__ import annotations

import heapq
import selectors
import signal
import socket
import time
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop(BaseException):
    """Leaves a daemon's main loop on a stop signal. Not an Exception: no `except
    Exception` in the loop's error handling may swallow it."""


def on_signals(handler: Callable, signals=STOP_SIGNALS) -> dict:
    """Install handler(signum, frame) for signals; returns the old handlers."""
    return {s: signal.signal(s, handler) for s in signals}


def raise_stop_on_signals(signals=STOP_SIGNALS) -> dict:
    """TERM and INT raise Stop in the main thread; returns the old handlers."""

    def stop(signum, frame):
        raise Stop()

    return on_signals(stop, signals)


class Wakeup:
    """The signal wake-up fd for a hand-written select loop: a socketpair whose write end
    the kernel's signal delivery writes to, so a select() on `fileno()` returns as soon as
    a signal arrives instead of sleeping through it. drain() once it is readable; close()
    restores the previous wake-up fd. (Loop.stop_on_signals uses one.)"""

    def __init__(self):
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self.old = signal.set_wakeup_fd(self.w.fileno())

    def fileno(self) -> int:
        return self.r.fileno()

    def drain(self) -> None:
        try:
            while self.r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        if self.r is not None:
            signal.set_wakeup_fd(self.old if self.old is not None else -1)
            self.r.close()
            self.w.close()
            self.r = self.w = None

    def __enter__(self) -> "Wakeup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Timers:
    """A heap of (when, n, callback(now)); callbacks re-check what they were armed for."""

    def __init__(self):
        self.heap: list = []
        self.n = 0

    def at(self, when: float, fn: Callable[[float], None]) -> None:
        self.n += 1
        heapq.heappush(self.heap, (when, self.n, fn))

    def timeout(self, now: float) -> Optional[float]:
        return max(0.0, self.heap[0][0] - now) if self.heap else None

    def run(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2](now)


class Loop:
    """A selector with timers. add(fileobj, callback) calls callback(mask) when the file is
    ready; at()/after() call fn(now) on time.monotonic()'s clock. stop_on_signals() makes
    TERM/INT end run() at once (a wake-up fd, so no select sleeps through them)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.timers = Timers()
        self.stopping = False
        self.signum: Optional[int] = None
        self._wake: Optional[Wakeup] = None
        self._old_handlers: dict = {}

    # files and timers ----------------------------------------------------------------------
    def add(self, fileobj, callback: Callable[[int], None],
            events: int = selectors.EVENT_READ) -> None:
        self.sel.register(fileobj, events, callback)

    def modify(self, fileobj, callback: Callable[[int], None], events: int) -> None:
        self.sel.modify(fileobj, events, callback)

    def remove(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def at(self, when: float, fn: Callable[[float], None]) -> None:
        self.timers.at(when, fn)

    def after(self, delay_s: float, fn: Callable[[float], None]) -> None:
        self.timers.at(time.monotonic() + delay_s, fn)

    # stopping ------------------------------------------------------------------------------
    def stop(self, signum: Optional[int] = None, frame=None) -> None:
        """End run() after the current round (also a signal handler)."""
        self.stopping = True
        if signum is not None:
            self.signum = signum

    def stop_on_signals(self, signals=STOP_SIGNALS) -> None:
        self._wake = Wakeup()
        self.add(self._wake, self._drain)
        self._old_handlers = on_signals(self.stop, signals)

    def _drain(self, mask: int) -> None:
        self._wake.drain()

    # running -------------------------------------------------------------------------------
    def run_once(self, max_wait: Optional[float] = None) -> None:
        """One round: wait for files or the next timer (at most max_wait), serve them."""
        timeout = self.timers.timeout(time.monotonic())
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        for key, mask in self.sel.select(timeout):
            key.data(mask)
        self.timers.run(time.monotonic())

    def run(self) -> None:
        """Serve until stop() (or a stop signal)."""
        while not self.stopping:
            self.run_once()

    def close(self) -> None:
        if self._wake is not None:
            self.remove(self._wake)
            self._wake.close()
            self._wake = None
        self.sel.close()
