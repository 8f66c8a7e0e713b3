"""The overlay's wire formats (golden datagrams), authentication and replay protection, the
link-state database and Dijkstra (against networkx), and the selective-repeat, receive-window
and reorder logic, without sockets; then a real daemon object on loopback fed bad datagrams.
No root needed."""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import struct
import time

import networkx as nx
import pytest

from testbed.overlay import wire
from testbed.overlay.daemon import Daemon, main, parse_args
from testbed.overlay.linkstate import COSTS, LinkStateDB, link_weight, shortest_paths
from testbed.overlay.reliable import ReceiveWindow, ReorderBuffer, RttEstimator, SRSender

KEY = bytes(range(32))


def h(t, sender=3, nonce=16, ts=0x12345678, inc=5, peer_inc=7):
    return wire.Header(t, sender, nonce, ts, inc, peer_inc)


def sign(msg: bytes, key: bytes = KEY) -> bytes:
    """An independent HMAC (hmac.new, not wire.tag)."""
    return msg + hmac.new(key, msg, hashlib.sha256).digest()[:16]


# golden datagrams -------------------------------------------------------------------------------

# version 1, inc 5, peer_inc 7, sender 3, nonce 16, ts 0x12345678; the type goes between
HDR_REST = "05" "07" "0003" "0000000000000010" "12345678"
HELLO_HEX = "01" "01" + HDR_REST + "0102" "deadbeef"  # seq, digest


def header_hex(t: int) -> str:
    return "01" + f"{t:02x}" + HDR_REST


def test_golden_hello():
    data = wire.encode(wire.Hello(0x0102, 0xDEADBEEF), h(wire.HELLO), KEY)
    assert data == sign(bytes.fromhex(HELLO_HEX))
    assert len(data) == 40  # small: 18 header + 6 body + 16 tag
    # the tag pinned too, so the algorithm cannot drift unnoticed
    assert data[-16:].hex() == hmac.new(KEY, bytes.fromhex(HELLO_HEX),
                                        hashlib.sha256).hexdigest()[:32]
    hdr, msg = wire.decode(data, KEY)
    assert hdr == h(wire.HELLO)
    assert msg == wire.Hello(0x0102, 0xDEADBEEF)


def test_golden_hello_ack():
    body = "0102" "abcdef01" "0064"  # seq, echo, rx_loss 100 = 1 %
    data = wire.encode(wire.HelloAck(0x0102, 0xABCDEF01, 100), h(wire.HELLO_ACK), KEY)
    assert data == sign(bytes.fromhex(header_hex(wire.HELLO_ACK) + body))
    assert wire.decode(data, KEY)[1].rx_loss == 100


def test_golden_link_state():
    lsa = wire.Lsa(2, 0x0102030405060708, 9, (wire.LsaLink(1, 10000, 0),
                                              wire.LsaLink(3, 5000, 250)))
    body = ("01"  # one LSA
            "0002" "0102030405060708" "0009" "0002"  # origin, seq, age, nlinks
            "0001" "00002710" "0000"  # neighbour 1, 10 ms, no loss
            "0003" "00001388" "00fa")  # neighbour 3, 5 ms, 2.5 %
    data = wire.encode(wire.LinkState((lsa,)), h(wire.LINK_STATE), KEY)
    assert data[wire.HEADER_LEN:-16].hex() == body
    assert wire.decode(data, KEY)[1] == wire.LinkState((lsa,))


def test_golden_data():
    r = wire.Routed(src=1, dst=6, sport=9, dport=10, ttl=64, proto=wire.RELIABLE, stamp=3,
                    kind=wire.KIND_SESSION, link_seq=0x01020304, budget_ms=0)
    msg = wire.Data(r, session=0xAABBCCDD, seq=5, wnd=40, ts=0x11223344, payload=b"hi")
    body = ("0001" "0006" "0009" "000a" "40" "01" "03" "01" "01020304" "0000"
            "aabbccdd" "00000005" "0028" "11223344" "6869")
    data = wire.encode(msg, h(wire.DATA), KEY)
    assert data[wire.HEADER_LEN:-16].hex() == body
    assert len(data) == wire.DATA_OVERHEAD + 2
    assert wire.decode(data, KEY)[1] == msg
    # the offsets the daemon rewrites in place
    b = bytearray(bytes.fromhex(body))
    assert b[wire.OFF_TTL] == 64 and b[wire.OFF_PROTO] == 1 and b[wire.OFF_STAMP] == 3
    assert wire.LINK_SEQ.unpack_from(b, wire.OFF_LINK_SEQ)[0] == 0x01020304


