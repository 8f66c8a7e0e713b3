"""The replicated state machine (testbed/replication/db.py): determinism, exactly-once,
order-independence of commutative and timestamp updates, snapshot / restore."""

import json
import random

import pytest

from testbed.replication import actions as A
from testbed.replication.db import COMMUTATIVE, STRICT, TIMESTAMP, Db, DbError, encode_update


def act(creator, index, sem, payload, client=5, seq=None):
    return A.Action(A.UPDATE, creator, index, client, index if seq is None else seq, sem,
                    payload)


def read(db, key):
    return json.loads(db.read(key))


def test_same_actions_same_order_same_hash_and_state():
    acts = [act(1, i, STRICT, encode_update(STRICT, b"k%d" % (i % 3), b"v%d" % i), client=i)
            for i in range(1, 20)]
    a, b = Db(), Db()
    for o, x in enumerate(acts, 1):
        a.apply(o, x)
        b.apply(o, x)
    assert a.hexdigest() == b.hexdigest() and a.state_digest() == b.state_digest()
    assert read(a, b"k0")["value"] == b"v18".hex()
    c = Db()
    for o, x in enumerate(reversed(acts), 1):
        c.apply(o, x)
    assert c.hexdigest() != a.hexdigest()        # another order, another hash
    assert read(c, b"k0")["value"] == b"v3".hex()


def test_ordinals_must_follow_each_other():
    db = Db()
    db.apply(1, act(1, 1, STRICT, b""))
    with pytest.raises(DbError, match="ordinal 3 applied after 1"):
        db.apply(3, act(1, 2, STRICT, b""))


def test_exactly_once_per_client_seq():
    db = Db()
    up = encode_update(COMMUTATIVE, b"n", 4)
    assert db.apply(1, act(1, 1, COMMUTATIVE, up, client=9, seq=1)) == (True, 1)
    # the same request resubmitted through another replica: ordered, not applied again
    assert db.apply(2, act(2, 1, COMMUTATIVE, up, client=9, seq=1)) == (False, 1)
    assert db.apply(3, act(2, 2, COMMUTATIVE, up, client=9, seq=2)) == (True, 3)
    assert db.apply(4, act(1, 2, COMMUTATIVE, up, client=9, seq=1)) == (False, 0)
    assert read(db, b"n")["counter"] == 8
    assert (db.applied, db.duplicates, db.ordinal) == (2, 2, 4)


def test_commutative_and_timestamp_updates_do_not_depend_on_order():
    rng = random.Random(3)
    acts, total = [], 0
    for i in range(1, 40):
        if i % 2:
            delta = rng.randint(-5, 9)
            total += delta
            acts.append(act(1 + i % 3, i, COMMUTATIVE,
                            encode_update(COMMUTATIVE, b"c", delta), client=i))
        else:
            acts.append(act(1 + i % 3, i, TIMESTAMP,
                            encode_update(TIMESTAMP, b"t", b"x%d" % i, ts=rng.randint(1, 6)),
                            client=i))
    digests = set()
    for _ in range(5):
        rng.shuffle(acts)
        db = Db()
        for x in acts:
            db.apply_tentative(x)
        digests.add(db.state_digest())
    assert len(digests) == 1
    assert read(db, b"c")["counter"] == total
    newest = max((x for x in acts if x.semantics == TIMESTAMP),
                 key=lambda x: (int.from_bytes(x.payload[3:11], "big"), x.creator, x.index))
    assert read(db, b"t")["ts_value"] == newest.payload[11:].hex()


def test_opaque_payload_takes_an_ordinal_and_changes_nothing():
    db = Db()
    db.apply(1, act(1, 1, COMMUTATIVE, b"\x00\x05ab"))     # key runs past the end
    db.apply(2, act(1, 2, STRICT, b"x" * 200))             # the load generator's bytes
    assert db.ordinal == 2 and db.applied == 2
    assert db.state_digest() == Db().state_digest()


def test_snapshot_restore_round_trip():
    db = Db()
    db.apply(1, act(1, 1, STRICT, encode_update(STRICT, b"a", b"\x00\xff")))
    db.apply(2, act(1, 2, COMMUTATIVE, encode_update(COMMUTATIVE, b"c", -3)))
    db.apply(3, act(2, 1, TIMESTAMP, encode_update(TIMESTAMP, b"t", b"v", ts=7), client=6))
    snap = db.snapshot()
    back = Db.restore(snap)
    assert back.snapshot() == snap
    assert back.hexdigest() == db.hexdigest() and back.state_digest() == db.state_digest()
    nxt = act(1, 3, STRICT, encode_update(STRICT, b"a", b"z"), seq=3)
    db.apply(4, nxt)
    back.apply(4, nxt)
    assert back.hexdigest() == db.hexdigest()
    # the exactly-once table travels with the data
    assert back.apply(5, act(3, 1, STRICT, b"", client=6, seq=1)) == (False, 3)


def test_bad_snapshot_is_one_line_error():
    with pytest.raises(DbError, match="^bad database snapshot") as e:
        Db.restore(b'{"kv": []}')
    assert "\n" not in str(e.value)
