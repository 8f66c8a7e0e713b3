"""A token bucket (the paper's leaky bucket): the sender spends one token per byte; tokens
come back at rate_bps / 8 per second up to burst bytes. The clock and sleep are injectable
so the unit tests run without waiting."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    def __init__(self, rate_bps: float, burst_bytes: int = 16384,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate_bps > 0:
            raise ValueError(f"bucket rate must be positive, got {rate_bps!r}")
        if burst_bytes < 1:
            raise ValueError(f"bucket burst must be at least 1 byte, got {burst_bytes!r}")
        self.rate = rate_bps / 8.0  # bytes per second
        self.burst = float(burst_bytes)
        self.clock, self.sleep = clock, sleep
        self.tokens = self.burst
        self.last = clock()
        self.waited_s = 0.0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def consume(self, n: int) -> None:
        """Take n bytes' worth of tokens, sleeping until they are there. n may exceed the
        burst: the debt is paid by waiting (so the long-run rate is exact)."""
        self._refill()
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.waited_s += wait
            self.sleep(wait)
            self._refill()