def test_golden_acks():
    ack = wire.LinkAck(wire.RELIABLE, 100, 0x01020304, bytes([0b101]))
    data = wire.encode(ack, h(wire.LINK_ACK), KEY)
    assert data[wire.HEADER_LEN:-16].hex() == "01" "00000064" "01020304" "0001" "05"
    assert wire.decode(data, KEY)[1] == ack
    assert wire.acked_seqs(100, ack.bitmap) == [101, 103]
    r = wire.Routed(6, 1, 10, 9, kind=wire.KIND_SESSION)
    e2e = wire.E2eAck(r, 0xAABBCCDD, 7, 9, wire.ACK_CONGESTED, b"\x80")
    data = wire.encode(e2e, h(wire.E2E_ACK), KEY)
    assert data[wire.HEADER_LEN + wire.ROUTED.size:-16].hex() == \
        "aabbccdd" "00000007" "00000009" "01" "0001" "80"
    assert wire.decode(data, KEY)[1] == e2e


def test_max_payload_fits_one_datagram():
    r = wire.Routed(1, 2, 3, 4)
    data = wire.encode(wire.Data(r, payload=b"x" * wire.MAX_PAYLOAD), h(wire.DATA), KEY)
    assert len(data) == wire.MAX_MESSAGE
    with pytest.raises(ValueError):
        wire.encode(wire.Data(r, payload=b"x" * (wire.MAX_PAYLOAD + 1)), h(wire.DATA), KEY)


def test_link_states_split_across_datagrams():
    lsas = [wire.Lsa(o, 1, 0, tuple(wire.LsaLink(n, 100, 0) for n in range(60)))
            for o in range(1, 11)]
    bodies = wire.pack_link_states(lsas)
    assert len(bodies) > 1
    back = [a for b in bodies for a in wire.LinkState.unpack(memoryview(b)).lsas]
    assert back == lsas
    for b in bodies:
        assert len(b) + wire.HEADER_LEN + wire.TAG_LEN <= wire.MAX_MESSAGE


# rejection ----------------------------------------------------------------------------------------

def _reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(wire.WireError) as e:
        wire.decode(data, key)
    return e.value.reason


def test_bad_hmac_wrong_key_and_tampering():
    good = wire.encode(wire.Hello(1, 2), h(wire.HELLO), KEY)
    assert _reason(good, key=b"k" * 32) == "bad_hmac"
    for i in (0 + 4, wire.HEADER_LEN, len(good) - 1):  # header, body, tag
        bad = bytearray(good)
        bad[i] ^= 1
        assert _reason(bytes(bad)) == "bad_hmac"


def test_truncated_oversized_version_type_malformed():
    good = wire.encode(wire.Hello(1, 2), h(wire.HELLO), KEY)
    assert _reason(good[:20]) == "truncated"
    assert _reason(b"") == "truncated"
    assert _reason(good + b"\0" * wire.MAX_MESSAGE) == "oversized"
    v2 = bytearray(bytes.fromhex(HELLO_HEX))
    v2[0] = 2
    assert _reason(sign(bytes(v2))) == "bad_version"
    t99 = bytearray(bytes.fromhex(HELLO_HEX))
    t99[1] = 99
    assert _reason(sign(bytes(t99))) == "unknown_type"
    # a correctly signed hello whose body is one byte short
    assert _reason(sign(bytes.fromhex(HELLO_HEX)[:-1])) == "malformed"
    # a link state that claims more links than it carries
    ls = bytes.fromhex(header_hex(wire.LINK_STATE)) + bytes.fromhex(
        "01" "0002" "0000000000000001" "0000" "0005" "0001" "00002710" "0000")
    assert _reason(sign(ls)) == "malformed"
    # a link ack whose bitmap length disagrees with the datagram
    la = bytes.fromhex(header_hex(wire.LINK_ACK) + "01" "00000000" "00000000"
                       "0004" "ff")
    assert _reason(sign(la)) == "malformed"


def test_replay_window():
    w = wire.ReplayWindow(size=64)
    assert w.accept(1000)
    assert not w.accept(1000)  # the same again
    assert w.accept(1002) and w.accept(1001)  # reordered within the window: fine
    assert not w.accept(1001)
    assert w.accept(1100)
    assert not w.accept(1100 - 64)  # fell out of the window
    assert w.accept(1100 - 63)
    assert not w.accept(5)
    assert w.accept(10**15)  # a restarted sender's nonces start at its start time in us


