"""Wire formats of testbed.failover: golden encodings of every message, decoding, and the
checks that drop forged, malformed, stale and replayed datagrams."""

from __future__ import annotations

import pytest

from testbed.failover import wire as w

KEY = b"golden-key-0123456789abcdef!!!!!"
INC = 0x0102030405060708
V = w.View(7, 2, (2, 3, 5), INC)
# header of every golden message: sender 3, incarnation 1.7e15 us, seq 42, sent 123456 us later
HDR = "574b01{t:02x}0003000000060a24181e40000000002a00060a2418202240"
VIEW = "00000007" "0002" "0102030405060708" "03" "000200030005"

GOLDEN = [
    (w.Heartbeat(V, True, True), VIEW + "03", "07d7b54969383779829467935d16e2d3"),
    (w.Propose(V), VIEW, "33a1c96a5e5f26a6d942ee0401736006"),
    (w.Ack(7, 2, INC), "00000007" "0002" "0102030405060708",
     "a4491f6c51be775c6afb30c3e285ff08"),
    (w.Install(V), VIEW, "6473295126d43e7c2bbcbbd0f2d83b2f"),
    (w.Leave(V), VIEW, "8117655253962974a405a9eeaec1cd4a"),
    (w.State(7, 2, ("10.100.0.101", "10.100.0.110"), True, 3, INC),
     "00000007" "0002" "0102030405060708" "01" "03" "0002" "0a640065" "0a64006e",
     "ca947ad69d2d45e4379e935151216cb2"),
    (w.Balance(7, 2, 4, (("10.100.0.101", 3), ("10.100.0.102", 5)), INC),
     "00000007" "0002" "0102030405060708" "00000004" "0002" "0a640065" "0003" "0a640066" "0005",
     "9e8d29d4468a056b0576716379986e2b"),
    (w.Released(7, 2, 4, ("10.100.0.102",), INC),
     "00000007" "0002" "0102030405060708" "00000004" "0001" "0a640066",
     "bf346f1f88f359ec066a97af63ddda03"),
    (w.ArpShare((("10.100.0.1", "02:aa:bb:cc:dd:ee"),)), "0001" "0a640001" "02aabbccddee",
     "b46ce36e59caa474ded90ec4fbf8c0c0"),
    (w.Drain(7, 2, INC), "00000007" "0002" "0102030405060708", "07222dc1e89d30a8cb3aac9087ba34c1"),
]


def header(mtype: int, seq: int = 42, sender: int = 3) -> w.Header:
    return w.Header(mtype, sender, 1_700_000_000_000_000, seq, 1_700_000_000_123_456)


@pytest.mark.parametrize("msg,body,tag", GOLDEN, ids=[type(g[0]).__name__ for g in GOLDEN])
def test_golden_encoding_and_decoding(msg, body, tag):
    data = w.encode(KEY, header(msg.type), msg)
    assert data.hex() == HDR.format(t=msg.type) + body + tag
    assert len(data) == w.HEADER_LEN + len(body) // 2 + w.TAG_LEN
    hdr, back = w.decode(KEY, data)
    assert back == msg
    assert (hdr.type, hdr.sender, hdr.seq, hdr.inc) == (msg.type, 3, 42, 1_700_000_000_000_000)
    to5 = w.encode(KEY, w.Header(msg.type, 3, 1_700_000_000_000_000, 42, 1, dest=5), msg)
    assert to5[6:8] == b"\x00\x05" and w.decode(KEY, to5)[0].dest == 5


def test_view_order_and_identity():
    a, b = w.View(5, 1, (1, 2)), w.View(5, 2, (2, 3))
    assert b.key < a.key  # same number: the lower coordinator wins
    assert w.View(6, 9, (9,)).key > a.key
    assert w.View(5, 1, (1,), inc=2).key > w.View(5, 1, (1, 2), inc=1).key  # a restart
    assert w.NO_KEY < w.View(0, 65535, (1,)).key


