"""Polling for readiness: the one `wait_until` every caller uses, never sleep-and-hope.

Timeouts are multiplied by TESTBED_TIMEOUT_SCALE: a machine under software emulation (the
full-kernel test VM runs under TCG) starts a Python daemon ten times slower.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, TypeVar

from testbed.errors import TestbedError

TIMEOUT_SCALE = float(os.environ.get("TESTBED_TIMEOUT_SCALE", "1"))

T = TypeVar("T")


class WaitTimeout(TestbedError, TimeoutError):
    """A condition did not come true in time; the message says which and how long."""


def scaled(timeout: float) -> float:
    """A timeout in seconds, stretched by TESTBED_TIMEOUT_SCALE."""
    return timeout * TIMEOUT_SCALE


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition",
               interval: float = 0.01, scale: bool = True,
               abort: Optional[Callable[[], Optional[str]]] = None) -> T:
    """Call predicate() until it returns something true, and return that.

    Raises WaitTimeout naming `what` after `timeout` seconds (scaled by
    TESTBED_TIMEOUT_SCALE unless scale=False). abort(), if given, is checked on each round:
    a string it returns ends the wait at once with a TestbedError saying so (a process that
    died before it was ready, say). The predicate is always tried once more at the deadline,
    so a slow last round cannot turn a success into a timeout."""
    limit = scaled(timeout) if scale else timeout
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if abort is not None:
            why = abort()
            if why:
                raise TestbedError(why)
        if time.monotonic() >= deadline:
            value = predicate()
            if value:
                return value
            raise WaitTimeout(f"{what}: not after {limit:g} s")
        time.sleep(interval)
