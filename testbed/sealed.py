"""Authenticated datagrams: what the daemons' wire formats share (overlay, Wackamole, HANet).
Pure: no sockets, no clocks.

Each format is `header | body | tag`, with tag = HMAC-SHA256(key, header + body)[:16]; a
receiver checks the size, then the tag, before it believes anything in the datagram, and
drops replays with a `ReplayWindow` per sender. What a header holds, and so how freshness
and incarnations are judged, stays each format's own.
"""

from __future__ import annotations

import hmac
import ipaddress

TAG_LEN = 16


class WireError(ValueError):
    """A message that must be dropped; `reason` names the daemon's drop counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def ip_to_int(ip: str) -> int:
    """An IPv4 address as the 32-bit number a header field carries (ValueError if bad)."""
    return int(ipaddress.IPv4Address(ip))


def int_to_ip(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def tag(key: bytes, msg) -> bytes:
    return hmac.digest(key, msg, "sha256")[:TAG_LEN]


def seal(key: bytes, msg) -> bytes:
    """msg (header + body) with its tag appended."""
    return bytes(msg) + tag(key, msg)


def check_size(n: int, min_len: int, max_len: int) -> None:
    if n > max_len:
        raise WireError("oversized", f"{n} bytes")
    if n < min_len:
        raise WireError("truncated", f"{n} bytes")


def verify(key: bytes, buf, n: int) -> None:
    """Raise WireError('bad_hmac') unless buf[:n] ends with the tag of what precedes it."""
    mv = memoryview(buf)
    if not hmac.compare_digest(tag(key, mv[:n - TAG_LEN]), mv[n - TAG_LEN:n]):
        raise WireError("bad_hmac")


class ReplayWindow:
    """Accept each sequence number (or nonce) once: anything above the highest seen, or
    within `size` below it and not seen yet (a bitmap, as IPsec's anti-replay window).
    size=1 accepts strictly increasing numbers only."""

    __slots__ = ("size", "top", "bits")

    def __init__(self, size: int = 256):
        self.size = size
        self.top = -1
        self.bits = 0  # bit d: number top - d seen

    def accept(self, seq: int) -> bool:
        top = self.top
        if seq > top:
            shift = seq - top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) \
                if shift < self.size else 1
            self.top = seq
            return True
        d = top - seq
        if d >= self.size or (self.bits >> d) & 1:
            return False
        self.bits |= 1 << d
        return True