# link state and routes ----------------------------------------------------------------------------

def _random_db(rng: random.Random, n: int, p: float) -> tuple:
    g = nx.gnp_random_graph(n, p, seed=rng.randrange(1 << 30))
    delay = {}
    for u, v in g.edges:
        delay[(u, v)] = rng.randrange(100, 50000)
        delay[(v, u)] = rng.randrange(100, 50000)  # each end measures its own direction
    loss = {e: rng.choice([0, 0, 100, 500, 2000]) for e in delay}
    db = LinkStateDB()
    for u in g.nodes:
        links = tuple(wire.LsaLink(v + 1, delay[(u, v)], loss[(u, v)]) for v in g.neighbors(u))
        db.install(wire.Lsa(u + 1, 1, 0, links), now=0.0)
    return g, delay, loss, db


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("cost", COSTS)
def test_dijkstra_matches_networkx(seed, cost):
    rng = random.Random(seed)
    g, delay, loss, db = _random_db(rng, rng.randrange(4, 30), rng.choice([0.1, 0.2, 0.4]))
    d = nx.DiGraph()
    d.add_nodes_from(u + 1 for u in g.nodes)
    for (u, v), dl in delay.items():
        d.add_edge(u + 1, v + 1, weight=link_weight(cost, dl, loss[(u, v)]))
    graph = db.graph(cost)
    for src in list(d.nodes)[:6]:
        routes = shortest_paths(graph, src)
        want = nx.single_source_dijkstra_path_length(d, src)
        assert set(routes) == set(want) - {src}
        for dst, r in routes.items():
            assert r.cost == want[dst], (src, dst)
            assert r.path[0] == src and r.path[-1] == dst and r.next_hop == r.path[1]
            assert sum(d[a][b]["weight"] for a, b in zip(r.path, r.path[1:])) == r.cost


def test_one_sided_links_are_not_used_and_newer_lsas_win():
    db = LinkStateDB()
    db.install(wire.Lsa(1, 5, 0, (wire.LsaLink(2, 100, 0), wire.LsaLink(3, 100, 0))), 0.0)
    db.install(wire.Lsa(2, 5, 0, (wire.LsaLink(1, 100, 0),)), 0.0)
    db.install(wire.Lsa(3, 5, 0, ()), 0.0)  # 3 no longer lists 1 (a dead link, or node)
    assert shortest_paths(db.graph("hops"), 1) == {2: (1, 2, (1, 2))}
    d0 = db.digest
    assert not db.install(wire.Lsa(3, 4, 0, (wire.LsaLink(1, 1, 0),)), 0.0)  # older: ignored
    assert db.digest == d0
    assert db.install(wire.Lsa(3, 6, 0, (wire.LsaLink(1, 1, 0),)), 0.0)
    assert db.digest != d0
    assert shortest_paths(db.graph("hops"), 1)[3].path == (1, 3)


def test_lsas_age_out_with_the_age_they_carry():
    db = LinkStateDB(max_age_s=60)
    assert not db.install(wire.Lsa(4, 1, 60, ()), now=0.0)  # arrived too old
    db.install(wire.Lsa(4, 1, 50, ()), now=100.0)
    db.install(wire.Lsa(5, 1, 0, ()), now=100.0)
    assert db.current(105.0, [4])[0].age_s == 55
    assert db.expire(109.0) == []
    assert db.expire(110.0) == [4]
    assert db.get(4) is None and db.get(5) is not None
    same = LinkStateDB()
    same.install(wire.Lsa(5, 1, 0, ()), now=0.0)
    assert same.digest == db.digest  # equal databases, equal digests


def test_link_weights():
    assert link_weight("hops", 123456, 5000) == 1
    assert link_weight("latency", 10000, 5000) == 100  # 10 ms in 100 us units
    assert link_weight("latency", 1, 0) == 1  # never zero
    assert link_weight("expected", 10000, 0) == 100
    assert link_weight("expected", 10000, 1000) == round(100 * 1.1 / 0.9)


# selective repeat ---------------------------------------------------------------------------------

