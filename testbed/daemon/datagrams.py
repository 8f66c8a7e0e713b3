"""Reading a non-blocking socket dry: every loop callback of a datagram daemon does it."""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def until_dry(recv: Callable[[], T], quiet: bool = False) -> Iterator[T]:
    """recv()'s results (a datagram, a frame, a recvmsg tuple) until the socket has nothing
    more queued (it would block). quiet=True also ends on any other OSError (a packet socket
    whose interface went down), which otherwise propagates."""
    while True:
        try:
            got = recv()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if quiet:
                return
            raise
        yield got
