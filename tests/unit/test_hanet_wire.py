"""HANet's packet-transmission-agent messages: golden datagrams, authentication, rejection of
malformed, forged, replayed and stale messages. No root needed."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from testbed.failover import hanet_wire as wire

KEY = bytes(range(32))

# magic "HN", version 1, type, sender 2, flags 0, inc 0x0102030405060708, seq 9,
# ts_us 0x0000000a0b0c0d0e
HDR_REST = "0002" "0000" "0102030405060708" "00000009" "0000000a0b0c0d0e"


def header_hex(t: int) -> str:
    return "484e" "01" + f"{t:02x}" + HDR_REST


def hdr(t: int, seq: int = 9, inc: int = 0x0102030405060708, ts: int = 0x0A0B0C0D0E,
        sender: int = 2) -> wire.Header:
    return wire.Header(t, sender, inc, seq, ts)


def sign(msg: bytes, key: bytes = KEY) -> bytes:
    """An independent HMAC (hmac.new, not wire.tag)."""
    return msg + hmac.new(key, msg, hashlib.sha256).digest()[:16]


def test_golden_takeover():
    body = ("00000007"  # req
            "0a14000b"  # service 10.20.0.11
            "0a150101"  # via 10.21.1.1
            "000186a0"  # 100000 kbit/s
            "04" + b"priv".hex())
    msg = wire.Takeover(7, "10.20.0.11", "10.21.1.1", 100_000, "priv")
    data = wire.encode(KEY, hdr(wire.TAKEOVER), msg)
    assert data == sign(bytes.fromhex(header_hex(wire.TAKEOVER) + body))
    assert len(data) == 28 + 17 + 4 + 16
    assert data[-16:].hex() == hmac.new(KEY, data[:-16], hashlib.sha256).hexdigest()[:32]
    h, m = wire.decode(KEY, data)
    assert h == hdr(wire.TAKEOVER)
    assert m == msg


def test_golden_release_and_ack():
    data = wire.encode(KEY, hdr(wire.RELEASE), wire.Release(0xFFFFFFFF, "10.20.0.12"))
    assert data == sign(bytes.fromhex(header_hex(wire.RELEASE) + "ffffffff" "0a14000c"))
    assert wire.decode(KEY, data)[1] == wire.Release(0xFFFFFFFF, "10.20.0.12")

    ack = wire.Ack(7, wire.NO_PUBLIC, 1_700_000_000_000_001, 1_700_000_000_000_900)
    data = wire.encode(KEY, hdr(wire.ACK), ack)
    body = "00000007" "01" f"{1_700_000_000_000_001:016x}" f"{1_700_000_000_000_900:016x}"
    assert data == sign(bytes.fromhex(header_hex(wire.ACK) + body))
    assert wire.decode(KEY, data) == (hdr(wire.ACK), ack)
    assert wire.STATUS_NAMES[ack.status] == "no_public"


def test_every_message_round_trips_at_its_limits():
    for msg in (wire.Takeover(0, "0.0.0.0", "255.255.255.255", 0xFFFFFFFF, "a" * 15),
                wire.Takeover(1, "10.0.0.1", "10.0.0.2", 115, ""),
                wire.Release(0, "192.0.2.1"), wire.Ack(1, wire.REFUSED, 0, 2 ** 64 - 1)):
        data = wire.encode(KEY, hdr(msg.TYPE, seq=2 ** 32 - 1, inc=2 ** 64 - 1), msg)
        assert len(data) <= wire.MAX_MESSAGE
        h, m = wire.decode(KEY, data)
        assert m == msg and h.seq == 2 ** 32 - 1 and h.inc == 2 ** 64 - 1


def test_encode_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError):
        wire.encode(KEY, hdr(wire.TAKEOVER), wire.Takeover(1, "10.0.0.1", "10.0.0.2", 1,
                                                           "x" * 16))
    with pytest.raises(ValueError):  # header type and body disagree
        wire.encode(KEY, hdr(wire.ACK), wire.Release(1, "10.0.0.1"))


def reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(wire.WireError) as e:
        wire.decode(key, data)
    return e.value.reason


def test_forged_or_corrupted_messages_are_rejected():
    good = wire.encode(KEY, hdr(wire.TAKEOVER),
                       wire.Takeover(7, "10.20.0.11", "10.21.1.1", 100_000, "priv"))
    assert reason(good, key=bytes(32)) == "bad_hmac"  # a forger without the key
    for i in range(len(good)):  # any flipped bit anywhere
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert reason(bytes(bad)) in ("bad_hmac", "bad_magic", "bad_version")
    assert reason(good[:-1]) == "bad_hmac"
    assert reason(good[:wire.MIN_MESSAGE - 1]) == "truncated"
    assert reason(good + bytes(wire.MAX_MESSAGE)) == "oversized"
    # a correctly signed message that is wrong inside is still refused
    wrong_magic = sign(bytes.fromhex("4e48" + header_hex(wire.RELEASE)[4:]) + bytes(8))
    assert reason(wrong_magic) == "bad_magic"
    wrong_version = sign(bytes.fromhex("484e02" + header_hex(wire.RELEASE)[6:]) + bytes(8))
    assert reason(wrong_version) == "bad_version"
    assert reason(sign(bytes.fromhex(header_hex(9)) + bytes(8))) == "unknown_type"
    assert reason(sign(bytes.fromhex(header_hex(wire.RELEASE)) + bytes(7))) == "malformed"
    bad_name = bytes.fromhex(header_hex(wire.TAKEOVER)) + bytes(16) + b"\x05abc"
    assert reason(sign(bad_name)) == "malformed"  # name length says 5, 3 follow
    bad_status = bytes.fromhex(header_hex(wire.ACK)) + bytes(4) + b"\x09" + bytes(16)
    assert reason(sign(bad_status)) == "malformed"


def test_replay_guard_accepts_each_message_once():
    g = wire.ReplayGuard(started_us=1_000_000, max_age_s=5)
    now = 2_000_000
    a = hdr(wire.TAKEOVER, seq=10, inc=100, ts=now)
    g.check(a, now)
    with pytest.raises(wire.WireError, match="replay"):
        g.check(a, now)  # the same message again
    g.check(hdr(wire.TAKEOVER, seq=12, inc=100, ts=now), now)
    g.check(hdr(wire.TAKEOVER, seq=11, inc=100, ts=now), now)  # late but new
    with pytest.raises(wire.WireError, match="replay"):
        g.check(hdr(wire.TAKEOVER, seq=11, inc=100, ts=now), now)
    g.check(hdr(wire.TAKEOVER, seq=10_000, inc=100, ts=now), now)
    with pytest.raises(wire.WireError, match="replay"):  # far below the window
        g.check(hdr(wire.TAKEOVER, seq=13, inc=100, ts=now), now)
    # a restarted sender (newer incarnation) starts over; the old incarnation is dead
    g.check(hdr(wire.TAKEOVER, seq=1, inc=200, ts=now), now)
    with pytest.raises(wire.WireError, match="replay"):
        g.check(hdr(wire.TAKEOVER, seq=99_999, inc=100, ts=now), now)
    # senders are independent
    g.check(hdr(wire.TAKEOVER, seq=1, inc=100, ts=now, sender=3), now)


def test_replay_guard_refuses_stale_and_future_messages():
    g = wire.ReplayGuard(started_us=10_000_000, max_age_s=5)
    now = 20_000_000
    for ts in (9_999_999,  # sent before the receiver started: captured earlier
               now - 5_000_001,  # too old
               now + 5_000_001):  # from the future
        with pytest.raises(wire.WireError, match="stale"):
            g.check(hdr(wire.RELEASE, ts=ts), now)
    g.check(hdr(wire.RELEASE, ts=now - 4_000_000), now)