def run_link(sender: SRSender, n: int, loss: float, seed: int, rtt_steps: int = 4,
             reorder_free: bool = True) -> tuple:
    """Push n items through a simulated lossy FIFO channel (one step = 1 ms); returns
    (items delivered in arrival order, steps taken, duplicates the receiver refused)."""
    rng = random.Random(seed)
    rx = ReceiveWindow()
    to_rx: list = []  # (arrival step, seq)
    to_tx: list = []  # (arrival step, cum, bits)
    delivered, queue = [], list(range(n))
    step = 0
    while len(delivered) < n:
        step += 1
        now = step / 1000
        assert step < 200000, "stuck"
        while sender.can_retransmit():
            seq = sender.next_lost()
            sender.transmitted(seq, now)
            if rng.random() >= loss:
                to_rx.append((step + rtt_steps // 2, seq))
        while queue and sender.can_send():
            seq = sender.new(queue.pop(0))
            sender.transmitted(seq, now)
            if rng.random() >= loss:
                to_rx.append((step + rtt_steps // 2, seq))
        got = [s for t, s in to_rx if t <= step]
        to_rx = [(t, s) for t, s in to_rx if t > step]
        for s in got:
            if rx.receive(s):
                delivered.append(s)
        if got and rng.random() >= loss:
            cum, bitmap = rx.ack()
            to_tx.append((step + rtt_steps // 2, cum, wire.bytes_to_bits(bitmap)))
        for _t, cum, bits in [a for a in to_tx if a[0] <= step]:
            sender.on_ack(cum, bits, now, rtt=rtt_steps / 1000)
        to_tx = [a for a in to_tx if a[0] > step]
        dl = sender.deadline()
        if dl is not None and now >= dl:
            sender.on_timeout(now)
    return delivered, step, rx.dups


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("seed", [1, 2])
def test_selective_repeat_delivers_everything_exactly_once(loss, seed):
    s = SRSender(cc=True, window=256, dupthresh=1,
                 rtt=RttEstimator(init_rto=0.05, min_rto=0.01, max_rto=0.5))
    delivered, steps, _ = run_link(s, 3000, loss, seed)
    assert sorted(delivered) == list(range(3000))  # every item once (receive() said new)
    assert s.outstanding == 0 or all(x in delivered for x in s.entries)
    if loss:
        assert s.retransmitted > 0 and s.losses > 0
        assert s.cwnd < 256  # the window reacted
    else:
        assert s.retransmitted == 0
        assert delivered == list(range(3000))  # no loss on a FIFO channel: in order


def test_fast_retransmit_on_a_sack_gap_and_one_reduction_per_window():
    s = SRSender(cc=True, window=1024, init_cwnd=20, dupthresh=1)
    for i in range(20):
        s.transmitted(s.new(i), 0.0)
    # 3 and 4 lost: the receiver's cum stays at 3, it has 5..9
    bits = sum(1 << (x - 4) for x in range(5, 10))
    s.on_ack(3, bits, 0.01, rtt=0.01)
    assert list(s.lost) == [3, 4]  # both detected at once
    assert s.reductions == 1
    cwnd = s.cwnd
    assert cwnd < 20
    s.on_ack(3, bits | (1 << (12 - 4)), 0.011)  # 12 arrived, so 10 and 11 were lost too,
    assert list(s.lost) == [3, 4, 10, 11]  # but in the same window: no new reduction
    assert s.reductions == 1 and s.cwnd == cwnd
    assert s.next_lost() == 3 and s.can_retransmit()
    for seq in (3, 4, 10, 11):
        s.transmitted(seq, 0.02)
    assert not s.lost
    s.on_ack(20, 0, 0.03, rtt=0.01)  # everything
    assert s.outstanding == 0 and s.una == 20
    assert s.retransmitted == 4


def test_slow_start_then_timeout_backs_off():
    s = SRSender(cc=True, window=1024, init_cwnd=2, rtt=RttEstimator(0.1, 0.05, 1.0))
    s.ssthresh = 8
    for r in range(4):  # four round trips of a full window, all acked
        n = int(s.cwnd)
        for _ in range(n):
            s.transmitted(s.new(None), r * 0.01)
        s.on_ack(s.next_seq, 0, r * 0.01 + 0.005, rtt=0.005)
    assert 8 <= s.cwnd < 10  # doubled to ssthresh, then about +1 per window
    s.transmitted(s.new(None), 1.0)
    rto = s.rtt.rto
    assert s.deadline() == pytest.approx(1.0 + rto)
    assert s.on_timeout(1.0 + rto / 2) == 0
    cwnd = s.cwnd
    assert s.on_timeout(1.0 + rto) == 1  # a first timeout: halve, as for a lost tail
    assert s.cwnd == pytest.approx(cwnd / 2) and s.timeouts == 1
    assert s.rtt.rto == pytest.approx(2 * rto)  # backed off
    s.transmitted(s.next_lost(), 1.0 + rto)  # resent
    assert s.on_timeout(1.0 + 3.5 * rto) == 1  # again, nothing acked between: cwnd 1
    assert s.cwnd == 1 and s.timeouts == 2 and s.rtt.rto == pytest.approx(4 * rto)
    s.rtt.sample(0.005)
    assert s.rtt.backoff == 1


def test_timeouts_not_congestion_keep_the_window():
    """A session over reliable links: timeouts resend and back off, the window stays
    (nothing is lost there; a timeout means a slow path); stamps still reduce it."""
    s = SRSender(cc=True, window=1024, init_cwnd=16, timeout_is_congestion=False,
                 rtt=RttEstimator(0.1, 0.05, 1.0))
    for _ in range(16):
        s.transmitted(s.new(None), 0.0)
    rto = s.rtt.rto
    assert s.on_timeout(rto) == 16
    assert s.cwnd == 16 and s.timeouts == 1 and s.rtt.rto == pytest.approx(2 * rto)
    while s.can_retransmit():
        s.transmitted(s.next_lost(), rto)
    assert s.on_timeout(rto + 2 * rto) == 16  # again, nothing acked between
    assert s.cwnd == 16 and s.timeouts == 2 and s.retransmitted == 16
    assert s.congestion() and s.cwnd == pytest.approx(8)  # a stamp still halves it


def test_window_limit_and_congestion_signal():
    s = SRSender(cc=True, window=8, init_cwnd=100)
    sent = 0
    while s.can_send():
        s.transmitted(s.new(sent), 0.0)
        sent += 1
    assert sent == 8  # the receiver's window, not the congestion window, limits
    s.on_ack(2, 0, 0.01)
    assert s.can_send()
    s.cwnd = 20.0
    assert s.congestion() and s.cwnd == 10.0
    assert not s.congestion()  # once per window: nothing sent after the reduction acked yet
    s.transmitted(s.new(0), 0.02)
    s.on_ack(s.next_seq, 0, 0.03)
    assert s.congestion()


def test_take_all_hands_back_in_order():
    s = SRSender(window=64)
    for i in range(5):
        s.transmitted(s.new(f"m{i}"), 0.0)
    s.on_ack(0, 0b10, 0.01)  # seq 2 acked
    assert s.take_all() == ["m0", "m1", "m3", "m4"]
    assert s.outstanding == 0 and s.next_seq == 0 and not s.flight


# receive window, reorder buffer -------------------------------------------------------------------

def test_receive_window_bitmap_and_duplicates():
    w = ReceiveWindow(limit=64)
    assert w.receive(0) and w.receive(2) and w.receive(5)
    assert not w.receive(2)
    cum, bitmap = w.ack()
    assert cum == 1 and wire.acked_seqs(cum, bitmap) == [2, 5]
    assert w.receive(1)
    assert w.ack() == (3, wire.bits_to_bytes(1 << 1))  # 5 is cum + 2
    assert not w.receive(3 + 64)  # beyond the window (reliable: refuse)
    assert w.beyond == 1


def test_receive_window_slides_past_abandoned_holes():
    w = ReceiveWindow(limit=16, slide=True)
    assert w.receive(0)
    assert w.receive(40)  # 1..24 are forgotten, the window now ends at 40
    assert w.cum == 25 and w.skipped == 24
    assert not w.receive(3)  # behind the window: a late duplicate, refused
    assert w.receive(25) and w.cum == 26


def test_reorder_buffer_in_order_exactly_once():
    rng = random.Random(5)
    order = list(range(500)) + rng.sample(range(500), 200)  # with duplicates
    rng.shuffle(order)
    buf, out = ReorderBuffer(limit=1000), []
    for seq in order:
        status, ready = buf.push(seq, seq)
        out += ready
        cum, bitmap = buf.ack()
        assert cum == buf.expected
        assert set(wire.acked_seqs(cum, bitmap)) == {s for s in buf.buf if s < cum + 1 + 2048}
    assert out == list(range(500))
    assert buf.dups == 200 and buf.buffered == 0


def test_reorder_buffer_refuses_beyond_its_limit():
    buf = ReorderBuffer(limit=10)
    assert buf.push(10, b"x")[0] == ReorderBuffer.FULL
    assert buf.push(9, b"x")[0] == ReorderBuffer.NEW


# the daemon: bad datagrams are counted, never raised ----------------------------------------------

@pytest.fixture
def daemon(tmp_path):
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    d = Daemon(1, ("127.0.0.1", 0), {2: peer.getsockname()}, KEY, str(tmp_path / "ctl"),
               hello_ms=100)
    yield d, peer
    d.close()
    peer.close()


def test_daemon_drops_and_counts_bad_datagrams(daemon):
    d, peer = daemon
    addr = d.sock.getsockname()

    def hello(sender=2, nonce=100, key=KEY, version=1, typ=wire.HELLO, body=None):
        msg = struct.pack("!BBBBHQI", version, typ, 0, 0, sender, nonce, 0)
        msg += body if body is not None else struct.pack("!HI", 1, 0)
        return msg + hmac.new(key, msg, hashlib.sha256).digest()[:16]

    sends = {
        "bad_hmac": [hello(key=b"x" * 32), hello()[:-1] + b"\0"],
        "truncated": [b"", b"\x01\x01\x00"],
        "oversized": [hello() + b"\0" * 1500],
        "bad_version": [hello(version=9)],
        "unknown_type": [hello(typ=42)],
        "unknown_sender": [hello(sender=7)],
        "malformed": [hello(nonce=200, body=b"\0"),
                      hello(nonce=201, typ=wire.LINK_STATE, body=b"\x05\x00")],
        "replay": [],
    }
    good = hello(nonce=5000)
    for datagrams in sends.values():
        for data in datagrams:
            peer.sendto(data, addr)
    peer.sendto(good, addr)
    peer.sendto(good, addr)  # replayed
    peer.sendto(hello(nonce=4999), addr)  # reordered within the window: accepted
    peer.sendto(hello(nonce=5000 - 1024), addr)  # older than the window
    total = sum(len(v) for v in sends.values()) + 4
    got = 0
    for _ in range(50):
        d.on_udp(0)  # must not raise
        got = d.c["rx"]
        if got >= total:
            break
        time.sleep(0.01)
    assert got == total
    for reason, datagrams in sends.items():
        assert d.drops[reason] == (len(datagrams) if reason != "replay" else 2), reason
    assert d.c["internal_errors"] == 0
    nb = d.neighbours[2]
    assert nb.c["hellos_rx"] == 2  # the good hello once, and the reordered one
    # it was answered with a hello ack, signed with our key
    peer.settimeout(2)
    data = peer.recv(2048)
    hdr, msg = wire.decode(data, KEY)
    assert hdr.type == wire.HELLO_ACK and hdr.sender == 1 and msg.seq == 1


def test_daemon_arguments_are_checked_before_anything(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text(KEY.hex())
    base = ["--id", "1", "--listen", "127.0.0.1:9000", "--key-file", str(key),
            "--control", str(tmp_path / "sock")]
    assert parse_args(base)["key"] == KEY
    for extra, msg in [
        (["--neighbour", "1=127.0.0.1:9001"], "own neighbour"),
        (["--neighbour", "2=nowhere:9001"], "bad --neighbour address"),
        (["--neighbour", "2=127.0.0.1:9001", "--neighbour", "2=127.0.0.1:9002"], "twice"),
        (["--cost", "cheapest"], "--cost must be one of"),
        (["--hello-ms", "1"], "--hello-ms must be"),
        (["--dead-hellos", "1"], "--dead-hellos must be"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    key.write_text("zz")
    assert main(base) == 2
    assert "hex" in capsys.readouterr().err
    assert not (tmp_path / "sock").exists()  # nothing was created


def test_daemon_process_ready_file_and_clean_stop(tmp_path):
    """The daemon as a process: the ready file (JSON, its pid) appears once it serves;
    SIGTERM ends it with status 0 and removes the ready file and the control socket."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from testbed.poll import wait_until

    key = tmp_path / "key"
    key.write_text(KEY.hex())
    ready, ctl = tmp_path / "ready", tmp_path / "sock"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "testbed.overlay", "--id", "1", "--listen",
                          f"127.0.0.1:{port}", "--key-file", str(key), "--control", str(ctl),
                          "--ready-file", str(ready), "--neighbour", "2=127.0.0.1:9"],
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_until(ready.exists, 20, "overlay ready file",
                   abort=lambda: p.poll() is not None and "the daemon exited")
        info = json.loads(ready.read_text())
        assert info["pid"] == p.pid and info["id"] == 1 and ctl.exists()
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert not ready.exists() and not ctl.exists()
