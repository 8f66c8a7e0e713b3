"""ReplicaClient: the client library of the replicated database (TCP, protocol.py).

    with ReplicaClient("10.120.0.11", 8310, timeout=10) as c:
        ordinal = c.set(b"x", b"42")            # strict: answered once globally ordered
        c.add(b"stock", -3)                      # commutative: answered in any component
        c.ts_set(b"pos", b"12,7", ts=1700)       # timestamp: the newest timestamp wins
        c.get(b"x", kind="consistent")           # or "weak" (green state), "dirty":
            # {"value": b"42", "counter": 0, "ts": None, "ts_value": None}
        ordinal, result = c.update(payload, semantics="strict")   # a raw action payload

One request at a time per client (the paper's clients are closed-loop); the load generator
(loadgen.py) drives many clients from one process with the same frames. Every failure is
an exception, never a silent loss:

- `ReplicaUnavailable`: the replica cannot be reached, the connection drops, or no reply
  comes within `timeout` (the action's outcome is then unknown: it may still be applied);
  the client is closed after it and every later call raises it again.
- `ReplicaError`: the replica answered with an error (not in a primary component, an action
  in doubt, ...); the message is the replica's one-line reason. The connection stays usable.

A client picks a random 64-bit client_id and numbers its requests from 1: (client_id,
client_seq) is each action's identity.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

from testbed.errors import TestbedError
from testbed.replication import db, protocol


class ReplicaUnavailable(TestbedError):
    """The replica is gone (refused, dropped, timed out): one line naming it and why."""


class ReplicaError(TestbedError):
    """The replica answered with an error; the message is its reason."""


class ReplicaClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0,
                 client_id: int = None):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.client_id = (client_id if client_id is not None
                          else struct.unpack("!Q", os.urandom(8))[0])
        self.seq = 0
        self.decoder = protocol.Decoder()
        self.pending: list = []
        self.sock = None
        self.broken = ""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ReplicaUnavailable(f"replica {self.host}:{self.port}: cannot connect: "
                                     f"{e.strerror or e}") from None

    def __enter__(self) -> "ReplicaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if not self.broken:
            self.broken = "client closed"

    def _fail(self, why: str):
        self.broken = why
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        raise ReplicaUnavailable(f"replica {self.host}:{self.port}: {why}")

    def request(self, kind: str, semantics: str, payload: bytes) -> protocol.Reply:
        """Send one request and wait for its reply (any Reply, errors included)."""
        if self.sock is None:
            raise ReplicaUnavailable(f"replica {self.host}:{self.port}: {self.broken}")
        self.seq += 1
        req = protocol.Request(self.client_id, self.seq, kind, semantics, bytes(payload))
        try:
            self.sock.sendall(protocol.encode_request(req))
        except OSError as e:
            self._fail(f"connection lost while sending: {e.strerror or e}")
        deadline = time.monotonic() + self.timeout
        while True:
            while self.pending:
                rep = self.pending.pop(0)
                if rep.client_seq == self.seq:
                    return rep
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no reply within {self.timeout:g} s (outcome unknown)")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                self._fail(f"connection lost: {e.strerror or e} (outcome unknown)")
            if not data:
                self._fail("connection closed by the replica (outcome unknown)")
            try:
                msgs, _ = self.decoder.feed(data)
            except protocol.ProtocolError as e:
                self._fail(f"bad reply: {e}")
            self.pending.extend(m for m in msgs if isinstance(m, protocol.Reply))

    def _result(self, rep: protocol.Reply) -> tuple:
        if not rep.ok:
            raise ReplicaError(f"replica {self.host}:{self.port}: {rep.reason}")
        return rep.ordinal, rep.result

    def update(self, payload: bytes, semantics: str = protocol.STRICT) -> tuple:
        """(ordinal, result) once the action is in the global persistent order."""
        if semantics not in protocol.UPDATE_SEMANTICS:
            raise ValueError(f"semantics must be one of {', '.join(protocol.UPDATE_SEMANTICS)}")
        return self._result(self.request(protocol.UPDATE, semantics, payload))

    # the key-value database's operations (db.py) --------------------------------------
    def set(self, key, value: bytes) -> int:
        """A strict update: key = value. Returns the action's ordinal in the global order."""
        return self.update(db.encode_update(db.STRICT, _b(key), bytes(value)))[0]

    def add(self, key, delta: int) -> int:
        """A commutative update: key += delta (answered once delivered, in any component;
        returns 0, the ordinal it will get is not known yet)."""
        return self.update(db.encode_update(db.COMMUTATIVE, _b(key), int(delta)),
                           protocol.COMMUTATIVE)[0]

    def ts_set(self, key, value: bytes, ts: int) -> int:
        """A timestamp update: key = value unless the key holds a newer timestamp."""
        return self.update(db.encode_update(db.TIMESTAMP, _b(key), bytes(value), int(ts)),
                           protocol.TIMESTAMP)[0]

    def get(self, key, kind: str = protocol.CONSISTENT) -> dict:
        """What the database holds under key, read with the query semantics kind: its
        strict value (bytes or None), its counter (the sum of the commutative updates) and
        its newest timestamp update (ts and ts_value, or None)."""
        out = json.loads(self.query(_b(key), kind)[1])
        for f in ("value", "ts_value"):
            if out.get(f) is not None:
                out[f] = bytes.fromhex(out[f])
        return out

    def query(self, key: bytes, kind: str = protocol.CONSISTENT) -> tuple:
        """(ordinal of the state read, result)."""
        if kind not in protocol.QUERY_SEMANTICS:
            raise ValueError(f"kind must be one of {', '.join(protocol.QUERY_SEMANTICS)}")
        if isinstance(key, str):
            key = key.encode()
        return self._result(self.request(protocol.QUERY, kind, key))


def _b(key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)
