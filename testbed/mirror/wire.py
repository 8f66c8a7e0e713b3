"""Mirror wire format, declared once: every message is a frame

    magic "MR" (2 bytes) | type (u8) | payload length (u32, big endian) | payload

and each type's payload layout is in MESSAGES below (struct format of the fixed part, then
a variable tail: block data, a list of hashes, a UTF-8 text). A session (port 10566):

    sender                                   receiver
    STATUS_REQ  ------------------------->   STATUS (state, volume size, block size, manifest)
    BEGIN (mode, block size, files)  ---->   HASHES (per file: its current block hashes)
                                             | ERROR (busy, bad size, promoted ...)
    BLOCK (file, index, sha256, data) x N ->
    END (blocks sent, manifest sha256) --->  DONE (manifest) | ERROR (hash mismatch ...)

The manifest is sha256 over the concatenation of every block hash of the new volume, in
order (file by file); the receiver commits only if its staged copy has that manifest.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from testbed.daemon.io import PeerClosed, recv_exact

MAGIC = b"MR"
HEADER = struct.Struct("!2sBI")
MAX_PAYLOAD = 64 << 20  # a block is at most 16 MiB; a hash list of 1M blocks fits
HASH_LEN = 32
DEFAULT_PORT = 10566
MODES = {"block": 0, "file": 1}

STATUS_REQ, STATUS, BEGIN, HASHES, BLOCK, END, DONE, PROMOTE, PROMOTED, ERROR = (
    0x01, 0x02, 0x10, 0x11, 0x20, 0x30, 0x31, 0x40, 0x41, 0x7F)

# type -> (name, fixed-part struct, what follows the fixed part)
MESSAGES = {
    STATUS_REQ: ("STATUS_REQ", struct.Struct("!"), None),
    # state (0 idle, 1 syncing, 2 promoted), volume size, block size, syncs done, manifest
    STATUS: ("STATUS", struct.Struct("!BQIQ32s"), None),
    # mode, block size, number of files; then per file: name length u16, name, size u64
    BEGIN: ("BEGIN", struct.Struct("!BII"), "files"),
    # number of files; then per file: block count u32 (0xFFFFFFFF: absent), hashes
    HASHES: ("HASHES", struct.Struct("!I"), "hashlists"),
    # file index, block index, sha256 of the data; then the data
    BLOCK: ("BLOCK", struct.Struct("!II32s"), "data"),
    # blocks sent, manifest of the whole new volume
    END: ("END", struct.Struct("!I32s"), None),
    DONE: ("DONE", struct.Struct("!32s"), None),
    PROMOTE: ("PROMOTE", struct.Struct("!"), None),
    PROMOTED: ("PROMOTED", struct.Struct("!32s"), None),
    ERROR: ("ERROR", struct.Struct("!"), "text"),
}
ABSENT = 0xFFFFFFFF
FILE_ENTRY = struct.Struct("!H")
SIZE = struct.Struct("!Q")
COUNT = struct.Struct("!I")


class WireError(Exception):
    """A malformed, truncated or unexpected frame."""


@dataclass
class Message:
    type: int
    fields: tuple = ()
    tail: object = None  # bytes (BLOCK), list of (name, size) (BEGIN), list of lists (HASHES), str

    @property
    def name(self) -> str:
        return MESSAGES[self.type][0]


def encode(msg: Message) -> bytes:
    if msg.type not in MESSAGES:
        raise WireError(f"unknown message type {msg.type:#x}")
    _, fixed, kind = MESSAGES[msg.type]
    body = fixed.pack(*msg.fields)
    if kind == "files":
        for name, size in msg.tail:
            raw = name.encode()
            body += FILE_ENTRY.pack(len(raw)) + raw + SIZE.pack(size)
    elif kind == "hashlists":
        for hashes in msg.tail:
            if hashes is None:
                body += COUNT.pack(ABSENT)
            else:
                body += COUNT.pack(len(hashes)) + b"".join(hashes)
    elif kind == "data":
        body += bytes(msg.tail)
    elif kind == "text":
        body += str(msg.tail).encode()
    if len(body) > MAX_PAYLOAD:
        raise WireError(f"{MESSAGES[msg.type][0]} payload of {len(body)} bytes is too large")
    return HEADER.pack(MAGIC, msg.type, len(body)) + body


def decode_payload(mtype: int, body: bytes) -> Message:
    if mtype not in MESSAGES:
        raise WireError(f"unknown message type {mtype:#x}")
    name, fixed, kind = MESSAGES[mtype]
    if len(body) < fixed.size or (kind is None and len(body) != fixed.size):
        raise WireError(f"{name}: payload of {len(body)} bytes, expected "
                        f"{'at least ' if kind else ''}{fixed.size}")
    fields = fixed.unpack_from(body)
    rest = body[fixed.size:]
    tail = None
    try:
        if kind == "files":
            tail, off = [], 0
            for _ in range(fields[2]):
                (n,) = FILE_ENTRY.unpack_from(rest, off)
                off += FILE_ENTRY.size
                if off + n + SIZE.size > len(rest):
                    raise WireError(f"{name}: truncated file list")
                fname = rest[off:off + n].decode()
                off += n
                (size,) = SIZE.unpack_from(rest, off)
                off += SIZE.size
                tail.append((fname, size))
            if off != len(rest):
                raise WireError(f"{name}: {len(rest) - off} trailing bytes")
        elif kind == "hashlists":
            tail, off = [], 0
            for _ in range(fields[0]):
                (n,) = COUNT.unpack_from(rest, off)
                off += COUNT.size
                if n == ABSENT:
                    tail.append(None)
                    continue
                if off + n * HASH_LEN > len(rest):
                    raise WireError(f"{name}: truncated hash list")
                tail.append([rest[off + i * HASH_LEN:off + (i + 1) * HASH_LEN] for i in range(n)])
                off += n * HASH_LEN
            if off != len(rest):
                raise WireError(f"{name}: {len(rest) - off} trailing bytes")
        elif kind == "data":
            tail = bytes(rest)
        elif kind == "text":
            tail = rest.decode(errors="replace")
    except struct.error:
        raise WireError(f"{name}: truncated payload") from None
    except UnicodeDecodeError:
        raise WireError(f"{name}: a file name is not UTF-8") from None
    return Message(mtype, fields, tail)


def decode(frame: bytes) -> Message:
    """Decode exactly one whole frame."""
    if len(frame) < HEADER.size:
        raise WireError(f"truncated header ({len(frame)} bytes)")
    magic, mtype, length = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if len(frame) != HEADER.size + length:
        raise WireError(f"frame of {len(frame)} bytes, header says {HEADER.size + length}")
    return decode_payload(mtype, frame[HEADER.size:])


def recv(sock: socket.socket) -> Message:
    """One whole frame from the stream; WireError "stream truncated: ..." if the peer
    closes in the middle of one (or before it: "... after 0 of 7 bytes")."""
    try:
        magic, mtype, length = HEADER.unpack(recv_exact(sock, HEADER.size))
        if magic != MAGIC:
            raise WireError(f"bad magic {magic!r}")
        if length > MAX_PAYLOAD:
            raise WireError(f"frame length {length} over the limit {MAX_PAYLOAD}")
        body = recv_exact(sock, length)
    except PeerClosed as e:
        raise WireError(f"stream truncated: {e}") from None
    return decode_payload(mtype, body)


def send(sock: socket.socket, msg: Message) -> int:
    data = encode(msg)
    sock.sendall(data)
    return len(data)


def error(text: str) -> Message:
    return Message(ERROR, (), text)


def block_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def manifest(hashlists) -> bytes:
    """sha256 over every block hash, file by file, in order."""
    h = hashlib.sha256()
    for hashes in hashlists:
        for b in hashes:
            h.update(b)
    return h.digest()


def expect(msg: Message, mtype: int, what: Optional[str] = None) -> Message:
    if msg.type == ERROR:
        raise WireError(f"peer refused{' ' + what if what else ''}: {msg.tail}")
    if msg.type != mtype:
        raise WireError(f"expected {MESSAGES[mtype][0]}, got {msg.name}")
    return msg
