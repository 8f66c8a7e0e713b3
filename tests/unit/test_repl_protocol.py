"""Client frames (testbed.replication.protocol): golden bytes, round trips, a stream split
anywhere, and one-line errors on malformed input."""

import pytest

from testbed.replication import protocol as p


def test_golden_request_bytes():
    req = p.Request(7, 9, p.UPDATE, p.STRICT, b"ab")
    raw = p.encode_request(req)
    assert raw == (bytes.fromhex("00000015" "01" "0000000000000007" "0000000000000009"
                                 "01" "01") + b"ab")
    assert p.decode(raw) == req


def test_golden_reply_bytes():
    rep = p.Reply(9, p.OK, 42, "", b"r")
    raw = p.encode_reply(rep)
    assert raw == bytes.fromhex("00000015" "02" "0000000000000009" "00" "000000000000002a"
                                "0000") + b"r"
    assert p.decode(raw) == rep
    err = p.error_reply(3, "not in a\nprimary component")
    assert err.reason == "not in a primary component"
    assert p.decode(p.encode_reply(err)) == err and not err.ok


def test_stream_split_anywhere():
    msgs = [p.Request(1, i, p.QUERY if i % 2 else p.UPDATE,
                      p.WEAK if i % 2 else p.COMMUTATIVE, bytes(range(i))) for i in range(1, 6)]
    raw = b"".join(p.encode_request(m) for m in msgs)
    for cut in (1, 3, 7, len(raw) - 1):
        dec = p.Decoder()
        a, _ = dec.feed(raw[:cut])
        b, rest = dec.feed(raw[cut:])
        assert a + b == msgs and rest == 0


@pytest.mark.parametrize("raw, msg", [
    (bytes.fromhex("00000000"), "frame length 0"),
    (bytes.fromhex("7fffffff"), "out of range"),
    (bytes.fromhex("0000000109"), "unknown frame type 9"),
    (bytes.fromhex("0000000301abcd"), "shorter than its header"),
    (p.encode_request(p.Request(1, 1, p.UPDATE, p.STRICT, b""))[:-1] + b"\x09",
     "unknown semantics 9"),
    (bytes.fromhex("00000003" "01" "0000"), "shorter"),
])
def test_malformed_frames_are_one_line_errors(raw, msg):
    with pytest.raises(p.ProtocolError, match=msg) as e:
        p.Decoder().feed(raw)
    assert "\n" not in str(e.value)


def test_bad_fields_are_refused():
    with pytest.raises(p.ProtocolError, match="semantics 'weak'"):
        p.Request(1, 1, p.UPDATE, p.WEAK, b"")
    with pytest.raises(p.ProtocolError, match="client_seq"):
        p.Request(1, -1, p.UPDATE, p.STRICT, b"")
    with pytest.raises(p.ProtocolError, match="exactly one"):
        p.decode(p.encode_reply(p.Reply(1)) * 2)
