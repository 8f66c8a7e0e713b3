"""The migration image: a connection's TCP state, its queues, the application's state and
its memory image, in one checksummed stream.

Layout (declared once, big-endian):
    magic    8 bytes  b"TBMIG\\x00\\x02\\x00"
    hdr_len  u32      length of the JSON header
    body_len u64      length of the payload after the header
    header   JSON: {"tcp": TcpState dict, "app": {...}, "parts": [[name, length], ...]}
    payload  the parts' bytes, in the header's order (sendq, recvq, image)
    sha256   32 bytes over everything before it
The checksum is a trailer so that both ends hash while the bytes travel (a 40 MB image is
hashed in the shadow of its transfer). A stream that is truncated, padded, or whose
checksum does not match is refused (StateError) before anything is restored.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator

MAGIC = b"TBMIG\x00\x02\x00"
PREFIX = struct.Struct(">8sIQ")
DIGEST = 32
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 34
SLICE = 1 << 20


class StateError(ValueError):
    """A migration image that must not be restored."""


@dataclass
class Image:
    tcp: dict
    app: dict
    parts: dict = field(default_factory=dict)  # name -> bytes-like

    def chunks(self) -> Iterator[memoryview]:
        """The encoded image piece by piece, the checksum computed on the way."""
        names = list(self.parts)
        header = json.dumps({"tcp": self.tcp, "app": self.app,
                             "parts": [[n, len(self.parts[n])] for n in names]},
                            sort_keys=True).encode()
        body_len = sum(len(self.parts[n]) for n in names)
        h = hashlib.sha256()
        for piece in [PREFIX.pack(MAGIC, len(header), body_len), header]:
            h.update(piece)
            yield memoryview(piece)
        for n in names:
            mv = memoryview(self.parts[n]).cast("B")
            for off in range(0, len(mv), SLICE):
                piece = mv[off:off + SLICE]
                h.update(piece)
                yield piece
        yield memoryview(h.digest())

    def encode(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())


def sizes(prefix: bytes) -> tuple:
    """(header length, payload length) from the fixed prefix; StateError if malformed."""
    if len(prefix) < PREFIX.size:
        raise StateError(f"truncated image: {len(prefix)} bytes, the prefix alone is "
                         f"{PREFIX.size}")
    magic, hdr_len, body_len = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise StateError("not a migration image (bad magic)")
    if hdr_len > MAX_HEADER or body_len > MAX_BODY:
        raise StateError(f"implausible image sizes: header {hdr_len}, body {body_len}")
    return hdr_len, body_len


def _parse(header: bytes, body, body_len: int) -> Image:
    try:
        hdr = json.loads(header)
        tcp, app, part_list = hdr["tcp"], hdr["app"], hdr["parts"]
        lengths = [int(n) for _, n in part_list]
    except (ValueError, KeyError, TypeError) as e:
        raise StateError(f"bad image header: {e}") from None
    if sum(lengths) != body_len or any(n < 0 for n in lengths):
        raise StateError("part lengths do not add up to the payload")
    parts, off = {}, 0
    for (name, _), n in zip(part_list, lengths):
        parts[name] = body[off:off + n]
        off += n
    return Image(tcp, app, parts)


def decode(blob: bytes) -> Image:
    """Verify and parse a whole encoded image; StateError on any mismatch."""
    hdr_len, body_len = sizes(blob)
    want = PREFIX.size + hdr_len + body_len + DIGEST
    if len(blob) != want:
        raise StateError(f"{'truncated' if len(blob) < want else 'oversized'} image: "
                         f"{len(blob)} bytes, expected {want}")
    mv = memoryview(blob)
    if hashlib.sha256(mv[:-DIGEST]).digest() != bytes(mv[-DIGEST:]):
        raise StateError("checksum mismatch: the image is corrupt")
    start = PREFIX.size + hdr_len
    return _parse(bytes(mv[PREFIX.size:start]), mv[start:-DIGEST], body_len)


def read(recv_into: Callable[[memoryview], int], eof: bool = True) -> Image:
    """Read one image from a stream (recv_into(buffer) -> bytes read, 0 at EOF), hashing
    as it arrives; StateError if it ends early, fails its checksum, or (eof=True: the image
    must be the stream's last) carries more."""
    h = hashlib.sha256()

    def fill(buf: memoryview, what: str) -> None:
        got = 0
        while got < len(buf):
            n = recv_into(buf[got:])
            if not n:
                raise StateError(f"truncated image: the stream ended in the {what} "
                                 f"({got} of {len(buf)} bytes)")
            got += n

    prefix = memoryview(bytearray(PREFIX.size))
    fill(prefix, "prefix")
    hdr_len, body_len = sizes(bytes(prefix))
    h.update(prefix)
    header = memoryview(bytearray(hdr_len))
    fill(header, "header")
    h.update(header)
    body = memoryview(bytearray(body_len))
    for off in range(0, body_len, SLICE):
        piece = body[off:off + SLICE]
        fill(piece, "payload")
        h.update(piece)
    digest = memoryview(bytearray(DIGEST))
    fill(digest, "checksum")
    if h.digest() != bytes(digest):
        raise StateError("checksum mismatch: the image is corrupt")
    if eof and recv_into(memoryview(bytearray(1))):
        raise StateError("oversized image: bytes after the checksum")
    return _parse(bytes(header), body, body_len)
