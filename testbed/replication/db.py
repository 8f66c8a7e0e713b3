"""The replicated state machine: a deterministic key-value "database" (docs/replication.md).

The engine applies **green** actions to it in the global order, one ordinal after the
other (`apply(ordinal, action)`); replicas that applied the same actions in the same order
hold the same state and the same `hexdigest()`.

State (three tables, one per update semantics, so that the semantics never mix on a key):

- `kv`:  key -> value, written by strict `set` (the last one in the green order wins);
- `ctr`: key -> integer, written by commutative `add` (the sum; order does not matter);
- `ts`:  key -> (timestamp, creator, index, value), written by `ts_set`: the newest
  timestamp wins, ties broken by the larger action id, so the result does not depend on
  the order either.

An update's payload (what a client sends; `encode_update` builds it):

    strict       klen u16 | key | value
    commutative  klen u16 | key | delta i64
    timestamp    klen u16 | key | ts u64 | value

A payload that does not parse (e.g. the load generator's opaque 200 bytes) is an opaque
action: it takes its ordinal, enters the hash and the exactly-once table, and changes no
table. Internal actions (PERSISTENT_JOIN / LEAVE) are applied the same way.

**Exactly-once.** Per client the database keeps `(last client_seq applied, its ordinal)`
with the data (so it travels in a snapshot). An action whose client_seq is at most the
client's last one is a duplicate (a client that resubmitted through another replica): it
keeps its place in the order (and the hash) but changes nothing; the reply then carries
the ordinal of the first application when it is the client's last action.

**Hash.** `hexdigest()` is a running SHA-256 chained over the green actions applied:
h_i = SHA-256(h_(i-1) | ordinal u64 | client_id u64 | client_seq u64). A chain (not one
hashlib object) so that it travels in a snapshot.

`snapshot()` / `restore()` give the whole state as bytes (JSON), for the state transfer to
a joining server. `copy()` + `apply_tentative()` serve the dirty query (green state plus
the red actions, on a scratch copy). `read(key)` answers a query.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct

from testbed.replication import actions as A

KLEN = struct.Struct("!H")
DELTA = struct.Struct("!q")
TS = struct.Struct("!Q")
HASH_ITEM = struct.Struct("!QQQ")
STRICT, COMMUTATIVE, TIMESTAMP = 1, 2, 3     # protocol.SEMANTICS of the updates


class DbError(ValueError):
    """A bad snapshot or a misuse (one line)."""


def encode_update(semantics: int, key: bytes, value=b"", ts: int = 0) -> bytes:
    """The payload of an update: value is bytes (strict, timestamp) or an int (commutative)."""
    head = KLEN.pack(len(key)) + key
    if semantics == COMMUTATIVE:
        return head + DELTA.pack(int(value))
    if semantics == TIMESTAMP:
        return head + TS.pack(ts) + bytes(value)
    return head + bytes(value)


def parse_update(semantics: int, payload: bytes):
    """(op, key, arg) or None when the payload does not parse."""
    if len(payload) < KLEN.size:
        return None
    (klen,) = KLEN.unpack_from(payload)
    off = KLEN.size + klen
    if len(payload) < off:
        return None
    key, rest = payload[KLEN.size:off], payload[off:]
    if semantics == STRICT:
        return ("set", key, rest)
    if semantics == COMMUTATIVE and len(rest) == DELTA.size:
        return ("add", key, DELTA.unpack(rest)[0])
    if semantics == TIMESTAMP and len(rest) >= TS.size:
        return ("ts_set", key, (TS.unpack_from(rest)[0], rest[TS.size:]))
    return None


class Db:
    def __init__(self):
        self.kv = {}
        self.ctr = {}
        self.ts = {}
        self.clients = {}          # client_id -> [last client_seq, its ordinal]
        self.ordinal = 0
        self.chain = bytes(32)
        self.applied = 0           # actions that changed (or could change) the state
        self.duplicates = 0

    # -- the green order ----------------------------------------------------------------

    def apply(self, ordinal: int, action: A.Action) -> tuple:
        """Apply the green action at `ordinal` (must be the next one). Returns
        (applied, reply_ordinal): applied is False for a duplicate."""
        if ordinal != self.ordinal + 1:
            raise DbError(f"ordinal {ordinal} applied after {self.ordinal}")
        self.ordinal = ordinal
        self.chain = hashlib.sha256(self.chain + HASH_ITEM.pack(
            ordinal, action.client_id, action.client_seq)).digest()
        first = self._effect(action, ordinal)
        if first is None:
            self.applied += 1
            return True, ordinal
        self.duplicates += 1
        return False, first

    def apply_tentative(self, action: A.Action):
        """Apply an action that has no ordinal yet (scratch copies only)."""
        self._effect(action, 0)

    def _effect(self, action: A.Action, ordinal: int):
        """None if applied, else the ordinal to report for the duplicate (0: unknown)."""
        if action.client_id:
            last = self.clients.get(action.client_id)
            if last is not None and action.client_seq <= last[0]:
                return last[1] if action.client_seq == last[0] else 0
            self.clients[action.client_id] = [action.client_seq, ordinal]
        if action.kind != A.UPDATE:
            return None
        op = parse_update(action.semantics, action.payload)
        if op is None:
            return None
        name, key, arg = op
        if name == "set":
            self.kv[key] = arg
        elif name == "add":
            self.ctr[key] = self.ctr.get(key, 0) + arg
        else:
            stamp, value = arg
            new = (stamp, action.creator, action.index, value)
            old = self.ts.get(key)
            if old is None or new[:3] > old[:3]:
                self.ts[key] = new
        return None

    # -- queries ------------------------------------------------------------------------

    def read(self, key: bytes) -> bytes:
        """A query's result: JSON with the key's value in each table (hex for bytes)."""
        ts = self.ts.get(key)
        out = {"value": self.kv[key].hex() if key in self.kv else None,
               "counter": self.ctr.get(key, 0),
               "ts": ts[0] if ts else None,
               "ts_value": ts[3].hex() if ts else None}
        return json.dumps(out, sort_keys=True, separators=(",", ":")).encode()

    def hexdigest(self) -> str:
        return self.chain.hex()

    def state_digest(self) -> str:
        """A digest of the tables alone (not of the order): equal tables, equal digest."""
        return hashlib.sha256(self._tables_json().encode()).hexdigest()

    def copy(self) -> "Db":
        return copy.deepcopy(self)

    # -- state transfer -----------------------------------------------------------------

    def _tables_json(self) -> str:
        return json.dumps({
            "kv": sorted([k.hex(), v.hex()] for k, v in self.kv.items()),
            "ctr": sorted([k.hex(), v] for k, v in self.ctr.items()),
            "ts": sorted([k.hex(), t, c, i, v.hex()] for k, (t, c, i, v) in self.ts.items()),
        }, separators=(",", ":"))

    def snapshot(self) -> bytes:
        tables = json.loads(self._tables_json())
        tables.update(clients=sorted([c, s, o] for c, (s, o) in self.clients.items()),
                      ordinal=self.ordinal, chain=self.chain.hex(), applied=self.applied,
                      duplicates=self.duplicates)
        return json.dumps(tables, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def restore(cls, data: bytes) -> "Db":
        try:
            d = json.loads(data)
            db = cls()
            db.kv = {bytes.fromhex(k): bytes.fromhex(v) for k, v in d["kv"]}
            db.ctr = {bytes.fromhex(k): int(v) for k, v in d["ctr"]}
            db.ts = {bytes.fromhex(k): (int(t), int(c), int(i), bytes.fromhex(v))
                     for k, t, c, i, v in d["ts"]}
            db.clients = {int(c): [int(s), int(o)] for c, s, o in d["clients"]}
            db.ordinal = int(d["ordinal"])
            db.chain = bytes.fromhex(d["chain"])
            db.applied = int(d["applied"])
            db.duplicates = int(d["duplicates"])
        except (ValueError, KeyError, TypeError) as e:
            raise DbError(f"bad database snapshot: {e}") from None
        return db