def test_forged_truncated_and_malformed_datagrams_are_refused():
    good = w.encode(KEY, header(w.HEARTBEAT), w.Heartbeat(V))
    with pytest.raises(w.WireError) as e:
        w.decode(b"another key, same length!!!!!!!!", good)
    assert e.value.reason == "bad_hmac"
    flipped = bytearray(good)
    flipped[w.HEADER_LEN] ^= 1  # one bit of the body
    with pytest.raises(w.WireError) as e:
        w.decode(KEY, bytes(flipped))
    assert e.value.reason == "bad_hmac"
    for data, reason in ((good[:20], "truncated"), (b"\0" * 1500, "oversized"),
                         (b"\x57\x4c" + good[2:], "bad_magic"),
                         (good[:2] + b"\x09" + good[3:], "bad_version")):
        with pytest.raises(w.WireError) as e:
            w.decode(KEY, data)
        assert e.value.reason == reason
    # authenticated but nonsense: members out of order, a body cut short, an unknown type
    bad_view = w.View(1, 1, (3, 2))
    raw = w.Header(w.PROPOSE, 3, 1, 1, 2).pack() + bad_view.pack()
    with pytest.raises(w.WireError) as e:
        w.decode(KEY, raw + w.tag(KEY, raw))
    assert e.value.reason == "malformed"
    raw = w.Header(w.STATE, 3, 1, 1, 2).pack() + w.State(1, 1, ("10.0.0.1",)).pack()[:-2]
    with pytest.raises(w.WireError) as e:
        w.decode(KEY, raw + w.tag(KEY, raw))
    assert e.value.reason == "malformed"
    raw = w.Header(77, 3, 1, 1, 2).pack()
    with pytest.raises(w.WireError) as e:
        w.decode(KEY, raw + w.tag(KEY, raw))
    assert e.value.reason == "unknown_type"
    with pytest.raises(ValueError):
        w.encode(KEY, header(w.ACK), w.Heartbeat(V))  # header and message disagree


def test_replay_window():
    win = w.ReplayWindow(8)
    assert [win.accept(s) for s in (1, 2, 3)] == [True] * 3
    assert not win.accept(2)  # seen
    assert win.accept(10) and win.accept(5)  # out of order within the window
    assert not win.accept(5)
    assert not win.accept(2)  # below the window
    assert not win.accept(0)


def test_replay_guard_drops_replays_stale_and_old_incarnations():
    start = 1_000_000_000
    g = w.ReplayGuard(started_us=start, me=1, max_age_s=10)

    def h(seq, inc=start + 10, ts=start + 100, sender=2, dest=0):
        return w.Header(w.HEARTBEAT, sender, inc, seq, ts, dest)

    now = start + 200
    assert g.check(h(1), now) is None
    assert g.check(h(2), now) is None
    assert g.check(h(2), now) == "replay"
    assert g.check(h(1), now) == "replay"
    assert g.check(h(1, sender=3), now) is None  # windows are per sender
    assert g.check(h(5), now) is None
    # 3 and 4 were lost: replayed (captured elsewhere) they are refused all the same
    assert g.check(h(4), now) == "replay"
    # unicasts to me count apart (a unicast can be overtaken by a broadcast while the
    # sender resolves my MAC); a unicast for another member is refused whatever its seq
    assert g.check(h(1, dest=1), now) is None
    assert g.check(h(1, dest=1), now) == "replay"
    assert g.check(h(9, dest=3), now) == "misdirected"
    # sent before this receiver started: it cannot be meant for it (a captured message)
    assert g.check(h(6, ts=start - 1), now) == "stale"
    assert g.check(h(6, ts=now - 11_000_000), now) == "stale"
    assert g.check(h(6, ts=now + 11_000_000), now + 0) == "stale"
    # a restart (newer incarnation) starts a new window; the old incarnation is dead
    assert g.check(h(1, inc=start + 150, ts=start + 160), now) is None
    assert g.check(h(6), now) == "replay"
    assert g.check(h(0, inc=start + 170, ts=start + 180), now) == "replay"
    # with a window, late datagrams within it are still taken once (not used by default)
    gw = w.ReplayGuard(started_us=start, me=1, window=64)
    assert [gw.check(h(q), now) for q in (1, 3, 2, 2)] == [None, None, None, "replay"]


def test_a_full_arp_share_fits_one_datagram():
    entries = tuple((f"10.0.{i // 250}.{i % 250}", "02:00:00:00:00:01")
                    for i in range(w.MAX_ARP_ENTRIES))
    data = w.encode(KEY, header(w.ARP_SHARE), w.ArpShare(entries))
    assert len(data) <= w.MAX_MESSAGE
    assert w.decode(KEY, data)[1].entries == entries
    with pytest.raises(ValueError):
        more = entries + (("10.9.9.9", "02:00:00:00:00:02"),)
        w.encode(KEY, header(w.ARP_SHARE), w.ArpShare(more))
